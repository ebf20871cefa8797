// Command signal-kube runs the pieces of a Kubernetes control plane that signal-operator's tests start:
// upstream kube-apiserver, kube-controller-manager and kube-scheduler, an in-process etcd, and for a node
// the upstream kubelet.
//
// It is one multi-call binary so that the Kubernetes packages the components share compile and link once:
//
//	signal-kube etcd --data-dir DIR --listen-client-url URL --listen-peer-url URL
//	signal-kube apiserver [kube-apiserver flags]
//	signal-kube controller-manager [kube-controller-manager flags]
//	signal-kube scheduler [kube-scheduler flags]
//	signal-kube kubelet [kubelet flags]
//	signal-kube version
//
// The testkit (testkit/src/kube_cluster.rs and kube_node.rs) chooses every flag; this file only dispatches.
package main

import (
	"context"
	"fmt"
	"os"
	_ "time/tzdata" // CronJob time zones, as upstream's kube-apiserver and kube-controller-manager mains do

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as upstream's mains register it
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as upstream's mains register them
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric, as upstream's mains register it
	"k8s.io/component-base/version"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

const usage = `usage: signal-kube etcd|apiserver|controller-manager|scheduler|kubelet|version [flags]`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	subcommand, args := os.Args[1], os.Args[2:]
	switch subcommand {
	case "etcd":
		os.Exit(runEtcd(args))
	case "apiserver":
		command := apiserver.NewAPIServerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "controller-manager":
		command := controllermanager.NewControllerManagerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "scheduler":
		command := scheduler.NewSchedulerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "kubelet":
		command := kubelet.NewKubeletCommand(context.Background())
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "version":
		fmt.Println(version.Get().GitVersion)
	default:
		fmt.Fprintf(os.Stderr, "unknown subcommand %q\n%s\n", subcommand, usage)
		os.Exit(2)
	}
}

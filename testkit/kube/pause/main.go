// Command pause is the sandbox ("pause") image's only program on the testkit's node: it holds a pod's
// namespaces open and does nothing else until it is told to stop. Upstream's pause is C; this one is Go
// so that it builds, static, with the rest of testkit/kube.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	// As PID 1 of its sandbox it gets no default signal handling, so it must ask for these itself.
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
}

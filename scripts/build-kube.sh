#!/usr/bin/env bash
# Builds the test suite's Kubernetes: target/kube/signal-kube, one binary running upstream kube-apiserver,
# kube-controller-manager, kube-scheduler and kubelet (k8s.io/kubernetes v1.36.3) and an in-process etcd,
# and target/kube/pause, the node's sandbox program, from the Go module in testkit/kube. The Go build cache makes a re-run with nothing changed take a few seconds;
# the first build takes about 13 minutes of CPU (15-25 minutes on 2 shared cores). The testkit finds
# the binary there, or at $SIGNAL_KUBE_BINARY. Needs Go >= 1.26 and the Go module proxy (go.sum pins every module).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[build-kube] %s\n' "$*"; }

# Go's own install directory, which a non-login shell may not have on PATH.
case ":$PATH:" in *:/usr/local/go/bin:*) ;; *) PATH="$PATH:/usr/local/go/bin" ;; esac

if ! command -v go >/dev/null 2>&1; then
    log "go not found: install Go >= 1.26 (Debian machines here have it at /usr/local/go/bin)"
    exit 1
fi

output="$PWD/target/kube/signal-kube"
mkdir -p "$(dirname "$output")"

started=$(date +%s)
log "$(go version); building $output"
(
    cd testkit/kube
    # The version the servers report (/version, which helm checks against the chart's kubeVersion) is
    # stamped at link time, as upstream's hack/lib/version.sh does; it comes from go.mod.
    kube_version=$(go list -mod=readonly -m -f '{{.Version}}' k8s.io/kubernetes)
    minor=${kube_version#v1.}
    minor=${minor%%.*}
    ldflags="-s -w"
    for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $package.gitVersion=$kube_version -X $package.gitMajor=1 -X $package.gitMinor=$minor"
        ldflags+=" -X $package.gitTreeState=clean"
    done
    # providerless: no cloud-provider code; CGO off: a static binary and no C toolchain needed.
    CGO_ENABLED=0 go build -mod=readonly -tags providerless -trimpath -ldflags "$ldflags" -o "$output" .
    CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$(dirname "$output")/pause" ./pause
)
log "built $("$output" version) in $(($(date +%s) - started)) s"

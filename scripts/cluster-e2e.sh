#!/usr/bin/env bash
# The cluster end to end on a machine without Docker (the kind path for laptops is
# scripts/kind-e2e.sh): a real control plane and node built from upstream Kubernetes
# (scripts/build-kube.sh), Debian's containerd, runc and CNI plugins, and nats-server,
# clickhouse-server and redis-server on the node's bridge. The operator runs out of cluster and
# launches worker pods from the release worker binary packed into a local image; the scenario and its
# figures are operator/tests/cluster_node.rs. Needs root (containerd, runc, the bridge).
#
#   scripts/cluster-e2e.sh            # prints each step's figures
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
export PATH

if [ "$(id -u)" -ne 0 ]; then
    echo "cluster-e2e: needs root (containerd, runc and the node's bridge)" >&2
    exit 1
fi
scripts/install-test-deps.sh
scripts/build-kube.sh
# The pods run the release worker, as a user's would (the test suite packs its debug build).
cargo build --locked --release -p signal-worker
SIGNAL_WORKER_BINARY="$PWD/target/release/signal-worker" \
    cargo test --locked -p signal-operator --test cluster_node -- --nocapture

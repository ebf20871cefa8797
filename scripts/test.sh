#!/usr/bin/env bash
# The test command: installs missing test dependencies, builds the Kubernetes control plane
# (scripts/build-kube.sh) and the current nats-server (scripts/build-current-nats.sh), then runs
# every test of the workspace.
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh -p signal-testkit -- --nocapture`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian installs nats-server and clickhouse-server in /usr/sbin; helm/kubectl may go to
# ~/.local/bin for non-root users.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
case ":$PATH:" in *":$HOME/.local/bin:"*) ;; *) PATH="$PATH:$HOME/.local/bin" ;; esac
export PATH
export RUST_BACKTRACE=1

scripts/install-test-deps.sh
# The Kubernetes control plane the cluster tests start (target/kube/signal-kube); a few seconds
# when nothing changed, about ten minutes the first time on 2 cores.
scripts/build-kube.sh
# The current nats-server the tests of newer-server features start (target/nats/nats-server); a
# few seconds when nothing changed, under a minute the first time.
scripts/build-current-nats.sh

# The whole workspace, unless the arguments pick packages (`-p NAME` / `--package NAME`).
scope=(--workspace)
for arg in "$@"; do
    case "$arg" in
        --) break ;;
        -p | -p* | --package | --package=*) scope=() ;;
    esac
done

echo "[test] cargo test ${scope[*]} --locked $*"
exec cargo test "${scope[@]}" --locked --no-fail-fast "$@"

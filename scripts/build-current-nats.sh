#!/usr/bin/env bash
# Builds the suite's current nats-server (target/nats/nats-server) from its Go module, pinned by
# testkit/nats/go.mod and go.sum: Debian ships 2.9.10, and what only newer releases have (a
# stream's subject transform, which partitioned pipelines use there) is tested against this one.
# About a minute of CPU the first time; a few seconds from the Go build cache. The testkit finds
# it there, or at $SIGNAL_TEST_CURRENT_NATS_SERVER. Needs Go >= 1.26 and the Go module proxy.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[build-current-nats] %s\n' "$*"; }

case ":$PATH:" in *:/usr/local/go/bin:*) ;; *) PATH="$PATH:/usr/local/go/bin" ;; esac

if ! command -v go >/dev/null 2>&1; then
    log "go not found: install Go >= 1.26 (Debian machines here have it at /usr/local/go/bin)"
    exit 1
fi

output="$PWD/target/nats/nats-server"
mkdir -p "$(dirname "$output")"
started=$(date +%s)
(
    cd testkit/nats
    CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$output" \
        github.com/nats-io/nats-server/v2
)
log "built $("$output" --version) in $(($(date +%s) - started)) s"

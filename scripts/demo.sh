#!/usr/bin/env bash
# The one-command demo: NATS JetStream → signal-worker → ClickHouse (+ Redis cache, + dead letters),
# run by `signal-operator local` on this machine, no Kubernetes needed.
#
#   scripts/demo.sh [COUNT]
#
# It installs the server packages it lacks (nats-server, clickhouse-server, clickhouse-client,
# redis-server; through scripts/install-test-deps.sh, which starts no system service), starts its
# own servers on free loopback ports in a temporary directory, builds the release binaries, runs the
# pipeline of examples/local/demo.yaml, publishes COUNT sample signals with `signal-demo` (a few malformed on purpose)
# with a live progress line, and shows what arrived in ClickHouse, in Redis and on the dead-letter
# subject. Ctrl-C or the end stops everything it started (and nothing else) and removes its
# temporary directory.
#
# Environment:
#   SIGNAL_DEMO_MESSAGES            signals to publish (default 200000; the argument wins)
#   SIGNAL_DEMO_MALFORMED_PERCENT   share of malformed signals (default 3)
#   SIGNAL_DEMO_REPLICAS            worker processes (default 2)
#   SIGNAL_DEMO_NATS_URL            use this NATS server (JetStream enabled) instead of starting one
#   SIGNAL_DEMO_CLICKHOUSE_URL      use this ClickHouse (HTTP URL) instead of starting one
#   SIGNAL_DEMO_REDIS_URL           use this Redis instead of starting one
#   SIGNAL_DEMO_KEEP=1              keep the temporary directory (logs, data) at the end
# Credentials for servers of your own go in the variables the worker reads (SIGNAL_NATS_TOKEN,
# SIGNAL_CLICKHOUSE_USER, SIGNAL_CLICKHOUSE_PASSWORD, SIGNAL_REDIS_PASSWORD, …).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

count=${1:-${SIGNAL_DEMO_MESSAGES:-200000}}
malformed_percent=${SIGNAL_DEMO_MALFORMED_PERCENT:-3}
replicas=${SIGNAL_DEMO_REPLICAS:-2}
nats_url=${SIGNAL_DEMO_NATS_URL:-}
clickhouse_url=${SIGNAL_DEMO_CLICKHOUSE_URL:-}
redis_url=${SIGNAL_DEMO_REDIS_URL:-}

# Debian installs nats-server and clickhouse-server in /usr/sbin.
case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
export PATH

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
say() { printf '%s[demo]%s %s\n' "$bold" "$plain" "$*"; }
die() {
    say "error: $*" >&2
    exit 1
}

case "$count" in '' | *[!0-9]*) die "COUNT must be a number, not '$count'" ;; esac

# ---------------------------------------------------------------------------------------------
# Cleanup: only the processes started here, operator first (its workers flush into the servers),
# then the servers; then the temporary directory.
# ---------------------------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/signal-demo.XXXXXX")
server_pids=()
operator_pid=''

stop_pid() { # PID GRACE_SECONDS: SIGTERM, wait, SIGKILL
    local pid=$1 grace=$2
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq $((grace * 10))); do
        kill -0 "$pid" 2>/dev/null || {
            wait "$pid" 2>/dev/null || true
            return 0
        }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$status" -ne 0 ] && [ "$status" -ne 130 ] && [ -s "$work/operator.log" ]; then
        say "last lines of the operator log:" >&2
        tail -n 20 "$work/operator.log" >&2
    fi
    if [ -n "$operator_pid" ]; then
        say "stopping signal-operator local (workers flush and acknowledge)"
        stop_pid "$operator_pid" 45
    fi
    if [ "${#server_pids[@]}" -gt 0 ]; then
        say "stopping the demo's servers"
        for pid in "${server_pids[@]}"; do stop_pid "$pid" 15; done
    fi
    if [ "${SIGNAL_DEMO_KEEP:-}" = 1 ]; then
        say "kept $work"
    else
        rm -rf "$work"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Ports and readiness, with bash alone (no curl or nc needed)
# ---------------------------------------------------------------------------------------------
taken_ports=' '
port_is_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_ports VAR N: N consecutive free ports below the ephemeral range; the first goes into VAR.
free_ports() {
    local var=$1 n=$2 base offset ok
    for _ in $(seq 200); do
        base=$((20000 + RANDOM % 12000))
        ok=true
        for offset in $(seq 0 $((n - 1))); do
            case "$taken_ports" in *" $((base + offset)) "*) ok=false ;; esac
            port_is_free $((base + offset)) || ok=false
        done
        if [ "$ok" = true ]; then
            for offset in $(seq 0 $((n - 1))); do taken_ports+="$((base + offset)) "; done
            printf -v "$var" '%s' "$base"
            return 0
        fi
    done
    die "no $n free consecutive ports found"
}

# wait_until NAME PID LOG SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_until() {
    local name=$1 pid=$2 log=$3 seconds=$4
    shift 4
    for _ in $(seq $((seconds * 10))); do
        "$@" 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$log" >&2 || true
            die "$name exited during startup (log above)"
        fi
        sleep 0.1
    done
    tail -n 20 "$log" >&2 || true
    die "$name did not become ready within $seconds s (log above)"
}

port_is_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

clickhouse_pings() { # PORT: GET /ping answers Ok.
    local reply
    reply=$(
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
        timeout 2 cat <&3
    ) || return 1
    [[ $reply == *"Ok."* ]]
}

# start NAME LOG COMMAND...: in its own session, so a Ctrl-C in the terminal reaches this script
# (which then stops everything in order) rather than every server at once.
start() {
    local name=$1 log=$2
    shift 2
    setsid "$@" >"$log" 2>&1 </dev/null &
    server_pids+=($!)
    last_pid=$!
    say "started $name (pid $last_pid)"
}

# ---------------------------------------------------------------------------------------------
# Server packages, only those needed for servers started here
# ---------------------------------------------------------------------------------------------
needed=()
[ -z "$nats_url" ] && ! command -v nats-server >/dev/null && needed+=(nats-server)
[ -z "$clickhouse_url" ] && ! command -v clickhouse-server >/dev/null && needed+=(clickhouse-server)
[ -z "$redis_url" ] && ! command -v redis-server >/dev/null && needed+=(redis-server)
if [ "${#needed[@]}" -gt 0 ]; then
    say "missing ${needed[*]}; installing the server packages (no system service is started)"
    scripts/install-test-deps.sh --servers-only
fi
command -v cargo >/dev/null || die "cargo not found: install Rust first (https://rustup.rs)"

# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------
if [ -z "$nats_url" ]; then
    free_ports nats_port 1
    mkdir -p "$work/nats"
    start nats-server "$work/nats.log" nats-server -js -sd "$work/nats" -a 127.0.0.1 -p "$nats_port"
    wait_until nats-server "$last_pid" "$work/nats.log" 30 port_is_open "$nats_port"
    nats_url="nats://127.0.0.1:$nats_port"
fi

if [ -z "$clickhouse_url" ]; then
    free_ports clickhouse_http_port 1
    free_ports clickhouse_tcp_port 1
    free_ports clickhouse_interserver_port 1
    ch="$work/clickhouse"
    mkdir -p "$ch"/{data,tmp,user_files,format_schemas,log}
    # The configuration testkit's ClickHouseServer uses: loopback only, own directories, small
    # caches, no query log; 18.16 and later accept it.
    timezone=''
    [ -e /usr/share/zoneinfo/UTC ] && timezone='<timezone>UTC</timezone>'
    sed -e "s|@DIR@|$ch|g" -e "s|@NAME@|signal-demo|g" -e "s|@HTTP_PORT@|$clickhouse_http_port|g" \
        -e "s|@TCP_PORT@|$clickhouse_tcp_port|g" \
        -e "s|@INTERSERVER_PORT@|$clickhouse_interserver_port|g" -e "s|@TIMEZONE@|$timezone|g" \
        "$repo/testkit/clickhouse/config.xml.in" >"$ch/config.xml"
    cp "$repo/testkit/clickhouse/users.xml" "$ch/users.xml"
    cd "$ch" # as testkit does: nothing the server writes relative to its cwd lands in the repo
    start clickhouse-server "$ch/log/stdout.log" clickhouse-server --config-file="$ch/config.xml"
    cd "$repo"
    wait_until clickhouse-server "$last_pid" "$ch/log/clickhouse-server.err.log" 60 clickhouse_pings "$clickhouse_http_port"
    clickhouse_url="http://127.0.0.1:$clickhouse_http_port"
fi

if [ -z "$redis_url" ]; then
    free_ports redis_port 1
    mkdir -p "$work/redis"
    start redis-server "$work/redis.log" redis-server --port "$redis_port" --bind 127.0.0.1 \
        --dir "$work/redis" --save '' --appendonly no
    wait_until redis-server "$last_pid" "$work/redis.log" 30 port_is_open "$redis_port"
    redis_url="redis://127.0.0.1:$redis_port"
fi

# ---------------------------------------------------------------------------------------------
# Binaries and the pipeline
# ---------------------------------------------------------------------------------------------
say "building release binaries (the first build takes a few minutes)"
cargo build --release --quiet -p signal-operator -p signal-worker -p signal-demo
bin=$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release
[ -x "$bin/signal-operator" ] || bin="$repo/target/release"

pipeline="$work/pipeline.yaml"
sed -e "s|nats://127.0.0.1:4222|$nats_url|" \
    -e "s|http://127.0.0.1:8123|$clickhouse_url|" \
    -e "s|redis://127.0.0.1:6379|$redis_url|" \
    -e "s|^    replicas: 2$|    replicas: $replicas|" \
    examples/local/demo.yaml >"$pipeline"

free_ports metrics_port "$replicas"
"$bin/signal-operator" local -f "$pipeline" --metrics-base-port "$metrics_port" \
    >"$work/operator.log" 2>&1 </dev/null &
operator_pid=$!
say "signal-operator local runs $replicas workers (metrics on 127.0.0.1:$metrics_port and up)"
say "  NATS $nats_url · ClickHouse $clickhouse_url · Redis $redis_url"
say "  pipeline $pipeline (from examples/local/demo.yaml); log $work/operator.log"

"$bin/signal-demo" --log-level warn publish -f "$pipeline" --count "$count" \
    --malformed-percent "$malformed_percent"
kill -0 "$operator_pid" 2>/dev/null || die "signal-operator local exited"

"$bin/signal-demo" --log-level warn report -f "$pipeline"
echo
say "done; stopping what the demo started"

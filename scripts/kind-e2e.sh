#!/usr/bin/env bash
# End-to-end test on a local kind cluster: builds the operator and worker images, installs the dev
# servers (deploy/dev) and the Helm chart, runs examples/transactions.yaml, publishes signals and
# checks that they land in ClickHouse and Redis, that scaling and editing the SignalPipeline move
# the worker Deployment, and that deleting the pipeline removes its workers. Prints PASS at the end.
#
# Usage: scripts/kind-e2e.sh [--keep]
#   --keep   leave the cluster running afterwards (otherwise it is deleted, also on failure)
# Needs docker, kind, kubectl and helm on PATH.
set -euo pipefail

cd "$(dirname "$0")/.."

CLUSTER=signal-operator # the name in kind-config.yaml
NAMESPACE=signals
OPERATOR_NAMESPACE=signal-operator
OPERATOR_IMAGE=signal-operator:e2e
WORKER_IMAGE=signal-worker:e2e
PIPELINE=transactions
WORKER_DEPLOYMENT=transactions-worker # the operator names a pipeline's Deployment <pipeline>-worker
SIGNAL_COUNT=200
# Tags this run's signals, so a re-run on a kept cluster counts only its own rows and keys.
RUN_ID="e2e$(date +%s)"
KEEP=false

for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=true ;;
    -h | --help)
      sed -n '2,9p' "$0"
      exit 0
      ;;
    *)
      echo "unknown argument: $arg (try --help)" >&2
      exit 2
      ;;
  esac
done

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || {
    echo "kind-e2e: $tool is not on PATH" >&2
    exit 1
  }
done

step() { printf '\n==> %s\n' "$*"; }
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# eventually SECONDS WHAT COMMAND...: runs COMMAND every 2 seconds until it succeeds, or fails WHAT.
eventually() {
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@"; do
    ((SECONDS < deadline)) || fail "$what"
    sleep 2
  done
}

on_exit() {
  local status=$?
  if ((status != 0)); then
    echo "--- diagnostics ---" >&2
    kubectl get sigp,deploy,pods -A -o wide >&2 || true
    kubectl -n "$OPERATOR_NAMESPACE" logs deploy/signal-operator --tail=100 >&2 || true
    kubectl -n "$NAMESPACE" logs "deploy/$WORKER_DEPLOYMENT" --tail=50 >&2 || true
  fi
  if [[ "$KEEP" == true ]]; then
    echo "Cluster $CLUSTER kept; delete it with: kind delete cluster --name $CLUSTER"
  else
    kind delete cluster --name "$CLUSTER"
  fi
  exit "$status"
}

step "Creating kind cluster $CLUSTER"
if kind get clusters | grep -qx "$CLUSTER"; then
  echo "cluster $CLUSTER already exists; reusing it"
else
  kind create cluster --config kind-config.yaml --wait 120s
fi
trap on_exit EXIT
kubectl config use-context "kind-$CLUSTER"

step "Building and loading images"
docker build -f docker/operator.Dockerfile -t "$OPERATOR_IMAGE" .
docker build -f docker/worker.Dockerfile -t "$WORKER_IMAGE" .
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$WORKER_IMAGE"

step "Starting NATS, ClickHouse and Redis in namespace $NAMESPACE"
kubectl apply -f deploy/dev/
kubectl -n "$NAMESPACE" wait --for=condition=Available --timeout=300s \
  deploy/nats deploy/clickhouse deploy/redis

step "Installing the operator chart"
# The release is called signal-operator, so the chart names its Deployment signal-operator too.
helm upgrade --install signal-operator charts/signal-operator \
  --namespace "$OPERATOR_NAMESPACE" --create-namespace \
  --set image.repository="${OPERATOR_IMAGE%:*}" --set image.tag="${OPERATOR_IMAGE#*:}" \
  --set image.pullPolicy=Never \
  --set workerImage.repository="${WORKER_IMAGE%:*}" --set workerImage.tag="${WORKER_IMAGE#*:}" \
  --set logFormat=human \
  --wait --timeout 180s

step "Creating SignalPipeline $PIPELINE"
kubectl apply -f "examples/$PIPELINE.yaml"
kubectl -n "$NAMESPACE" wait --for=condition=Ready --timeout=180s "sigp/$PIPELINE"
kubectl -n "$NAMESPACE" get sigp "$PIPELINE"

step "Publishing $SIGNAL_COUNT transaction signals"
# nats expands the {{ }} templates per message: one wallet per message, so every message leaves its
# own Redis key; TimeStamp is RFC 3339.
body='{"event_time":"{{ TimeStamp }}","source_id":"'"$RUN_ID"'","event_type":"transaction",'
body+='"severity":1,"trace_id":"trace-{{ Count }}","user_id":"user-{{ Count }}",'
body+='"wallet_address":"'"$RUN_ID"'-{{ Count }}","payload":{"tx_hash":"0xtx{{ Count }}",'
body+='"chain":"ethereum","asset":"USDC","amount":12.5,"direction":"in"}}'
kubectl -n "$NAMESPACE" delete job publish-signals --ignore-not-found
kubectl -n "$NAMESPACE" create job publish-signals --image=natsio/nats-box:latest -- \
  nats --server "nats://nats.$NAMESPACE.svc:4222" pub --jetstream --count "$SIGNAL_COUNT" \
  signals.transaction "$body"
kubectl -n "$NAMESPACE" wait --for=condition=Complete --timeout=120s job/publish-signals

step "Checking rows in ClickHouse"
clickhouse_query() {
  # The credentials expand inside the container, from the env the Secret gave it.
  # shellcheck disable=SC2016
  kubectl -n "$NAMESPACE" exec deploy/clickhouse -- sh -c \
    'clickhouse-client --user "$CLICKHOUSE_USER" --password "$CLICKHOUSE_PASSWORD" -q "$0"' "$1"
}
rows_landed() {
  local rows
  rows=$(clickhouse_query "SELECT count() FROM risksignal.transaction_signals WHERE source_id = '$RUN_ID'") ||
    return 1
  echo "rows: $rows"
  [[ "$rows" == "$SIGNAL_COUNT" ]]
}
eventually 120 "expected $SIGNAL_COUNT rows in risksignal.transaction_signals" rows_landed

step "Checking keys in Redis"
keys_cached() {
  local keys
  keys=$(kubectl -n "$NAMESPACE" exec deploy/redis -- redis-cli --scan --pattern "wallet:$RUN_ID-*:latest" | wc -l) ||
    return 1
  echo "keys: $keys"
  ((keys == SIGNAL_COUNT))
}
eventually 60 "expected $SIGNAL_COUNT wallet:$RUN_ID-*:latest keys in Redis" keys_cached
tx_hash=$(kubectl -n "$NAMESPACE" exec deploy/redis -- redis-cli HGET "wallet:$RUN_ID-7:latest" tx_hash)
[[ "$tx_hash" == "0xtx7" ]] || fail "wallet:$RUN_ID-7:latest has tx_hash '$tx_hash', expected 0xtx7"

# worker_replicas_are N: the worker Deployment wants N replicas and has N ready.
worker_replicas_are() {
  local wanted ready
  wanted=$(kubectl -n "$NAMESPACE" get deploy "$WORKER_DEPLOYMENT" -o jsonpath='{.spec.replicas}') || return 1
  ready=$(kubectl -n "$NAMESPACE" get deploy "$WORKER_DEPLOYMENT" -o jsonpath='{.status.readyReplicas}') || return 1
  echo "worker replicas: spec=$wanted ready=${ready:-0}"
  [[ "$wanted" == "$1" && "${ready:-0}" == "$1" ]]
}

step "Scaling through the scale subresource"
kubectl -n "$NAMESPACE" scale "sigp/$PIPELINE" --replicas=3
eventually 180 "worker Deployment did not reach 3 ready replicas" worker_replicas_are 3

step "Editing the SignalPipeline"
kubectl -n "$NAMESPACE" patch "sigp/$PIPELINE" --type merge -p '{"spec":{"workers":{"replicas":1}}}'
eventually 180 "worker Deployment did not go back to 1 replica" worker_replicas_are 1

step "Deleting the SignalPipeline"
kubectl -n "$NAMESPACE" delete "sigp/$PIPELINE" --timeout=120s
pipeline_gone() {
  ! kubectl -n "$NAMESPACE" get "sigp/$PIPELINE" >/dev/null 2>&1 &&
    ! kubectl -n "$NAMESPACE" get deploy "$WORKER_DEPLOYMENT" >/dev/null 2>&1
}
eventually 120 "the pipeline or its worker Deployment is still there" pipeline_gone

printf '\nPASS\n'

#!/usr/bin/env bash
# `make run`: the main job on the embedded default (SQLite file + in-process store).
# Starts policyd with the sample policy, a mock OpenAI-compatible provider and Envoy as the gateway,
# creates two demo customers and prints the base URL and their keys. Ctrl-C stops everything.
# POLICYD_DEMO_ONCE=1 drives the gateway once with `policyd demo` (the openai SDK) and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
GRPC_PORT="${POLICYD_GRPC_PORT:-50051}"
GATEWAY_PORT="${POLICYD_GATEWAY_PORT:-10000}"
MOCK_PORT="${POLICYD_MOCK_PORT:-8080}"
ADMIN_PORT="${POLICYD_ENVOY_ADMIN_PORT:-9901}"
STATE="${POLICYD_DEMO_DIR:-.policyd-demo}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
export POLICYD_LISTEN="127.0.0.1:$GRPC_PORT"
export POLICYD_SERVER="$POLICYD_LISTEN"
export POLICYD_DATABASE_URL="${POLICYD_DATABASE_URL:-sqlite:///$STATE/policyd.db}"
if [ -z "${POLICYD_PROVIDERS_FILE:-}" ]; then  # the demo's accounts, OpenAI's asked for background responses
  sed "s#cluster: openai,#cluster: openai, base_url: 'http://127.0.0.1:$MOCK_PORT/v1',#" scripts/demo-providers.yaml \
    >"$STATE/providers.yaml"
  export POLICYD_PROVIDERS_FILE="$STATE/providers.yaml"
fi
export POLICYD_BACKGROUND_POLL_SECONDS="${POLICYD_BACKGROUND_POLL_SECONDS:-1}"

pids=()
cleanup() {  # SIGTERM, then SIGKILL for whatever has not stopped in 20 s
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 200); do
    alive=0; for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

policyd serve --policy policyd/samples/policy.yaml >"$STATE/policyd.log" 2>&1 &
pids+=($!)
policyd mock-provider --port "$MOCK_PORT" --api-key mock-provider-key-1 --api-key mock-provider-key-2 \
  --api-key mock-provider-key-3 --api-key mock-provider-key-4 --api-key mock-provider-key-5 >"$STATE/mock.log" 2>&1 &
pids+=($!)
policyd gateway-config --listen-port "$GATEWAY_PORT" --admin-port "$ADMIN_PORT" --policyd "127.0.0.1:$GRPC_PORT" \
  --cluster "openai=127.0.0.1:$MOCK_PORT" --cluster "anthropic=127.0.0.1:$MOCK_PORT" \
  --cluster "google=127.0.0.1:$MOCK_PORT" --cluster "cohere=127.0.0.1:$MOCK_PORT" >"$STATE/envoy.yaml"
envoy -c "$STATE/envoy.yaml" --log-level warn --base-id "$GATEWAY_PORT" >"$STATE/envoy.log" 2>&1 &
pids+=($!)
for attempt in $(seq 1 30); do  # up to a minute; at once if policyd has exited (an address taken, a bad setting)
  policyd health --wait 2 >/dev/null 2>&1 && break
  if [ "$attempt" = 30 ] || ! kill -0 "${pids[0]}" 2>/dev/null; then
    echo "policyd did not start; the end of $STATE/policyd.log:" >&2
    tail -n 20 "$STATE/policyd.log" >&2
    exit 1
  fi
done

policyd credit grant --customer alice --amount 10.00 --grant-id demo-alice-welcome >/dev/null
policyd credit grant --customer bob --amount 0.001 --source promo --grant-id demo-bob-trial >/dev/null
key_a=$(policyd keys create --customer alice --plan pro --label "alice demo" --json | python -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
key_b=$(policyd keys create --customer bob --plan free --label "bob demo" --json | python -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$GATEWAY_PORT") 2>/dev/null && break; sleep 0.1; done

cat <<MSG
policyd is serving: gRPC on 127.0.0.1:$GRPC_PORT, and Envoy as an OpenAI-compatible gateway at

    base URL:  http://127.0.0.1:$GATEWAY_PORT/v1
    alice (plan pro, 10.00 USD):   $key_a
    bob   (plan free, 0.001 USD):  $key_b

(keys are shown once; the provider behind Envoy is a local mock.) In another terminal, with
$PWD/.venv/bin on PATH:

    policyd demo --key-a $key_a --key-b $key_b
    policyd usage list
    policyd wallet alice

or point any OpenAI SDK at the base URL with one of the keys. Ctrl-C stops everything.
MSG
if [ "${POLICYD_DEMO_ONCE:-}" = "1" ]; then
  policyd demo --base-url "http://127.0.0.1:$GATEWAY_PORT/v1" --key-a "$key_a" --key-b "$key_b"
  policyd audit
  exit 0
fi
wait "${pids[0]}"

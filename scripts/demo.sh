#!/usr/bin/env bash
# `make run`: policyd on the embedded default (SQLite file + in-process store) with the sample
# policy, a demo customer with $10.00 of credit, and a demo key printed once. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
export POLICYD_LISTEN="${POLICYD_LISTEN:-127.0.0.1:50051}"
export POLICYD_SERVER="$POLICYD_LISTEN"
export POLICYD_DATABASE_URL="${POLICYD_DATABASE_URL:-sqlite:///policyd.db}"

policyd serve --policy policyd/samples/policy.yaml &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT INT TERM
policyd health --wait 30 >/dev/null

policyd credit grant --customer demo --amount 10.00 --source promo --grant-id demo-welcome-credit
created=$(policyd keys create --customer demo --plan pro --environment production --label "demo key" --json)
secret=$(printf '%s' "$created" | python -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
key_id=$(printf '%s' "$created" | python -c 'import json,sys; print(json.load(sys.stdin)["key"]["id"])')

cat <<MSG

policyd is serving on $POLICYD_LISTEN (embedded store, $POLICYD_DATABASE_URL).
Demo key $key_id for customer "demo" (shown once):

    $secret

Try it in another terminal (with $(pwd)/.venv/bin on PATH):
    policyd authorize --key $secret --model gpt-4o --max-tokens 200 --request-id demo-1
    policyd settle demo-1 --input-tokens 12 --output-tokens 150
    policyd wallet demo
    policyd keys pause $key_id        # the next authorize is denied
    policyd audit

Ctrl-C stops policyd.
MSG
wait "$server"

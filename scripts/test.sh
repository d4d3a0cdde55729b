#!/usr/bin/env bash
# Runs the test suite. pytest's exit code 5 ("no tests collected") is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
# Each test file runs whole in one of TEST_WORKERS processes (2 by default; 0: all in this one), so that a file's
# servers (a gateway's Envoy, policyd and mock provider) start once; each process has its own Redis and PostgreSQL.
python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
code=$?
if [ "$code" -eq 5 ]; then
  echo "no tests were collected: failing" >&2
  exit 1
fi
exit "$code"

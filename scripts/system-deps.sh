#!/usr/bin/env bash
# Installs redis-server, PostgreSQL, Node.js with npm (the Node client's build and tests) and
# Chromium with its driver (the dashboard's browser tests) from Debian's packages when missing.
# The tests start their own servers on loopback in temp dirs; nothing here starts a service.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v wrk >/dev/null 2>&1 || need+=(wrk)  # the Envoy-path benchmark's load generator
[ ${#need[@]} -eq 0 ] && exit 0

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install: ${need[*]}" >&2; exit 1; }
  as_root=(sudo -n)
fi
echo "installing ${need[*]} from Debian's packages"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
# policy-rc.d keeps the packages from starting system services; the tests start their own
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

#!/usr/bin/env bash
# Make sure the servers the test suite starts itself are installed: memcached (required)
# and twemproxy (Debian package nutcracker; without it the proxy tests skip, or fail under CI=true).
set -euo pipefail
have_memcached() { command -v memcached >/dev/null 2>&1 || [ -x /usr/bin/memcached ]; }
have_nutcracker() { command -v nutcracker >/dev/null 2>&1 || [ -x /usr/sbin/nutcracker ]; }

missing=()
have_memcached || missing+=(memcached)
have_nutcracker || missing+=(nutcracker)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "${missing[*]} not found: installing Debian's package(s) ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # the packages start system daemons where they can; the tests start their own
  exit 0
fi
if ! have_memcached; then
  echo "memcached is required for the tests: install it (e.g. 'sudo apt-get install memcached') and rerun make test" >&2
  exit 1
fi
echo "twemproxy not found: the proxy tests will skip (fail under CI=true); install it with 'sudo apt-get install nutcracker'" >&2

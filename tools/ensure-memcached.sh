#!/usr/bin/env bash
# Make sure the servers the test suite starts itself are installed: memcached (required),
# twemproxy (Debian package nutcracker), redis-server (a Redis of the tests' own, to pause)
# and openssl (a certificate for memcached over TLS); without the last three the tests
# that need them skip, or fail under CI=true.
set -euo pipefail
have_memcached() { command -v memcached >/dev/null 2>&1 || [ -x /usr/bin/memcached ]; }
have_nutcracker() { command -v nutcracker >/dev/null 2>&1 || [ -x /usr/sbin/nutcracker ]; }
have_redis_server() { command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]; }
have_openssl() { command -v openssl >/dev/null 2>&1; }

missing=()
have_memcached || missing+=(memcached)
have_nutcracker || missing+=(nutcracker)
have_redis_server || missing+=(redis-server)
have_openssl || missing+=(openssl)
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
echo "${missing[*]} not found: the tests that need them will skip (fail under CI=true); install them with 'sudo apt-get install ${missing[*]}'" >&2

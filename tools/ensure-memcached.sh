#!/usr/bin/env bash
# Make sure a memcached binary is available for the test suite.
set -euo pipefail
if command -v memcached >/dev/null 2>&1 || [ -x /usr/bin/memcached ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "memcached not found: installing Debian's memcached package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends memcached >/dev/null
  # the package starts a system daemon where it can; the tests start their own
  exit 0
fi
echo "memcached is required for the tests: install it (e.g. 'sudo apt-get install memcached') and rerun make test" >&2
exit 1

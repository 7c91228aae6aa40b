#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need, then cargo test.
# Tests start their own servers on free loopback ports; nothing here relies on a running service.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing redis-server (Debian package) for the Redis-backed tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  else
    echo "test.sh: redis-server is missing. Install the Debian package 'redis-server'" \
         "(apt-get install redis-server) or put redis-server on PATH, then rerun." >&2
    exit 1
  fi
fi

# Tango's own Python SDK (raas 2.2.0 from PyPI), for the test that runs it against the gateway.
venv=target/raas-venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import raas' 2>/dev/null; then
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "test.sh: installing python3-venv (Debian package) for the SDK test"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    else
      echo "test.sh: python3 with venv is missing (Debian: apt-get install python3-venv)." >&2
      exit 1
    fi
  fi
  echo "test.sh: installing Tango's Python SDK (raas 2.2.0) into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check raas==2.2.0
fi
export RAAS_SDK_PYTHON="$PWD/$venv/bin/python"

# The concurrency tests hold a few thousand loopback sockets at once; lift the soft limit.
hard=$(ulimit -Hn)
if [ "$hard" = "unlimited" ] || [ "$hard" -gt 65536 ]; then hard=65536; fi
ulimit -n "$hard" 2>/dev/null || true

cargo test --locked --all-targets
# Doc examples are compiled and run separately (--all-targets leaves them out).
cargo test --locked --doc

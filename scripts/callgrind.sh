#!/usr/bin/env bash
# Instructions the proxy executes per request, counted by valgrind's callgrind: repeatable where
# wall-clock benchmarks on a shared machine swing by ±15 %. For Basic and OAuth Bearer profiles
# (workers = 1, access log off), the proxy runs under callgrind twice, serving N1 and then N2
# keep-alive GETs from one connection; the difference divided by N2 - N1 is the cost of one
# request, with start-up, the one token mint and shutdown cancelled out.
#
#   scripts/callgrind.sh              # N1=500 N2=2500 by default
#   N1=1000 N2=5000 scripts/callgrind.sh
#
# All traffic stays on 127.0.0.1. Needs valgrind (installed from Debian when missing and root).
set -euo pipefail
cd "$(dirname "$0")/.."

N1=${N1:-500}
N2=${N2:-2500}

if ! command -v valgrind >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends valgrind >/dev/null
  else
    echo "callgrind.sh: valgrind is missing; install the Debian package valgrind" >&2
    exit 1
  fi
fi

cargo build --release --locked --quiet --bin tango-auth-proxy --example bench_upstream
BIN=target/release/tango-auth-proxy
UPSTREAM_BIN=target/release/examples/bench_upstream

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_port() {
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "callgrind.sh: nothing listening on port $1" >&2
  exit 1
}

UP_PORT=$(free_port)
"$UPSTREAM_BIN" "127.0.0.1:$UP_PORT" & pids+=($!)
wait_port "$UP_PORT"
IDP_PORT=$(free_port)
"$BIN" mock-tango --listen "127.0.0.1:$IDP_PORT" >/dev/null 2>"$work/idp.log" & pids+=($!)
wait_port "$IDP_PORT"

profile_toml() { # $1 = basic | bearer
  case $1 in
    basic) printf 'auth = "basic"\nplatform_name = "bench-platform"\napi_key = "bench-api-key"\n' ;;
    bearer)
      printf 'auth = "service_account"\ntoken_url = "http://127.0.0.1:%s/oauth/token"\n' "$IDP_PORT"
      printf 'client_id = "demo-client"\nclient_secret = "demo-client-secret"\n'
      printf 'username = "demo-user"\npassword = "demo-password"\n' ;;
  esac
}

# Sends $2 GETs over one keep-alive connection to port $1; fails unless every answer is 200.
drive() {
  python3 - "$1" "$2" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    c.request("GET", "/raas/v2/catalogs")
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"request {i}: status {r.status}")
c.close()
PY
}

# Total instructions (Ir) of one proxy run serving $2 requests in mode $1.
instructions() {
  local mode=$1 n=$2 port admin out
  port=$(free_port); admin=$(free_port); out="$work/callgrind.$mode.$n"
  cat > "$work/$mode.toml" <<TOML
[listen]
proxy = "127.0.0.1:$port"
admin = "127.0.0.1:$admin"
workers = 1
[upstream]
url = "http://127.0.0.1:$UP_PORT"
allow_http = true
[profiles.default]
$(profile_toml "$mode")
TOML
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$BIN" serve --config "$work/$mode.toml" 2>"$work/$mode.$n.log" &
  local pid=$!
  wait_port "$port"
  drive "$port" 1 # the first request waits for the token (OAuth) and warms the pool
  drive "$port" "$n"
  kill -TERM "$pid"
  wait "$pid" || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

printf '| profile | instructions per request (callgrind) | N1 → N2 requests |\n|---|---|---|\n'
for mode in basic bearer; do
  a=$(instructions "$mode" "$N1")
  b=$(instructions "$mode" "$N2")
  printf '| %s | %s | %s → %s |\n' "$mode" "$(( (b - a) / (N2 - N1) ))" "$N1" "$N2"
done

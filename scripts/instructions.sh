#!/usr/bin/env bash
# Instructions executed per request, counted by valgrind's callgrind: repeatable where wall-clock
# benchmarks on a shared machine swing by ±15 %. The proxy (workers = 1, access log off) with a
# Basic, an OAuth Bearer and a DPoP profile, and as a gateway (Basic profile, caller
# authentication and policy on), and nginx as the peer (one process, keep-alive upstream pool,
# a static Authorization header), each run under callgrind twice, serving N1 and then N2
# keep-alive GETs from one connection; the difference divided by N2 - N1 is the cost of one
# request, with start-up, the one token mint and shutdown cancelled out. Only the server under
# test is counted; its upstream is nginx answering `return 200` (as in scripts/bench.sh). Last,
# one raw ES256 signature (examples/sign_cost) is counted the same way, and DPoP's excess over
# Bearer is given as a multiple of it. Two more rows show what hyper and Tokio cost on their own
# (examples/hyper_floor): a hyper server answering every request itself, and the same server
# forwarding over one hyper client connection with nothing else a proxy does.
#
#   scripts/instructions.sh              # N1=500 N2=2500 by default
#   N1=1000 N2=5000 scripts/instructions.sh
#
# All traffic stays on 127.0.0.1. Needs valgrind and nginx (installed from Debian when missing
# and root).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

N1=${N1:-500}
N2=${N2:-2500}

need valgrind valgrind
need nginx nginx

cargo build --release --locked --quiet --bin tango-auth-proxy --example sign_cost --example hyper_floor
BIN=target/release/tango-auth-proxy
SIGN_BIN=target/release/examples/sign_cost
FLOOR_BIN=target/release/examples/hyper_floor

UP_PORT=$(free_port)
upstream_conf "$UP_PORT"
nginx -p "$work/upstream" -c "$work/upstream/nginx.conf" & pids+=($!)
wait_port "$UP_PORT"
IDP_PORT=$(free_port)
"$BIN" mock-tango --listen "127.0.0.1:$IDP_PORT" >/dev/null 2>"$work/idp.log" & pids+=($!)
wait_port "$IDP_PORT"
"$BIN" keygen --out "$work/dpop.pem" >/dev/null 2>&1

# Sends $2 GETs over one keep-alive connection to port $1 (with header $3, if given); fails
# unless every answer is 200.
drive() {
  python3 - "$1" "$2" "${3:-}" <<'PY'
import http.client, sys
port, n, header = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
headers = dict([header.split(": ", 1)]) if header else {}
c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    c.request("GET", "/raas/v2/catalogs", headers=headers)
    r = c.getresponse()
    r.read()
    if r.status != 200:
        sys.exit(f"request {i}: status {r.status}")
c.close()
PY
}

# Total instructions (Ir) of one run of the server in mode $1 (a proxy profile, or nginx)
# serving $2 requests.
instructions() {
  local mode=$1 n=$2 port admin out
  port=$(free_port); admin=$(free_port); out="$work/callgrind.$mode.$n"
  if [ "$mode" = nginx ]; then
    nginx_conf "$port"
    valgrind --tool=callgrind --callgrind-out-file="$out" \
      nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" 2>"$work/$mode.$n.log" &
  elif [ "${mode%%_*}" = floor ]; then
    valgrind --tool=callgrind --callgrind-out-file="$out" \
      "$FLOOR_BIN" "${mode#floor_}" "127.0.0.1:$port" "127.0.0.1:$UP_PORT" 2>"$work/$mode.$n.log" &
  else
    # "logged": the Basic profile with its access log on (one line a request, to a file).
    local kind=$mode log=warn
    if [ "$mode" = logged ]; then kind=basic; log=info; fi
    proxy_toml "$port" "$admin" "$kind" > "$work/$mode.toml"
    RUST_LOG=$log valgrind --tool=callgrind --callgrind-out-file="$out" \
      "$BIN" serve --config "$work/$mode.toml" 2>"$work/$mode.$n.log" &
  fi
  local pid=$!
  wait_port "$port" 600 # callgrind starts slowly
  local header=""
  if [ "$mode" = gateway ]; then header=$(gateway_auth); fi
  drive "$port" 1 "$header" # the first request waits for the token (OAuth) and warms the pool
  drive "$port" "$n" "$header"
  if [ "$mode" = nginx ]; then kill -QUIT "$pid"; else kill -TERM "$pid"; fi
  wait "$pid" || true
  awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

per_request() {
  local a b
  a=$(instructions "$1" "$N1")
  b=$(instructions "$1" "$N2")
  echo $(( (b - a) / (N2 - N1) ))
}

# Instructions of one raw signature with the DPoP key type (examples/sign_cost: ring signing a
# real proof's signing input), by the same difference of two runs.
per_signature() {
  local a b out
  for n in 200 1000; do
    out="$work/callgrind.sign.$n"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$SIGN_BIN" "$1" "$n" >/dev/null 2>&1
    b=$(awk '/^(summary|totals):/ {print $2; exit}' "$out")
    if [ "$n" = 200 ]; then a=$b; fi
  done
  echo $(( (b - a) / 800 ))
}

peer=$(per_request nginx)
printf '| server | instructions per request (callgrind) | / nginx | N1 → N2 requests |\n|---|---|---|---|\n'
printf '| nginx, static Authorization | %s | 1.00 | %s → %s |\n' "$peer" "$N1" "$N2"
declare -A ir
for mode in basic bearer dpop gateway logged; do
  ir[$mode]=$(per_request "$mode")
  printf '| proxy, %s | %s | %s | %s → %s |\n' "$mode" "${ir[$mode]}" \
    "$(awk -v a="${ir[$mode]}" -v b="$peer" 'BEGIN {printf "%.2f", a/b}')" "$N1" "$N2"
done
# What hyper and Tokio cost before the proxy does anything (examples/hyper_floor).
for mode in direct proxy; do
  ir[floor_$mode]=$(per_request "floor_$mode")
done
printf '| hyper floor: server answering itself | %s | %s | %s → %s |\n' "${ir[floor_direct]}" \
  "$(awk -v a="${ir[floor_direct]}" -v b="$peer" 'BEGIN {printf "%.2f", a/b}')" "$N1" "$N2"
printf '| hyper floor: server + one client connection, nothing else | %s | %s | %s → %s |\n' \
  "${ir[floor_proxy]}" "$(awk -v a="${ir[floor_proxy]}" -v b="$peer" 'BEGIN {printf "%.2f", a/b}')" "$N1" "$N2"
sig=$(per_signature es256)
excess=$(( ir[dpop] - ir[bearer] ))
echo
echo "raw ES256 signature (ring, a proof's signing input): $sig instructions"
echo "DPoP excess over Bearer: $excess instructions = $(awk -v a="$excess" -v b="$sig" 'BEGIN {printf "%.2f", a/b}') x the raw signature"

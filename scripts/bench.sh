#!/usr/bin/env bash
# Throughput and latency of tango-auth-proxy (Basic, OAuth Bearer and DPoP modes, and gateway
# mode: a caller authenticating with Basic and its policy checked) against nginx
# adding a static Authorization header, both with one worker, in front of the same minimal
# upstream on loopback. The OAuth rows get their token from the built-in mock Tango (one mint);
# the DPoP row signs a fresh ES256 proof for every request.
#
#   scripts/bench.sh                 # defaults: 10 s per run, 50 connections
#   DURATION=30s CONNECTIONS=100 scripts/bench.sh
#
# Prints one table from one run: requests/s, p50, p99, peak RSS, and the proxy/nginx ratio.
# Access logs are off in both (nginx: access_log off; proxy: RUST_LOG=warn); a last row shows
# the proxy with its access log on. All traffic stays on 127.0.0.1 and each run is time-bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

DURATION=${DURATION:-10s}
# With two or more cores, the server under test (nginx or the proxy) gets core 0 to itself and
# wrk plus the upstream share the rest, so both servers meet the same, steadier conditions.
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  SUT="taskset -c 0"; LOAD="taskset -c 1-$(( $(nproc) - 1 ))"
else
  SUT=""; LOAD=""
fi
CONNECTIONS=${CONNECTIONS:-50}
WARMUP=${WARMUP:-2s}

need wrk wrk
need nginx nginx

cargo build --release --locked --quiet --bin tango-auth-proxy --example bench_upstream
BIN=target/release/tango-auth-proxy
UPSTREAM_BIN=target/release/examples/bench_upstream

hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

UP_PORT=$(free_port)
$LOAD "$UPSTREAM_BIN" "127.0.0.1:$UP_PORT" & pids+=($!); UP_PID=$!
wait_port "$UP_PORT"

# nginx: one process, keep-alive pool to the upstream, static Authorization header.
NG_PORT=$(free_port)
nginx_conf "$NG_PORT"
$SUT nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" & pids+=($!); NG_PID=$!
wait_port "$NG_PORT"

# The mock Tango as token endpoint for the OAuth rows, and a DPoP key.
IDP_PORT=$(free_port)
$LOAD "$BIN" mock-tango --listen "127.0.0.1:$IDP_PORT" >/dev/null 2>"$work/idp.log" & pids+=($!)
wait_port "$IDP_PORT"
"$BIN" keygen --out "$work/dpop.pem" >/dev/null 2>&1

start_proxy() { # $1 = RUST_LOG, $2 = basic | bearer | dpop
  local port admin
  port=$(free_port); admin=$(free_port)
  proxy_toml "$port" "$admin" "$2" > "$work/proxy.toml"
  RUST_LOG=$1 $SUT "$BIN" serve --config "$work/proxy.toml" >/dev/null 2>"$work/proxy-$port.log" &
  PROXY_PID=$!; pids+=("$PROXY_PID"); PROXY_PORT=$port
  wait_port "$port"
  wait_ready "$admin" # for the OAuth modes: a token in hand
}

# Runs wrk against $2 and appends "name rps p50 p99 rss" to the results; $3 = pid for RSS.
results=()
measure() { # $4 = an optional request header
  local name=$1 url=$2 pid=$3 out rps p50 p99
  local header=(); if [ -n "${4:-}" ]; then header=(-H "$4"); fi
  $LOAD wrk -t1 -c"$CONNECTIONS" -d"$WARMUP" "${header[@]}" "$url" >/dev/null
  out=$($LOAD wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${header[@]}" "$url")
  if ! grep -q 'Requests/sec' <<<"$out"; then echo "$out" >&2; exit 1; fi
  if grep -q 'Non-2xx' <<<"$out"; then echo "bench.sh: $name answered errors:" >&2; echo "$out" >&2; exit 1; fi
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  results+=("$name|$rps|$p50|$p99|$(( $(hwm_kib "$pid") / 1024 )) MiB")
}

measure "upstream direct" "http://127.0.0.1:$UP_PORT/raas/v2/catalogs" "$UP_PID"
measure "nginx, static Authorization (1 worker)" "http://127.0.0.1:$NG_PORT/raas/v2/catalogs" "$NG_PID"
start_proxy warn basic
measure "tango-auth-proxy basic (workers = 1)" "http://127.0.0.1:$PROXY_PORT/raas/v2/catalogs" "$PROXY_PID"
kill "$PROXY_PID"
start_proxy warn bearer
measure "tango-auth-proxy OAuth bearer" "http://127.0.0.1:$PROXY_PORT/raas/v2/catalogs" "$PROXY_PID"
kill "$PROXY_PID"
start_proxy warn dpop
measure "tango-auth-proxy DPoP (ES256 proof/request)" "http://127.0.0.1:$PROXY_PORT/raas/v2/catalogs" "$PROXY_PID"
kill "$PROXY_PID"
start_proxy warn gateway
measure "gateway: caller auth + policy, basic" "http://127.0.0.1:$PROXY_PORT/raas/v2/catalogs" "$PROXY_PID" "$(gateway_auth)"
kill "$PROXY_PID"
start_proxy info basic
measure "tango-auth-proxy basic, access log on" "http://127.0.0.1:$PROXY_PORT/raas/v2/catalogs" "$PROXY_PID"

echo
echo "wrk -t1 -c$CONNECTIONS -d$DURATION, $(nproc) cores, $(date -u +%Y-%m-%d)${SUT:+, server under test pinned to core 0}"
echo
printf '| %-40s | %12s | %9s | %9s | %8s |\n' "target" "requests/s" "p50" "p99" "peak RSS"
printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..42})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..10})"
for r in "${results[@]}"; do
  IFS='|' read -r n rps p50 p99 rss <<<"$r"
  printf '| %-40s | %12s | %9s | %9s | %8s |\n' "$n" "$rps" "$p50" "$p99" "$rss"
done
ng=$(cut -d'|' -f2 <<<"${results[1]}")
echo
for i in 2 3 4 5; do
  name=$(cut -d'|' -f1 <<<"${results[$i]}")
  px=$(cut -d'|' -f2 <<<"${results[$i]}")
  echo "$name / nginx throughput ratio: $(awk -v a="$px" -v b="$ng" 'BEGIN {printf "%.2f", a/b}')"
done
basic=$(cut -d'|' -f2 <<<"${results[2]}")
gw=$(cut -d'|' -f2 <<<"${results[5]}")
echo "gateway / sidecar basic throughput ratio: $(awk -v a="$gw" -v b="$basic" 'BEGIN {printf "%.2f", a/b}')"

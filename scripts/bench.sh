#!/usr/bin/env bash
# Throughput, latency and memory of tango-auth-proxy against nginx, on loopback, with one worker
# each, in front of the same upstream: nginx answering `return 200` with a small JSON body (one
# worker; plain HTTP/1.1, and TLS with HTTP/2 offered for the TLS rows).
#
#   scripts/bench.sh                          # ROUNDS=3 DURATION=10s CONNECTIONS=50
#   ROUNDS=5 DURATION=20s scripts/bench.sh
#
# * Throughput (wrk -t1): the upstream direct; nginx adding a static Authorization header
#   (keep-alive pool to the upstream); the proxy in Basic, OAuth Bearer and DPoP mode (the OAuth
#   rows take one token from the built-in mock Tango; DPoP signs an ES256 proof per request), as
#   a gateway (a caller authenticating with Basic, its policy checked, in front of a Basic
#   profile), with its access log on; and both over TLS to the upstream (the proxy speaks
#   HTTP/2 there, as to Tango; nginx HTTP/1.1 keep-alive, as it cannot proxy over HTTP/2).
#   One more row shows what hyper and Tokio alone allow (examples/hyper_floor: a hyper server
#   forwarding over one hyper client connection with nothing else a proxy does).
#   Every target runs once per round, rounds interleaved; the table shows each target's median
#   round and every round's requests/s.
# * The DPoP limit: one core doing a Bearer request plus one signature per request can do at
#   most 1 / (1/Bearer + t_sig), t_sig timed by examples/sign_cost on the same core.
# * Latency at a fixed rate (examples/fixed_rate, open loop, free of coordinated omission): nginx
#   and the proxy (Basic) at 50 % and 90 % of nginx's median throughput.
# * Memory: the proxy's resident set idle (after start and a few requests) and its peak under
#   256 connections.
#
# Access logs are off in both (nginx: access_log off; proxy: RUST_LOG=warn) except the row that
# says otherwise. With two or more cores the server under test (nginx or the proxy) is pinned to
# core 0 and everything else (wrk, the upstream, the mock) to the others. All traffic stays on
# 127.0.0.1 and every run is time-bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
WARMUP=${WARMUP:-2s}
if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  SUT="taskset -c 0"; LOAD="taskset -c 1-$(( $(nproc) - 1 ))"
else
  SUT=""; LOAD=""
fi

need wrk wrk
need nginx nginx
need openssl openssl

cargo build --release --locked --quiet --bin tango-auth-proxy \
  --example sign_cost --example fixed_rate --example hyper_floor
BIN=target/release/tango-auth-proxy
EXAMPLES=target/release/examples

hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# The upstream: nginx, plain and TLS.
UP_PORT=$(free_port); UP_TLS_PORT=$(free_port)
tls_files
upstream_conf "$UP_PORT" "$UP_TLS_PORT"
$LOAD nginx -p "$work/upstream" -c "$work/upstream/nginx.conf" & pids+=($!); UP_PID=$!
wait_port "$UP_PORT"; wait_port "$UP_TLS_PORT"

# The peers: nginx adding a static Authorization header, plain and over TLS to the upstream.
NG_PORT=$(free_port); NG_TLS_PORT=$(free_port)
nginx_conf "$NG_PORT"
nginx_conf "$NG_TLS_PORT" "$UP_TLS_PORT"
$SUT nginx -p "$work/nginx" -c "$work/nginx/nginx.conf" & pids+=($!); NG_PID=$!
$SUT nginx -p "$work/nginx-tls" -c "$work/nginx-tls/nginx.conf" & pids+=($!); NG_TLS_PID=$!
wait_port "$NG_PORT"; wait_port "$NG_TLS_PORT"

# The mock Tango as token endpoint for the OAuth rows, and a DPoP key.
IDP_PORT=$(free_port)
$LOAD "$BIN" mock-tango --listen "127.0.0.1:$IDP_PORT" >/dev/null 2>"$work/idp.log" & pids+=($!)
wait_port "$IDP_PORT"
"$BIN" keygen --out "$work/dpop.pem" >/dev/null 2>&1

# Starts the proxy: $1 = RUST_LOG, $2 = a proxy_toml kind, $3 = "tls" to forward over TLS.
start_proxy() {
  local port admin
  port=$(free_port); admin=$(free_port)
  if [ "${3:-}" = tls ]; then
    UPSTREAM_URL="https://127.0.0.1:$UP_TLS_PORT" UPSTREAM_EXTRA="ca_file = \"$work/tls/ca.pem\"" \
      proxy_toml "$port" "$admin" "$2" > "$work/proxy.toml"
  else
    proxy_toml "$port" "$admin" "$2" > "$work/proxy.toml"
  fi
  RUST_LOG=$1 $SUT "$BIN" serve --config "$work/proxy.toml" >/dev/null 2>"$work/proxy-$port.log" &
  PROXY_PID=$!; pids+=("$PROXY_PID"); PROXY_PORT=$port
  wait_port "$port"
  wait_ready "$admin" # for the OAuth modes: a token in hand
}

# One wrk run against $1 (with header $2, if given); prints "rps p50 p99".
wrk_run() {
  local url=$1 out header=()
  if [ -n "${2:-}" ]; then header=(-H "$2"); fi
  $LOAD wrk -t1 -c"$CONNECTIONS" -d"$WARMUP" "${header[@]}" "$url" >/dev/null
  out=$($LOAD wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${header[@]}" "$url")
  if ! grep -q 'Requests/sec' <<<"$out"; then echo "$out" >&2; exit 1; fi
  if grep -q 'Non-2xx' <<<"$out"; then echo "bench.sh: $url answered errors:" >&2; echo "$out" >&2; exit 1; fi
  printf '%s %s %s\n' "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1=="50%" {print $2}' <<<"$out")" "$(awk '$1=="99%" {print $2}' <<<"$out")"
}

# The targets, in table order: "key|name".
targets=(
  "direct|upstream direct (nginx return 200, sharing a core with wrk)"
  "nginx|nginx, static Authorization (1 worker)"
  "basic|tango-auth-proxy Basic (workers = 1)"
  "bearer|tango-auth-proxy OAuth Bearer"
  "dpop|tango-auth-proxy DPoP (ES256 proof per request)"
  "gateway|tango-auth-proxy gateway (caller auth + policy, Basic)"
  "logged|tango-auth-proxy Basic, access log on"
  "floor|hyper floor: server + one client connection, nothing else"
  "nginx_tls|nginx, TLS upstream (HTTP/1.1 keep-alive)"
  "basic_tls|tango-auth-proxy Basic, TLS upstream (HTTP/2)"
)

# Measures target $1 once; appends "rps p50 p99 peakRSS_MiB" to $work/runs.$1.
measure() {
  local key=$1 pid url hdr="" line
  case $key in
    direct) pid=$UP_PID; url="http://127.0.0.1:$UP_PORT/raas/v2/catalogs" ;;
    nginx) pid=$NG_PID; url="http://127.0.0.1:$NG_PORT/raas/v2/catalogs" ;;
    nginx_tls) pid=$NG_TLS_PID; url="http://127.0.0.1:$NG_TLS_PORT/raas/v2/catalogs" ;;
    floor)
      PROXY_PORT=$(free_port)
      $SUT "$EXAMPLES/hyper_floor" proxy "127.0.0.1:$PROXY_PORT" "127.0.0.1:$UP_PORT" &
      PROXY_PID=$!; pids+=("$PROXY_PID"); wait_port "$PROXY_PORT"
      pid=$PROXY_PID; url="http://127.0.0.1:$PROXY_PORT/raas/v2/catalogs" ;;
    *)
      case $key in
        logged) start_proxy info basic ;;
        basic_tls) start_proxy warn basic tls ;;
        *) start_proxy warn "$key" ;;
      esac
      pid=$PROXY_PID; url="http://127.0.0.1:$PROXY_PORT/raas/v2/catalogs"
      if [ "$key" = gateway ]; then hdr=$(gateway_auth); fi ;;
  esac
  line=$(wrk_run "$url" "$hdr")
  echo "$line $(( $(hwm_kib "$pid") / 1024 ))" >> "$work/runs.$key"
  if [ "$pid" = "${PROXY_PID:-}" ]; then stop_pid "$PROXY_PID"; PROXY_PID=; fi
}

for round in $(seq 1 "$ROUNDS"); do
  echo "bench.sh: round $round of $ROUNDS" >&2
  for t in "${targets[@]}"; do measure "${t%%|*}"; done
done

# The median round of target $1 (by requests/s): "rps p50 p99 rss".
median() { sort -n "$work/runs.$1" | sed -n "$(( (ROUNDS + 1) / 2 ))p"; }
rps_of() { median "$1" | cut -d' ' -f1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }

echo
echo "wrk -t1 -c$CONNECTIONS -d$DURATION, median of $ROUNDS interleaved rounds, $(nproc) cores, $(date -u +%Y-%m-%d)${SUT:+, server under test pinned to core 0}"
echo "upstream: nginx 'return 200' (1 worker)"
echo
printf '| %-58s | %10s | %8s | %8s | %8s | %-26s |\n' target "requests/s" p50 p99 "peak RSS" "every round"
printf '|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..60})" "$(printf -- '-%.0s' {1..12})" \
  "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..10})" "$(printf -- '-%.0s' {1..28})"
for t in "${targets[@]}"; do
  key=${t%%|*}; name=${t#*|}
  read -r rps p50 p99 rss <<<"$(median "$key")"
  printf '| %-58s | %10s | %8s | %8s | %5s MiB | %-26s |\n' "$name" "$rps" "$p50" "$p99" "$rss" \
    "$(cut -d' ' -f1 "$work/runs.$key" | paste -sd' ')"
done

echo
for key in basic bearer dpop gateway logged floor; do
  echo "$key / nginx: $(ratio "$(rps_of "$key")" "$(rps_of nginx)")"
done
echo "basic over TLS / nginx over TLS: $(ratio "$(rps_of basic_tls)" "$(rps_of nginx_tls)")"
echo "gateway / sidecar Basic: $(ratio "$(rps_of gateway)" "$(rps_of basic)")"

# The DPoP limit on this core.
t_sig_ns=$($SUT "$EXAMPLES/sign_cost" es256 20000 | awk '/^ns_per_signature/ {print $2}')
limit=$(awk -v b="$(rps_of bearer)" -v t="$t_sig_ns" 'BEGIN {printf "%.0f", 1 / (1/b + t/1e9)}')
echo "DPoP limit 1 / (1/Bearer + t_sig), t_sig = $(( t_sig_ns / 1000 )) µs: $limit requests/s; DPoP / limit: $(ratio "$(rps_of dpop)" "$limit")"

# Latency at fixed rates: 50 % and 90 % of nginx's median, nginx and the proxy interleaved, each
# $ROUNDS times; the median round (by p99) is shown, with every round's p99. A run the load side
# cannot keep up with (on two cores the client shares its core with the upstream) is not valid
# and is shown as such.
echo
echo "fixed rate (examples/fixed_rate, $CONNECTIONS connections, $DURATION, open loop, median of $ROUNDS interleaved rounds by p99):"
printf '| %-16s | %-24s | %10s | %9s | %9s | %9s | %-30s |\n' load target "achieved/s" p50 p99 p99.9 "p99 of every round"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..18})" "$(printf -- '-%.0s' {1..26})" \
  "$(printf -- '-%.0s' {1..12})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..32})"
start_proxy warn basic
for pct in 50 90; do
  rate=$(awk -v n="$(rps_of nginx)" -v p="$pct" 'BEGIN {printf "%.0f", n * p / 100}')
  for round in $(seq 1 "$ROUNDS"); do
    for target in nginx proxy; do
      port=$NG_PORT; if [ "$target" = proxy ]; then port=$PROXY_PORT; fi
      if out=$($LOAD "$EXAMPLES/fixed_rate" "http://127.0.0.1:$port/raas/v2/catalogs" --rate "$rate" \
        --connections "$CONNECTIONS" --duration "${DURATION%s}" --warmup "${WARMUP%s}" 2>"$work/fixed.err"); then
        awk '{v[$1]=$2} END {print v["p99_us"], v["achieved_rate"], v["p50_us"], v["p999_us"]}' <<<"$out" \
          >> "$work/fixed.$pct.$target"
      else
        echo "not-valid" >> "$work/fixed.$pct.$target"
        echo "bench.sh: fixed rate $rate/s against $target, round $round: $(head -1 "$work/fixed.err")" >&2
      fi
    done
  done
  for target in nginx proxy; do
    f=$work/fixed.$pct.$target
    name=nginx; if [ "$target" = proxy ]; then name="tango-auth-proxy Basic"; fi
    if grep -q not-valid "$f"; then
      printf '| %3s %% (%6s/s) | %-24s | %10s | %9s | %9s | %9s | %-30s |\n' "$pct" "$rate" "$name" \
        "not valid" "-" "-" "-" "$(cut -d' ' -f1 "$f" | paste -sd' ')"
      continue
    fi
    read -r p99 achieved p50 p999 <<<"$(sort -n "$f" | sed -n "$(( (ROUNDS + 1) / 2 ))p")"
    printf '| %3s %% (%6s/s) | %-24s | %10s | %6s µs | %6s µs | %6s µs | %-30s |\n' "$pct" "$rate" "$name" \
      "$achieved" "$p50" "$p99" "$p999" "$(cut -d' ' -f1 "$f" | paste -sd' ')"
  done
done
stop_pid "$PROXY_PID"

# Memory: idle, then the peak under 256 connections.
start_proxy warn basic
for _ in 1 2 3 4 5; do
  (exec 3<>"/dev/tcp/127.0.0.1/$PROXY_PORT"; printf 'GET /raas/v2/catalogs HTTP/1.0\r\n\r\n' >&3; cat <&3 >/dev/null)
done
idle=$(rss_kib "$PROXY_PID")
$LOAD wrk -t1 -c256 -d5s "http://127.0.0.1:$PROXY_PORT/raas/v2/catalogs" >/dev/null
peak=$(hwm_kib "$PROXY_PID")
stop_pid "$PROXY_PID"
echo
echo "proxy memory: idle $(( idle / 1024 )) MiB resident; peak $(( peak / 1024 )) MiB at 256 connections (wrk -c256, 5 s)"

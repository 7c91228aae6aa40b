# shellcheck shell=bash
# Helpers shared by the scripts under scripts/ (sourced, not run).
# After sourcing: $work is a fresh temporary directory, every PID appended to `pids` is killed on
# exit, and the directory is removed.

# Installs Debian package $2 when command $1 is missing (as root), or explains and exits.
need() {
  local cmd=$1 pkg=$2
  if ! command -v "$cmd" >/dev/null 2>&1; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
      echo "$(basename "$0"): installing $pkg" >&2
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
    else
      echo "$(basename "$0"): $cmd is missing; install the Debian package $pkg" >&2
      exit 1
    fi
  fi
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Waits until something listens on 127.0.0.1:$1, at most $2 tenths of a second (default 100).
wait_port() {
  for _ in $(seq 1 "${2:-100}"); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$(basename "$0"): nothing listening on port $1" >&2
  exit 1
}

# Waits until the proxy whose admin listener is on 127.0.0.1:$1 answers /readyz with 200 (for
# OAuth profiles: a token in hand), at most 10 s.
wait_ready() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1"; printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3; grep -q ' 200 ' <&3) 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  echo "$(basename "$0"): the proxy with admin port $1 never became ready" >&2
  exit 1
}

# Signals child $1 (with signal $2, default TERM), reaps it and drops it from `pids`, so the
# exit cleanup never signals a PID the system may have handed to another process since.
stop_pid() {
  local p=$1 q keep=()
  kill -"${2:-TERM}" "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
  for q in "${pids[@]}"; do
    if [ "$q" != "$p" ]; then keep+=("$q"); fi
  done
  pids=("${keep[@]}")
}

# The [profiles.default] body of a test proxy: $1 = basic | bearer | dpop | client_credentials.
# The OAuth ones take their token from the mock Tango on $IDP_PORT (its demo client; bearer and
# dpop as its service account); dpop signs with $work/dpop.pem.
profile_toml() {
  case $1 in
    basic|gateway) printf 'auth = "basic"\nplatform_name = "bench-platform"\napi_key = "bench-api-key"\n' ;;
    client_credentials)
      printf 'auth = "client_credentials"\ntoken_url = "http://127.0.0.1:%s/oauth/token"\n' "$IDP_PORT"
      printf 'client_id = "demo-client"\nclient_secret = "demo-client-secret"\n' ;;
    *)
      printf 'auth = "service_account"\ntoken_url = "http://127.0.0.1:%s/oauth/token"\n' "$IDP_PORT"
      printf 'client_id = "demo-client"\nclient_secret = "demo-client-secret"\n'
      printf 'username = "demo-user"\npassword = "demo-password"\n'
      if [ "$1" = dpop ]; then printf 'dpop_key_file = "%s"\n' "$work/dpop.pem"; fi ;;
  esac
}

# A test proxy's whole config, $WORKERS worker threads (default 1), in front of the upstream on
# $UP_PORT: $1 = proxy port, $2 = admin port, $3 = a kind of profile_toml. The profile table
# comes last, so a caller may append more profile keys.
proxy_toml() {
  cat <<TOML
[listen]
proxy = "127.0.0.1:$1"
admin = "127.0.0.1:$2"
workers = ${WORKERS:-1}
[upstream]
url = "${UPSTREAM_URL:-http://127.0.0.1:$UP_PORT}"
${UPSTREAM_EXTRA:-allow_http = true}
$(if [ "$3" = gateway ]; then gateway_caller_toml; fi)
[profiles.default]
$(profile_toml "$3")
TOML
}

# The key of the gateway rows' caller, and how wrk sends it.
GATEWAY_KEY=bench-store-key
gateway_auth() { printf 'Authorization: Basic %s' "$(printf 'pos-1:%s' "$GATEWAY_KEY" | base64)"; }

# One gateway caller with its policy on: Basic authentication, an allow list, account and
# customer bindings, a rate limit far above the load (the bucket is still taken per request).
gateway_caller_toml() {
  cat <<GW
[callers.pos-1]
key_sha256 = "$(printf '%s' "$GATEWAY_KEY" | sha256sum | cut -c1-64)"
allow = ["GET /raas/v2/catalogs", "POST /raas/v2/orders", "GET /raas/v2/orders/*"]
accounts = ["A-STORE-1"]
customers = ["C-STORE-1"]
require_external_ref_id = true
rate = "1000000/s"
GW
}

# The settings every nginx here shares, for a config in directory $1: one process (no master, no
# daemon, so it can run under a tool or be pinned), access log off, temp paths inside $1.
nginx_main() {
  mkdir -p "$1/logs"
  cat <<NGINX
daemon off;
master_process off;
worker_processes 1;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections 4096; }
NGINX
}

nginx_http_common() {
  cat <<NGINX
  access_log off;
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
NGINX
}

# The upstream both servers under test forward to, written to $work/upstream/nginx.conf: nginx
# answering every request 200 with a small JSON body (Tango's shape), one worker, on
# 127.0.0.1:$1 over plain HTTP/1.1 and, with $2, on 127.0.0.1:$2 over TLS with HTTP/2 offered by
# ALPN (as Tango's edge does), with the certificate from tls_files.
upstream_conf() {
  local dir=$work/upstream
  mkdir -p "$dir"
  {
    nginx_main "$dir"
    echo "http {"
    nginx_http_common "$dir"
    cat <<NGINX
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$1;
$(if [ -n "${2:-}" ]; then printf '    listen 127.0.0.1:%s ssl http2;\n    ssl_certificate %s;\n    ssl_certificate_key %s;\n' "$2" "$work/tls/upstream.pem" "$work/tls/upstream.key"; fi)
    location / {
      default_type application/json;
      return 200 '{"catalogName":"Bench","brands":[{"brandKey":"B000001","brandName":"Bench Brand","items":[]}]}';
    }
  }
}
NGINX
  } > "$dir/nginx.conf"
}

# A private CA ($work/tls/ca.pem) and the upstream's certificate for 127.0.0.1 and localhost,
# signed by it ($work/tls/upstream.pem, .key).
tls_files() {
  local d=$work/tls
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=bench CA" -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=localhost" -keyout "$d/upstream.key" -out "$d/upstream.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$d/ext"
  openssl x509 -req -in "$d/upstream.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial \
    -days 2 -extfile "$d/ext" -out "$d/upstream.pem" 2>/dev/null
}

# nginx as the peer the proxy is compared with, written to $work/nginx/nginx.conf: one process,
# access log off, listening on 127.0.0.1:$1, a keep-alive pool to the upstream on $UP_PORT, a
# static Authorization header (the Basic one the proxy's basic rows send). With $2, it forwards
# over TLS to the upstream's TLS port $2 instead (HTTP/1.1 keep-alive: nginx does not proxy over
# HTTP/2), verifying the certificate against the private CA.
nginx_conf() {
  local dir=$work/nginx up="http://tango"
  if [ -n "${2:-}" ]; then dir=$work/nginx-tls; up="https://tango"; fi
  mkdir -p "$dir"
  {
    nginx_main "$dir"
    echo "http {"
    nginx_http_common "$dir"
    cat <<NGINX
  upstream tango { server 127.0.0.1:${2:-$UP_PORT}; keepalive 128; keepalive_requests 1000000; }
  # The proxy never closes a keep-alive connection after a number of requests; nor does nginx
  # here (its default, 1000, costs its clients a reconnect every thousand requests).
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass $up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Basic $(printf 'bench-platform:bench-api-key' | base64)";
$(if [ -n "${2:-}" ]; then printf '      proxy_ssl_verify on;\n      proxy_ssl_name localhost;\n      proxy_ssl_trusted_certificate %s;\n      proxy_ssl_session_reuse on;\n' "$work/tls/ca.pem"; fi)
    }
  }
}
NGINX
  } > "$dir/nginx.conf"
}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

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
url = "http://127.0.0.1:$UP_PORT"
allow_http = true
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

# nginx as the peer the proxy is compared with, written to $work/nginx/nginx.conf: one process
# (no master, no daemon, so it can run under a tool), access log off, listening on 127.0.0.1:$1,
# a keep-alive pool to the upstream on $UP_PORT, a static Authorization header (the Basic one the
# proxy's basic rows send).
nginx_conf() {
  mkdir -p "$work/nginx/logs"
  cat > "$work/nginx/nginx.conf" <<NGINX
daemon off;
master_process off;
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  upstream tango { server 127.0.0.1:$UP_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$1;
    location / {
      proxy_pass http://tango;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Basic $(printf 'bench-platform:bench-api-key' | base64)";
    }
  }
}
NGINX
}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

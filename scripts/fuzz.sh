#!/usr/bin/env bash
# Fuzzing with libFuzzer (cargo fuzz): the key format, scope patterns, CIDR lists with
# X-Forwarded-For, and the config and key-store loaders. Each target runs FUZZ_SECS seconds
# (default 10) from the corpus it has grown before; any crash fails the run and leaves its
# input under fuzz/artifacts/. Installs cargo-fuzz when missing. Runs on stable Rust, without
# a sanitizer (`-s none`): the code under test forbids `unsafe`, so the fuzzer looks for
# panics, failed assertions and hangs.
#
#   scripts/fuzz.sh                        FUZZ_SECS=600 scripts/fuzz.sh    (a long run)
#   FUZZ_RUNS=10000000 scripts/fuzz.sh     (a fixed number of executions per target)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked --quiet cargo-fuzz
TARGETS=(key_format scope forwarded_for loaders)
cargo fuzz build -s none
for t in "${TARGETS[@]}"; do
  if [[ -n ${FUZZ_RUNS:-} ]]; then limit=(-runs="$FUZZ_RUNS"); else limit=(-max_total_time="${FUZZ_SECS:-10}"); fi
  # -timeout: one input taking over 5 s counts as a hang.
  out=$(cargo fuzz run -s none "$t" -- "${limit[@]}" -timeout=5 2>&1) || { echo "$out" | tail -40; echo "fuzz target $t failed" >&2; exit 1; }
  echo "$t: $(grep '^Done' <<<"$out")"
done

#!/usr/bin/env bash
# Fuzzing with libFuzzer (cargo fuzz): the key format, scope patterns, CIDR lists with
# X-Forwarded-For, the config and key-store loaders, the admin API's JSON bodies, and the
# whole way from a create and a patch body through the store and a snapshot to a decided
# request (key_lifecycle). Each target runs FUZZ_SECS seconds (default 10) from the corpus
# it has grown before and the seeds committed under fuzz/seeds/ (with fuzz/<target>.dict where there is one); any crash
# fails the run and leaves its input under fuzz/artifacts/. Installs cargo-fuzz when
# missing. Runs on stable Rust, without a sanitizer (`-s none`): the code under test forbids
# `unsafe`, so the fuzzer looks for panics, failed assertions and hangs.
#
#   scripts/fuzz.sh                        FUZZ_SECS=600 scripts/fuzz.sh    (a long run)
#   FUZZ_RUNS=10000000 scripts/fuzz.sh     (a fixed number of executions per target)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked --quiet cargo-fuzz
TARGETS=(key_format scope forwarded_for loaders admin_bodies key_lifecycle)
cargo fuzz build -s none
for t in "${TARGETS[@]}"; do
  if [[ -n ${FUZZ_RUNS:-} ]]; then limit=(-runs="$FUZZ_RUNS"); else limit=(-max_total_time="${FUZZ_SECS:-10}"); fi
  # The grown corpus, plus the committed seeds and dictionary where a target has them.
  mkdir -p "fuzz/corpus/$t"
  dirs=("$PWD/fuzz/corpus/$t") extra=()
  [[ -d fuzz/seeds/$t ]] && dirs+=("$PWD/fuzz/seeds/$t")
  [[ -f fuzz/$t.dict ]] && extra+=(-dict="$PWD/fuzz/$t.dict")
  # -timeout: one input taking over 5 s counts as a hang.
  out=$(cargo fuzz run -s none "$t" "${dirs[@]}" -- "${limit[@]}" "${extra[@]}" -timeout=5 2>&1) || { echo "$out" | tail -40; echo "fuzz target $t failed" >&2; exit 1; }
  echo "$t: $(grep '^Done' <<<"$out")"
done

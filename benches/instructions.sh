#!/usr/bin/env bash
# Instructions per accepted request, counted by callgrind over real traffic: unlike timings,
# the count does not move with machine noise, so a change of a few percent shows.
#
#   benches/instructions.sh [path/to/keygate]      (default: target/release/keygate)
#   HOUSEKEEPING=1 benches/instructions.sh         (include the 5-second usage flush)
#   SHAPE=customer benches/instructions.sh         (keys with credits, an identity and two
#                                                   named limits: examples/perf_setup.rs)
#
# Needs valgrind, nginx (the upstream) and wrk; loopback only. Every process started here is
# stopped by its own PID, and every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${1:-$TARGET/release/keygate}
SECS=${SECS:-6}
WORK=$(mktemp -d /tmp/keygate-instr.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [[ -n "${KEEP:-}" ]] || rm -rf "$WORK"
}
trap cleanup EXIT
for tool in valgrind callgrind_control nginx wrk curl; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install valgrind nginx wrk curl)" >&2; exit 2; }
done
[[ -x "$BIN" ]] || { echo "no $BIN: cargo build --release first" >&2; exit 2; }
cargo build --release --quiet --example perf_setup
"$TARGET"/release/examples/perf_setup "$WORK/gw" 10000 ${SHAPE:+--$SHAPE} >/dev/null
# The warm-up must reach every key once in the customer shape, so that each key's first
# credits lease is not charged to the measured phase (valgrind runs ~20x slower).
WARM=${WARM:-$([[ ${SHAPE:-} == customer ]] && echo 20 || echo 2)}
# Housekeeping (usage flush, alerts) is periodic, not per request. Under valgrind requests
# run ~20x slower, so every flush would be charged to ~20x fewer requests: it is pushed out
# of the measured window unless HOUSEKEEPING=1 asks for it (then every 5 s, the default).
[[ -n "${HOUSEKEEPING:-}" ]] || printf 'usage:\n  flush_interval: 1h\n' >> "$WORK/gw/keygate.yaml"

# shellcheck source=benches/upstream.sh
source benches/upstream.sh
write_upstream_conf "$WORK"
nginx -p "$WORK/" -c "$WORK/upstream.conf" -g 'daemon off;' &
PIDS+=($!)
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/cg.out" \
  "$BIN" serve --config "$WORK/gw/keygate.yaml" 2>"$WORK/valgrind.log" &
VG=$!
PIDS+=($VG)
key=$(head -1 "$WORK/gw/keys.txt")
for _ in $(seq 600); do   # valgrind starts slowly: up to 60 s
  curl -s -o /dev/null -m 1 -H "Authorization: Bearer $key" http://127.0.0.1:18083/v1/ping && break
  sleep 0.1
done
# Warm up (pool connections, first-use allocations), then count only the measured phase.
wrk -t1 -c16 -d"${WARM}s" -s benches/wrk_keys.lua http://127.0.0.1:18083/v1/ping -- "$WORK/gw/keys.txt" >/dev/null
callgrind_control -i on "$VG" >/dev/null
callgrind_control -z "$VG" >/dev/null
result=$(wrk -t1 -c16 -d"${SECS}s" -s benches/wrk_keys.lua http://127.0.0.1:18083/v1/ping -- "$WORK/gw/keys.txt" | grep '^RESULT')
callgrind_control -d "$VG" >/dev/null
sleep 1
requests=$(sed -n 's/.*requests=\([0-9]*\).*/\1/p' <<<"$result")
non2xx=$(sed -n 's/.*non2xx=\([0-9]*\).*/\1/p' <<<"$result")
instructions=$(awk '/^summary:/ { print $2 }' "$WORK/cg.out.1")
printf 'requests=%s non2xx=%s instructions=%s per_request=%s\n' "$requests" "$non2xx" "$instructions" \
  "$(awk -v i="$instructions" -v r="$requests" 'BEGIN { printf "%.0f", (r > 0 ? i / r : 0) }')"

#!/usr/bin/env bash
# Does a reload make requests wait? The same gateway, with KEYS keys (default 100,000), under
# the same load, with and without a full reload (SIGHUP) every second, rounds interleaved.
# Prints p50/p99 per round, the medians, and the ratio of p99 during reloads to without.
#
#   cargo build --release --bins --examples && benches/reload_latency.sh
#
# Needs nginx (the upstream) and wrk; loopback only. The gateway runs alone on CPU 1; wrk and
# nginx share CPU 0 (the reload's build runs on the gateway's blocking thread, also CPU 1).
# Every process is stopped by its own PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-8}
KEYS=${KEYS:-100000}
CONNS=${CONNS:-16}
BIN=target/release/keygate
WORK=$(mktemp -d /tmp/keygate-reload-latency.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
for tool in nginx wrk curl taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
[[ -x $BIN && -x target/release/examples/perf_setup ]] || { echo "cargo build --release --bins --examples first" >&2; exit 2; }
target/release/examples/perf_setup "$WORK/gw" "$KEYS" >/dev/null
printf 'usage:\n  flush_interval: 1h\n' >> "$WORK/gw/keygate.yaml"
# shellcheck source=benches/upstream.sh
source benches/upstream.sh
write_upstream_conf "$WORK"
taskset -c 0 nginx -p "$WORK/" -c "$WORK/upstream.conf" -g 'daemon off;' &
PIDS+=($!)
taskset -c 1 "$BIN" serve --config "$WORK/gw/keygate.yaml" 2>"$WORK/gw.log" &
GW=$!
PIDS+=($GW)
key=$(head -1 "$WORK/gw/keys.txt")
for _ in $(seq 300); do
  curl -s -o /dev/null -m 1 -H "Authorization: Bearer $key" http://127.0.0.1:18083/v1/ping && break
  sleep 0.1
done
head -2000 "$WORK/gw/keys.txt" > "$WORK/some-keys.txt"
load() {
  taskset -c 0 wrk -t1 -c"$CONNS" -d"${SECS}s" -s benches/wrk_keys.lua http://127.0.0.1:18083/v1/ping -- "$WORK/some-keys.txt" | grep '^RESULT'
}
load >/dev/null # warm up
for r in $(seq "$ROUNDS"); do
  printf 'steady round %s: %s\n' "$r" "$(load)" | tee -a "$WORK/results"
  before=$(grep -c '"reloaded"\|reloaded' "$WORK/gw.log" || true)
  ( for _ in $(seq "$SECS"); do sleep 1; kill -HUP "$GW"; done ) &
  hup=$!
  printf 'reload round %s: %s\n' "$r" "$(load)" | tee -a "$WORK/results"
  wait "$hup"
  sleep 1
  after=$(grep -c '"reloaded"\|reloaded' "$WORK/gw.log" || true)
  echo "  reloads in that round: $((after - before))"
done
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for kind in steady reload; do
  for f in rps p50_us p99_us; do
    printf '%s median %s = %s\n' "$kind" "$f" "$(grep "^$kind " "$WORK/results" | sed -n "s/.* $f=\([0-9.]*\).*/\1/p" | median)"
  done
done
s=$(grep '^steady ' "$WORK/results" | sed -n 's/.* p99_us=\([0-9]*\).*/\1/p' | median)
d=$(grep '^reload ' "$WORK/results" | sed -n 's/.* p99_us=\([0-9]*\).*/\1/p' | median)
awk -v s="$s" -v d="$d" 'BEGIN { printf "p99 during reloads / p99 without: %.2f\n", d / s }'

#!/usr/bin/env bash
# What the shared rate limiter costs: the same gateway, the same 10,000 rate-limited keys and
# the same load, with `rate_limit.backend: local` and `redis`, rounds interleaved. Prints
# requests/s, p50 and p99 per round and the medians.
#
#   cargo build --release --bins --examples && benches/redis_latency.sh
#   ROUNDS=5 SECS=8 CONNS=16 benches/redis_latency.sh
#
# Needs nginx (the upstream), redis-server and wrk; loopback only. The gateway runs alone
# on CPU 1; wrk, nginx and Redis share CPU 0. Every process is stopped by its own PID.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
CONNS=${CONNS:-16}
BIN=target/release/keygate
WORK=$(mktemp -d /tmp/keygate-redis-latency.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
for tool in nginx redis-server wrk curl taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
[[ -x $BIN && -x target/release/examples/perf_setup ]] || { echo "cargo build --release --bins --examples first" >&2; exit 2; }
target/release/examples/perf_setup "$WORK/gw" 10000 >/dev/null
printf 'usage:\n  flush_interval: 1h\n' >> "$WORK/gw/keygate.yaml"
cp "$WORK/gw/keygate.yaml" "$WORK/gw/local.yaml"
cp "$WORK/gw/keygate.yaml" "$WORK/gw/redis.yaml"
printf 'rate_limit: {backend: redis, url: "redis://127.0.0.1:16399/0", fail_mode: closed}\n' >> "$WORK/gw/redis.yaml"

# shellcheck source=benches/upstream.sh
source benches/upstream.sh
write_upstream_conf "$WORK"
taskset -c 0 nginx -p "$WORK/" -c "$WORK/upstream.conf" -g 'daemon off;' &
PIDS+=($!)
taskset -c 0 redis-server --port 16399 --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
PIDS+=($!)

run() { # $1 = local|redis; prints the RESULT line
  taskset -c 1 "$BIN" serve --config "$WORK/gw/$1.yaml" 2>"$WORK/$1.log" &
  local gw=$!
  local key
  key=$(head -1 "$WORK/gw/keys.txt")
  for _ in $(seq 100); do
    curl -s -o /dev/null -m 1 -H "Authorization: Bearer $key" http://127.0.0.1:18083/v1/ping && break
    sleep 0.1
  done
  taskset -c 0 wrk -t1 -c"$CONNS" -d1s -s benches/wrk_keys.lua http://127.0.0.1:18083/v1/ping -- "$WORK/gw/keys.txt" >/dev/null
  taskset -c 0 wrk -t1 -c"$CONNS" -d"${SECS}s" -s benches/wrk_keys.lua http://127.0.0.1:18083/v1/ping -- "$WORK/gw/keys.txt" | grep '^RESULT'
  kill "$gw"; wait "$gw" 2>/dev/null || true
}

for r in $(seq "$ROUNDS"); do
  for backend in local redis; do
    printf '%s round %s: %s\n' "$backend" "$r" "$(run "$backend")" | tee -a "$WORK/results"
  done
done
for backend in local redis; do
  for f in rps p50_us p99_us; do
    grep "^$backend " "$WORK/results" | sed -n "s/.* $f=\([0-9.]*\).*/\1/p" | sort -n |
      awk -v b="$backend" -v f="$f" '{ v[NR] = $1 } END { printf "%s median %s = %s\n", b, f, v[int((NR + 1) / 2)] }'
  done
done

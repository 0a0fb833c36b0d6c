#!/usr/bin/env bash
# What a key that models a customer costs: the same keygate binary twice, side by side, one
# with 10,000 keys of one rate limit each ("plain"), one with 10,000 keys that each carry
# credits, an identity (with metadata and a rate limit of its own) and two named rate limits
# ("customer", examples/perf_setup.rs --customer). Every limit is far above the load, so
# every request is accepted and proxied.
#
#   benches/customer_cost.sh                  # 7 interleaved rounds of 6 s, wrk -c64
#   ROUNDS=5 SECS=5 CONNS=256 benches/customer_cost.sh
#   KEYS=100 benches/customer_cost.sh         # a key set that fits the caches
#   PORT_BASE=18280 benches/customer_cost.sh  # other loopback ports (upstream on PORT_BASE,
#                                             # the gateways on +3 and +4, admin +13 and +14)
#
# Both gateways run one worker on CPU 1; wrk and the upstream (nginx, one worker) share CPU
# 0. Rounds alternate the two so that machine noise hits them alike. Each gateway first
# sees every key once (warm-up), so each key's first credits lease (one fsync, then one per
# 1,000 requests) is not charged to the measured rounds, as it is not to a key in steady
# use. The figure is user CPU per request (utime of the gateway process over wrk's request
# count); the summary gives medians and the median same-round ratio customer/plain.
#
# Needs nginx, wrk and taskset (installed with apt-get if missing). Loopback only; every
# process started here is stopped by its own PID, and the run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-7}
SECS=${SECS:-6}
CONNS=${CONNS:-64}
KEYS=${KEYS:-10000}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/release/keygate}
UP=${PORT_BASE:-18080}
PLAIN=$((UP + 3)) CUSTOMER=$((UP + 4))

missing=()
for tool in nginx:nginx wrk:wrk curl:curl taskset:util-linux; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
cargo build --release --quiet --bin keygate --example perf_setup

WORK=$(mktemp -d /tmp/keygate-customer.XXXXXX)
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap stop_all EXIT
( sleep $(( 120 + ROUNDS * 2 * (SECS + 5) )); echo "customer_cost.sh: time limit reached" >&2; kill -TERM $$ ) &
PIDS+=($!)

"$TARGET"/release/examples/perf_setup "$WORK/plain" "$KEYS" >/dev/null
"$TARGET"/release/examples/perf_setup "$WORK/customer" "$KEYS" --customer >/dev/null
for t in plain customer; do
  sed -i "s/127.0.0.1:18080/127.0.0.1:$UP/; s/127.0.0.1:18083/127.0.0.1:$PLAIN/; s/127.0.0.1:18093/127.0.0.1:$((UP + 13))/" "$WORK/$t/keygate.yaml"
done
sed -i "s/127.0.0.1:$PLAIN/127.0.0.1:$CUSTOMER/; s/127.0.0.1:$((UP + 13))/127.0.0.1:$((UP + 14))/" "$WORK/customer/keygate.yaml"

# shellcheck source=benches/upstream.sh
source benches/upstream.sh
write_upstream_conf "$WORK" "$UP"
taskset -c 0 nginx -p "$WORK/" -c "$WORK/upstream.conf" -g 'daemon off;' & PIDS+=($!)
declare -A PID_OF PORT=([plain]=$PLAIN [customer]=$CUSTOMER)
for t in plain customer; do
  taskset -c 1 "$BIN" serve --config "$WORK/$t/keygate.yaml" 2>"$WORK/$t.log" & PIDS+=($!); PID_OF[$t]=$!
done
for t in plain customer; do
  key=$(head -1 "$WORK/$t/keys.txt")
  for _ in $(seq 100); do
    got=$(curl -s -o /dev/null -w '%{http_code}' -m 1 -H "Authorization: Bearer $key" "http://127.0.0.1:${PORT[$t]}/v1/ping" || true)
    [[ $got == 200 ]] && break
    sleep 0.1
  done
  [[ $got == 200 ]] || { echo "$t does not answer 200 (got $got)" >&2; exit 3; }
done
# The customer's key really is limited three ways and named by its identity.
curl -s -D - -o /dev/null -H "Authorization: Bearer $(head -1 "$WORK/customer/keys.txt")" \
  "http://127.0.0.1:$CUSTOMER/v1/ping" | grep -qi '^ratelimit: "second".*"hourly".*"identity.minute"' ||
  { echo "the customer shape is not in force" >&2; exit 3; }

user_ticks() { awk '{ print $14 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
load() {  # target seconds
  timeout $(($2 + 20)) taskset -c 0 wrk -t1 -c"$CONNS" -d"${2}s" --timeout 5s \
    -s benches/wrk_keys.lua "http://127.0.0.1:${PORT[$1]}/v1/ping" -- "$WORK/$1/keys.txt" | grep '^RESULT' || true
}
for t in plain customer; do load "$t" 3 >/dev/null; done

echo "target round rps p99_us user_us_per_req non2xx" > "$WORK/results"
for round in $(seq "$ROUNDS"); do
  for t in plain customer; do
    before=$(user_ticks "${PID_OF[$t]}")
    line=$(load "$t" "$SECS")
    after=$(user_ticks "${PID_OF[$t]}")
    [[ -n $line ]] || { echo "no result for $t round $round" >&2; continue; }
    awk -v t="$t" -v r="$round" -v d=$((after - before)) -v hz="$HZ" '{
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      printf "%s %s %.0f %d %.3f %d\n", t, r, v["rps"], v["p99_us"], d / hz * 1e6 / v["requests"], v["non2xx"]
    }' <<<"$line" >> "$WORK/results"
    echo "  $(tail -1 "$WORK/results")" >&2
  done
done

echo
echo "# $(date -Is) keygate $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $KEYS keys, $ROUNDS rounds x ${SECS}s, wrk -c$CONNS; medians"
awk 'NR > 1 {
  n[$1]++; rps[$1, n[$1]] = $3; p99[$1, n[$1]] = $4; usr[$1, n[$1]] = $5; bad[$1] += $6
  round[$1, $2] = $5
} function median(a, k, m,   i, j, t, x) {
  for (i = 1; i <= m; i++) x[i] = a[k, i]
  for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (x[j] < x[i]) { t = x[i]; x[i] = x[j]; x[j] = t }
  return m % 2 ? x[(m + 1) / 2] : (x[m / 2] + x[m / 2 + 1]) / 2
} END {
  printf "%-9s %9s %8s %14s %7s\n", "target", "req/s", "p99 us", "user us/req", "non2xx"
  for (o = 1; o <= 2; o++) {
    t = o == 1 ? "plain" : "customer"
    printf "%-9s %9.0f %8.0f %14.3f %7d\n", t, median(rps, t, n[t]), median(p99, t, n[t]), median(usr, t, n[t]), bad[t]
  }
  m = 0
  for (r = 1; ("plain", r) in round; r++) if (("customer", r) in round && round["plain", r] > 0) ratio["x", ++m] = round["customer", r] / round["plain", r]
  if (m) printf "\nuser CPU per request, customer / plain: median of %d same-round ratios %.3f\n", m, median(ratio, "x", m)
}' "$WORK/results"

#!/usr/bin/env bash
# Instructions per accepted request, counted by callgrind over real traffic: unlike timings,
# the count does not move with machine noise, so a change of a few percent shows.
#
#   benches/instructions.sh [path/to/keygate]      (default: target/release/keygate)
#   HOUSEKEEPING=1 benches/instructions.sh         (include the 5-second usage flush)
#   PEERS=1 benches/instructions.sh                (nginx and HAProxy doing the same job, under
#                                                   the same traffic, and the ratios)
#   SHAPE=customer benches/instructions.sh         (keys with credits, an identity and two
#                                                   named limits: examples/perf_setup.rs)
#   ACCESS_LOG=json benches/instructions.sh        (with the access log on, json or combined,
#                                                   its writer thread counted too)
#   HISTORY=0 benches/instructions.sh              (each key's request history off)
#   WORKERS=2 benches/instructions.sh              (two worker threads: tokio's multi-thread
#                                                   runtime, its cross-thread work counted)
#   REFUSED=1 benches/instructions.sh              (per refused request instead: well-formed keys
#                                                   of a set never loaded, each answered 401)
#   PORT_BASE=18180 benches/instructions.sh        (other loopback ports, so that two runs can
#                                                   go at once: the upstream listens on
#                                                   PORT_BASE, keygate on +3, its admin on +13)
#   CACHE=1 benches/instructions.sh                (also simulate the caches and give the data
#                                                   reads and writes that miss each level, per
#                                                   request: what instructions cannot show. The
#                                                   last level simulated is one core's L2, 2 MiB
#                                                   16-way unless CACHE_LL=size,ways,line says
#                                                   otherwise: past it a miss costs tens of ns)
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
TRAFFIC="$WORK/gw/keys.txt"
if [[ -n "${REFUSED:-}" ]]; then
  "$TARGET"/release/examples/perf_setup "$WORK/unknown" 1000 >/dev/null
  TRAFFIC="$WORK/unknown/keys.txt"
fi
UP=${PORT_BASE:-18080}
NGINX_GW=$((UP + 1)) HAPROXY_GW=$((UP + 2)) GW=$((UP + 3)) ADMIN=$((UP + 13))
sed -i "s/127.0.0.1:18080/127.0.0.1:$UP/; s/127.0.0.1:18083/127.0.0.1:$GW/; s/127.0.0.1:18093/127.0.0.1:$ADMIN/" "$WORK/gw/keygate.yaml"
# The warm-up must reach every key once in the customer shape, so that each key's first
# credits lease is not charged to the measured phase (valgrind runs ~20x slower).
WARM=${WARM:-$([[ ${SHAPE:-} == customer ]] && echo 20 || echo 2)}
# Housekeeping (usage flush, alerts) is periodic, not per request. Under valgrind requests
# run ~20x slower, so every flush would be charged to ~20x fewer requests: it is pushed out
# of the measured window unless HOUSEKEEPING=1 asks for it (then every 5 s, the default).
[[ -n "${HOUSEKEEPING:-}" ]] || printf 'usage:\n  flush_interval: 1h\n' >> "$WORK/gw/keygate.yaml"
[[ -z "${WORKERS:-}" ]] || sed -i "s/^workers: .*/workers: $WORKERS/" "$WORK/gw/keygate.yaml"
[[ -z "${HISTORY:-}" ]] || printf 'request_history:\n  per_key: %s\n' "$HISTORY" >> "$WORK/gw/keygate.yaml"
[[ -z "${ACCESS_LOG:-}" ]] || printf 'access_log:\n  path: access.log\n  format: %s\n' "$ACCESS_LOG" >> "$WORK/gw/keygate.yaml"

# shellcheck source=benches/upstream.sh
source benches/upstream.sh
write_upstream_conf "$WORK" "$UP"
nginx -p "$WORK/" -c "$WORK/upstream.conf" -g 'daemon off;' &
PIDS+=($!)
# measure NAME PORT COMMAND...: runs COMMAND under callgrind, waits until it accepts a key on
# PORT, warms it up, then counts the instructions of the measured phase only; prints one line.
measure() {
  local name=$1 port=$2 vg result requests non2xx instructions
  shift 2
  valgrind --tool=callgrind --instr-atstart=no ${CACHE:+--cache-sim=yes --LL=${CACHE_LL:-2097152,16,64}} --callgrind-out-file="$WORK/cg-$name.out" \
    "$@" 2>"$WORK/valgrind-$name.log" &
  vg=$!
  PIDS+=($vg)
  local key
  key=$(head -1 "$WORK/gw/keys.txt")
  for _ in $(seq 600); do   # valgrind starts slowly: up to 60 s
    curl -s -o /dev/null -m 1 -H "Authorization: Bearer $key" "http://127.0.0.1:$port/v1/ping" && break
    sleep 0.1
  done
  # Warm up (pool connections, first-use allocations), then count only the measured phase.
  wrk -t1 -c16 -d"${WARM}s" -s benches/wrk_keys.lua "http://127.0.0.1:$port/v1/ping" -- "$TRAFFIC" >/dev/null
  callgrind_control -i on "$vg" >/dev/null
  callgrind_control -z "$vg" >/dev/null
  result=$(wrk -t1 -c16 -d"${SECS}s" -s benches/wrk_keys.lua "http://127.0.0.1:$port/v1/ping" -- "$TRAFFIC" | grep '^RESULT')
  callgrind_control -d "$vg" >/dev/null
  sleep 1
  kill "$vg" 2>/dev/null || true
  wait "$vg" 2>/dev/null || true
  requests=$(sed -n 's/.*requests=\([0-9]*\).*/\1/p' <<<"$result")
  non2xx=$(sed -n 's/.*non2xx=\([0-9]*\).*/\1/p' <<<"$result")
  # The dump of the measured phase is the file's first part (`.1`).
  instructions=$(awk '/^summary:/ { print $2 }' "$WORK/cg-$name.out.1")
  PER_REQUEST[$name]=$(awk -v i="$instructions" -v r="$requests" 'BEGIN { printf "%.0f", (r > 0 ? i / r : 0) }')
  printf '%-8s requests=%s non2xx=%s instructions=%s per_request=%s\n' "$name" "$requests" "$non2xx" \
    "$instructions" "${PER_REQUEST[$name]}"
  # Valgrind runs no SHA-NI, so keygate's key hash is counted in sha2's software code; the
  # native binary hashes with SHA-NI in about a third of the time (PERFORMANCE.md, "SHA-256
  # under callgrind"). Its share is given apart, so that the rest can be compared.
  if [[ $name == keygate ]]; then
    local sha
    sha=$(callgrind_annotate --inclusive=yes "$WORK/cg-$name.out.1" 2>/dev/null |
      awk '/sha2::sha256::compress256 \[/ { gsub(",", "", $1); print $1; exit }') || true
    [[ -z $sha ]] || awk -v s="$sha" -v r="$requests" -v name="$name" 'BEGIN { if (r > 0)
      printf "%-8s of which software SHA-256: %.0f per request (valgrind runs no SHA-NI)\n", name, s / r }'
  fi
  [[ -z "${CACHE:-}" ]] || awk -v r="$requests" -v name="$name" '
    /^events:/ { for (i = 2; i <= NF; i++) col[$i] = i }
    /^summary:/ { if (r > 0) printf "%-8s per_request: D1 misses %.1f (reads %.1f, writes %.1f), LL misses %.1f (reads %.1f, writes %.1f)\n", name,
      ($col["D1mr"] + $col["D1mw"]) / r, $col["D1mr"] / r, $col["D1mw"] / r,
      ($col["DLmr"] + $col["DLmw"]) / r, $col["DLmr"] / r, $col["DLmw"] / r }' "$WORK/cg-$name.out.1"
}
declare -A PER_REQUEST
measure keygate "$GW" "$BIN" serve --config "$WORK/gw/keygate.yaml"

[[ -n "${PEERS:-}" ]] || exit 0
# The peers doing the same job under the same traffic: a known key (nginx maps the raw
# header, HAProxy hashes it with SHA-256 as keygate does), 127.0.0.1 allowed, a per-key rate
# limit far above the load, keep-alive to the same upstream. One process each.
temp_paths() { for d in client_body proxy fastcgi uwsgi scgi; do printf '%s_temp_path %s/%s-%s;\n' "$d" "$WORK" "$1" "$d"; done; }
cat > "$WORK/nginx-gw.conf" <<NGX
master_process off;
daemon off;
worker_processes 1;
pid $WORK/nginx-gw.pid;
error_log $WORK/nginx-gw.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  $(temp_paths gw)
  map_hash_max_size 65536;
  map_hash_bucket_size 256;
  map \$http_authorization \$known_key { default 0; include $WORK/gw/nginx-keys.conf; }
  geo \$allowed_ip { default 0; 127.0.0.1/32 1; }
  limit_req_zone \$http_authorization zone=per_key:32m rate=100000r/s;
  limit_req_status 429;
  upstream api { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 100000000; }
  server {
    listen 127.0.0.1:$NGINX_GW backlog=4096;
    location / {
      if (\$known_key = 0) { return 401; }
      if (\$allowed_ip = 0) { return 403; }
      limit_req zone=per_key burst=1000 nodelay;
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGX
cat > "$WORK/haproxy.cfg" <<HAP
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend gateway
  bind 127.0.0.1:$HAPROXY_GW
  http-request deny deny_status 401 unless { req.hdr(authorization) -m beg "Bearer " }
  http-request set-var(txn.key) req.hdr(authorization),bytes(7),sha2(256),hex,lower,map($WORK/gw/haproxy-keys.map)
  http-request deny deny_status 401 unless { var(txn.key) -m found }
  http-request deny deny_status 403 unless { src 127.0.0.1/32 }
  http-request track-sc0 var(txn.key) table per_key
  http-request deny deny_status 429 if { sc_http_req_rate(0) gt 100000 }
  default_backend api
backend per_key
  stick-table type string len 16 size 50k expire 60s store http_req_rate(1s)
backend api
  server upstream 127.0.0.1:$UP maxconn 1000
HAP
measure nginx "$NGINX_GW" nginx -p "$WORK/" -c "$WORK/nginx-gw.conf"
command -v haproxy >/dev/null && measure haproxy "$HAPROXY_GW" haproxy -db -f "$WORK/haproxy.cfg"
for peer in nginx haproxy; do
  [[ -n ${PER_REQUEST[$peer]:-} ]] || continue
  printf 'keygate / %s: %s\n' "$peer" \
    "$(awk -v a="${PER_REQUEST[keygate]}" -v b="${PER_REQUEST[$peer]}" 'BEGIN { printf "%.2f", a / b }')"
done

#!/usr/bin/env bash
# keygate side by side with nginx and HAProxy doing the same job, on loopback.
#
#   benches/load.sh                    # 5 interleaved rounds of 8 s
#   ROUNDS=3 SECS=5 benches/load.sh    # quicker
#   KEYGATE_BIN=a/keygate KEYGATE_B=b/keygate benches/load.sh
#                                      # two keygate builds side by side (b as keygate-b)
#   PORT_BASE=18280 benches/load.sh   # other loopback ports (upstream on PORT_BASE, nginx +1,
#                                      # HAProxy +2, keygate +3 and +4, admin +13 and +14), so
#                                      # that it can run beside benches/instructions.sh
#   KEYGATE_B=target/release/keygate B_ACCESS_LOG=json PAIR_ONLY=1 benches/load.sh
#                                      # keygate-b logs every request (json or combined) to a
#                                      # file (A_ACCESS_LOG: keygate does); PAIR_ONLY leaves
#                                      # out direct, nginx and HAProxy
#   WORKERS=2 GATEWAY_CPU=0,1 LOAD_CPU=0,1 benches/load.sh
#                                      # every gateway with two workers (keygate's `workers`,
#                                      # nginx's worker_processes, HAProxy's nbthread), all
#                                      # processes sharing both cores; CPU counts every worker
#
# Every gateway checks a Bearer key against the same 10,000 keys (401), allows only
# 127.0.0.1 (403), applies a per-key rate limit set far above the load (429), and proxies to
# the same keep-alive upstream: nginx with one worker answering a 100-byte 200. Each gateway
# runs one worker on CPU 1; wrk and the upstream share CPU 0 for every target, "direct" (no
# gateway) included, which gives the ceiling. Rounds interleave the targets so that machine
# noise hits them alike; the summary gives medians and same-round ratios. nginx cannot hash
# without extra modules, so it maps the raw header; HAProxy hashes with sha2(256) like keygate.
#
# Installs nginx, haproxy and wrk with apt-get if they are missing. Loopback only; every
# process started here is stopped by its own PID, and the whole run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-8}
CONNS=${CONNS:-64}
GATEWAY_CPU=${GATEWAY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
WORKERS=${WORKERS:-1}
UP=${PORT_BASE:-18080}
NGINX=$((UP + 1)) HAPROXY=$((UP + 2)) KEYGATE=$((UP + 3)) KEYGATE_B_PORT=$((UP + 4))
ADMIN=$((UP + 13)) ADMIN_B=$((UP + 14))
KEYGATE_BIN=${KEYGATE_BIN:-target/release/keygate}
KEYGATE_B=${KEYGATE_B:-}
A_ACCESS_LOG=${A_ACCESS_LOG:-}
B_ACCESS_LOG=${B_ACCESS_LOG:-}
PAIR_ONLY=${PAIR_ONLY:-}

missing=()
for tool in nginx:nginx haproxy:haproxy wrk:wrk curl:curl taskset:util-linux; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

cargo build --release --quiet --bin keygate --example perf_setup
WORK=$(mktemp -d /tmp/keygate-load.XXXXXX)
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap stop_all EXIT
# Bound the whole run: rounds x targets x (measurement + slack), plus set-up.
( sleep $(( 120 + ROUNDS * 4 * (SECS + 5) )); echo "load.sh: time limit reached" >&2; kill -TERM $$ ) &
PIDS+=($!)

target/release/examples/perf_setup "$WORK/kg" 10000 >/dev/null
sed -i "s/^workers: .*/workers: $WORKERS/; s/127.0.0.1:18080/127.0.0.1:$UP/; s/127.0.0.1:18083/127.0.0.1:$KEYGATE/; s/127.0.0.1:18093/127.0.0.1:$ADMIN/" "$WORK/kg/keygate.yaml"
KEYS="$WORK/kg/keys.txt"
# Unknown keys: well-formed keygate keys from a set never loaded, so every gateway looks
# them up and finds nothing.
target/release/examples/perf_setup "$WORK/unknown" 1000 >/dev/null
BAD="$WORK/unknown/keys.txt"

temp_paths() { for d in client_body proxy fastcgi uwsgi scgi; do printf '%s_temp_path %s/%s-%s;\n' "$d" "$WORK" "$1" "$d"; done; }
cat > "$WORK/upstream.conf" <<NGX
worker_processes 1;
pid $WORK/upstream.pid;
error_log $WORK/upstream.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  $(temp_paths up)
  server { listen 127.0.0.1:$UP backlog=4096; location / { default_type text/plain; return 200 '{"ok":true,"from":"upstream","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}\n'; } }
}
NGX
cat > "$WORK/nginx.conf" <<NGX
worker_processes $WORKERS;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 100000000;
  keepalive_timeout 120s;
  $(temp_paths gw)
  map_hash_max_size 65536;
  map_hash_bucket_size 256;
  map \$http_authorization \$known_key { default 0; include $WORK/kg/nginx-keys.conf; }
  geo \$allowed_ip { default 0; 127.0.0.1/32 1; }
  limit_req_zone \$http_authorization zone=per_key:32m rate=100000r/s;
  limit_req_status 429;
  upstream api { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 100000000; }
  server {
    listen 127.0.0.1:$NGINX backlog=4096;
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
  nbthread $WORKERS
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  option http-keep-alive
  http-reuse always
frontend gateway
  bind 127.0.0.1:$HAPROXY
  http-request deny deny_status 401 unless { req.hdr(authorization) -m beg "Bearer " }
  http-request set-var(txn.key) req.hdr(authorization),bytes(7),sha2(256),hex,lower,map($WORK/kg/haproxy-keys.map)
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

declare -A PID_OF PORT=([direct]=$UP [nginx]=$NGINX [haproxy]=$HAPROXY [keygate]=$KEYGATE [keygate-b]=$KEYGATE_B_PORT)
GATEWAYS=(nginx haproxy keygate)
FIRST=(direct)
[[ -z $PAIR_ONLY ]] || { GATEWAYS=(keygate); FIRST=(); }
taskset -c "$LOAD_CPU" nginx -p "$WORK/" -c "$WORK/upstream.conf" -g 'daemon off;' & PIDS+=($!)
taskset -c "$GATEWAY_CPU" nginx -p "$WORK/" -c "$WORK/nginx.conf" -g 'daemon off;' & PIDS+=($!); PID_OF[nginx]=$!
taskset -c "$GATEWAY_CPU" haproxy -db -f "$WORK/haproxy.cfg" & PIDS+=($!); PID_OF[haproxy]=$!
A_CONF="$WORK/kg/keygate.yaml"
if [[ -n $A_ACCESS_LOG ]]; then
  A_CONF="$WORK/kg/keygate-a.yaml"
  cp "$WORK/kg/keygate.yaml" "$A_CONF"
  printf 'access_log:\n  path: access.log\n  format: %s\n' "$A_ACCESS_LOG" >> "$A_CONF"
fi
taskset -c "$GATEWAY_CPU" "$KEYGATE_BIN" serve --config "$A_CONF" 2>"$WORK/keygate.log" & PIDS+=($!); PID_OF[keygate]=$!
if [[ -n $KEYGATE_B ]]; then
  # The same config and keys, on its own port and with its own log, audit and usage files.
  mkdir -p "$WORK/kg-b"
  sed "s/127.0.0.1:$KEYGATE/127.0.0.1:$KEYGATE_B_PORT/; s/127.0.0.1:$ADMIN/127.0.0.1:$ADMIN_B/" "$WORK/kg/keygate.yaml" \
    | sed "s#^keys_file: .*#keys_file: $WORK/kg/keys.yaml#" > "$WORK/kg-b/keygate.yaml"
  [[ -z $B_ACCESS_LOG ]] || printf 'access_log:\n  path: access.log\n  format: %s\n' "$B_ACCESS_LOG" >> "$WORK/kg-b/keygate.yaml"
  taskset -c "$GATEWAY_CPU" "$KEYGATE_B" serve --config "$WORK/kg-b/keygate.yaml" 2>"$WORK/keygate-b.log" & PIDS+=($!); PID_OF[keygate-b]=$!
  GATEWAYS+=(keygate-b)
fi
key=$(head -1 "$KEYS")
for t in direct "${GATEWAYS[@]}"; do
  for _ in $(seq 100); do curl -s -o /dev/null -m 1 "http://127.0.0.1:${PORT[$t]}/" && break; sleep 0.1; done
  [[ $t == direct ]] && continue
  got="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" "http://127.0.0.1:${PORT[$t]}/v1/ping")"
  got+=" $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$t]}/v1/ping")"
  got+=" $(curl -s -o /dev/null -w '%{http_code}' --interface 127.0.0.2 -H "Authorization: Bearer $key" "http://127.0.0.1:${PORT[$t]}/v1/ping")"
  [[ $got == "200 401 403" ]] || { echo "$t does not do the job: got '$got', want '200 401 403'" >&2; exit 3; }
done
# The nginx workers are the processes whose CPU counts for nginx.
PID_OF[nginx]=$(pgrep -P "${PID_OF[nginx]}" | tr '\n' ' ')

# User plus system ticks of the given processes (every thread counted), summed; with a second
# argument `user`, user ticks alone.
cpu_ticks() {
  local t=0 p fields='$14 + $15'
  [[ ${2:-} == user ]] && fields='$14'
  for p in $1; do t=$((t + $(awk "{ print $fields }" "/proc/$p/stat"))); done
  echo "$t"
}
HZ=$(getconf CLK_TCK)
echo "case target round rps p50_us p99_us cpu_us_per_req user_us_per_req" > "$WORK/results"
run() {  # case target round keyfile
  local before after before_user after_user line
  before=$(cpu_ticks "${PID_OF[$2]:-}")
  before_user=$(cpu_ticks "${PID_OF[$2]:-}" user)
  line=$(timeout $((SECS + 20)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${SECS}s" --timeout 5s \
         -s benches/wrk_keys.lua "http://127.0.0.1:${PORT[$2]}/v1/ping" -- "$4" | grep '^RESULT' || true)
  after=$(cpu_ticks "${PID_OF[$2]:-}")
  after_user=$(cpu_ticks "${PID_OF[$2]:-}" user)
  [[ -n $line ]] || { echo "no result for $1 $2 round $3" >&2; return; }
  [[ $2 != keygate-b ]] || sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line" >> "$WORK/b_requests"
  awk -v c="$1" -v t="$2" -v r="$3" -v d=$((after - before)) -v u=$((after_user - before_user)) -v hz="$HZ" '{
    for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "%s %s %s %.0f %d %d %.2f %.2f\n", c, t, r, v["rps"], v["p50_us"], v["p99_us"], (t == "direct" ? 0 : d / hz * 1e6 / v["requests"]), (t == "direct" ? 0 : u / hz * 1e6 / v["requests"])
  }' <<<"$line" >> "$WORK/results"
  echo "  $1 $2 round $3: $(tail -1 "$WORK/results" | cut -d' ' -f4-)" >&2
}
for round in $(seq "$ROUNDS"); do
  for t in "${FIRST[@]}" "${GATEWAYS[@]}"; do run accepted "$t" "$round" "$KEYS"; done
  for t in "${GATEWAYS[@]}"; do run unknown "$t" "$round" "$BAD"; done
done

if [[ -n $B_ACCESS_LOG && -n $KEYGATE_B ]]; then
  sleep 1  # the writer's next flush
  echo "keygate-b access log: $(wc -l < "$WORK/kg-b/access.log") lines for $(awk '{ s += $1 } END { print s }' "$WORK/b_requests") requests"
fi
echo
echo "# $(date -Is) keygate $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $ROUNDS rounds x ${SECS}s, wrk -c$CONNS; medians"
awk 'NR > 1 {
  k = $1 " " $2; n[k]++; rps[k, n[k]] = $4; p50[k, n[k]] = $5; p99[k, n[k]] = $6; cpu[k, n[k]] = $7; usr[k, n[k]] = $8
  byround[$1, $2, $3] = $4; cpuround[$1, $2, $3] = $7; userround[$1, $2, $3] = $8
} function b_vs_a(per, what,   c, cs, m, round, i, r, rr) {
  # keygate-b against keygate, per request: the median of same-round ratios of `per`.
  print "\nsame-round ratios of " what " us/req (median):"
  for (c = 1; c <= 2; c++) {
    cs = c == 1 ? "accepted" : "unknown"
    m = 0; delete r; delete rr
    for (round = 1; (cs, "keygate", round) in per; round++) if ((cs, "keygate-b", round) in per && per[cs, "keygate", round] > 0) r[++m] = per[cs, "keygate-b", round] / per[cs, "keygate", round]
    for (i = 1; i <= m; i++) rr["x", i] = r[i]
    if (m) printf "  %-8s keygate-b vs keygate %.3f\n", cs, median(rr, "x", m)
  }
} function median(a, k, m,   i, j, t, x) {
  for (i = 1; i <= m; i++) x[i] = a[k, i]
  for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (x[j] < x[i]) { t = x[i]; x[i] = x[j]; x[j] = t }
  return m % 2 ? x[(m + 1) / 2] : (x[m / 2] + x[m / 2 + 1]) / 2
} END {
  printf "%-9s %-8s %9s %8s %8s %12s %12s\n", "case", "target", "req/s", "p50 us", "p99 us", "cpu us/req", "user us/req"
  split("accepted:direct accepted:nginx accepted:haproxy accepted:keygate accepted:keygate-b unknown:nginx unknown:haproxy unknown:keygate unknown:keygate-b", order, " ")
  for (o = 1; o in order; o++) {
    split(order[o], ct, ":"); k = ct[1] " " ct[2]; if (!(k in n)) continue
    printf "%-9s %-8s %9.0f %8.0f %8.0f %12.2f %12.2f\n", ct[1], ct[2], median(rps, k, n[k]), median(p50, k, n[k]), median(p99, k, n[k]), median(cpu, k, n[k]), median(usr, k, n[k])
  }
  print "\nsame-round ratios of req/s (median):"
  for (c = 1; c <= 2; c++) {
    cs = c == 1 ? "accepted" : "unknown"
    split("haproxy keygate keygate-b", others, " ")
    for (o = 1; o <= 3; o++) {
      m = 0; delete r
      for (round = 1; (cs, "nginx", round) in byround; round++) if ((cs, others[o], round) in byround) r[++m] = byround[cs, others[o], round] / byround[cs, "nginx", round]
      for (i = 1; i <= m; i++) rr["x", i] = r[i]
      if (m) printf "  %-8s %-9s vs nginx %.2f\n", cs, others[o], median(rr, "x", m)
    }
    m = 0; delete r
    for (round = 1; (cs, "keygate", round) in byround; round++) if ((cs, "keygate-b", round) in byround) r[++m] = byround[cs, "keygate-b", round] / byround[cs, "keygate", round]
    for (i = 1; i <= m; i++) rr["x", i] = r[i]
    if (m) printf "  %-8s keygate-b vs keygate %.2f\n", cs, median(rr, "x", m)
  }
  b_vs_a(cpuround, "cpu")
  b_vs_a(userround, "user")
}' "$WORK/results"

#!/usr/bin/env bash
# What forward auth costs, on loopback, side by side in interleaved rounds:
#   nginx          nginx alone as the gateway: its key map, address rule and limit, then
#                  the upstream (the shared harness's job, as benches/load.sh runs it)
#   keygate        keygate's own proxy doing the same job
#   keygate-auth   keygate's auth listener asked directly: one decision per request, no
#                  forwarding (the cost of a forward-auth decision)
#   nginx+keygate  nginx with the shipped examples/nginx/keygate.conf: auth_request to
#                  keygate's auth listener, then the upstream
#   nginx+static   the same nginx config asking a stand-in that answers every question
#                  200 with fixed identity headers (a second nginx's `return 200`, on the
#                  same CPU): no decision at all, so its throughput is the ceiling of the
#                  auth_request placement for any auth service, keygate included. It does
#                  not do the job (it admits unknown keys) and is not checked for it.
#
#   benches/forward_auth.sh                  # 5 rounds of 8 s
#   ROUNDS=3 SECS=5 benches/forward_auth.sh  # quicker
#   NGINX_EXAMPLE=my.conf benches/forward_auth.sh
#                                            # another nginx config in the shipped one's place
#                                            # (the same addresses: 9091 keygate, 3000 the API)
#
# Every gateway runs one worker on CPU 1 (nginx+keygate: both processes there); wrk and the
# upstream share CPU 0. `user us/req` is the user CPU time per request of the gateway's
# processes (for nginx+keygate, nginx's worker and keygate together). The targets: a
# decision (keygate-auth) at most 0.5x the user CPU of a proxied request (keygate), and
# nginx+keygate at least 0.6x nginx's throughput. Needs nginx with the headers-more module
# and wrk (installed with apt-get when missing). Every process started here is stopped by
# its own PID, and the whole run is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
SECS=${SECS:-8}
CONNS=${CONNS:-64}
GATEWAY_CPU=${GATEWAY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
UP=18080 NGINX=18081 KEYGATE=18083 AUTH=18085 NGINX_AUTH=18086 STATIC=18087 NGINX_STATIC=18088
HEADERS_MORE=/usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so

missing=()
for tool in nginx:nginx wrk:wrk curl:curl taskset:util-linux; do
  command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
[[ -e $HEADERS_MORE ]] || missing+=(libnginx-mod-http-headers-more-filter)
if ((${#missing[@]})); then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

cargo build --release --quiet --bin keygate --example perf_setup
WORK=$(mktemp -d /tmp/keygate-fauth.XXXXXX)
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap stop_all EXIT
( sleep $(( 120 + ROUNDS * 7 * (SECS + 5) )); echo "forward_auth.sh: time limit reached" >&2; kill -TERM $$ ) &
PIDS+=($!)

target/release/examples/perf_setup "$WORK/kg" 10000 >/dev/null
KEYS="$WORK/kg/keys.txt"
# keygate's listeners: the proxy, and the auth listener, trusting nginx (on loopback).
sed -i "s#listen: {proxy: 127.0.0.1:$KEYGATE, admin: \([0-9.:]*\)}#listen: {proxy: 127.0.0.1:$KEYGATE, admin: \1, auth: 127.0.0.1:$AUTH}\ntrusted_proxies: [127.0.0.1/32]#" "$WORK/kg/keygate.yaml"
grep -q "auth: 127.0.0.1:$AUTH" "$WORK/kg/keygate.yaml" || { echo "cannot set listen.auth" >&2; exit 3; }

temp_paths() { for d in client_body proxy fastcgi uwsgi scgi; do printf '%s_temp_path %s/%s-%s;\n' "$d" "$WORK" "$1" "$d"; done; }
nginx_conf() {  # name, then the http block's own lines
  local name=$1; shift
  printf '%s\n' "worker_processes 1;" "pid $WORK/$name.pid;" "error_log $WORK/$name.err warn;" \
    "events { worker_connections 4096; }" "http {" "access_log off;" "keepalive_requests 100000000;" \
    "keepalive_timeout 120s;" "$(temp_paths "$name")" "$@" "}" > "$WORK/$name.conf"
}
nginx_conf upstream \
  "server { listen 127.0.0.1:$UP backlog=4096; location / { default_type text/plain; return 200 '{\"ok\":true,\"from\":\"upstream\",\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}\n'; } }"
nginx_conf nginx "map_hash_max_size 65536;" "map_hash_bucket_size 256;" \
  "map \$http_authorization \$known_key { default 0; include $WORK/kg/nginx-keys.conf; }" \
  "geo \$allowed_ip { default 0; 127.0.0.1/32 1; }" \
  "limit_req_zone \$http_authorization zone=per_key:32m rate=100000r/s;" "limit_req_status 429;" \
  "upstream api { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 100000000; }" \
  "server { listen 127.0.0.1:$NGINX backlog=4096; location / {
     if (\$known_key = 0) { return 401; }
     if (\$allowed_ip = 0) { return 403; }
     limit_req zone=per_key burst=1000 nodelay;
     proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
# The shipped example, with the bench's addresses, and its pools kept open as long as the
# other nginx's.
sed -e "s/127.0.0.1:9091/127.0.0.1:$AUTH/; s/127.0.0.1:3000/127.0.0.1:$UP/" \
    -e "s/listen 8000;/listen 127.0.0.1:$NGINX_AUTH backlog=4096;/" \
    -e "s/keepalive 128;/keepalive 128; keepalive_requests 100000000;/" \
    "${NGINX_EXAMPLE:-examples/nginx/keygate.conf}" > "$WORK/example.conf"
nginx_conf nginx-auth "include $WORK/example.conf;"
sed -i "1i load_module $HEADERS_MORE;" "$WORK/nginx-auth.conf"
# The ceiling: the same example asking the stand-in instead of keygate.
sed -e "s/127.0.0.1:$AUTH/127.0.0.1:$STATIC/; s/listen 127.0.0.1:$NGINX_AUTH /listen 127.0.0.1:$NGINX_STATIC /" \
    -e "s/upstream keygate_auth/upstream static_auth/; s#http://keygate_auth#http://static_auth#" \
    -e "s/upstream api /upstream api_static /; s#http://api;#http://api_static;#" \
    "$WORK/example.conf" > "$WORK/example-static.conf"
nginx_conf nginx-static "include $WORK/example-static.conf;"
sed -i "1i load_module $HEADERS_MORE;" "$WORK/nginx-static.conf"
nginx_conf static-auth "server { listen 127.0.0.1:$STATIC backlog=4096; location / {
     add_header X-Keygate-Key-Id 0a1b2c3d; add_header X-Keygate-Namespace acme;
     add_header X-Keygate-Environment production; return 200; } }"

declare -A PID_OF PORT=([nginx]=$NGINX [keygate]=$KEYGATE [keygate-auth]=$AUTH [nginx+keygate]=$NGINX_AUTH [nginx+static]=$NGINX_STATIC)
TARGETS=(nginx keygate keygate-auth nginx+keygate nginx+static)
taskset -c "$LOAD_CPU" nginx -p "$WORK/" -c "$WORK/upstream.conf" -g 'daemon off;' & PIDS+=($!)
taskset -c "$GATEWAY_CPU" nginx -p "$WORK/" -c "$WORK/nginx.conf" -g 'daemon off;' & PIDS+=($!); PID_OF[nginx]=$!
taskset -c "$GATEWAY_CPU" nginx -p "$WORK/" -c "$WORK/nginx-auth.conf" -g 'daemon off;' & PIDS+=($!); PID_OF[nginx+keygate]=$!
taskset -c "$GATEWAY_CPU" nginx -p "$WORK/" -c "$WORK/nginx-static.conf" -g 'daemon off;' & PIDS+=($!); PID_OF[nginx+static]=$!
taskset -c "$GATEWAY_CPU" nginx -p "$WORK/" -c "$WORK/static-auth.conf" -g 'daemon off;' & PIDS+=($!); STATIC_PID=$!
taskset -c "$GATEWAY_CPU" target/release/keygate serve --config "$WORK/kg/keygate.yaml" 2>"$WORK/keygate.log" & PIDS+=($!)
PID_OF[keygate]=$! PID_OF[keygate-auth]=$!
KEYGATE_PID=$!
key=$(head -1 "$KEYS")
for t in "${TARGETS[@]}"; do
  for _ in $(seq 100); do curl -s -o /dev/null -m 1 "http://127.0.0.1:${PORT[$t]}/" && break; sleep 0.1; done
  got="$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" "http://127.0.0.1:${PORT[$t]}/v1/ping")"
  got+=" $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT[$t]}/v1/ping")"
  got+=" $(curl -s -o /dev/null -w '%{http_code}' --interface 127.0.0.2 -H "Authorization: Bearer $key" "http://127.0.0.1:${PORT[$t]}/v1/ping")"
  want="200 401 403"; [[ $t == nginx+static ]] && want="200 200 200"
  [[ $got == "$want" ]] || { echo "$t does not do what it should: got '$got', want '$want'" >&2; exit 3; }
done
# The nginx workers are the processes whose CPU counts.
PID_OF[nginx]=$(pgrep -P "${PID_OF[nginx]}" | head -1)
PID_OF[nginx+keygate]="$(pgrep -P "${PID_OF[nginx+keygate]}" | head -1) $KEYGATE_PID"
PID_OF[nginx+static]="$(pgrep -P "${PID_OF[nginx+static]}" | head -1) $(pgrep -P "$STATIC_PID" | head -1)"

user_ticks() { local sum=0 p; for p in $1; do sum=$((sum + $(awk '{ print $14 }' "/proc/$p/stat"))); done; echo $sum; }
all_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
echo "target round rps p50_us p99_us user_us_per_req keygate_user_us_per_req keygate_cpu_us_per_req" > "$WORK/results"
run() {  # target round
  local before after kg_before kg_after kc_before kc_after line
  before=$(user_ticks "${PID_OF[$1]}")
  kg_before=$(user_ticks "$KEYGATE_PID") kc_before=$(all_ticks "$KEYGATE_PID")
  line=$(timeout $((SECS + 20)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${SECS}s" --timeout 5s \
         -s benches/wrk_keys.lua "http://127.0.0.1:${PORT[$1]}/v1/ping" -- "$KEYS" | grep '^RESULT' || true)
  after=$(user_ticks "${PID_OF[$1]}")
  kg_after=$(user_ticks "$KEYGATE_PID") kc_after=$(all_ticks "$KEYGATE_PID")
  [[ -n $line ]] || { echo "no result for $1 round $2" >&2; return; }
  awk -v t="$1" -v r="$2" -v d=$((after - before)) -v k=$((kg_after - kg_before)) -v kc=$((kc_after - kc_before)) -v hz="$HZ" '{
    for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    if (v["non2xx"] > 0) { print "refusals in " t " round " r ": " v["non2xx"] > "/dev/stderr" }
    printf "%s %s %.0f %d %d %.2f %.2f %.2f\n", t, r, v["rps"], v["p50_us"], v["p99_us"], d / hz * 1e6 / v["requests"], k / hz * 1e6 / v["requests"], kc / hz * 1e6 / v["requests"]
  }' <<<"$line" >> "$WORK/results"
  echo "  $1 round $2: $(tail -1 "$WORK/results" | cut -d' ' -f3-)" >&2
}
for t in "${TARGETS[@]}"; do run "$t" warmup; done
sed -i '/ warmup /d' "$WORK/results"
for round in $(seq "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do run "$t" "$round"; done
done

echo
echo "# $(date -Is) keygate $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $ROUNDS rounds x ${SECS}s, wrk -c$CONNS, 10,000 keys; medians"
awk 'NR > 1 {
  n[$1]++; rps[$1, n[$1]] = $3; p50[$1, n[$1]] = $4; p99[$1, n[$1]] = $5; cpu[$1, n[$1]] = $6; kg[$1, n[$1]] = $7; kc[$1, n[$1]] = $8
  r_rps[$1, $2] = $3; r_cpu[$1, $2] = $6; rounds[$2] = 1
} function median(a, k, m,   i, j, t, x) {
  for (i = 1; i <= m; i++) x[i] = a[k, i]
  for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++) if (x[j] < x[i]) { t = x[i]; x[i] = x[j]; x[j] = t }
  return m % 2 ? x[(m + 1) / 2] : (x[m / 2] + x[m / 2 + 1]) / 2
} function ratio(a, num, den,   m, r, round) {
  m = 0
  for (round in rounds) if ((num, round) in a && (den, round) in a && a[den, round] > 0) r["x", ++m] = a[num, round] / a[den, round]
  return m ? median(r, "x", m) : 0
} END {
  printf "%-14s %9s %8s %8s %12s %14s %14s\n", "target", "req/s", "p50 us", "p99 us", "user us/req", "keygate user", "keygate cpu"
  split("nginx keygate keygate-auth nginx+keygate nginx+static", order, " ")
  for (o = 1; o in order; o++) {
    t = order[o]; if (!(t in n)) continue
    printf "%-14s %9.0f %8.0f %8.0f %12.2f %14.2f %14.2f\n", t, median(rps, t, n[t]), median(p50, t, n[t]), median(p99, t, n[t]), median(cpu, t, n[t]), median(kg, t, n[t]), median(kc, t, n[t])
  }
  print "\nsame-round ratios (median):"
  printf "  user CPU, a decision (keygate-auth) / a proxied request (keygate): %.2f  (target <= 0.5)\n", ratio(r_cpu, "keygate-auth", "keygate")
  printf "  req/s, nginx+keygate / nginx alone:                                %.2f  (target >= 0.6)\n", ratio(r_rps, "nginx+keygate", "nginx")
  printf "  user CPU, nginx+keygate / nginx alone:                             %.2f\n", ratio(r_cpu, "nginx+keygate", "nginx")
  printf "  req/s, nginx+static / nginx alone (the placement'"'"'s ceiling):       %.2f\n", ratio(r_rps, "nginx+static", "nginx")
  printf "  req/s, nginx+keygate / nginx+static (keygate against no decision):  %.2f\n", ratio(r_rps, "nginx+keygate", "nginx+static")
  print "\n(user us/req: all of the target processes; keygate user and cpu: the keygate process alone,"
  print " user and user+system time per request: for nginx+keygate, what keygate adds to nginx)"
}' "$WORK/results"

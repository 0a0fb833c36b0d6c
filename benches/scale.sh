#!/usr/bin/env bash
# What a key change costs at scale. For each store kind in STORES (default "file sqlite") and
# each key count in SIZES (default "100000 1000000"): import that many keys with `keygate keys
# import`, start the gateway (`workers: 1`), then make CREATES keys (default 5) through the
# admin API one after another, each followed by a proxied request with the new key, time list
# pages, make CHANGES more changes (default 1000 for sqlite, 0 for the file store, which
# rewrites itself whole on each), and reload once. Prints, per store and size: import time,
# store size, start until listening, resident memory after start, after the creates and after
# the changes, each create's time until it answered 201 (and their median), whether the next
# request with the new key was accepted, how the changes were applied (delta or reload), list
# page times (median of 5), proxied traffic's p99 under wrk alone and while the admin API takes
# 100 creates a second (LOAD_SECS each, default 10, in P99_ROUNDS alternating pairs, default 3,
# with the median ratio; skipped without wrk), and `POST /v1/reload`.
#
#   cargo build --release && benches/scale.sh
#   STORES=sqlite SIZES=100000 CREATES=9 benches/scale.sh
#   BIN=/path/to/other/keygate benches/scale.sh      (another build, for a same-day comparison)
#
# Needs nginx (the upstream) and curl; loopback only; every process is stopped by its own PID.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"100000 1000000"}
STORES=${STORES:-"file sqlite"}
CREATES=${CREATES:-5}
BIN=${BIN:-target/release/keygate}
PROXY=127.0.0.1:18183
ADMIN=127.0.0.1:18193
export KEYGATE_ADMIN_TOKEN=scale-bench-admin-token
WORK=$(mktemp -d /tmp/keygate-scale.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
for tool in nginx curl awk; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done
[[ -x $BIN ]] || { echo "cargo build --release first" >&2; exit 2; }
# shellcheck source=benches/upstream.sh
source benches/upstream.sh
write_upstream_conf "$WORK"
nginx -p "$WORK/" -c "$WORK/upstream.conf" -g 'daemon off;' &
PIDS+=($!)

now_ms() { date +%s%3N; }
rss_mib() { awk '/^VmRSS/ { printf "%.0f", $2 / 1024 }' "/proc/$1/status"; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
counter() {
  curl -s -H "Authorization: Bearer $KEYGATE_ADMIN_TOKEN" "http://$ADMIN/metrics" |
    awk -v n="$1" '$1 == n { print $2 }'
}

# Milliseconds of one admin GET, the median of 5.
get_ms() {
  for _ in 1 2 3 4 5; do
    curl -s -o /dev/null -w '%{time_total}\n' -H "Authorization: Bearer $KEYGATE_ADMIN_TOKEN" "http://$ADMIN$1"
  done | awk '{ printf "%.1f\n", $1 * 1000 }' | median
}

for kind in $STORES; do
for n in $SIZES; do
  dir="$WORK/$kind-$n"
  mkdir -p "$dir"
  case $kind in
    file) store_line="store: {kind: file, path: keys.yaml}"; store_file=keys.yaml; changes=${CHANGES:-0} ;;
    sqlite) store_line="store: {kind: sqlite, path: keys.db}"; store_file=keys.db; changes=${CHANGES:-1000} ;;
    *) echo "unknown store kind $kind" >&2; exit 2 ;;
  esac
  cat > "$dir/keygate.yaml" <<YAML
listen: {proxy: $PROXY, admin: $ADMIN}
$store_line
workers: 1
usage: {flush_interval: 1h}
routes:
  - {path_prefix: /, upstream: "http://127.0.0.1:18080", environment: production}
YAML
  # Keys from an older system: not in keygate's format, so they are imported as they are.
  awk -v n="$n" 'BEGIN { srand(7); for (i = 0; i < n; i++) printf "legacy_%08d_%08x%08x\n", i, int(rand() * 4294967295), int(rand() * 4294967295) }' > "$dir/plain.txt"
  t0=$(now_ms)
  "$BIN" keys import --config "$dir/keygate.yaml" --namespace acme --environment production "$dir/plain.txt" >/dev/null
  import_ms=$(( $(now_ms) - t0 ))
  store_mb=$(du -cb "$dir/$store_file"* | awk 'END { printf "%.1f", $1 / 1e6 }')
  old_key=$(head -1 "$dir/plain.txt")

  t0=$(now_ms)
  "$BIN" serve --config "$dir/keygate.yaml" 2>"$dir/gw.log" &
  gw=$!
  PIDS+=($gw)
  until curl -s -o /dev/null -m 1 -H "Authorization: Bearer $old_key" "http://$PROXY/v1/ping"; do
    kill -0 "$gw" 2>/dev/null || { echo "the gateway exited; see its log:" >&2; cat "$dir/gw.log" >&2; exit 1; }
    (( $(now_ms) - t0 < 120000 )) || { echo "not listening after 120 s" >&2; exit 1; }
    sleep 0.05
  done
  start_ms=$(( $(now_ms) - t0 ))
  rss_start=$(rss_mib "$gw")

  : > "$dir/creates"
  accepted=0
  for _ in $(seq "$CREATES"); do
    out=$(curl -s -w '\n%{http_code} %{time_total}' -X POST -H "Authorization: Bearer $KEYGATE_ADMIN_TOKEN" \
      -H 'content-type: application/json' -d '{"namespace":"acme","environment":"production"}' \
      "http://$ADMIN/v1/api-keys")
    read -r code secs <<<"$(tail -1 <<<"$out")"
    [[ $code == 201 ]] || { echo "create answered $code: $out" >&2; exit 1; }
    awk -v s="$secs" 'BEGIN { printf "%.1f\n", s * 1000 }' >> "$dir/creates"
    key=$(head -1 <<<"$out" | sed -n 's/.*"key":"\([^"]*\)".*/\1/p')
    status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" "http://$PROXY/v1/ping")
    [[ $status == 200 ]] && accepted=$((accepted + 1))
  done
  rss_creates=$(rss_mib "$gw")
  list_ms=$(get_ms "/v1/api-keys?limit=50")
  list_page2_ms=$(get_ms "/v1/api-keys?limit=50&cursor=$(curl -s -H "Authorization: Bearer $KEYGATE_ADMIN_TOKEN" "http://$ADMIN/v1/api-keys?limit=50" | sed -n 's/.*"next_cursor":"\([^"]*\)".*/\1/p')")
  search_id_ms=$(get_ms "/v1/api-keys?limit=50&search=0a")
  search_none_ms=$(get_ms "/v1/api-keys?limit=50&search=no-such-name")
  last_id=$(head -1 <<<"$out" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
  t0=$(now_ms)
  for i in $(seq "$changes"); do
    curl -s -o /dev/null -X PATCH -H "Authorization: Bearer $KEYGATE_ADMIN_TOKEN" \
      -H 'content-type: application/json' -d "{\"note\":\"change $i\"}" "http://$ADMIN/v1/api-keys/$last_id"
  done
  changes_ms=$(( $(now_ms) - t0 ))
  rss_changes=$(rss_mib "$gw")
  # Proxied traffic's p99 alone, then while the admin API takes 100 creates a second, in
  # P99_ROUNDS alternating pairs (default 3): one pair moves with the machine by a third.
  p99_pairs="" p99_ratio=-
  if command -v wrk >/dev/null && (( ${LOAD_SECS:-10} > 0 )); then
    wrk_p99_us() {
      wrk -t1 -c16 -d"${LOAD_SECS:-10}s" --latency -H "Authorization: Bearer $old_key" "http://$PROXY/v1/ping" |
        awk '$1 == "99%" { v = $2; u = 1;
          if (v ~ /us$/) { u = 1 } else if (v ~ /ms$/) { u = 1000 } else if (v ~ /s$/) { u = 1000000 }
          sub(/[a-z]+$/, "", v); printf "%.0f\n", v * u }'
    }
    creates_url="http://$ADMIN/v1/api-keys"
    urls=()
    for _ in $(seq $(( ${LOAD_SECS:-10} * 100 ))); do urls+=("$creates_url"); done
    ratios=()
    for _ in $(seq "${P99_ROUNDS:-3}"); do
      steady=$(wrk_p99_us)
      curl -s -o /dev/null --rate 100/s -X POST -H "Authorization: Bearer $KEYGATE_ADMIN_TOKEN" \
        -H 'content-type: application/json' -d '{"namespace":"acme","environment":"production"}' "${urls[@]}" >/dev/null &
      churn=$!
      PIDS+=($churn)
      during=$(wrk_p99_us)
      kill "$churn" 2>/dev/null || true
      wait "$churn" 2>/dev/null || true
      p99_pairs+="${steady}/${during} "
      ratios+=("$(awk -v a="$steady" -v b="$during" 'BEGIN { printf "%.2f", b / a }')")
    done
    p99_ratio=$(printf '%s\n' "${ratios[@]}" | median)
  fi
  deltas=$(counter keygate_key_changes_applied_total)
  reloads=$(counter keygate_reloads_total)
  reload_s=$(curl -s -o /dev/null -w '%{time_total}' -X POST -H "Authorization: Bearer $KEYGATE_ADMIN_TOKEN" "http://$ADMIN/v1/reload")
  kill "$gw"
  wait "$gw" 2>/dev/null || true

  echo "== $n keys ($kind store)"
  echo "import:                        ${import_ms} ms"
  echo "store on disk:                 ${store_mb} MB"
  echo "start until listening:         ${start_ms} ms"
  echo "resident memory after start:   ${rss_start} MiB"
  echo "resident memory after creates: ${rss_creates} MiB"
  echo "after $changes more changes:     ${rss_changes} MiB (the changes took ${changes_ms} ms)"
  echo "admin creates, ms:             $(paste -sd' ' "$dir/creates") (median $(median < "$dir/creates"))"
  echo "new key accepted next request: $accepted of $CREATES"
  echo "applied as deltas / reloads:   $deltas / $reloads"
  echo "list page, ms (median of 5):   first ${list_ms}, second ${list_page2_ms}, search by id ${search_id_ms}, search matching none ${search_none_ms}"
  echo "proxied p99 µs, steady / during 100 creates/s, by round: ${p99_pairs:--} (median ratio $p99_ratio)"
  awk -v s="$reload_s" 'BEGIN { printf "POST /v1/reload:               %.0f ms\n", s * 1000 }'
  rm -rf "$dir"
done
done

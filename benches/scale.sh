#!/usr/bin/env bash
# What a key change costs at scale. For each key count in SIZES (default "100000 1000000"):
# import that many keys with `keygate keys import`, start the gateway (`workers: 1`), then make
# CREATES keys (default 5) through the admin API one after another, each followed by a proxied
# request with the new key, and reload once. Prints, per size: import time, store size, start
# until listening, resident memory after start and after the creates, each create's time until
# it answered 201 (and their median), whether the next request with the new key was accepted,
# how the change was applied (delta or reload), and `POST /v1/reload`.
#
#   cargo build --release && benches/scale.sh
#   SIZES=100000 CREATES=9 benches/scale.sh
#   BIN=/path/to/other/keygate benches/scale.sh      (another build, for a same-day comparison)
#
# Needs nginx (the upstream) and curl; loopback only; every process is stopped by its own PID.
# The file store only: it is the one store kind that exists today (see PERFORMANCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"100000 1000000"}
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

for n in $SIZES; do
  dir="$WORK/$n"
  mkdir -p "$dir"
  cat > "$dir/keygate.yaml" <<YAML
listen: {proxy: $PROXY, admin: $ADMIN}
keys_file: keys.yaml
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
  store_mb=$(awk -v b="$(stat -c %s "$dir/keys.yaml")" 'BEGIN { printf "%.1f", b / 1e6 }')
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
  deltas=$(counter keygate_key_changes_applied_total)
  reloads=$(counter keygate_reloads_total)
  reload_s=$(curl -s -o /dev/null -w '%{time_total}' -X POST -H "Authorization: Bearer $KEYGATE_ADMIN_TOKEN" "http://$ADMIN/v1/reload")
  kill "$gw"
  wait "$gw" 2>/dev/null || true

  echo "== $n keys (file store)"
  echo "import:                        ${import_ms} ms"
  echo "store file:                    ${store_mb} MB"
  echo "start until listening:         ${start_ms} ms"
  echo "resident memory after start:   ${rss_start} MiB"
  echo "resident memory after creates: ${rss_creates} MiB"
  echo "admin creates, ms:             $(paste -sd' ' "$dir/creates") (median $(median < "$dir/creates"))"
  echo "new key accepted next request: $accepted of $CREATES"
  echo "applied as deltas / reloads:   $deltas / $reloads"
  awk -v s="$reload_s" 'BEGIN { printf "POST /v1/reload:               %.0f ms\n", s * 1000 }'
  rm -rf "$dir"
done

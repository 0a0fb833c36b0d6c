#!/usr/bin/env bash
# keygate's one test command: installs what the tests need on a fresh Debian machine, then
# runs every check and every test. CI runs it through .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# Debian packages the suites need, by the command each provides.
need_apt=()
# The console's end-to-end tests drive Debian's chromium through chromedriver.
# The scale-out tests start a private redis-server. The forward-auth tests put a real nginx
# and a real Caddy in front of keygate; the deployment test verifies the systemd unit; the
# upgrade test runs in a network namespace of its own (unshare, and ip for its loopback).
for pair in "curl:curl" "pkg-config:pkg-config" "chromium:chromium" "chromedriver:chromium-driver" \
  "redis-server:redis-server" "nginx:nginx" "caddy:caddy" "systemd-analyze:systemd" \
  "ip:iproute2" "unshare:util-linux"; do
  cmd=${pair%%:*} pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need_apt+=("$pkg")
done
# The nginx example removes client-sent X-Keygate-* headers with the headers-more module.
[[ -e /usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so ]] ||
  need_apt+=(libnginx-mod-http-headers-more-filter)
# The API conformance run (schemathesis, from PyPI) needs Python with venv.
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]}"
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need_apt[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is missing: install a stable Rust toolchain (rustup) first" >&2
  exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy 2>/dev/null || true

# The alert-email test talks to a real SMTP server: aiosmtpd, from PyPI, in a virtualenv.
PYTOOLS=target/pytools
if ! "$PYTOOLS/bin/python" -c 'import aiosmtpd' >/dev/null 2>&1; then
  log "installing aiosmtpd into $PYTOOLS"
  python3 -m venv "$PYTOOLS"
  "$PYTOOLS/bin/pip" install --quiet "aiosmtpd==1.4.6"
fi
export KEYGATE_TEST_PYTHON="$PWD/$PYTOOLS/bin/python"

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

# Every suite writes the secrets it is handed and everything keygate said or wrote to this
# ledger; the last step searches all of it (tests/suite_secrets.rs).
export KEYGATE_SECRET_LEDGER="$PWD/target/secret-ledger"
rm -rf "$KEYGATE_SECRET_LEDGER"

log "cargo test"
# One build serves every suite; the suites themselves bound their own time.
cargo test

log "API conformance: schemathesis against the admin API's OpenAPI document"
./scripts/conformance.sh

log "secret scan: every secret the suite made, searched for in everything keygate said or wrote"
cargo test --quiet --test suite_secrets -- --ignored --nocapture

log "fuzzing: each target briefly (FUZZ_SECS, default 10 s)"
./scripts/fuzz.sh

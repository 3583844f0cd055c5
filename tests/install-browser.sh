#!/bin/sh
# Install headless Chromium and chromedriver for tests/test_browser.py, where apt-get can.
# Idempotent and quiet: does nothing when both are on PATH. Where it cannot install (macOS, no root or
# password-less sudo, no network) it says so in one line and exits 0: the browser tests are then skipped
# (except under CI=true, where they fail).
set -u

have_browser() {
    { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1 &&
        command -v chromedriver >/dev/null 2>&1
}

if have_browser; then
    exit 0
fi

skip() {
    echo "install-browser.sh: could not install chromium and chromedriver ($1): browser tests will be skipped" >&2
    exit 0
}

command -v apt-get >/dev/null 2>&1 || skip "no apt-get here; install Chromium and a matching chromedriver yourself"

if [ "$(id -u)" -eq 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"  # never waits for a password
else
    skip "needs root: sudo apt-get install chromium chromium-driver"
fi

log=$(mktemp "${TMPDIR:-/tmp}/install-browser.XXXXXX")
trap 'rm -f "$log"' EXIT
install() {
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver >>"$log" 2>&1
}
# The package lists may already be fresh enough: update them only when the install fails without.
if ! install; then
    $as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$log" 2>&1
    if ! install; then
        tail -n 5 "$log" >&2
        skip "apt-get install chromium chromium-driver failed"
    fi
fi

hash -r 2>/dev/null || true  # forget command locations the shell remembered before the install
have_browser || skip "installed, but chromium or chromedriver is still not on PATH"

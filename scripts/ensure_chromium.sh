#!/usr/bin/env bash
# Make sure Debian's Chromium is at /usr/bin/chromium for the browser tests (tests/test_browser.py drives it through
# Playwright; never `playwright install`). Idempotent and quiet: nothing happens when it is there; as root with apt it
# is installed; otherwise it says why the browser tests will be skipped. Never fails the build by itself.
set -uo pipefail
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
[ -x "$CHROMIUM" ] && exit 0
if [ "$(id -u)" != "0" ]; then
  echo ">> $CHROMIUM is missing and this is not root: the browser tests will be skipped (sudo apt-get install -y chromium)" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo ">> $CHROMIUM is missing and there is no apt-get: the browser tests will be skipped" >&2
  exit 0
fi
echo ">> installing chromium with apt-get (for the browser tests, about 30 s, once)"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; }; then
  echo ">> apt-get could not install chromium: the browser tests will be skipped" >&2
  exit 0
fi
[ -x "$CHROMIUM" ] || echo ">> chromium was installed but $CHROMIUM is not there: the browser tests will be skipped" >&2
exit 0

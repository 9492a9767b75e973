#!/usr/bin/env bash
# Install the headless browser the web view's tests drive (tests/test_ui_browser.py):
# Debian's Chromium and its driver, from the system's packages. Playwright drives
# /usr/bin/chromium; it never downloads a browser of its own (no `playwright install`).
# Does nothing when Chromium is already there, so it is safe to run every time.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser.sh: no apt-get; install Chromium at /usr/bin/chromium yourself" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# A fresh machine's package lists may be empty or stale: update once if the install fails.
$sudo apt-get install -y -qq chromium chromium-driver >/dev/null ||
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium chromium-driver >/dev/null; }
/usr/bin/chromium --version

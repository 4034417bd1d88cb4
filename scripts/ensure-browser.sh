#!/usr/bin/env bash
# Installs what tests/test_dashboard.py needs and the machine may lack:
#   - Debian's `chromium` package, via apt-get, when /usr/bin/chromium is missing (needs root, as in CI);
#   - Playwright's Python package, via pip, into the project's venv when it cannot be imported.
# Playwright drives Debian's chromium through `executable_path`: this script never runs
# `playwright install` (it would download a browser build, which cannot be fetched here).
# Safe to run repeatedly: each step is skipped when already done.
#
# Usage: scripts/ensure-browser.sh [PYTHON]   (default: the venv's python beside this repo)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${1:-$ROOT/.venv/bin/python}"

if [ ! -x /usr/bin/chromium ]; then
    echo "ensure-browser: installing chromium with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
fi

if ! "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "ensure-browser: pip install playwright into $PYTHON" >&2
    "$PYTHON" -m pip install -q playwright
fi

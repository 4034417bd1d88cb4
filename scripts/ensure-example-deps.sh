#!/usr/bin/env bash
# Installs what the receivers in examples/ need and the machine may lack:
#   - examples/node/node_modules (Express), via npm, when missing;
#   - the PHP CLI, via apt-get, when `php` is not on PATH (needs root, as in CI).
# Safe to run repeatedly: each step is skipped when already done.
# tests/test_examples.py runs it once per test session.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v node >/dev/null 2>&1; then
    echo "ensure-example-deps: node is not installed (need Node.js 18+); install it first" >&2
fi

if command -v npm >/dev/null 2>&1 && [ ! -d examples/node/node_modules ]; then
    echo "ensure-example-deps: npm install in examples/node" >&2
    (cd examples/node && npm install --no-audit --no-fund --loglevel=error)
fi

if ! command -v php >/dev/null 2>&1; then
    echo "ensure-example-deps: installing php-cli with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq php-cli >/dev/null
fi

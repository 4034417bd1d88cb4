#!/usr/bin/env bash
# Installs what the receivers in examples/ and in the partner guides need and the machine may lack:
#   - examples/node/node_modules (Express, standardwebhooks), via npm, when one is missing;
#   - the PHP CLI, via apt-get, when `php` is not on PATH (needs root, as in CI);
#   - FastAPI, uvicorn and standardwebhooks for $PYTHON (the tests' interpreter), via pip,
#     when it cannot import them (`make test` installs them with the test extras already).
# Safe to run repeatedly: each step is skipped when already done.
# tests/test_examples.py and tests/test_guide_snippets.py run it once per test session.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! command -v node >/dev/null 2>&1; then
    echo "ensure-example-deps: node is not installed (need Node.js 18+); install it first" >&2
fi

if command -v npm >/dev/null 2>&1 && { [ ! -d examples/node/node_modules/express ] ||
                                       [ ! -d examples/node/node_modules/standardwebhooks ]; }; then
    echo "ensure-example-deps: npm install in examples/node" >&2
    (cd examples/node && npm install --no-audit --no-fund --loglevel=error)
fi

if ! command -v php >/dev/null 2>&1; then
    echo "ensure-example-deps: installing php-cli with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq php-cli >/dev/null
fi

if ! "$PYTHON" -c 'import fastapi, uvicorn, standardwebhooks' 2>/dev/null; then
    echo "ensure-example-deps: pip install fastapi uvicorn standardwebhooks for $PYTHON" >&2
    "$PYTHON" -m pip install --quiet fastapi uvicorn standardwebhooks
fi

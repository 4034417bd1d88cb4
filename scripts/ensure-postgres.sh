#!/usr/bin/env bash
# Installs PostgreSQL's server binaries from the OS packages when they are missing. The tests
# start their own throwaway server (tests/pg.py) in a temp dir, on 127.0.0.1 and a free port, as
# the `postgres` user, and stop it by PID; the distro's own cluster is never started.
set -euo pipefail

have_initdb() {
    command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
if have_initdb && id postgres >/dev/null 2>&1; then
    exit 0
fi

echo "ensure-postgres: installing postgresql with apt-get" >&2
bash "$(dirname "$0")/apt-install-no-services.sh" postgresql
have_initdb && id postgres >/dev/null 2>&1

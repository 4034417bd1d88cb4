#!/usr/bin/env bash
# Installs PostgreSQL's server binaries from the OS packages when they are missing (needs root,
# as on CI and dev machines). The tests start their own throwaway server (tests/pg.py) in a temp
# dir, on 127.0.0.1 and a free port, as the `postgres` user, and stop it by PID. The distro's own
# cluster is never started: while the package installs, a policy-rc.d that refuses every service
# start is in place (ours, removed afterwards, unless the machine already had one).
set -euo pipefail

have_initdb() {
    command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
if have_initdb && id postgres >/dev/null 2>&1; then
    exit 0
fi

echo "ensure-postgres: installing postgresql with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/ensure-postgres.sh: no service starts while postgresql installs\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    ours=1
fi
cleanup() { if [ "$ours" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq postgresql >/dev/null
have_initdb && id postgres >/dev/null 2>&1

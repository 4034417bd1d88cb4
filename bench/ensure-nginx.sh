#!/usr/bin/env bash
# Installs nginx from the OS packages when it is missing (needs root, as on CI and dev machines).
# The distro's default nginx service is never started: while the package installs, a
# policy-rc.d that refuses every service start is in place (ours, removed afterwards, unless
# the machine already had one). The benchmark runs its own nginx with its own config, prefix
# and pid file (bench/receiver.py), and stops it by PID.
set -euo pipefail

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi

echo "ensure-nginx: installing nginx with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# bench/ensure-nginx.sh: no service starts while nginx installs\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    ours=1
fi
cleanup() { if [ "$ours" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq nginx-light >/dev/null || apt-get install -y -qq nginx >/dev/null

# Should a service manager have started the packaged nginx anyway, stop exactly that
# instance, by the PID in the package's own pid file (never by name).
if [ -s /run/nginx.pid ]; then
    kill "$(cat /run/nginx.pid)" 2>/dev/null || true
fi
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]

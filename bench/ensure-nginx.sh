#!/usr/bin/env bash
# Installs nginx from the OS packages when it is missing (needs root, as on CI and dev machines),
# with no service started (scripts/apt-install-no-services.sh). The benchmark runs its own nginx
# with its own config, prefix and pid file (bench/receiver.py), and stops it by PID.
set -euo pipefail

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi

echo "ensure-nginx: installing nginx with apt-get" >&2
bash "$(dirname "$0")/../scripts/apt-install-no-services.sh" nginx-light \
    || bash "$(dirname "$0")/../scripts/apt-install-no-services.sh" nginx

# Should a service manager have started the packaged nginx anyway, stop exactly that
# instance, by the PID in the package's own pid file (never by name).
if [ -s /run/nginx.pid ]; then
    kill "$(cat /run/nginx.pid)" 2>/dev/null || true
fi
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]

#!/usr/bin/env bash
# Installs systemd-analyze (Debian's systemd package) when missing, with no service started, so
# that tests/test_deploy.py can check deploy/webhookd.service. Needs root, as on CI and dev machines.
set -euo pipefail

if command -v systemd-analyze >/dev/null 2>&1; then
    exit 0
fi
echo "ensure-systemd-analyze: installing systemd with apt-get" >&2
bash "$(dirname "$0")/apt-install-no-services.sh" systemd
command -v systemd-analyze >/dev/null 2>&1

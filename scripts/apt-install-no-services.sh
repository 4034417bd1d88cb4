#!/usr/bin/env bash
# apt-get install PACKAGE... (needs root, as on CI and dev machines) with no service started:
# a package like nginx or postgresql would start the distro's own instance, which we never use
# (the bench and the tests run their own, with their own config, and stop them by PID). While
# the packages install, a policy-rc.d that refuses every service start is in place (ours,
# removed afterwards, unless the machine already had one).
#
# Usage: scripts/apt-install-no-services.sh PACKAGE [PACKAGE...]
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
ours=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/apt-install-no-services.sh: no service starts while packages install\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    ours=1
fi
cleanup() { if [ "$ours" = 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

apt-get update -qq
apt-get install -y -qq "$@" >/dev/null

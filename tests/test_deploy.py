"""deploy/webhookd.service: systemd accepts it as it is (systemd-analyze verify, no warning), and it
holds what docs/operations.md promises — its own user, its state directory, a read-only system, no new
privileges, restart on failure, and a stop timeout longer than the SIGTERM drain."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

UNIT = ROOT / "deploy" / "webhookd.service"


def service_settings() -> dict[str, str]:
    settings, section = {}, None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_the_unit_holds_the_promised_settings():
    import config

    s = service_settings()
    assert s["DynamicUser"] == "yes" and s["User"] == "webhookd"
    assert s["StateDirectory"] == "webhookd" and s["WorkingDirectory"] == "/var/lib/webhookd"
    assert "Environment=WEBHOOKD_STORAGE_PATH=/var/lib/webhookd/webhookd.db" in UNIT.read_text()
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes" and s["ProtectHome"] == "yes"
    assert s["Restart"] == "on-failure" and s["KillSignal"] == "SIGTERM"
    bundled = config.load_config(ROOT / "webhookd.toml", environ={})
    assert int(s["TimeoutStopSec"]) > bundled.delivery.timeout_s + 2   # the drain fits before a SIGKILL
    settings = [line for line in UNIT.read_text().splitlines() if not line.startswith("#")]
    assert not [line for line in settings if "TOKEN=" in line or "SECRET=" in line]   # secrets: EnvironmentFile
    assert s["EnvironmentFile"] == "-/etc/webhookd/secrets.env"


def test_systemd_accepts_the_unit_without_a_warning(tmp_path):
    # Installed like nginx and Chromium when missing; a machine without it fails here, never skips.
    subprocess.run(["bash", str(ROOT / "scripts" / "ensure-systemd-analyze.sh")], check=True, timeout=900)
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is missing after scripts/ensure-systemd-analyze.sh"
    webhookd = Path(sys.executable).parent / "webhookd"   # the installed command, where the unit expects it
    assert webhookd.exists()
    unit = tmp_path / "webhookd.service"
    unit.write_text(UNIT.read_text().replace("/opt/webhookd/.venv/bin/webhookd", str(webhookd)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and (done.stdout + done.stderr).strip() == "", done.stdout + done.stderr

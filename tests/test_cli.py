"""Command-line tools that partners and students run: `webhookd listen`."""

import os
import subprocess
import sys

from conftest import GUARD_DIR, ROOT, free_port, wait_for
from payloads import PAYMENT_SUCCESS


def test_listen_verifies_a_real_delivery_three_ways(hub, tmp_path):
    port = free_port()
    partner = hub.register(f"http://127.0.0.1:{port}/", ["payment.success"])
    out = open(tmp_path / "listen.out", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "webhookd.py"), "listen", "--secret", partner["shared_secret"],
         "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(GUARD_DIR)})
    try:
        wait_for(lambda: "listening on" in (tmp_path / "listen.out").read_text())
        event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
        line = wait_for(lambda: next((l for l in (tmp_path / "listen.out").read_text().splitlines()
                                      if event_id in l), None))
        assert "payment.success" in line and "raw=ok" in line and "canonical=ok" in line and "standard=ok" in line
        wait_for(lambda: hub.deliveries(event_id=event_id)[0]["state"] == "delivered")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        out.close()


def test_listen_refuses_a_wrong_signature_with_401(tmp_path):
    import httpx

    port = free_port()
    out = open(tmp_path / "listen.out", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "webhookd.py"), "listen", "--secret", "sk_live_right", "--port", str(port)],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(GUARD_DIR)})
    try:
        wait_for(lambda: "listening on" in (tmp_path / "listen.out").read_text())
        r = httpx.post(f"http://127.0.0.1:{port}/", content=b'{"event":"x.y"}',
                       headers={"X-Webhook-Signature": "00" * 32, "X-Webhook-Event": "x.y", "X-Webhook-Id": "evt_1"})
        assert r.status_code == 401
        assert "raw=BAD" in wait_for(lambda: (tmp_path / "listen.out").read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        out.close()

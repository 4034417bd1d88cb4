"""`webhookd backup` while a publishing burst runs, `webhookd restore` into a fresh folder, and a
server started on the restored file: every event accepted before the backup began is in it, and
its pending deliveries go out. A restore under a running server is refused."""

from __future__ import annotations

import sqlite3
import threading
import time

import httpx
import pytest

from conftest import ADMIN_TOKEN, Receiver, free_port, wait_for, webhookd_cli
from payloads import PAYMENT_SUCCESS

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RETRYING = dict(WEBHOOKD_DELIVERY_MAX_ATTEMPTS="100", WEBHOOKD_DELIVERY_BACKOFF_BASE_S="0.5",
                WEBHOOKD_DELIVERY_BACKOFF_MAX_S="1")


def test_a_backup_taken_during_a_burst_restores_every_accepted_event_and_its_deliveries_go_out(serve_factory,
                                                                                                tmp_path):
    receiver_port = free_port()   # nobody listens yet: every delivery stays pending, retrying
    serve = serve_factory(**RETRYING)
    r = httpx.post(serve.url + "/partners/register", headers=ADMIN, json={
        "partner_name": "Backup Tours", "webhook_url": f"http://127.0.0.1:{receiver_port}/hook",
        "events": ["payment.success"]})
    assert r.status_code == 201, r.text
    partner = r.json()

    accepted: list[tuple[str, float]] = []   # (event id, when its 202 came back)
    stop = threading.Event()

    def burst() -> None:
        with httpx.Client(base_url=serve.url, headers=ADMIN, timeout=10) as client:
            for i in range(2000):
                if stop.is_set():
                    return
                answer = client.post("/events", json={**PAYMENT_SUCCESS, "transaction_id": f"t{i}"})
                assert answer.status_code == 202, answer.text
                accepted.append((answer.json()["event_id"], time.time()))

    publisher = threading.Thread(target=burst, daemon=True)
    publisher.start()
    try:
        wait_for(lambda: len(accepted) >= 100, timeout=60)
        began = time.time()
        backup = tmp_path / "backup" / "webhookd.db"
        backup.parent.mkdir()
        done = webhookd_cli(serve.env, "backup", str(backup))
        assert done.returncode == 0 and "backed up" in done.stdout, done.stderr
        wait_for(lambda: accepted and accepted[-1][1] > time.time() - 0.5 and len(accepted) > 150, timeout=60)
    finally:
        stop.set()
        publisher.join(timeout=30)
    assert not publisher.is_alive()
    before = [event_id for event_id, at in accepted if at < began]
    during = len(accepted) - len(before)
    assert len(before) >= 100 and during > 0, "the burst must go on while the backup runs"

    # Restoring over the live file is refused while its server runs.
    refused = webhookd_cli(serve.env, "restore", str(backup), "--replace")
    assert refused.returncode == 1 and "is using" in refused.stderr, refused.stderr

    fresh = {**serve.env, "WEBHOOKD_STORAGE_PATH": str(tmp_path / "fresh" / "webhookd.db")}
    restored = webhookd_cli(fresh, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    with sqlite3.connect(fresh["WEBHOOKD_STORAGE_PATH"]) as db:
        stored = {row[0] for row in db.execute("SELECT id FROM events")}
        pending = {row[0] for row in db.execute("SELECT event_id FROM deliveries WHERE state = 'pending'")}
    assert set(before) <= stored and set(before) <= pending

    serve.stop()
    receiver = Receiver(secret=partner["shared_secret"], port=receiver_port).start()
    try:
        again = serve_factory(WEBHOOKD_STORAGE_PATH=fresh["WEBHOOKD_STORAGE_PATH"], **RETRYING)
        wait_for(lambda: set(before) <= set(receiver.event_ids), timeout=120)
        assert all(r.guide_ok for r in receiver.received)    # the restored secret signs
        wait_for(lambda: httpx.get(again.url + "/stats", headers=ADMIN).json()["totals"]["pending"] == 0, timeout=120)
    finally:
        receiver.stop()

"""Regressions found by a review: each test fails on the code before its fix."""

import json
import socket
import threading
import time

import pytest
from websockets.sync.client import connect

import delivery
import signing
import sitecustomize
from conftest import ROOT, wait_for
from payloads import PAYMENT_SUCCESS
from store import Job


def _signed(hub, partner, payload, event=None, **headers):
    body = json.dumps(payload).encode()
    return hub.http.post("/webhooks/partners", content=body, headers={
        "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body),
        "X-Webhook-Event": event or payload.get("event", "tour.purchased"), **headers})


def test_the_loop_sleeps_after_a_partner_failed_past_its_pause(webhookd_factory):
    from conftest import free_port

    hub = webhookd_factory(delivery__max_attempts=1, delivery__breaker_threshold=1,
                           delivery__breaker_cooldown_s=0.1, delivery__breaker_cooldown_max_s=0.1)
    hub.register(f"http://127.0.0.1:{free_port()}/down", ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: hub.deliveries(state="failed"))
    calls = []
    real = hub.store.next_due_at
    hub.store.next_due_at = lambda *a, **k: calls.append(1) or real(*a, **k)
    time.sleep(1.0)
    hub.store.next_due_at = real
    assert len(calls) < 10, f"the loop spun: {len(calls)} looks for due work in 1 s"


def test_event_header_must_match_the_signed_payload(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    r = _signed(hub, partner, {"event": "tour.promoted", "tour_id": "t"}, event="booking.cancelled")
    assert r.status_code == 400 and r.json()["error"]["code"] == "event_mismatch"


def test_a_huge_integer_timestamp_is_refused_not_a_500(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    r = _signed(hub, partner, {"event": "tour.promoted", "timestamp": 10 ** 400})
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_timestamp"


def test_refused_signatures_are_rate_limited_per_address(webhookd_factory):
    hub = webhookd_factory(security__inbound_failures_per_s=1.0)
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    body = b'{"event":"tour.purchased"}'
    bad = {"X-Webhook-Signature": "00" * 32, "X-Webhook-Event": "tour.purchased"}
    codes = [hub.http.post("/webhooks/partners", content=body, headers=bad).status_code for _ in range(6)]
    assert codes[:4] == [401] * 4 and codes[-1] == 429
    assert _signed(hub, partner, {"event": "tour.purchased", "n": 1}).status_code == 429  # until the bucket refills
    time.sleep(1.1)
    assert _signed(hub, partner, {"event": "tour.purchased", "n": 2}).status_code == 200


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "a..example"])
def test_hostnames_that_idna_refuses_are_422_not_500(webhookd_factory, host):
    hub = webhookd_factory(security__allow_private_targets=False)
    r = hub.http.post("/partners/register", headers=hub.admin, json={
        "partner_name": "P", "webhook_url": f"http://{host}/x", "events": ["payment.success"]})
    assert r.status_code == 422 and "'webhook_url'" in r.json()["error"]["message"]


def test_a_resolver_that_never_answers_stalls_nothing_else(webhookd_factory):
    hub = webhookd_factory(security__allow_private_targets=False)
    sitecustomize.FAKE_DNS["slow.example"] = lambda: time.sleep(8) or ["93.184.216.34"]
    results = []

    def register():
        r = hub.http.post("/partners/register", headers=hub.admin, json={
            "partner_name": "P", "webhook_url": "https://slow.example/x", "events": ["payment.success"]}, timeout=30)
        results.append(r.status_code)

    try:
        threads = [threading.Thread(target=register) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        started = time.monotonic()
        assert hub.http.get("/health").status_code == 200
        assert time.monotonic() - started < 1.0
        for t in threads:
            t.join(timeout=30)
        assert results == [422] * 8
    finally:
        sitecustomize.FAKE_DNS.clear()


def test_the_deadline_watchdog_survives_a_connection_closed_under_it():
    class ClosingUnderfoot:
        """A connection whose socket disappears between two reads of .sock (the sender closed it)."""

        def __init__(self):
            self.reads = 0

        @property
        def sock(self):
            self.reads += 1
            return socket.socket() if self.reads == 1 else None

    watchdog = delivery._Deadlines()
    watchdog.watch(time.monotonic(), ClosingUnderfoot())
    left, right = socket.socketpair()
    conn = type("Conn", (), {"sock": left})()
    entry = watchdog.watch(time.monotonic() + 0.2, conn)
    wait_for(lambda: entry[2] is None, timeout=5)
    assert watchdog._thread.is_alive()
    assert left.recv(1) == b""  # shut down by the watchdog
    left.close()
    right.close()


def _job(partner_failing_since):
    return Job(delivery_id="d", event_id="e", event="payment.success", partner_id="p", url="http://x/",
               secrets=("s",), body=b"{}", attempt=1, max_attempts=3, partner_failing_since=partner_failing_since)


def test_a_success_resets_the_failing_streak_even_for_jobs_claimed_before_it():
    breakers = delivery.Breakers(delivery.Settings(disable_after_s=100.0))
    fail = delivery.Sent(delivery.Attempt(1, 0, 1, 500, "http_error", ""))
    ok = delivery.Sent(delivery.Attempt(1, 0, 1, 200, None, ""))
    assert breakers.record(_job(None), fail, now=1000.0) == (1000.0, True, None)
    assert breakers.record(_job(1000.0), ok, now=1090.0)[0] is None
    since, changed, disable = breakers.record(_job(1000.0), fail, now=1101.0)  # claimed before the success
    assert (since, changed, disable) == (1101.0, True, None)


def test_a_non_ascii_path_is_delivered_percent_encoded(hub, receiver_factory):
    receiver = receiver_factory()
    hub.register(receiver.server.url + "/café€", ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: receiver.received)
    assert receiver.received[0].path == "/café€"  # the receiver decodes %C3%A9%E2%82%AC
    wait_for(lambda: hub.deliveries()[0]["state"] == "delivered")


def test_user_id_that_names_no_one_reaches_no_one(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    tokens = {u: hub.http.post("/realtime/tokens", headers=hub.admin, json={"user_id": u}).json()["token"]
              for u in ("42", "alice")}
    ws_url = hub.url.replace("http://", "ws://") + "/ws?token="
    with connect(ws_url + tokens["42"]) as user42, connect(ws_url + tokens["alice"]) as alice:
        wait_for(lambda: len(hub.app.state.ctx.notifier.clients) == 2)
        alice.send(b"\x00binary frames are ignored")
        _signed(hub, partner, {"event": "tour.promoted", "tour_id": "t1", "user_id": 42})
        assert json.loads(user42.recv(timeout=5))["tour_id"] == "t1"
        for bad in (None, "", {"id": 1}):
            _signed(hub, partner, {"event": "tour.promoted", "tour_id": "t-bad", "user_id": bad})
        _signed(hub, partner, {"event": "tour.promoted", "tour_id": "t2"})  # no user_id: everyone
        assert json.loads(alice.recv(timeout=5))["tour_id"] == "t2"
        assert json.loads(user42.recv(timeout=5))["tour_id"] == "t2"


def test_event_detail_says_how_many_deliveries_there_are(hub):
    for i in range(3):
        hub.register("http://127.0.0.1:9/x", ["payment.success"], name=f"P{i}")
    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    shown = hub.http.get(f"/events/{event_id}", headers=hub.admin).json()
    assert shown["fanout"] == 3 and len(shown["deliveries"]) == 3 and shown["more_deliveries"] is False


def test_config_can_follow_the_subcommand(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "WEBHOOKD_STORAGE_PATH": str(tmp_path / "w.db"), "WEBHOOKD_ADMIN_TOKEN": "adm_x"}
    result = subprocess.run([sys.executable, str(ROOT / "webhookd.py"), "token", "--config", str(ROOT / "webhookd.toml")],
                            capture_output=True, text=True, env=env, timeout=30, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "adm_x"

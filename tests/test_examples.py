"""examples/: the Python, Node and PHP receivers and the partner sender, run the way their README
says, against a live webhookd on 127.0.0.1.

Each receiver appends one JSON line per request to $RECEIVER_LOG
({"id", "event", "hex_ok", "standard_ok", "duplicate", "status"}); the tests read it to know
what the receiver verified. scripts/ensure-example-deps.sh installs Express and the PHP CLI
when they are missing; a runtime still missing afterwards fails the tests (it does not skip them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import signing
from conftest import ADMIN, GUARD_DIR, ROOT, ReceiverProcess, free_port, wait_for
from payloads import ALL_OUTBOUND, BOOKING_CANCELLED_WITH_URL, BOOKING_CONFIRMED, PAYMENT_FAILED, PAYMENT_SUCCESS

EXAMPLES = ROOT / "examples"
PAYLOADS = [PAYMENT_SUCCESS, BOOKING_CONFIRMED, PAYMENT_FAILED, BOOKING_CANCELLED_WITH_URL]
SENDER = EXAMPLES / "sender" / "send_event.py"


def _command(language: str, port: int) -> list[str]:
    return {
        "python": [sys.executable, "receiver.py"],
        "node": ["node", "receiver.js"],
        "php": ["php", "-S", f"127.0.0.1:{port}", "receiver.php"],
    }[language]


class ExampleReceiver(ReceiverProcess):
    """One example receiver as a subprocess on 127.0.0.1, with its output and RECEIVER_LOG in tmp."""

    def __init__(self, language: str, secret: str, port: int, tmp_path: Path):
        self.log_path = tmp_path / f"{language}-receiver.jsonl"
        env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", "PARTNER_SHARED_SECRET": secret,
               "RECEIVER_LOG": str(self.log_path), "WEBHOOK_SEEN_DIR": str(tmp_path / "seen")}
        if language == "python":
            env["PYTHONPATH"] = str(GUARD_DIR)  # the loopback guard, as in every Python subprocess
        self.start(_command(language, port), port=port, cwd=EXAMPLES / language, env=env,
                   out_path=tmp_path / f"{language}-receiver.out")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/events"

    def records(self) -> list[dict]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]


def _signed_headers(secret: str, body: bytes, webhook_id: str, *, timestamp: int | None = None,
                    hex_signature: str | None = None) -> dict[str, str]:
    """Headers as webhookd sends them; ``hex_signature=""`` leaves X-Webhook-Signature out."""
    stamp = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": "application/json",
        "X-Webhook-Event": "payment.success",
        "X-Webhook-Id": webhook_id,
        "X-Webhook-Signature": signing.sign_hex(secret, body) if hex_signature is None else hex_signature,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": signing.standard_signature(secret, webhook_id, stamp, body),
    }
    if hex_signature == "":
        del headers["X-Webhook-Signature"]
    return headers


@pytest.mark.parametrize("language", ["python", "node", "php"])
def test_example_receiver_verifies_every_delivery_and_rejects_bad_signatures(
        language, example_runtimes, hub, tmp_path):
    port = free_port()
    partner = hub.register(f"http://127.0.0.1:{port}/webhooks/events", ALL_OUTBOUND, name=f"{language} example")
    secret = partner["shared_secret"]
    receiver = ExampleReceiver(language, secret, port, tmp_path)
    try:
        # 1. Every guide payload (150.0, accents, "/", nested metadata) verifies both ways.
        ids = []
        for payload in PAYLOADS:
            r = hub.publish(payload)
            assert r.status_code == 202, r.text
            ids.append(r.json()["event_id"])
        wait_for(lambda: len(receiver.records()) >= len(ids), timeout=15)
        by_id = {rec["id"]: rec for rec in receiver.records()}
        assert set(by_id) == set(ids), receiver.output()
        for event_id, payload in zip(ids, PAYLOADS):
            assert by_id[event_id] == {"id": event_id, "event": payload["event"], "hex_ok": True,
                                       "standard_ok": True, "duplicate": False, "status": 200}
        delivered = wait_for(lambda: (items := hub.deliveries(partner_id=partner["partner_id"]))
                             and all(d["state"] != "pending" for d in items) and items, timeout=15)
        assert sorted(d["event_id"] for d in delivered) == sorted(ids)
        assert {d["state"] for d in delivered} == {"delivered"}
        for event_id in ids:  # one line per webhook on the console: type, id, verdict
            assert event_id in receiver.output()

        # 2. Bad X-Webhook-Signature headers: 401 with a JSON error, never a 500.
        body = signing.canonical(PAYMENT_SUCCESS)
        good = signing.sign_hex(secret, body)
        bad = {
            "missing": "",
            "wrong length": good[:10],
            "too long": good + "00",
            "non-hex": "z" * 64,
            "uppercase hex": good.upper(),
            "signature of another body": signing.sign_hex(secret, body + b" "),
        }
        for n, (case, signature) in enumerate(bad.items()):
            r = httpx.post(receiver.url, content=body, timeout=5,
                           headers=_signed_headers(secret, body, f"msg_bad_{n}", hex_signature=signature))
            assert r.status_code == 401, (case, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json"), case
            assert r.json()["error"]["code"] == "invalid_signature", case
        # a correct hex signature with a stale (10 min old) Standard Webhooks timestamp: replay refused
        stale = _signed_headers(secret, body, "msg_stale", timestamp=int(time.time()) - 600)
        assert httpx.post(receiver.url, content=body, headers=stale, timeout=5).status_code == 401
        # a correct hex signature, no Standard Webhooks headers at all
        bare = {k: v for k, v in _signed_headers(secret, body, "msg_bare").items() if not k.startswith("webhook-")}
        assert httpx.post(receiver.url, content=body, headers=bare, timeout=5).status_code == 401

        # 3. A repeated X-Webhook-Id (a retry) is flagged duplicate and still answered 200.
        r = httpx.post(receiver.url, content=body, headers=_signed_headers(secret, body, ids[0]), timeout=5)
        assert r.status_code == 200 and r.json() == {"status": "received"}
        assert receiver.records()[-1] == {"id": ids[0], "event": "payment.success", "hex_ok": True,
                                          "standard_ok": True, "duplicate": True, "status": 200}
        r = httpx.post(receiver.url, content=body, headers=_signed_headers(secret, body, "msg_new_1"), timeout=5)
        assert r.status_code == 200 and receiver.records()[-1]["duplicate"] is False
        assert all(rec["status"] in (200, 401) for rec in receiver.records())
    finally:
        receiver.stop()


@pytest.mark.parametrize("language", ["python", "node", "php"])
def test_example_receiver_answers_the_endpoint_verification_and_only_when_signed(
        language, example_runtimes, webhookd_factory, tmp_path):
    """On a hub that asks endpoints to prove themselves, the example is verified (its echo of the
    challenge is accepted) and then gets its events; a verification request with a forged signature
    gets 401 and no challenge back."""
    hub = webhookd_factory(security__verify_endpoints=True)
    port = free_port()
    partner = hub.register(f"http://127.0.0.1:{port}/webhooks/events", ALL_OUTBOUND, name=f"{language} example")
    secret = partner["shared_secret"]
    receiver = ExampleReceiver(language, secret, port, tmp_path)
    try:
        def state() -> str:
            return hub.http.get(f"/partners/{partner['partner_id']}", headers=ADMIN).json()["verification"]["state"]

        wait_for(lambda: state() == "verified", timeout=30)
        r = hub.publish(PAYMENT_SUCCESS)
        assert r.status_code == 202, r.text
        event_id = r.json()["event_id"]
        wait_for(lambda: [d["state"] for d in hub.deliveries(event_id=event_id)] == ["delivered"], timeout=30)
        verifications = [rec for rec in receiver.records() if rec["event"] == "webhook.verification"]
        assert verifications and verifications[-1]["status"] == 200, receiver.records()

        body = signing.canonical({"event": "webhook.verification", "challenge": "c_forged_0123456789"})
        forged = {**_signed_headers("sk_live_not_the_secret", body, "evt_forged_verification"),
                  "X-Webhook-Event": "webhook.verification"}
        r = httpx.post(receiver.url, content=body, headers=forged, timeout=5)
        assert r.status_code == 401 and "c_forged_0123456789" not in r.text, (r.status_code, r.text)
        signed = {**_signed_headers(secret, body, "evt_signed_verification"), "X-Webhook-Event": "webhook.verification"}
        r = httpx.post(receiver.url, content=body, headers=signed, timeout=5)
        assert r.status_code == 200 and r.json() == {"challenge": "c_forged_0123456789"}, r.text
    finally:
        receiver.stop()


# --- examples/sender/send_event.py --------------------------------------------------------


def _run_sender(url: str, secret: str, *args: str, partner_id: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "WEBHOOKD_URL": url, "PARTNER_SHARED_SECRET": secret, "PARTNER_ID": partner_id,
           "PYTHONPATH": str(GUARD_DIR)}
    return subprocess.run([sys.executable, str(SENDER), *args], cwd=SENDER.parent, env=env,
                          capture_output=True, text=True, timeout=30)


def test_example_sender_is_received_once_even_when_sent_twice(hub):
    partner = hub.register("http://127.0.0.1:9/unused", ["payment.success"], name="Montaña Tours")
    event = json.dumps({"tour_id": "tour_xyz789", "price": 250.0, "url": "https://example.com/a/b"})
    for _ in range(2):  # the second run is a partner's retry: same X-Webhook-Id
        done = _run_sender(hub.url, partner["shared_secret"], "tour.purchased", event, "--id", "msg_fixed_1",
                           partner_id=partner["partner_id"])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "-> 200" in done.stdout
    stored = hub.inbound()
    assert len(stored) == 1
    assert stored[0]["partner_id"] == partner["partner_id"] and stored[0]["event"] == "tour.purchased"
    assert stored[0]["payload"]["url"] == "https://example.com/a/b" and stored[0]["payload"]["price"] == 250.0
    # without X-Partner-Id webhookd finds the partner by its secret; a new id is a new event
    done = _run_sender(hub.url, partner["shared_secret"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert [i["event"] for i in hub.inbound()] == ["tour.promoted", "tour.purchased"]
    # a wrong secret is a 401, not retried
    done = _run_sender(hub.url, "sk_live_wrong", "--backoff", "0.01")
    assert done.returncode == 1 and done.stdout.count("attempt") == 1 and "-> 401" in done.stdout


def test_example_sender_retries_5xx_and_429_with_the_same_id_and_bytes(receiver_factory):
    stub = receiver_factory()
    stub.script = [(503, 0), (429, 0)]  # then 200
    done = _run_sender(stub.server.url, "sk_live_example", "--backoff", "0.01")
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(stub.received) == 3
    assert len({r.headers["x-webhook-id"] for r in stub.received}) == 1
    assert len({r.body for r in stub.received}) == 1
    first = stub.received[0]
    assert first.body == signing.canonical(json.loads(first.body))  # canonical bytes, signed as sent
    assert first.headers["x-webhook-signature"] == signing.sign_hex("sk_live_example", first.body)
    assert first.headers["x-webhook-event"] == "tour.promoted"


def test_example_sender_gives_up_after_its_attempts_when_nobody_listens():
    done = _run_sender(f"http://127.0.0.1:{free_port()}", "sk_live_example", "--attempts", "3", "--backoff", "0.01")
    assert done.returncode == 1
    assert done.stdout.count("attempt") == 3 and "refused" in done.stdout.lower()

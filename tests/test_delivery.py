"""End-to-end delivery: webhookd on a real server, partners as real receivers on 127.0.0.1."""

import json

import standardwebhooks

from conftest import wait_for
from payloads import ALL_OUTBOUND, BOOKING_CONFIRMED, GUIDE_EVENTS, PAYMENT_SUCCESS

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)


def _publish_ok(hub, payload, **headers):
    r = hub.publish(payload, headers=headers or None)
    assert r.status_code == 202, r.text
    return r.json()


def _final(hub, event_id, partner_id=None):
    """The delivery of ``event_id`` once it is no longer pending."""
    def done():
        items = hub.deliveries(event_id=event_id, **({"partner_id": partner_id} if partner_id else {}))
        return items if items and all(d["state"] != "pending" for d in items) else None
    items = wait_for(done, timeout=15)
    return hub.delivery(items[0]["delivery_id"])


def test_guide_receivers_verify_every_guide_example(hub, receiver_factory):
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ALL_OUTBOUND)
    receiver.secret = partner["shared_secret"]
    ids = [_publish_ok(hub, p)["event_id"] for p in GUIDE_EVENTS]
    wait_for(lambda: len(receiver.received) == 3)
    by_id = {r.headers["x-webhook-id"]: r for r in receiver.received}
    assert set(by_id) == set(ids)
    verifier = standardwebhooks.Webhook(partner["standard_webhooks_secret"])
    for event_id, payload in zip(ids, GUIDE_EVENTS):
        got = by_id[event_id]
        assert got.guide_ok is True and got.raw_ok is True
        assert got.json == payload
        assert got.headers["x-webhook-event"] == payload["event"]
        assert got.headers["content-type"] == "application/json"
        assert got.headers["user-agent"].startswith("webhookd/")
        assert got.headers["webhook-id"] == event_id
        assert got.headers["x-webhook-timestamp"] == got.headers["webhook-timestamp"]
        assert verifier.verify(got.body, got.headers) == payload
    for event_id in ids:
        assert _final(hub, event_id)["state"] == "delivered"


def test_body_is_exactly_the_canonical_bytes_with_escaped_accents(hub, receiver_factory):
    receiver = receiver_factory()
    hub.register(receiver.url, ["payment.success"])
    _publish_ok(hub, PAYMENT_SUCCESS)
    wait_for(lambda: receiver.received)
    body = receiver.received[0].body
    assert body == json.dumps(PAYMENT_SUCCESS, sort_keys=True, separators=(",", ":")).encode()
    assert b'"amount":150.0' in body and b"P\\u00e9rez" in body


def test_partner_only_gets_the_events_it_subscribed_to(hub, receiver_factory):
    payments_only = receiver_factory()
    everything = receiver_factory()
    p1 = hub.register(payments_only.url, ["payment.success"], name="Payments only")
    p2 = hub.register(everything.url, ALL_OUTBOUND, name="Everything")
    booking = _publish_ok(hub, BOOKING_CONFIRMED)
    payment = _publish_ok(hub, PAYMENT_SUCCESS)
    assert booking["deliveries"] == 1 and payment["deliveries"] == 2
    wait_for(lambda: len(everything.received) == 2 and len(payments_only.received) == 1)
    assert _final(hub, payment["event_id"], p1["partner_id"])["state"] == "delivered"
    assert [r.headers["x-webhook-event"] for r in payments_only.received] == ["payment.success"]
    assert hub.deliveries(partner_id=p1["partner_id"], event="booking.confirmed") == []
    assert len(hub.deliveries(partner_id=p2["partner_id"])) == 2


def test_two_500s_then_200_is_delivered_on_the_third_attempt(hub, receiver_factory):
    receiver = receiver_factory()
    receiver.script = [(500, 0), (500, 0)]
    hub.register(receiver.url, ["payment.success"])
    event = _publish_ok(hub, PAYMENT_SUCCESS)
    d = _final(hub, event["event_id"])
    assert d["state"] == "delivered" and d["attempt_count"] == 3
    assert [a["status_code"] for a in d["attempts"]] == [500, 500, 200]
    assert [a["error"] for a in d["attempts"]] == ["http_error", "http_error", None]
    assert '"status":"error"' in d["attempts"][0]["response_snippet"]
    assert all(a["duration_ms"] >= 0 for a in d["attempts"])
    assert len({r.headers["x-webhook-id"] for r in receiver.received}) == 1  # same id on every retry


def test_always_500_fails_after_three_attempts(hub, receiver_factory):
    receiver = receiver_factory(default=(500, 0))
    hub.register(receiver.url, ["payment.success"])
    event = _publish_ok(hub, PAYMENT_SUCCESS)
    d = _final(hub, event["event_id"])
    assert d["state"] == "failed" and d["attempt_count"] == 3
    assert len(receiver.received) == 3
    assert hub.deliveries(state="failed")[0]["delivery_id"] == d["delivery_id"]


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__max_attempts=1)
    receiver = receiver_factory(default=(302, 0))
    hub.register(receiver.url, ["payment.success"])
    d = _final(hub, _publish_ok(hub, PAYMENT_SUCCESS)["event_id"])
    assert d["state"] == "failed"
    assert d["attempts"][0]["status_code"] == 302 and d["attempts"][0]["error"] == "redirect"
    assert len(receiver.received) == 1


def test_a_receiver_slower_than_the_timeout_is_recorded_as_timeout(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__max_attempts=1, delivery__timeout_s=0.3)
    receiver = receiver_factory(default=(200, 1.5))
    hub.register(receiver.url, ["payment.success"])
    d = _final(hub, _publish_ok(hub, PAYMENT_SUCCESS)["event_id"])
    assert d["state"] == "failed"
    attempt = d["attempts"][0]
    assert attempt["error"] == "timeout" and attempt["status_code"] is None
    assert 250 <= attempt["duration_ms"] < 1500


def test_connection_refused_is_recorded(webhookd_factory):
    from conftest import free_port

    hub = webhookd_factory(delivery__max_attempts=1)
    hub.register(f"http://127.0.0.1:{free_port()}/nobody-home", ["payment.success"])
    d = _final(hub, _publish_ok(hub, PAYMENT_SUCCESS)["event_id"])
    assert d["attempts"][0]["error"] == "connection_refused"


def test_retry_of_a_failed_delivery_delivers_once_the_receiver_is_healthy(hub, receiver_factory):
    receiver = receiver_factory(default=(503, 0))
    hub.register(receiver.url, ["payment.success"])
    d = _final(hub, _publish_ok(hub, PAYMENT_SUCCESS)["event_id"])
    assert d["state"] == "failed"
    receiver.default = (200, 0)
    r = hub.http.post(f"/deliveries/{d['delivery_id']}/retry", headers=hub.admin)
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "pending"
    done = wait_for(lambda: (x := hub.delivery(d["delivery_id"]))["state"] == "delivered" and x)
    assert done["attempt_count"] == 4 and done["attempts"][-1]["status_code"] == 200
    again = hub.http.post(f"/deliveries/{d['delivery_id']}/retry", headers=hub.admin)
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_failed"


def test_a_manual_retry_that_fails_is_one_attempt_then_failed_again(hub, receiver_factory):
    receiver = receiver_factory(default=(500, 0))
    hub.register(receiver.url, ["payment.success"])
    d = _final(hub, _publish_ok(hub, PAYMENT_SUCCESS)["event_id"])
    assert hub.http.post(f"/deliveries/{d['delivery_id']}/retry", headers=hub.admin).status_code == 202
    again = wait_for(lambda: (x := hub.delivery(d["delivery_id"]))["state"] == "failed" and x["attempt_count"] == 4 and x)
    assert len(again["attempts"]) == 4 and len(receiver.received) == 4


def test_same_idempotency_key_twice_is_one_event_and_one_fan_out(hub, receiver_factory):
    receiver = receiver_factory()
    hub.register(receiver.url, ["payment.success"])
    first = hub.publish(PAYMENT_SUCCESS, headers={"Idempotency-Key": "order-77"})
    second = hub.publish(PAYMENT_SUCCESS, headers={"Idempotency-Key": "order-77"})
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    wait_for(lambda: receiver.received)
    assert len(hub.deliveries()) == 1
    reused = hub.publish({**PAYMENT_SUCCESS, "amount": 1.0}, headers={"Idempotency-Key": "order-77"})
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused"
    assert len(hub.deliveries()) == 1 and len(receiver.received) == 1


def test_timestamp_is_added_when_absent(hub, receiver_factory):
    import time

    receiver = receiver_factory()
    hub.register(receiver.url, ["booking.cancelled"])
    before = int(time.time())
    _publish_ok(hub, {"event": "booking.cancelled", "booking_id": "b1", "user_id": "u1"})
    wait_for(lambda: receiver.received)
    assert before <= receiver.received[0].json["timestamp"] <= int(time.time())

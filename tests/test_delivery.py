"""End-to-end delivery: webhookd on a real server, partners as real receivers on 127.0.0.1; the
delivery loop (delivery.py) under misbehaving partners; a partner's change reaching the next attempt.

The breakers and the pace the loop asks for room are tested in test_breakers.py."""

import json
import random
import time

import pytest
import standardwebhooks

import delivery
from config import DeliverySettings
from conftest import free_port, wait_for
from housekeeping import Housekeeping
from models import Attempt, NewEvent
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


# --- The loop under misbehaving partners: kept-alive connections, isolation, settling ----------


def test_healthy_partners_get_kept_alive_connections(hub, receiver_factory):
    """100 deliveries in 10 waves of 10, each wave settled before the next: a wave needs at most 10
    connections at once, and the next one finds them idle in the pool. Without keep-alive, 100
    connections; with it, about one wave's worth (twice that allows for one the receiver dropped)."""
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    for wave in range(1, 11):
        hub.publish_many(10)
        wait_for(lambda n=10 * wave: len(receiver.received) == n)
        wait_for(lambda: all(d["state"] == "delivered" for d in hub.all_deliveries(partner["partner_id"])))
    assert len(receiver.connections) <= 20, len(receiver.connections)


def test_slow_partners_get_many_attempts_in_flight_and_none_exceeds_its_cap(webhookd_factory, receiver_factory):
    """25 partners answering after 0.5 s, 8 deliveries each, 4,000 in flight (the default) and 4 per
    partner: the receiver itself counts far more than the 16 requests at once that sender threads
    allowed, and never more than 4 at once on any partner's path."""
    hub = webhookd_factory(delivery__per_partner_concurrency=4)
    receiver = receiver_factory(default=(200, 0.5))
    for i in range(25):
        hub.register(f"{receiver.server.url}/p{i}", ["payment.success"], name=f"Partner {i}")
    hub.publish_many(8)
    wait_for(lambda: len(hub.deliveries(state="delivered", limit=200)) == 200, timeout=60)
    assert receiver.max_in_flight >= 40, receiver.max_in_flight
    assert len(receiver.max_in_flight_by_path) == 25
    assert max(receiver.max_in_flight_by_path.values()) <= hub.config.delivery.per_partner_concurrency == 4


def test_a_black_hole_partner_does_not_slow_the_healthy_one(webhookd_factory, receiver_factory, black_hole):
    hub = webhookd_factory(delivery__timeout_s=1.0, delivery__concurrency=8, delivery__per_partner_concurrency=4)
    healthy = receiver_factory()
    hub.register(black_hole.url, ["payment.success"], name="Black hole")
    good = hub.register(healthy.url, ["payment.success"], name="Healthy")
    started = time.monotonic()
    hub.publish_many(60)
    wait_for(lambda: len(healthy.received) == 60, timeout=5)
    elapsed = time.monotonic() - started
    # The black hole holds at most its cap of workers, each for one timeout: it is still
    # being tried (nothing of it is delivered) while every healthy delivery has arrived.
    # (The receiver has the last request a moment before the recorder has written its result.)
    wait_for(lambda: [d["state"] for d in hub.all_deliveries(good["partner_id"])].count("delivered") == 60)
    hole_id = next(p["partner_id"] for p in hub.http.get("/partners", headers=hub.admin).json()["items"]
                   if p["partner_name"] == "Black hole")
    assert all(d["state"] == "pending" for d in hub.all_deliveries(hole_id))
    assert len(black_hole.accepted) <= 4 * (int(elapsed / 1.0) + 2)


def test_a_flaky_receiver_ends_with_every_delivery_delivered_or_failed(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__breaker_threshold=1000)
    receiver = receiver_factory()
    rng = random.Random(7)
    receiver.script = [(500 if rng.random() < 0.5 else 200, 0) for _ in range(2000)]
    partner = hub.register(receiver.url, ["payment.success"])
    hub.publish_many(120)

    def settled():
        items = hub.all_deliveries(partner["partner_id"])
        return items if all(d["state"] != "pending" for d in items) else None

    items = wait_for(settled, timeout=30)
    delivered = sum(d["state"] == "delivered" for d in items)
    failed = sum(d["state"] == "failed" for d in items)
    assert delivered + failed == 120 == len(items)
    assert failed > 0 and delivered > 0
    assert all(1 <= d["attempt_count"] <= 3 for d in items)
    with hub.store._reader() as db:
        assert db.execute("SELECT COUNT(*) FROM deliveries WHERE leased_until IS NOT NULL").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == len(receiver.received)


def test_the_loop_sleeps_after_a_partner_failed_past_its_pause(webhookd_factory):
    hub = webhookd_factory(delivery__max_attempts=1, delivery__breaker_threshold=1,
                           delivery__breaker_cooldown_s=0.1, delivery__breaker_cooldown_max_s=0.1)
    hub.register(f"http://127.0.0.1:{free_port()}/down", ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: hub.deliveries(state="failed"))
    loop = hub.app.state.ctx.loop
    calls, pauses = [], []
    real_next_due_at, real_sleep = hub.store.next_due_at, loop._sleep

    async def recorded_sleep(seconds):
        pauses.append(seconds)
        await real_sleep(seconds)

    hub.store.next_due_at = lambda *a, **k: calls.append(1) or real_next_due_at(*a, **k)
    loop._sleep = recorded_sleep
    loop.wake()
    try:
        # Once the partner's pause is over nothing is due: the loop sleeps long, where a loop that
        # spins would look again every 0.05 s (NOTHING_CLAIMED_WAIT_S), on a machine of any speed.
        wait_for(lambda: pauses and pauses[-1] >= 1.0)
    except AssertionError:
        pytest.fail(f"the loop spun: {len(calls)} looks for due work, its pauses {pauses[-5:]}, never a long sleep")
    finally:
        hub.store.next_due_at, loop._sleep = real_next_due_at, real_sleep
    assert len(calls) < 10, f"the loop spun: {len(calls)} looks for due work before it slept"


# --- A partner's change reaches every attempt that starts after the answer --------------------


def _one_in_flight_one_due(hub, receiver):
    """Two deliveries to one partner with ``concurrency = 1``: the first held by the receiver, the
    second due and waiting for room (a claimed job begins at once, so none waits claimed)."""
    partner = hub.register(receiver.url, ["payment.success"])
    hub.publish_many(2)

    def leased():
        with hub.store._reader() as db:
            return db.execute("SELECT COUNT(*) FROM deliveries WHERE leased_until IS NOT NULL").fetchone()[0]

    wait_for(lambda: len(receiver.received) == 1 and leased() == 1)
    return partner


def test_a_job_claimed_before_a_change_begins_with_the_partner_as_it_is_now(tmp_path):
    """A change answered 200 reaches every attempt that begins after it, even of a job claimed
    before it: the attempt takes the URL, secrets and pace from the partner as it is now, and a
    partner paused meanwhile gets nothing (the job is given back)."""
    from storage import open_store

    store = open_store(str(tmp_path / "w.db"))
    try:
        partner = store.add_partner(partner_id="partner_1", name="P", webhook_url="http://127.0.0.1:9/old",
                                    events=["payment.success"], secret="sk_live_old", api_key_hash="h", now=100.0)
        store.publish(NewEvent(id="evt_1", type="payment.success", body=b"{}"), now=100.0, max_attempts=3,
                      new_delivery_id=lambda: "dlv_1")
        (job,) = store.claim_due(now=100.0, lease_s=30, limit=1, per_partner=1)
        store.update_partner(partner.id, webhook_url="http://127.0.0.1:9/new", max_rate_per_s=2.0, now=101.0)
        store.rotate_secret(partner.id, new_secret="sk_live_new", previous_until=101.0, now=101.0)
        loop = delivery.DeliveryLoop(store, DeliverySettings(), clock=lambda: 102.0)
        current = loop._as_partner_is_now(job)
        assert (job.url, job.secrets) == ("", ())  # the claim reads neither: the attempt takes them as they are then
        assert (current.url, current.secrets, current.max_rate_per_s) == ("http://127.0.0.1:9/new", ("sk_live_new",), 2.0)
        store.update_partner(partner.id, status="paused", now=103.0)
        assert loop._as_partner_is_now(job) is None
    finally:
        store.close()


def test_a_job_claimed_when_the_stop_comes_is_released_unsent(tmp_path):
    """Claimed, then the stop decision before its attempt began: it is not sent, and its lease is
    released with its attempt count unchanged, so the next run sends it at once."""
    import asyncio

    from storage import open_store

    store = open_store(str(tmp_path / "w.db"))
    try:
        store.add_partner(partner_id="partner_1", name="P", webhook_url="http://127.0.0.1:9/x",
                          events=["payment.success"], secret="sk_live_s", api_key_hash="h", now=100.0)
        store.publish(NewEvent(id="evt_1", type="payment.success", body=b"{}"), now=100.0, max_attempts=3,
                      new_delivery_id=lambda: "dlv_1")
        loop = delivery.DeliveryLoop(store, DeliverySettings(), clock=lambda: 100.0)

        async def claim_then_stop():
            loop._recorder.start()
            loop._stopping = True                         # the stop decision, then the claim's hand-off
            assert await loop._claim_and_start() == 1
            await loop.stop(grace_s=10)

        asyncio.run(claim_then_stop())
        row = store.get_delivery("dlv_1")
        assert (row.state, row.attempt_count, row.leased_until, row.attempts) == ("pending", 0, None, ())
    finally:
        store.close()


def test_a_new_url_and_secret_reach_the_next_attempt(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__concurrency=1)
    old = receiver_factory(default=(200, 0.6))  # under the 1 s timeout of the tests
    new = receiver_factory()
    partner = _one_in_flight_one_due(hub, old)
    rotated = hub.http.post(f"/partners/{partner['partner_id']}/rotate-secret", headers=hub.admin).json()
    new.secret = rotated["shared_secret"]
    r = hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin, json={"webhook_url": new.url})
    assert r.status_code == 200
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 2)
    assert len(old.received) == 1 and len(new.received) == 1
    assert new.received[0].guide_ok and new.received[0].raw_ok  # signed with the new secret
    urls = {d["event_id"]: hub.delivery(d["delivery_id"])["attempts"][0]["url"] for d in hub.deliveries()}
    assert sorted(urls.values()) == sorted([old.url, new.url])


def test_a_pause_holds_the_next_attempt_and_resume_sends_it(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__concurrency=1)
    receiver = receiver_factory(default=(200, 0.6))  # under the 1 s timeout of the tests
    partner = _one_in_flight_one_due(hub, receiver)
    path = f"/partners/{partner['partner_id']}"
    assert hub.http.patch(path, headers=hub.admin, json={"status": "paused"}).status_code == 200
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 1)
    held = wait_for(lambda: [d for d in hub.deliveries(state="pending")
                             if hub.store.get_delivery(d["delivery_id"]).leased_until is None])
    assert len(receiver.received) == 1 and held[0]["attempt_count"] == 0
    receiver.default = (200, 0.0)
    assert hub.http.patch(path, headers=hub.admin, json={"status": "active"}).status_code == 200
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 2)
    assert len(receiver.received) == 2


# --- A retention pass --------------------------------------------------------------------------------


def test_one_retention_pass_purges_every_table_until_done(tmp_path):
    """A pass deletes in batches until nothing old is left — delivered events behind kept failures,
    and inbound events even when there is no outbound work — instead of one batch per interval."""
    import asyncio

    from models import Outcome
    from storage import open_store

    store = open_store(str(tmp_path / "w.db"))
    try:
        partner = store.add_partner(partner_id="partner_1", name="P", webhook_url="http://127.0.0.1:9/x",
                                    events=["payment.success"], secret="sk_live_s", api_key_hash="h", now=100.0)
        for i in range(7):
            store.add_inbound(inbound_id=f"inb_{i}", partner_id=partner.id, event_type="tour.purchased",
                              dedupe_key=f"k{i}", body=b"{}", now=100.0)
        for i in range(9):
            store.publish(NewEvent(id=f"evt_{i}", type="payment.success", body=b"{}"), now=100.0 + i,
                          max_attempts=1, new_delivery_id=lambda i=i: f"dlv_{i}")
        outcomes = []
        for job in store.claim_due(now=200.0, lease_s=30, limit=20, per_partner=20):
            failed = job.event_id in ("evt_0", "evt_1", "evt_2", "evt_5")   # kept: failed
            outcomes.append(Outcome(
                delivery_id=job.delivery_id, partner_id=job.partner_id, state="failed" if failed else "delivered",
                attempt=Attempt(attempt=1, started_at=200.0, duration_ms=1, status_code=500 if failed else 200,
                                error="http_error" if failed else None, response_snippet=""),
                next_attempt_at=200.0, partner_failing_since=None, partner_failing_changed=False,
                disable_reason=None, event_id=job.event_id, created_at=100.0))
        assert store.finish_attempts(outcomes, now=200.0) == []
        settings = DeliverySettings(retention_s=1000.0, purge_batch=2)
        keeper = Housekeeping(store, settings, clock=lambda: 5000.0)
        assert asyncio.run(keeper.purge_expired()) == (5, 7)
        assert store.list_inbound(limit=10).items == []
        assert sorted(d.event_id for d in store.list_deliveries(limit=20).items) == ["evt_0", "evt_1", "evt_2", "evt_5"]
    finally:
        store.close()

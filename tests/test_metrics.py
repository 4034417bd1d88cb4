"""GET /metrics, parsed with prometheus_client's own parser, moving with a real flow."""

import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families

import signing
from conftest import wait_for
from payloads import BOOKING_CONFIRMED, PAYMENT_SUCCESS


def _samples(hub):
    r = hub.http.get("/metrics", headers=hub.admin)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_admin_token_unless_public(webhookd_factory):
    hub = webhookd_factory()
    assert hub.http.get("/metrics").status_code == 401
    public = webhookd_factory(security__metrics_public=True)
    assert public.http.get("/metrics").status_code == 200


def test_metrics_move_with_a_real_flow(hub, receiver_factory):
    good = receiver_factory()
    bad = receiver_factory(default=(500, 0))
    p_good = hub.register(good.url, ["payment.success"], name="Good")
    p_bad = hub.register(bad.url, ["payment.success"], name="Bad")
    before = _samples(hub)
    assert _value(before, "webhookd_events_published_total", event="payment.success") == 0
    for i in range(2):
        assert hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"t{i}"}).status_code == 202
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 2 and len(hub.deliveries(state="failed")) == 2)
    body = json.dumps({"event": "tour.purchased"}).encode()
    sig = signing.sign_hex(p_good["shared_secret"], body)
    for signature in (sig, sig, "00" * 32):
        hub.http.post("/webhooks/partners", content=body,
                      headers={"X-Webhook-Signature": signature, "X-Webhook-Event": "tour.purchased"})

    after = _samples(hub)
    assert _value(after, "webhookd_events_published_total", event="payment.success") == 2
    assert _value(after, "webhookd_deliveries_total", partner=p_good["partner_id"], outcome="delivered") == 2
    assert _value(after, "webhookd_deliveries_total", partner=p_bad["partner_id"], outcome="failed") == 2
    assert _value(after, "webhookd_attempts_total", result="success") == 2
    assert _value(after, "webhookd_attempts_total", result="http_error") == 6
    assert _value(after, "webhookd_attempt_duration_seconds_count") == 8
    assert _value(after, "webhookd_publish_to_delivered_seconds_count") == 2
    assert _value(after, "webhookd_inbound_total", result="accepted") == 1
    assert _value(after, "webhookd_inbound_total", result="duplicate") == 1
    assert _value(after, "webhookd_inbound_total", result="refused", reason="invalid_signature") == 1
    assert _value(after, "webhookd_deliveries", state="delivered") == 2
    assert _value(after, "webhookd_deliveries", state="failed") == 2
    assert _value(after, "webhookd_deliveries_in_flight") == 0
    assert ("webhookd_circuit_breakers_open", ()) in after
    assert _value(after, "webhookd_claim_rows_sum") == 8           # every attempt was claimed once
    assert _value(after, "webhookd_claim_duration_seconds_count") >= 1


def test_a_partners_open_circuit_is_a_labelled_gauge_and_a_probe_clears_it(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__max_attempts=50, delivery__breaker_threshold=2, delivery__breaker_span_s=0.01,
                           delivery__breaker_cooldown_s=60.0, delivery__breaker_cooldown_max_s=60.0)
    receiver = receiver_factory(default=(500, 0))
    partner = hub.register(receiver.url, ["payment.success"])
    pid = partner["partner_id"]
    assert _value(_samples(hub), "webhookd_partner_circuit_open", partner_id=pid) == 0.0
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: hub.http.get(f"/partners/{pid}", headers=hub.admin).json()["circuit"]["state"] == "open")
    assert _value(_samples(hub), "webhookd_partner_circuit_open", partner_id=pid) == 1.0
    receiver.default = (200, 0)
    r = hub.http.post(f"/partners/{pid}/recover", headers=hub.admin, params={"since": 0})
    assert r.status_code == 200   # nothing failed yet; the open circuit probes at once all the same
    wait_for(lambda: hub.deliveries(state="delivered"))   # long before the minute's pause would end
    assert _value(_samples(hub), "webhookd_partner_circuit_open", partner_id=pid) == 0.0


@pytest.mark.parametrize("how", ["cancel-pending", "delete"])
def test_a_result_the_store_refuses_is_logged_and_counted_as_what_was_recorded(hub_factory, receiver_factory,
                                                                                caplog, how):
    """An attempt is on the wire when the admin cancels the partner's pending deliveries (or
    deletes the partner); the partner answers 200 afterwards. The store keeps the delivery
    ``cancelled`` and refuses the result: the log says so, and the metrics count one cancelled
    delivery — not a delivered one as well."""
    caplog.set_level(logging.INFO, logger="webhookd.delivery")
    hub = hub_factory(delivery__timeout_s=10.0)
    receiver = receiver_factory(default=(200, 1.5))      # holds its answer: the attempt stays in flight
    pid = hub.register(receiver.url, ["payment.success"])["partner_id"]
    assert hub.publish(PAYMENT_SUCCESS).status_code == 202
    wait_for(lambda: receiver.received)
    if how == "delete":
        r = hub.http.delete(f"/partners/{pid}", headers=hub.admin)
    else:
        r = hub.http.post(f"/partners/{pid}/cancel-pending", headers=hub.admin)
    assert r.status_code == 200 and r.json()["cancelled_deliveries"] == 1, r.text

    def attempt_counted():  # the attempt itself did happen: counted (after its log line) once its result is handled
        samples = _samples(hub)
        return samples if _value(samples, "webhookd_attempts_total", result="success") == 1 else None

    samples = wait_for(attempt_counted, timeout=15)
    assert _value(samples, "webhookd_deliveries_total", partner=pid, outcome="cancelled") == 1
    assert _value(samples, "webhookd_deliveries_total", partner=pid, outcome="delivered") == 0
    assert _value(samples, "webhookd_publish_to_delivered_seconds_count") == 0
    [line] = [rec for rec in caplog.records if rec.name == "webhookd.delivery" and pid in rec.getMessage()]
    assert line.levelname == "INFO" and line.recorded is False
    assert line.getMessage().endswith("-> delivered but dropped: the delivery was cancelled while in flight "
                                      "(cancel-pending, or its partner deleted)")
    assert hub.rows("SELECT state FROM deliveries") == [("cancelled",)]
    assert hub.rows("SELECT COUNT(*) FROM attempts") == [(0,)]



def test_an_event_that_went_to_nobody_does_not_wake_the_delivery_loop(hub, receiver_factory):
    """A publish wakes the delivery loop only when it made deliveries: 30 events of a type nobody
    subscribes to, then one that goes to a partner. Each wake-up costs a claim (two store calls on
    worker threads); the claims counted while all 31 are handled stay a handful, not 30 or more."""
    receiver = receiver_factory()
    hub.register(receiver.url, ["payment.success"])
    wait_for(lambda: _value(_samples(hub), "webhookd_claim_rows_count") >= 1)  # the loop has started
    before = _value(_samples(hub), "webhookd_claim_rows_count")
    for i in range(30):
        assert hub.publish({**BOOKING_CONFIRMED, "booking_id": f"b{i}"}).json()["deliveries"] == 0
    assert hub.publish({**PAYMENT_SUCCESS, "transaction_id": "t1"}).json()["deliveries"] == 1
    wait_for(lambda: len(receiver.received) == 1)
    claims = _value(_samples(hub), "webhookd_claim_rows_count") - before
    assert 1 <= claims <= 5, claims


def test_the_served_process_sets_its_start_up_heap_aside_and_counts_the_collectors_pauses(serve_factory,
                                                                                          receiver_factory):
    """``webhookd serve`` freezes what is alive once it has started (garbage.py), so full collections
    walk only what changed since, and runs them on a clock; /metrics shows that and every
    collection's GIL time."""
    import httpx

    import garbage
    from conftest import ADMIN_TOKEN

    serve = serve_factory()
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    def samples():
        r = httpx.get(serve.url + "/metrics", headers=admin, timeout=10)
        assert r.status_code == 200
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(r.text) for s in family.samples}

    receiver = receiver_factory()
    r = httpx.post(serve.url + "/partners/register", headers=admin, timeout=10,
                   json={"partner_name": "Tours", "webhook_url": receiver.url, "events": ["payment.success"]})
    assert r.status_code == 201, r.text
    before = samples()
    assert _value(before, "webhookd_gc_frozen_objects") > 10_000  # the modules, the app: tens of thousands
    assert _value(before, "webhookd_gc_threshold", generation="2") == garbage.NEVER  # full collections on a clock
    for i in range(50):  # each allocates: young collections follow
        assert httpx.post(serve.url + "/events", headers=admin, timeout=10,
                          json={**PAYMENT_SUCCESS, "transaction_id": f"t{i}"}).status_code == 202
    wait_for(lambda: len(receiver.received) == 50)
    after = samples()
    assert _value(after, "webhookd_gc_collections_total", generation="0") > _value(
        before, "webhookd_gc_collections_total", generation="0")
    assert _value(after, "webhookd_gc_pause_seconds_total", generation="0") > 0
    assert 0 < _value(after, "webhookd_gc_longest_pause_seconds") < 60


def test_full_collections_run_on_their_own_clock_instead_of_the_collectors_rule():
    """``garbage.FullCollections`` turns the collector's own full collections off (the oldest
    generation's threshold) and runs one every ``every_s`` on the loop; ``stop`` gives the rule back."""
    import asyncio
    import gc

    import garbage

    thresholds = gc.get_threshold()
    loop = asyncio.new_event_loop()
    full = garbage.FullCollections(every_s=0.05)
    try:
        full.start(loop)
        assert gc.get_threshold() == (thresholds[0], thresholds[1], garbage.NEVER)
        started = gc.get_stats()[2]["collections"]
        for _ in range(200):  # 0.05 s turns of the loop: 10 s at most
            loop.run_until_complete(asyncio.sleep(0.05))
            if gc.get_stats()[2]["collections"] >= started + 2:
                break
        assert gc.get_stats()[2]["collections"] >= started + 2
    finally:
        full.stop()
        loop.close()
    assert gc.get_threshold() == thresholds

"""The delivery engine under misbehaving partners: reuse, isolation, breakers, Retry-After, 410."""

import random
import time

import pytest

import delivery
from breakers import Breakers, Pacer
from conftest import free_port, wait_for
from models import Attempt, Job, NewEvent
from payloads import PAYMENT_SUCCESS
from sender import Sent


def _publish(hub, n, **extra):
    ids = []
    for i in range(n):
        r = hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"txn_{i}", **extra})
        assert r.status_code == 202, r.text
        ids.append(r.json()["event_id"])
    return ids


def _states(hub, partner_id):
    items, cursor = [], None
    while True:
        params = {"partner_id": partner_id, "limit": 200, **({"cursor": cursor} if cursor else {})}
        page = hub.http.get("/deliveries", headers=hub.admin, params=params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return items


def _partner(hub, partner_id):
    return hub.http.get(f"/partners/{partner_id}", headers=hub.admin).json()


def test_healthy_partners_get_kept_alive_connections(hub, receiver_factory):
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    _publish(hub, 100)
    wait_for(lambda: len(receiver.received) == 100)
    wait_for(lambda: all(d["state"] == "delivered" for d in _states(hub, partner["partner_id"])))
    # One connection per sending thread at most, not one per delivery.
    assert len(receiver.connections) <= hub.config.delivery.concurrency
    assert len(receiver.connections) < 100 / 4


def test_slow_partners_get_many_attempts_in_flight_and_none_exceeds_its_cap(webhookd_factory, receiver_factory):
    """25 partners answering after 0.5 s, 8 deliveries each, 1,000 in flight (the default) and 4 per
    partner: the receiver itself counts far more than the 16 requests at once that sender threads
    allowed, and never more than 4 at once on any partner's path."""
    hub = webhookd_factory(delivery__per_partner_concurrency=4)
    receiver = receiver_factory(default=(200, 0.5))
    for i in range(25):
        hub.register(f"{receiver.server.url}/p{i}", ["payment.success"], name=f"Partner {i}")
    _publish(hub, 8)
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
    _publish(hub, 60)
    wait_for(lambda: len(healthy.received) == 60, timeout=5)
    elapsed = time.monotonic() - started
    # The black hole holds at most its cap of workers, each for one timeout: it is still
    # being tried (nothing of it is delivered) while every healthy delivery has arrived.
    # (The receiver has the last request a moment before the recorder has written its result.)
    wait_for(lambda: [d["state"] for d in _states(hub, good["partner_id"])].count("delivered") == 60)
    hole_id = next(p["partner_id"] for p in hub.http.get("/partners", headers=hub.admin).json()["items"]
                   if p["partner_name"] == "Black hole")
    assert all(d["state"] == "pending" for d in _states(hub, hole_id))
    assert len(black_hole.accepted) <= 4 * (int(elapsed / 1.0) + 2)


def test_the_circuit_opens_probes_one_at_a_time_and_closes(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__breaker_threshold=3, delivery__breaker_span_s=0.3,
                           delivery__breaker_cooldown_s=0.5, delivery__breaker_cooldown_max_s=1.0,
                           delivery__max_attempts=50, delivery__per_partner_concurrency=4)
    receiver = receiver_factory(default=(500, 0.1))
    partner = hub.register(receiver.url, ["payment.success"])
    _publish(hub, 10)
    wait_for(lambda: len(receiver.received) >= 4)
    wait_for(lambda: _partner(hub, partner["partner_id"])["failing_since"] is not None)
    circuit = wait_for(lambda: (c := _partner(hub, partner["partner_id"])["circuit"])["state"] == "open" and c)
    assert circuit["reason"] == "failures" and circuit["recent_failures"] >= 3
    assert circuit["next_probe_at"] >= circuit["opened_at"]
    wait_for(lambda: receiver.in_flight == 0)  # the attempts in flight when it opened are over
    first_wave, began = len(receiver.received), time.monotonic()
    receiver.max_in_flight = 0
    wait_for(lambda: len(receiver.received) - first_wave >= 3, timeout=60)
    elapsed = time.monotonic() - began
    probes = receiver.received[first_wave:]
    # Without a breaker 10 deliveries with 0.05-0.2 s backoffs make dozens of attempts a second;
    # with it, one probe per cool-down, and the cool-down doubles (0.5 s, then 1 s at most). Both
    # bounds only widen on a slower machine.
    assert len(probes) <= elapsed / 0.5 + 2, (len(probes), elapsed)
    gaps = [later.at - earlier.at for earlier, later in zip(probes, probes[1:])]
    assert min(gaps) >= 0.9, gaps  # after a failed probe the 0.5 s cool-down doubled (to its 1 s cap)
    assert receiver.max_in_flight == 1  # one probe at a time
    receiver.default = (200, 0)
    wait_for(lambda: all(d["state"] == "delivered" for d in _states(hub, partner["partner_id"])), timeout=10)
    shown = _partner(hub, partner["partner_id"])
    assert shown["status"] == "active" and shown["failing_since"] is None
    assert shown["circuit"] == {"state": "closed", "reason": None, "opened_at": None, "next_probe_at": None,
                                "recent_failures": 0}


def test_410_gone_disables_the_partner_and_patch_resumes_it(hub, receiver_factory):
    receiver = receiver_factory(default=(410, 0))
    partner = hub.register(receiver.url, ["payment.success"])
    _publish(hub, 5)
    wait_for(lambda: _partner(hub, partner["partner_id"])["status"] == "disabled")
    shown = _partner(hub, partner["partner_id"])
    assert "410" in shown["disabled_reason"]
    time.sleep(0.5)
    tried = len(receiver.received)
    assert tried <= 4  # at most the cap that was already in flight
    assert all(d["state"] == "pending" for d in _states(hub, partner["partner_id"]))  # held, not lost
    time.sleep(0.5)
    assert len(receiver.received) == tried  # nothing more is sent to a disabled partner
    receiver.default = (200, 0)
    r = hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin, json={"status": "active"})
    assert r.status_code == 200 and r.json()["status"] == "active" and r.json()["disabled_reason"] is None
    wait_for(lambda: all(d["state"] == "delivered" for d in _states(hub, partner["partner_id"])))


def test_retry_after_is_honoured(hub, receiver_factory):
    receiver = receiver_factory()
    receiver.script = [(429, 0, {"Retry-After": "1"})]
    partner = hub.register(receiver.url, ["payment.success"])
    _publish(hub, 1)
    wait_for(lambda: _states(hub, partner["partner_id"])[0]["state"] == "delivered", timeout=10)
    d = hub.store.get_delivery(_states(hub, partner["partner_id"])[0]["delivery_id"])
    assert [a.status_code for a in d.attempts] == [429, 200]
    assert d.attempts[1].started_at - d.attempts[0].started_at >= 0.95  # not the 0.05 s backoff


def test_a_flaky_receiver_ends_with_every_delivery_delivered_or_failed(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__breaker_threshold=1000)
    receiver = receiver_factory()
    rng = random.Random(7)
    receiver.script = [(500 if rng.random() < 0.5 else 200, 0) for _ in range(2000)]
    partner = hub.register(receiver.url, ["payment.success"])
    _publish(hub, 120)

    def settled():
        items = _states(hub, partner["partner_id"])
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
    calls = []
    real = hub.store.next_due_at
    hub.store.next_due_at = lambda *a, **k: calls.append(1) or real(*a, **k)
    time.sleep(1.0)
    hub.store.next_due_at = real
    assert len(calls) < 10, f"the loop spun: {len(calls)} looks for due work in 1 s"


def _job(partner_failing_since):
    return Job(delivery_id="d", event_id="e", event="payment.success", partner_id="p", url="http://x/",
               secrets=("s",), body=b"{}", attempt=1, max_attempts=3, partner_failing_since=partner_failing_since)


def test_a_success_resets_the_failing_streak_even_for_jobs_claimed_before_it():
    breakers = Breakers(delivery.Settings(disable_after_s=100.0))
    fail = Sent(Attempt(1, 0, 1, 500, "http_error", ""))
    ok = Sent(Attempt(1, 0, 1, 200, None, ""))
    assert breakers.record(_job(None), fail, now=1000.0) == (1000.0, True, None)
    assert breakers.record(_job(1000.0), ok, now=1090.0)[0] is None
    since, changed, disable = breakers.record(_job(1000.0), fail, now=1101.0)  # claimed before the success
    assert (since, changed, disable) == (1101.0, True, None)


# --- A partner's change reaches every attempt that starts after the answer --------------------


def _one_in_flight_one_due(hub, receiver):
    """Two deliveries to one partner with ``concurrency = 1``: the first held by the receiver, the
    second due and waiting for room (a claimed job begins at once, so none waits claimed)."""
    partner = hub.register(receiver.url, ["payment.success"])
    _publish(hub, 2)

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
        loop = delivery.DeliveryLoop(store, delivery.Settings(), clock=lambda: 102.0)
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
        loop = delivery.DeliveryLoop(store, delivery.Settings(), clock=lambda: 100.0)

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
        settings = delivery.Settings(retention_s=1000.0, purge_batch=2)
        loop = delivery.DeliveryLoop(store, settings, clock=lambda: 5000.0)
        assert asyncio.run(loop.purge_expired()) == (5, 7)
        assert store.list_inbound(limit=10).items == []
        assert sorted(d.event_id for d in store.list_deliveries(limit=20).items) == ["evt_0", "evt_1", "evt_2", "evt_5"]
    finally:
        store.close()


# --- The breaker's rules, with the clock in the test's hands ---------------------------------


def _failed(started_at, status=500, retry_after=None):
    return Sent(Attempt(1, started_at, 1, status, "http_error", ""), retry_after)


def _breakers(**settings):
    return Breakers(delivery.Settings(**{"breaker_threshold": 5, "breaker_span_s": 10.0,
                                                  "disable_after_s": 3 * 86400.0, **settings}))


def test_a_burst_of_concurrent_failures_does_not_open_the_circuit():
    breakers = _breakers()
    for n in range(6):  # six attempts in flight together, all refused within 50 ms
        breakers.record(_job(None), _failed(started_at=0.0), now=0.01 * n)
    assert breakers.state("p", now=0.1) == "closed" and breakers.room("p", busy=0, now=0.1) == delivery.Settings().per_partner_concurrency


def test_sustained_failure_opens_the_circuit_and_a_probe_doubles_the_pause():
    breakers = _breakers(breaker_cooldown_s=30.0, breaker_cooldown_max_s=600.0)
    for t in (0.0, 3.0, 6.0, 9.0):
        breakers.record(_job(None), _failed(started_at=t), now=t + 0.5)
    assert breakers.state("p", now=10.0) == "closed"           # four failures: below the threshold
    breakers.record(_job(None), _failed(started_at=12.0), now=12.5)
    shown = breakers.describe("p", now=13.0)
    assert shown == {"state": "open", "reason": "failures", "opened_at": 12, "next_probe_at": 43,
                     "recent_failures": 5}
    assert breakers.room("p", busy=0, now=20.0) == 0
    assert breakers.state("p", now=43.0) == "half_open" and breakers.room("p", busy=0, now=43.0) == 1
    breakers.record(_job(None), _failed(started_at=43.0), now=43.5)   # the probe failed
    assert breakers.describe("p", now=44.0)["next_probe_at"] == 104   # 43.5 + 60
    breakers.probe_now("p", now=50.0)                                 # an operator's retry
    assert breakers.state("p", now=50.0) == "half_open" and breakers.room("p", busy=0, now=50.0) == 1


def test_the_breakers_pause_follows_the_retry_schedule_unless_set():
    assert delivery.Settings(backoff_max_s=8.0).cooldown_s == 8.0
    assert delivery.Settings(backoff_max_s=8.0).cooldown_max_s == 8.0
    assert delivery.Settings().cooldown_s == 30.0 and delivery.Settings().cooldown_max_s == 600.0
    assert delivery.Settings(backoff_max_s=8.0, breaker_cooldown_s=20.0).cooldown_s == 20.0


def test_a_retry_after_pause_ends_without_a_probe():
    breakers = _breakers()
    breakers.record(_job(None), _failed(started_at=0.0, status=429, retry_after=5.0), now=0.0)
    assert breakers.describe("p", now=1.0)["reason"] == "retry_after"
    assert breakers.room("p", busy=0, now=1.0) == 0 and breakers.room("p", busy=0, now=5.0) == delivery.Settings().per_partner_concurrency


def test_two_isolated_failures_days_apart_do_not_disable_the_partner():
    breakers = _breakers()
    day = 86400.0
    assert breakers.record(_job(None), _failed(0.0), now=0.0)[2] is None
    since, _, disable = breakers.record(_job(0.0), _failed(3 * day + 60), now=3 * day + 60)
    assert disable is None and since == 3 * day + 60   # a new streak, not three days of failure


def test_failures_spread_over_the_whole_span_do_disable_the_partner():
    breakers = _breakers()
    hour = 3600.0
    reasons = [breakers.record(_job(None), _failed(h * hour), now=h * hour)[2] for h in range(0, 73, 6)]
    assert reasons[:-1] == [None] * 12 and reasons[-1].startswith("every attempt failed for 259200 s")


def test_an_attempt_started_before_a_reset_does_not_bring_the_old_streak_back():
    breakers = _breakers(disable_after_s=150.0)
    for t in range(0, 100, 5):
        breakers.record(_job(None if t == 0 else 0.0), _failed(float(t)), now=float(t))
    breakers.forget("p", now=100.5)                           # PATCH {"status": "active"}
    since, changed, disable = breakers.record(_job(0.0), _failed(100.0), now=151.0)  # claimed before it
    assert (since, changed, disable) == (151.0, True, None)


# --- A partner's pace ------------------------------------------------------------------------------


def test_a_partners_pace_holds_for_every_attempt_retries_included(webhookd_factory, receiver_factory):
    """max_rate_per_s = 5: the receiver's own clock never sees more than 5 + 1 requests in any
    second, first attempts and retries alike (a slow machine only spreads them further)."""
    hub = webhookd_factory(delivery__max_attempts=5)
    receiver = receiver_factory()
    receiver.script = [(500, 0)] * 3
    partner = hub.register(receiver.url, ["payment.success"])
    r = hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin, json={"max_rate_per_s": 5})
    assert r.status_code == 200 and r.json()["max_rate_per_s"] == 5.0
    _publish(hub, 16)
    wait_for(lambda: len(hub.deliveries(state="delivered", limit="50")) == 16, timeout=60)
    arrivals = sorted(r.at for r in receiver.received)
    assert len(arrivals) == 19
    assert max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals) <= 6
    assert arrivals[-1] - arrivals[0] >= 18 / 5 - 0.5   # 19 starts at least 0.2 s apart, give or take the wire


def test_the_pace_spaces_starts_and_a_429_halves_it_for_a_while():
    pacer = Pacer()
    job = _job(None)
    assert pacer.room("p", None, now=0.0) is None                    # no pace: the breaker's room only
    assert pacer.room("p", 2.0, now=0.0) == 1
    pacer.claimed(job)
    assert pacer.room("p", 2.0, now=0.0) == 0                        # one claimed, not started yet
    assert pacer.start(job, 2.0, now=0.0)
    assert pacer.room("p", 2.0, now=0.4) == 0 and pacer.room("p", 2.0, now=0.5) == 1
    assert pacer.room("p", 100.0, now=0.02) == 1                     # a raised pace counts at once
    pacer.slow_down("p", 2.0, now=1.0)
    assert pacer.rate("p", 2.0, now=2.0) == 1.0 and pacer.rate("p", 2.0, now=61.5) == 2.0
    late = _job(None)
    pacer.claimed(late)
    assert not pacer.start(late, 0.5, now=1.0)                       # slowed since its claim: given back
    assert pacer.room("p", 0.5, now=1.0) == 0 and pacer.room("p", 0.5, now=2.0) == 1
    unpaced = Pacer()
    for n in range(10):
        assert unpaced.start(_job(None), None, now=0.05 * n)
    unpaced.slow_down("p", None, now=0.5)                             # it was getting 10/s
    assert unpaced.rate("p", None, now=1.0) == 5.0


def test_attempts_that_started_before_the_circuit_opened_do_not_lengthen_its_pause():
    breakers = _breakers(breaker_cooldown_s=30.0, breaker_cooldown_max_s=600.0)
    for t in (0.0, 3.0, 6.0, 9.0, 12.0):
        breakers.record(_job(None), _failed(started_at=t), now=t + 0.5)   # opens at 12.5, probe at 42.5
    breakers.record(_job(None), _failed(started_at=12.2), now=13.0)      # was on the wire when it opened
    assert breakers.describe("p", now=14.0)["next_probe_at"] == 43


@pytest.mark.parametrize("rate", [0, -1, 10_001, "fast", True, [5]])
def test_a_pace_that_is_not_a_positive_number_is_422(hub, rate):
    r = hub.http.post("/partners/register", headers=hub.admin, json={
        "partner_name": "P", "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"],
        "max_rate_per_s": rate})
    assert r.status_code == 422 and "'max_rate_per_s'" in r.json()["error"]["message"]


def test_after_a_restart_a_long_failing_streak_goes_on_from_the_stores_last_failure():
    day = 86400.0
    # A partner failing since day 0, last failed at day 2.4; the process restarts at day 2.5.
    restored = Breakers(delivery.Settings(disable_after_s=3 * day), last_failure_of=lambda partner: 2.4 * day)
    assert restored.record(_job(0.0), _failed(2.9 * day), now=2.9 * day)[2] is None
    assert restored.record(_job(0.0), _failed(3.1 * day), now=3.1 * day)[2].startswith("every attempt failed")
    # Without that read the streak would restart at day 2.9 (its start is older than a quiet spell).
    forgetful = Breakers(delivery.Settings(disable_after_s=3 * day))
    assert forgetful.record(_job(0.0), _failed(2.9 * day), now=2.9 * day)[0] == 2.9 * day

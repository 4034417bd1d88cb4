"""The breakers and the pace (breakers.py): what a partner that fails, answers 429 or 410, or has a
pace sees of them through a running hub, and their rules with the clock in the test's hands.

The delivery loop that asks them for room is tested in test_delivery.py."""

import time

import pytest

from breakers import Breakers, Pacer
from config import DeliverySettings
from conftest import wait_for
from models import Attempt, Job
from sender import Sent


def _partner(hub, partner_id):
    return hub.http.get(f"/partners/{partner_id}", headers=hub.admin).json()


def test_the_circuit_opens_probes_one_at_a_time_and_closes(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__breaker_threshold=3, delivery__breaker_span_s=0.3,
                           delivery__breaker_cooldown_s=0.5, delivery__breaker_cooldown_max_s=1.0,
                           delivery__max_attempts=50, delivery__per_partner_concurrency=4)
    receiver = receiver_factory(default=(500, 0.1))
    partner = hub.register(receiver.url, ["payment.success"])
    hub.publish_many(10)
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
    wait_for(lambda: all(d["state"] == "delivered" for d in hub.all_deliveries(partner["partner_id"])), timeout=10)
    shown = _partner(hub, partner["partner_id"])
    assert shown["status"] == "active" and shown["failing_since"] is None
    assert shown["circuit"] == {"state": "closed", "reason": None, "opened_at": None, "next_probe_at": None,
                                "recent_failures": 0}


def test_410_gone_disables_the_partner_and_patch_resumes_it(hub, receiver_factory):
    receiver = receiver_factory(default=(410, 0))
    partner = hub.register(receiver.url, ["payment.success"])
    hub.publish_many(5)
    wait_for(lambda: _partner(hub, partner["partner_id"])["status"] == "disabled")
    shown = _partner(hub, partner["partner_id"])
    assert "410" in shown["disabled_reason"]
    hub.wait_until_nothing_is_due()  # the attempts in flight when it was disabled are over and recorded
    tried = len(receiver.received)
    assert tried <= 4  # at most the cap that was already in flight
    assert all(d["state"] == "pending" for d in hub.all_deliveries(partner["partner_id"]))  # held, not lost
    hub.wait_until_nothing_is_due()  # the loop has looked for due work again, twice
    assert len(receiver.received) == tried  # nothing more is sent to a disabled partner
    receiver.default = (200, 0)
    r = hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin, json={"status": "active"})
    assert r.status_code == 200 and r.json()["status"] == "active" and r.json()["disabled_reason"] is None
    wait_for(lambda: all(d["state"] == "delivered" for d in hub.all_deliveries(partner["partner_id"])))


def test_retry_after_is_honoured(hub, receiver_factory):
    receiver = receiver_factory()
    receiver.script = [(429, 0, {"Retry-After": "1"})]
    partner = hub.register(receiver.url, ["payment.success"])
    hub.publish_many(1)
    wait_for(lambda: hub.all_deliveries(partner["partner_id"])[0]["state"] == "delivered", timeout=10)
    d = hub.store.get_delivery(hub.all_deliveries(partner["partner_id"])[0]["delivery_id"])
    assert [a.status_code for a in d.attempts] == [429, 200]
    assert d.attempts[1].started_at - d.attempts[0].started_at >= 0.95  # not the 0.05 s backoff


def _job(partner_failing_since):
    return Job(delivery_id="d", event_id="e", event="payment.success", partner_id="p", url="http://x/",
               secrets=("s",), body=b"{}", attempt=1, max_attempts=3, partner_failing_since=partner_failing_since)


def test_a_success_resets_the_failing_streak_even_for_jobs_claimed_before_it():
    breakers = Breakers(DeliverySettings(disable_after_s=100.0))
    fail = Sent(Attempt(1, 0, 1, 500, "http_error", ""))
    ok = Sent(Attempt(1, 0, 1, 200, None, ""))
    assert breakers.record(_job(None), fail, now=1000.0) == (1000.0, True, None)
    assert breakers.record(_job(1000.0), ok, now=1090.0)[0] is None
    since, changed, disable = breakers.record(_job(1000.0), fail, now=1101.0)  # claimed before the success
    assert (since, changed, disable) == (1101.0, True, None)


# --- The breaker's rules, with the clock in the test's hands ---------------------------------


def _failed(started_at, status=500, retry_after=None):
    return Sent(Attempt(1, started_at, 1, status, "http_error", ""), retry_after)


def _breakers(**settings):
    return Breakers(DeliverySettings(**{"breaker_threshold": 5, "breaker_span_s": 10.0,
                                                  "disable_after_s": 3 * 86400.0, **settings}))


def test_a_burst_of_concurrent_failures_does_not_open_the_circuit():
    breakers = _breakers()
    for n in range(6):  # six attempts in flight together, all refused within 50 ms
        breakers.record(_job(None), _failed(started_at=0.0), now=0.01 * n)
    assert breakers.state("p", now=0.1) == "closed" and breakers.room("p", busy=0, now=0.1) == DeliverySettings().per_partner_concurrency


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
    assert DeliverySettings(backoff_max_s=8.0).cooldown_s == 8.0
    assert DeliverySettings(backoff_max_s=8.0).cooldown_max_s == 8.0
    assert DeliverySettings().cooldown_s == 30.0 and DeliverySettings().cooldown_max_s == 600.0
    assert DeliverySettings(backoff_max_s=8.0, breaker_cooldown_s=20.0).cooldown_s == 20.0


def test_a_retry_after_pause_ends_without_a_probe():
    breakers = _breakers()
    breakers.record(_job(None), _failed(started_at=0.0, status=429, retry_after=5.0), now=0.0)
    assert breakers.describe("p", now=1.0)["reason"] == "retry_after"
    assert breakers.room("p", busy=0, now=1.0) == 0 and breakers.room("p", busy=0, now=5.0) == DeliverySettings().per_partner_concurrency


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
    hub.publish_many(16)
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
    restored = Breakers(DeliverySettings(disable_after_s=3 * day), last_failure_of=lambda partner: 2.4 * day)
    assert restored.record(_job(0.0), _failed(2.9 * day), now=2.9 * day)[2] is None
    assert restored.record(_job(0.0), _failed(3.1 * day), now=3.1 * day)[2].startswith("every attempt failed")
    # Without that read the streak would restart at day 2.9 (its start is older than a quiet spell).
    forgetful = Breakers(DeliverySettings(disable_after_s=3 * day))
    assert forgetful.record(_job(0.0), _failed(2.9 * day), now=2.9 * day)[0] == 2.9 * day

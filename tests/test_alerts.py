"""Operational alerts ([alerts]): webhookd's own signed webhooks to the operator, through the same
engine — a circuit that opens, failed deliveries grouped per partner — and an alert receiver that
is down holds up no partner's deliveries."""

import threading
import time

from conftest import ShiftedClock, bearer, wait_for
from payloads import PAYMENT_SUCCESS

ALERT_SECRET = "alerts-secret-0123456789"
ALERTS_PARTNER = "partner_webhookdalerts"


def alerts_of(receiver, kind: str) -> list:
    return [r for r in receiver.received if r.json.get("alert") == kind]


class AlertsWatch:
    """Counts what the running alerts task has done, so that a test can wait for it to have moved
    past a moment before it says that no alert came: the task's ticks (each takes what is due and
    publishes it) and its looks at the oldest pending delivery. It wraps those methods on the live
    object; the real ones still run."""

    def __init__(self, hub):
        self.hub = hub
        self.ticks = 0
        self.backlog_looks = 0
        self._lock = threading.Lock()
        alerts = hub.app.state.ctx.alerts
        take_due, check_backlog = alerts._take_due, alerts._check_backlog

        def counted_take_due(now):
            due = take_due(now)
            with self._lock:
                self.ticks += 1
            return due

        async def counted_check_backlog(now):
            await check_backlog(now)
            with self._lock:
                self.backlog_looks += 1

        alerts._take_due, alerts._check_backlog = counted_take_due, counted_check_backlog

    def everything_told(self) -> None:
        """Wait until whatever was noted before now has reached the alert receiver: two more ticks
        (the first takes it, the second begins only once the first has published it), then every
        alert published has been delivered."""
        seen = self.ticks
        wait_for(lambda: self.ticks >= seen + 2, timeout=15)
        wait_for(lambda: all(d["state"] == "delivered"
                             for d in self.hub.deliveries(partner_id=ALERTS_PARTNER, limit="200")), timeout=15)

    def backlog_looked_at(self) -> None:
        """Wait for the next look at the oldest pending delivery to be over, and what it noted told."""
        seen = self.backlog_looks
        wait_for(lambda: self.backlog_looks > seen, timeout=15)
        self.everything_told()


def test_a_failing_partner_gives_one_circuit_alert_and_one_grouped_failed_alert(webhookd_factory, receiver_factory):
    clock = ShiftedClock()
    alarm = receiver_factory(secret=ALERT_SECRET)
    hub = webhookd_factory(clock=clock, alerts__url=alarm.url, alerts__secret=ALERT_SECRET, alerts__interval_s=60.0,
                           delivery__max_attempts=1, delivery__breaker_threshold=3, delivery__breaker_span_s=0.01,
                           delivery__breaker_cooldown_s=600.0, delivery__breaker_cooldown_max_s=600.0)
    broken = receiver_factory(default=(500, 0.0))
    partner = hub.register(broken.url, ["payment.success"], name="Broken Bus")
    watch = AlertsWatch(hub)
    # One failure at a time, 10 ms apart on the breaker's clock: the circuit opens on a streak that
    # has lasted breaker_span_s, and six failures sent together could all land within it.
    for i in range(6):
        assert hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"t{i}"}).status_code == 202
        wait_for(lambda i=i: alerts_of(alarm, "circuit_opened") or
                 len(hub.deliveries(partner_id=partner["partner_id"], state="failed")) > i, timeout=15)
        if alerts_of(alarm, "circuit_opened"):
            break
        clock.advance(0.01)
    wait_for(lambda: alerts_of(alarm, "circuit_opened"), timeout=15)
    failed = wait_for(lambda: hub.deliveries(partner_id=partner["partner_id"], state="failed"))

    def every_attempt_recorded():  # each ended failed (max_attempts = 1); none on the wire
        leased = hub.rows("SELECT COUNT(*) FROM deliveries WHERE partner_id = :p AND leased_until IS NOT NULL",
                          {"p": partner["partner_id"]})[0][0]
        return leased == 0 and len(hub.deliveries(partner_id=partner["partner_id"], state="failed")) == len(broken.received)

    wait_for(every_attempt_recorded, timeout=15)
    watch.everything_told()  # a second alert, or a failed-deliveries alert before its window ends, would show now
    assert len(alerts_of(alarm, "circuit_opened")) == 1 and alerts_of(alarm, "deliveries_failed") == []
    failed = hub.deliveries(partner_id=partner["partner_id"], state="failed")

    clock.advance(61)  # the failures' window ends: one alert, with their count
    grouped = wait_for(lambda: alerts_of(alarm, "deliveries_failed"), timeout=15)
    watch.everything_told()
    assert len(alerts_of(alarm, "deliveries_failed")) == 1 and grouped[0].json["count"] == len(failed) >= 3
    opened = alerts_of(alarm, "circuit_opened")[0]
    assert opened.json["partner_id"] == partner["partner_id"] and opened.json["partner_name"] == "Broken Bus"
    assert opened.json["event"] == "webhookd.alert" and "failed attempts in a row" in opened.json["detail"]
    assert all(r.guide_ok and r.raw_ok for r in alarm.received)       # signed with alerts.secret
    sent = hub.deliveries(partner_id=ALERTS_PARTNER)                     # the same engine: stored, traceable
    assert len(sent) == len(alarm.received) and {d["state"] for d in sent} == {"delivered"}
    assert ALERT_SECRET not in hub.http.get(f"/partners/{ALERTS_PARTNER}", headers=hub.admin).text


def test_an_alert_receiver_that_is_down_holds_up_no_partner(webhookd_factory, receiver_factory, black_hole):
    """The alerts go to a black hole (accepts, never answers) while one partner keeps failing and
    raising alerts; a healthy partner's 100 events, published 20 a second, all arrive, and at most
    five of them later than 2 s after their publish (a count, not a timing on this machine)."""
    hub = webhookd_factory(alerts__url=black_hole.url, alerts__secret=ALERT_SECRET, alerts__interval_s=0.2,
                           delivery__max_attempts=1)
    broken, healthy = receiver_factory(default=(500, 0.0)), receiver_factory()
    hub.register(broken.url, ["booking.confirmed"], name="Broken")
    hub.register(healthy.url, ["payment.success"], name="Healthy")
    published: dict[str, float] = {}
    for i in range(100):
        hub.publish({"event": "booking.confirmed", "booking_id": f"b{i}", "tour_id": "t", "user_id": "u",
                     "start_date": "2024-01-01", "end_date": "2024-01-02"})
        published[hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"t{i}"}).json()["event_id"]] = time.time()
        time.sleep(0.05)
    wait_for(lambda: len(healthy.received) >= 100, timeout=30)
    arrived = {r.headers["x-webhook-id"]: r.at for r in healthy.received}
    late = [e for e, at in published.items() if arrived[e] - at > 2.0]
    assert set(arrived) == set(published) and len(late) <= 5, late
    alerts = hub.deliveries(partner_id=ALERTS_PARTNER, limit="200")
    assert len(alerts) >= 3 and any(d["attempt_count"] >= 1 for d in alerts)   # sent into the hole all along
    assert not any(d["state"] == "delivered" for d in alerts)


def test_a_disabled_partner_an_enabled_one_and_an_old_backlog_are_told(webhookd_factory, receiver_factory):
    """A 410 Gone disables a partner (partner_disabled); the admin makes it active again
    (partner_enabled); a partner whose deliveries keep failing has a backlog that grows older than
    oldest_pending_s (backlog_old, once per interval). A paused partner's backlog is left out."""
    clock = ShiftedClock()
    alarm = receiver_factory(secret=ALERT_SECRET)
    hub = webhookd_factory(clock=clock, alerts__url=alarm.url, alerts__secret=ALERT_SECRET, alerts__interval_s=600.0,
                           alerts__oldest_pending_s=3600.0, delivery__max_attempts=50, delivery__backoff_base_s=5.0,
                           delivery__backoff_max_s=5.0)
    gone = receiver_factory(default=(410, 0.0))
    partner = hub.register(gone.url, ["payment.success"], name="Gone Tours")
    watch = AlertsWatch(hub)
    hub.publish(PAYMENT_SUCCESS)
    disabled = wait_for(lambda: alerts_of(alarm, "partner_disabled"), timeout=15)
    assert disabled[0].json["partner_id"] == partner["partner_id"] and "410" in disabled[0].json["detail"]
    gone.default = (503, 0.0)      # back, but failing: its deliveries wait, retried every 5 s
    assert hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin,
                          json={"status": "active"}).status_code == 200
    enabled = wait_for(lambda: alerts_of(alarm, "partner_enabled"), timeout=15)
    assert "the admin" in enabled[0].json["detail"]
    assert alerts_of(alarm, "backlog_old") == []
    clock.advance(3700)            # its oldest pending delivery is now over an hour old
    old = wait_for(lambda: alerts_of(alarm, "backlog_old"), timeout=15)
    assert old[0].json["partner_id"] == partner["partner_id"] and old[0].json["oldest_pending_s"] >= 3600
    clock.advance(40)              # looked at again 30 s later: within the interval, no second alert
    watch.backlog_looked_at()
    assert len(alerts_of(alarm, "backlog_old")) == 1
    assert hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin,
                          json={"status": "paused"}).status_code == 200
    clock.advance(700)             # past the interval, but paused: its backlog waits on purpose
    watch.backlog_looked_at()
    assert len(alerts_of(alarm, "backlog_old")) == 1
    assert all(r.guide_ok for r in alarm.received)


def test_a_partner_that_disables_and_enables_itself_again_and_again_is_told_once_per_interval(webhookd_factory,
                                                                                              receiver_factory):
    """A partner answers 410 (disabled), makes itself active again with its own key, and again, five
    times in a row: one partner_disabled and one partner_enabled alert now; the rest are held back
    and told once the interval ends, as one alert of each kind with their count."""
    clock = ShiftedClock()
    alarm = receiver_factory(secret=ALERT_SECRET)
    hub = webhookd_factory(clock=clock, alerts__url=alarm.url, alerts__secret=ALERT_SECRET, alerts__interval_s=600.0,
                           delivery__max_attempts=50)
    gone = receiver_factory(default=(410, 0.0))
    partner = hub.register(gone.url, ["payment.success"], name="Flapping Tours")
    pid, own_key = partner["partner_id"], bearer(partner["api_key"])
    watch = AlertsWatch(hub)

    def status():
        return hub.http.get(f"/partners/{pid}", headers=hub.admin).json()["status"]

    hub.publish(PAYMENT_SUCCESS)
    for _ in range(4):             # disabled by its 410, active again by its own PATCH; its delivery retried
        wait_for(lambda: status() == "disabled", timeout=15)
        assert hub.http.patch(f"/partners/{pid}", headers=own_key, json={"status": "active"}).status_code == 200
    wait_for(lambda: status() == "disabled", timeout=15)
    wait_for(lambda: alerts_of(alarm, "partner_disabled") and alerts_of(alarm, "partner_enabled"), timeout=15)
    watch.everything_told()        # more alerts, were they not held back, would show now
    assert len(alerts_of(alarm, "partner_disabled")) == 1 and len(alerts_of(alarm, "partner_enabled")) == 1
    assert "made active again by the partner" in alerts_of(alarm, "partner_enabled")[0].json["detail"]

    clock.advance(601)             # the interval ends: what was held back is told, once per kind
    wait_for(lambda: len(alerts_of(alarm, "partner_disabled")) == 2 and len(alerts_of(alarm, "partner_enabled")) == 2,
             timeout=15)
    disabled, enabled = alerts_of(alarm, "partner_disabled")[1].json, alerts_of(alarm, "partner_enabled")[1].json
    assert disabled["count"] == 4 and enabled["count"] == 3 and disabled["partner_id"] == pid
    assert "410" in disabled["detail"] and "4 times in the last 600 s" in disabled["detail"]
    assert disabled["detail"].endswith("its status now: disabled)")
    assert all(r.guide_ok and r.raw_ok for r in alarm.received)

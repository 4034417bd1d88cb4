"""What the log says of attempts (attempt_log.py): every failure on a line of its own at WARNING,
successes at DEBUG one by one and summed up at INFO."""

import logging

from attempt_log import AttemptLog
from conftest import wait_for
from models import Attempt, Outcome
from payloads import PAYMENT_SUCCESS


def _lines_about(caplog, partner_id):
    return [r for r in caplog.records if r.name == "webhookd.delivery" and f"partner={partner_id}" in r.getMessage()]


def test_a_failed_attempt_is_a_warning_line_and_a_success_only_a_debug_one(webhookd_factory, receiver_factory,
                                                                         caplog):
    caplog.set_level(logging.DEBUG, logger="webhookd.delivery")
    hub = webhookd_factory(delivery__max_attempts=1)
    healthy, failing = receiver_factory(), receiver_factory(default=(500, 0))
    ok_id = hub.register(healthy.url, ["payment.success"], name="Healthy")["partner_id"]
    bad_id = hub.register(failing.url, ["payment.success"], name="Failing")["partner_id"]
    hub.publish(PAYMENT_SUCCESS)
    (bad,) = wait_for(lambda: _lines_about(caplog, bad_id))
    (ok,) = wait_for(lambda: _lines_about(caplog, ok_id))
    assert bad.levelname == "WARNING" and bad.status_code == 500 and bad.error == "http_error"
    assert bad.getMessage().endswith(f"status=500 error=http_error duration_ms={bad.duration_ms} -> failed")
    assert ok.levelname == "DEBUG" and ok.status_code == 200 and ok.getMessage().endswith("-> delivered")


def test_successes_leave_no_info_line_of_their_own(webhookd_factory, receiver_factory, caplog):
    """At the default INFO level a delivered attempt is counted, not written: no line names it
    (the summary comes every 10 s, or when the recorder stops)."""
    caplog.set_level(logging.INFO, logger="webhookd.delivery")
    hub = webhookd_factory()
    receiver = receiver_factory()
    pid = hub.register(receiver.url, ["payment.success"])["partner_id"]
    for n in range(5):
        hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"txn_{n}"})
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 5)
    loop = hub.app.state.ctx.loop
    wait_for(lambda: loop.in_flight == 0)  # every result written, and so reported
    assert _lines_about(caplog, pid) == []
    hub.stop()  # the recorder stops: the successes since the last summary are summed up
    (summary,) = wait_for(lambda: [r for r in caplog.records if r.getMessage().startswith("delivered ")])
    assert summary.levelname == "INFO" and (summary.delivered, summary.partners) == (5, 1)


def _outcome(partner_id, status, ms):
    error = None if status == 200 else "http_error"
    return Outcome(delivery_id=f"dlv_{partner_id}_{ms}", partner_id=partner_id, state="delivered" if not error else "pending",
                   attempt=Attempt(attempt=1, started_at=0.0, duration_ms=ms, status_code=status, error=error,
                                   response_snippet=""), next_attempt_at=0.0, event_id="evt_1")


def test_the_summary_counts_the_successes_of_each_window_once(caplog):
    caplog.set_level(logging.INFO, logger="webhookd.delivery")
    now = [100.0]
    log = AttemptLog(summary_every_s=10.0, clock=lambda: now[0])
    for partner_id, status, ms in [("p1", 200, 10), ("p2", 200, 30), ("p1", 200, 20), ("p2", 500, 5)]:
        log.attempt(_outcome(partner_id, status, ms), None)
    log.summarise_if_due()  # too early: nothing yet
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # the failure, at once
    now[0] = 110.0
    log.summarise_if_due()
    summary = caplog.records[-1]
    assert summary.getMessage() == ("delivered 3 attempts to 2 partners in the last 10 s (mean 20 ms, slowest 30 ms); "
                                    "failed attempts are logged one by one")
    now[0] = 130.0
    log.summarise_if_due()  # nothing succeeded since: no line
    assert len(caplog.records) == 2

"""Erasing an event's content (erasure.py, ``DELETE /events/{id}/content``) and a type's own
retention, on both engines, against real receivers.

The proof that the content is gone is a scan of every text and binary column of every table for a
marker only the payload carried; the proof that a pending delivery is never sent is its final
state plus a later event that did arrive at the same receiver once it came up."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from conftest import Receiver, bearer, free_port, wait_for
from payloads import PAYMENT_FAILED, PAYMENT_SUCCESS


def tables(hub) -> list[str]:
    if hub.store.shared:
        return [r[0] for r in hub.rows("SELECT table_name FROM information_schema.tables "
                                       "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'")]
    return [r[0] for r in hub.rows("SELECT name FROM sqlite_master WHERE type = 'table'")]


def where_found(hub, marker: str) -> list[str]:
    """Every table.column holding ``marker`` in any text or binary value."""
    found = set()
    needle = marker.encode()
    for table in tables(hub):
        with hub.store._reader() as db:
            cursor = db.execute(f"SELECT * FROM {table}", {})
            rows = cursor.fetchall()
        for row in rows:
            for column, value in zip(row.keys(), tuple(row)):
                raw = bytes(value) if isinstance(value, (bytes, memoryview)) else str(value).encode()
                if needle in raw:
                    found.add(f"{table}.{column}")
    return sorted(found)


def test_an_erased_event_keeps_its_metadata_loses_its_content_everywhere_and_is_never_sent(
        hub_factory, receiver_factory):
    hub = hub_factory(delivery__max_attempts=1000)
    up = receiver_factory()
    down_port = free_port()
    down = Receiver(port=down_port)                 # not started yet: connections are refused
    partner_up = hub.register(up.url, ["payment.success"], name="Up")
    partner_down = hub.register(f"http://127.0.0.1:{down_port}/webhooks/events", ["payment.success"], name="Down")
    marker = f"erase-me-{uuid.uuid4().hex}"
    # A long note too: a body over a page long, whose overflow pages the erasure frees.
    event_id = hub.publish({**PAYMENT_SUCCESS, "user_id": marker, "note": f"{marker} " * 300}).json()["event_id"]
    delivered = wait_for(lambda: hub.deliveries(event_id=event_id, state="delivered"))[0]
    pending = wait_for(lambda: [d for d in hub.deliveries(event_id=event_id, partner_id=partner_down["partner_id"])
                                if d["attempt_count"] >= 1])[0]
    assert pending["state"] == "pending"
    # The scan finds the marker before: the body, the signed headers' trace and an answer are kept.
    assert "events.body" in where_found(hub, marker)
    assert hub.rows("SELECT COUNT(*) FROM attempts WHERE response_snippet IS NOT NULL")[0][0] >= 1

    erased = hub.http.delete(f"/events/{event_id}/content", headers=hub.admin)
    assert erased.status_code == 200, erased.text
    assert erased.json()["cancelled_deliveries"] == 1 and erased.json()["event"] == "payment.success"
    assert where_found(hub, marker) == []
    if not hub.store.shared:  # SQLite: not in the file's free space, nor in its write-ahead log
        path = Path(hub.config.storage.path)
        files = [path, path.with_name(path.name + "-wal")]
        assert not [f for f in files if f.exists() and marker.encode() in f.read_bytes()]
    # The attempts keep their status and times, not what was signed nor what the partner answered.
    kept = hub.rows("""SELECT a.status_code, a.signatures, a.response_snippet FROM attempts a
                       JOIN deliveries d ON d.id = a.delivery_id WHERE d.event_id = :id""", {"id": event_id})
    assert kept and all(signatures is None and snippet is None for _, signatures, snippet in kept)
    assert (200, None, None) in kept

    # Every answer about it: metadata kept, content gone, never a 500.
    answers = [hub.http.get(f"/events/{event_id}", headers=hub.admin),
               hub.http.get(f"/events/{event_id}/trace", headers=hub.admin),
               hub.http.get("/deliveries", headers=hub.admin, params={"event_id": event_id}),
               hub.http.get(f"/deliveries/{delivered['delivery_id']}", headers=hub.admin),
               hub.http.get(f"/deliveries/{pending['delivery_id']}", headers=bearer(partner_down["api_key"])),
               hub.http.get("/audit", headers=hub.admin)]
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert all(marker not in a.text for a in answers)
    event = answers[0].json()
    assert event["payload"] is None and event["erased_at"] >= event["created_at"]
    assert event["event"] == "payment.success" and event["fanout"] == 2
    assert {d["partner_id"]: d["state"] for d in event["deliveries"]} == {
        partner_up["partner_id"]: "delivered", partner_down["partner_id"]: "cancelled"}
    story = answers[1].json()
    assert story["body"] is None and story["erased_at"] is not None
    assert all(step.get("signed") is None for d in story["deliveries"] for step in d["steps"])
    assert all(d["event_erased_at"] for d in answers[2].json()["items"])

    # Retried or replayed, it is not sent again: nothing is left to send.
    for delivery in (delivered, pending):
        retried = hub.http.post(f"/deliveries/{delivery['delivery_id']}/retry", headers=hub.admin)
        assert retried.status_code == 409 and retried.json()["error"]["code"] == "event_erased", retried.text
    replayed = hub.http.post(f"/partners/{partner_up['partner_id']}/replay", headers=hub.admin,
                             params={"since": int(time.time()) - 3600})
    assert replayed.status_code == 202 and replayed.json()["replayed"] == 0

    # The receiver comes up; a later event reaches it, the erased one never does.
    down.start()
    try:
        later = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
        wait_for(lambda: hub.deliveries(event_id=later, partner_id=partner_down["partner_id"], state="delivered"),
                 timeout=30)
        assert event_id not in down.event_ids and later in down.event_ids
        assert hub.delivery(pending["delivery_id"])["state"] == "cancelled"
    finally:
        down.stop()

    # Twice: the same answer, nothing changed, one audit entry (which holds no content).
    again = hub.http.delete(f"/events/{event_id}/content", headers=hub.admin)
    assert again.status_code == 200 and again.json()["erased_at"] == erased.json()["erased_at"]
    assert again.json()["cancelled_deliveries"] == 0
    audit = hub.http.get("/audit", headers=hub.admin, params={"action": "event.erased"}).json()["items"]
    assert [(a["target"], a["actor"], a["changes"]) for a in audit] == [(event_id, "admin", {"cancelled_deliveries": 1})]
    # Unknown, and not the admin's.
    assert hub.http.delete("/events/evt_nope/content", headers=hub.admin).status_code == 404
    refused = hub.http.delete(f"/events/{event_id}/content", headers=bearer(partner_up["api_key"]))
    assert refused.status_code == 403


def test_an_attempt_in_flight_when_its_event_is_erased_is_not_recorded_nor_retried(hub_factory, receiver_factory):
    hub = hub_factory(delivery__max_attempts=1000)
    slow = receiver_factory()
    slow.script = [(500, 2.0)]                        # the first attempt hangs, then fails
    partner = hub.register(slow.url, ["payment.failed"])
    event_id = hub.publish(PAYMENT_FAILED).json()["event_id"]
    wait_for(lambda: slow.in_flight == 1)
    assert hub.http.delete(f"/events/{event_id}/content", headers=hub.admin).status_code == 200
    wait_for(lambda: slow.in_flight == 0)
    hub.wait_until_nothing_is_due()                  # the answer came back and the loop settled
    (d,) = hub.deliveries(event_id=event_id, partner_id=partner["partner_id"])
    assert d["state"] == "cancelled" and d["attempt_count"] == 0   # its failure was not recorded
    assert len(slow.received) == 1


def test_a_types_own_retention_deletes_what_ended_and_erases_what_is_kept(hub_factory, receiver_factory):
    kept_s = 3600.0
    offset = [0.0]
    up = receiver_factory()
    hub = hub_factory(clock=lambda: time.time() + offset[0], delivery__max_attempts=1,
                      retention__interval_s=0.2, event_retention_s={"payment.failed": kept_s})
    partner = hub.register(up.url, ["payment.failed", "payment.success"])
    up.script = [(500, 0.0)]                         # the first event's only attempt fails: kept by retention
    failed_id = hub.publish({**PAYMENT_FAILED, "user_id": "kept-but-erased"}).json()["event_id"]
    wait_for(lambda: hub.deliveries(event_id=failed_id, state="failed"))
    delivered_id = hub.publish(PAYMENT_FAILED).json()["event_id"]
    other_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    wait_for(lambda: len(hub.deliveries(partner_id=partner["partner_id"], state="delivered")) == 2)

    offset[0] = kept_s + 60                          # past the type's retention, far from everyone's
    hub.wait_for_a_retention_pass()
    assert hub.http.get(f"/events/{delivered_id}", headers=hub.admin).status_code == 404
    kept = hub.http.get(f"/events/{failed_id}", headers=hub.admin).json()
    assert kept["payload"] is None and kept["erased_at"] and kept["deliveries"][0]["state"] == "failed"
    assert where_found(hub, "kept-but-erased") == []
    other = hub.http.get(f"/events/{other_id}", headers=hub.admin).json()
    assert other["payload"]["transaction_id"] == PAYMENT_SUCCESS["transaction_id"] and other["erased_at"] is None


def test_retention_days_in_the_catalog_is_read_apart_from_the_fields_and_only_shortens(tmp_path):
    import pytest

    from config import ConfigError, load_config

    def loaded(days: str):
        path = tmp_path / "webhookd.toml"
        path.write_text(f'[events."payment.success"]\namount = "number"\nretention_days = {days}\n')
        return load_config(path, environ={})

    config = loaded("7")
    assert config.events == {"payment.success": {"amount": "number"}}
    assert config.event_retention_s == {"payment.success": 7 * 86400.0}
    assert loaded("0.5").event_retention_s == {"payment.success": 43200.0}
    for bad, says in [("30", "not shorter than retention.max_age_s"), ("0", "Expected a number of days"),
                      ("-1", "Expected a number of days"), ("true", "Expected a number of days"),
                      ("inf", "Expected a number of days")]:
        with pytest.raises(ConfigError, match=says):
            loaded(bad)


def test_the_dashboard_tells_an_erased_events_story_without_its_body(browser_ready, webhookd_factory,
                                                                      receiver_factory):
    from playwright.sync_api import expect, sync_playwright

    from conftest import ADMIN_TOKEN, CHROMIUM, CHROMIUM_ARGS

    hub = webhookd_factory()
    up = receiver_factory()
    hub.register(up.url, ["payment.success"])
    event_id = hub.publish({**PAYMENT_SUCCESS, "user_id": "dashboard-marker"}).json()["event_id"]
    (delivered,) = wait_for(lambda: hub.deliveries(event_id=event_id, state="delivered"))
    assert hub.http.delete(f"/events/{event_id}/content", headers=hub.admin).status_code == 200
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(10_000)
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            tid = page.get_by_test_id
            page.goto(hub.url + "/dashboard")
            tid("token-input").fill(ADMIN_TOKEN)
            tid("token-submit").click()
            page.locator(f'[data-testid=delivery-row][data-delivery-id="{delivered["delivery_id"]}"]').click()
            detail = tid("delivery-detail")
            detail.get_by_test_id("story").locator("summary").click()
            expect(detail.get_by_test_id("story-erased")).to_contain_text("The content was erased at")
            expect(detail.get_by_test_id("story-step")).not_to_have_count(0)
            assert "dashboard-marker" not in page.content()
        finally:
            browser.close()
    assert errors == []


def test_a_pull_only_partner_never_takes_an_erased_event_and_reads_it_without_a_body(hub_factory):
    from test_polling import poll, register_pull_only

    from polling import START
    from web import cursor_text

    hub = hub_factory()
    partner = register_pull_only(hub)
    erased_id, kept_id = hub.publish_many(2)
    assert hub.http.delete(f"/events/{erased_id}/content", headers=hub.admin).json()["cancelled_deliveries"] == 1
    taken = poll(hub, partner)                                      # a take: only what is still pending
    assert [i["event_id"] for i in taken["items"]] == [kept_id]
    (read,) = [i for i in poll(hub, partner, cursor=cursor_text(START))["items"] if i["event_id"] == erased_id]
    assert read["delivery_state"] == "cancelled" and read["body"] is None and read["content_erased"] is True

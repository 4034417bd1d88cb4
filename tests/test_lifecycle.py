"""A partner's whole life after registration: cancelled backlogs, expired deliveries, deletion,
stale subscriptions, and the audit trail that records every write — against a live server."""

import json
import logging
import time
from pathlib import Path

import signing
from conftest import ShiftedClock, bearer, wait_for
from payloads import BOOKING_CANCELLED_WITH_URL, PAYMENT_SUCCESS

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)


def signed_inbound(hub, partner: dict, named: bool = True):
    body = json.dumps({"event": "tour.purchased", "tour_id": "t1", "timestamp": int(time.time())}).encode()
    headers = {"X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body),
               "X-Webhook-Event": "tour.purchased", "Content-Type": "application/json"}
    if named:
        headers["X-Partner-Id"] = partner["partner_id"]
    return hub.http.post("/webhooks/partners", content=body, headers=headers)


def metric(hub, line_start: str) -> float:
    text = hub.http.get("/metrics", headers=hub.admin).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


def pause(hub, partner_id: str) -> None:
    r = hub.http.patch(f"/partners/{partner_id}", headers=hub.admin, json={"status": "paused"})
    assert r.status_code == 200, r.text


# --- Deleting a partner ---------------------------------------------------------------------------


def test_a_deleted_partners_key_and_signature_stop_at_once_and_nothing_pending_is_sent(hub, receiver_factory):
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success", "booking.cancelled"])
    pid, own = partner["partner_id"], bearer(partner["api_key"])
    assert signed_inbound(hub, partner).status_code == 200          # its signature works before...
    pause(hub, pid)                                                  # ...and three events wait for it
    for i in range(3):
        assert hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"t{i}"}).status_code == 202
    assert len(hub.deliveries(partner_id=pid, state="pending")) == 3

    refused = hub.http.delete(f"/partners/{pid}", headers=own)      # partner_self_delete is false
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_only"
    r = hub.http.delete(f"/partners/{pid}", headers=hub.admin)
    assert r.status_code == 200 and r.json() == {"partner_id": pid, "deleted": True, "cancelled_deliveries": 3}

    assert hub.http.get("/deliveries", headers=own).status_code == 401           # its key, on the next request
    assert signed_inbound(hub, partner).status_code == 401                       # its signature, named...
    assert signed_inbound(hub, partner, named=False).status_code == 401          # ...or not
    assert hub.http.get(f"/partners/{pid}", headers=hub.admin).status_code == 404
    assert pid not in [p["partner_id"] for p in hub.http.get("/partners", headers=hub.admin).json()["items"]]
    assert hub.http.delete(f"/partners/{pid}", headers=hub.admin).status_code == 404
    assert hub.publish(BOOKING_CANCELLED_WITH_URL).json()["deliveries"] == 0     # its subscriptions went too
    cancelled = hub.deliveries(partner_id=pid, state="cancelled")
    assert len(cancelled) == 3 and hub.deliveries(partner_id=pid, state="pending") == []
    retry = hub.http.post(f"/deliveries/{cancelled[0]['delivery_id']}/retry", headers=hub.admin)
    assert retry.status_code == 409 and retry.json()["error"]["code"] == "partner_deleted"
    assert metric(hub, f'webhookd_deliveries_total{{outcome="cancelled",partner="{pid}"}}') == 3
    hub.wait_until_nothing_is_due()  # nothing may go out meanwhile
    assert len(receiver.received) == 0
    rows = hub.rows("SELECT secret, previous_secret, api_key_hash, webhook_url, status FROM partners WHERE id = :id",
                    {"id": pid})
    assert rows == [("", None, f"deleted:{pid}", "", "deleted")]  # the tombstone keeps no credential


def every_stored_byte(hub) -> bytes:
    """What the database holds: on SQLite the bytes of its files (the write-ahead log too); on
    PostgreSQL every text and bytea column of every table."""
    if hub.store.shared:
        columns = hub.rows("""SELECT table_name, column_name, data_type FROM information_schema.columns
                              WHERE table_schema = 'public' AND data_type IN ('text', 'bytea')""")
        as_text = {"text": "{}", "bytea": "encode({}, 'escape')"}
        return "\n".join(str(hub.rows(f"SELECT {as_text[kind].format(c)} FROM {t}")) for t, c, kind in columns).encode()
    path = hub.config.storage.path
    return b"".join(Path(name).read_bytes() for name in (path, path + "-wal") if Path(name).exists())


def test_a_token_in_a_partners_url_is_kept_nowhere_and_its_url_goes_with_it(hub, receiver_factory):
    """A URL's query (where partners put tokens) is never recorded: attempts and audit entries keep
    ``?…``; once the partner is deleted they keep only where it pointed, and no byte of the database
    holds either token (old row versions included)."""
    receiver = receiver_factory()
    first, moved = "tok_first_9f2c71d8e4", "tok_moved_5b03aa61c7"
    partner = hub.register(f"{receiver.url}?token={first}", ["payment.success"])
    pid, receiver.secret = partner["partner_id"], partner["shared_secret"]
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: len(hub.deliveries(partner_id=pid, state="delivered")) == 1)
    moved_url = f"{receiver.url}/moved?token={moved}"
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"webhook_url": moved_url}).status_code == 200
    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    wait_for(lambda: len(hub.deliveries(partner_id=pid, state="delivered")) == 2)
    assert all(r.guide_ok for r in receiver.received) and len(receiver.received) == 2

    def shown() -> str:
        """Everything the API shows of the partner's history: its audit entries, attempts, a trace."""
        audit = hub.http.get("/audit", headers=hub.admin, params={"partner_id": pid}).json()["items"]
        attempts = [a for d in hub.deliveries(partner_id=pid) for a in hub.delivery(d["delivery_id"])["attempts"]]
        trace = hub.http.get(f"/events/{event_id}/trace", headers=hub.admin).json()
        assert len(audit) >= 2 and len(attempts) == 2, (audit, attempts)
        return json.dumps([audit, attempts, trace], ensure_ascii=False)

    before = shown()
    assert first not in before and moved not in before
    assert f"{receiver.url}?…" in before and f"{receiver.url}/moved?…" in before   # where each attempt went
    assert hub.http.get(f"/partners/{pid}", headers=hub.admin).json()["webhook_url"] == moved_url  # its own record

    assert hub.http.delete(f"/partners/{pid}", headers=hub.admin).status_code == 200
    after = shown()
    origin = receiver.url.split("/webhooks")[0]
    assert first not in after and moved not in after and "/moved" not in after and f"{origin}/…" in after
    stored = every_stored_byte(hub)
    assert pid.encode() in stored                                     # the dump does read the rows
    assert first.encode() not in stored and moved.encode() not in stored
    assert partner["shared_secret"].encode() not in stored          # nor its erased secret


def test_a_partner_deletes_itself_only_when_the_config_allows_it(hub_factory):
    hub = hub_factory(security__partner_self_delete=True)
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    other = hub.register("http://127.0.0.1:9/y", ["payment.success"], name="Other")
    pid = partner["partner_id"]
    assert hub.http.delete(f"/partners/{pid}", headers=bearer(other["api_key"])).status_code == 404
    r = hub.http.delete(f"/partners/{pid}", headers=bearer(partner["api_key"]))
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert hub.http.get(f"/partners/{other['partner_id']}", headers=bearer(other["api_key"])).status_code == 200


# --- Cancelling a backlog, and expiry --------------------------------------------------------------


def test_the_admin_cancels_a_partners_backlog_and_none_of_it_is_sent(hub, receiver_factory):
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    pid = partner["partner_id"]
    pause(hub, pid)
    for i in range(2):
        hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"old{i}"})
    assert hub.http.post(f"/partners/{pid}/cancel-pending", headers=bearer(partner["api_key"])).status_code == 403
    r = hub.http.post(f"/partners/{pid}/cancel-pending", headers=hub.admin)
    assert r.status_code == 200 and r.json() == {"partner_id": pid, "cancelled_deliveries": 2}
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"}).status_code == 200
    fresh = hub.publish({**PAYMENT_SUCCESS, "transaction_id": "new"}).json()["event_id"]
    wait_for(lambda: fresh in receiver.event_ids)
    hub.wait_until_nothing_is_due()
    assert receiver.event_ids == [fresh]
    assert len(hub.deliveries(partner_id=pid, state="cancelled")) == 2


def test_a_delivery_pending_too_long_expires_is_never_sent_and_can_be_retried_by_hand(hub_factory, receiver_factory):
    """A partner paused for longer than max_pending_age_s: its backlog ends expired (the clock is
    moved, the retention pass runs every 0.1 s); resumed, it gets none of it; a retry by hand sends it."""
    clock = ShiftedClock()
    hub = hub_factory(clock=clock, delivery__max_pending_age_s=3600, retention__interval_s=0.1)
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    pid = partner["partner_id"]
    pause(hub, pid)
    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    hub.wait_for_a_retention_pass()  # not old enough yet
    assert hub.deliveries(partner_id=pid)[0]["state"] == "pending"
    clock.advance(3601)
    expired = wait_for(lambda: hub.deliveries(partner_id=pid, state="expired"))
    assert metric(hub, f'webhookd_deliveries_total{{outcome="expired",partner="{pid}"}}') == 1
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"}).status_code == 200
    hub.wait_until_nothing_is_due()
    assert receiver.received == []
    r = hub.http.post(f"/deliveries/{expired[0]['delivery_id']}/retry", headers=bearer(partner["api_key"]))
    assert r.status_code == 202 and r.json()["state"] == "pending"
    wait_for(lambda: event_id in receiver.event_ids)
    assert hub.delivery(expired[0]["delivery_id"])["state"] == "delivered"  # and it did not expire again at once


# --- Stale subscriptions --------------------------------------------------------------------------


def test_subscriptions_to_a_type_removed_from_the_catalog_are_shown_logged_and_kept(webhookd_factory, caplog):
    first = webhookd_factory()
    partner = first.register("http://127.0.0.1:9/x", ["booking.cancelled", "payment.success"])
    pid = partner["partner_id"]
    catalog = {k: v for k, v in first.config.events.items() if k != "booking.cancelled"}
    first.stop()
    with caplog.at_level(logging.WARNING, logger="webhookd"):
        hub = webhookd_factory(events=catalog)          # the same database, booking.cancelled gone
        wait_for(lambda: "no longer in the event catalog" in caplog.text)
    assert pid in caplog.text and "booking.cancelled" in caplog.text
    shown = hub.http.get(f"/partners/{pid}", headers=hub.admin).json()
    assert shown["stale_subscriptions"] == ["booking.cancelled"]
    kept = hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"events": ["booking.cancelled", "payment.failed"]})
    assert kept.status_code == 200, kept.text
    assert kept.json()["events_subscribed"] == ["booking.cancelled", "payment.failed"]
    added = hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"events": ["booking.confirmed", "tour.gone"]})
    assert added.status_code == 422 and "'tour.gone'" in added.json()["error"]["message"]
    dropped = hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"events": ["payment.failed"]})
    assert dropped.json()["stale_subscriptions"] == []


# --- The audit trail ------------------------------------------------------------------------------


def test_the_audit_trail_lists_every_write_with_who_and_what_and_no_secret(hub, receiver_factory):
    receiver = receiver_factory(default=(500, 0))
    partner = hub.register(receiver.url, ["payment.success"])
    pid, own = partner["partner_id"], bearer(partner["api_key"])
    credentials = [partner["shared_secret"], partner["standard_webhooks_secret"], partner["api_key"]]

    def ok(r, status=200):
        assert r.status_code == status, r.text
        return r.json()

    ok(hub.http.patch(f"/partners/{pid}", headers=own, json={"max_rate_per_s": 50}))
    ok(hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "suspended", "reason": "fraud check"}))
    ok(hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"}))
    rotated = ok(hub.http.post(f"/partners/{pid}/rotate-secret", headers=own))
    rotated_again = ok(hub.http.post(f"/partners/{pid}/rotate-secret?revoke_old=true", headers=hub.admin))
    reissued = ok(hub.http.post(f"/partners/{pid}/api-key", headers=own))
    own = bearer(reissued["api_key"])
    credentials += [rotated["shared_secret"], rotated["standard_webhooks_secret"], rotated_again["shared_secret"],
                    rotated_again["standard_webhooks_secret"], reissued["api_key"]]
    hub.publish(PAYMENT_SUCCESS)
    failed = wait_for(lambda: hub.deliveries(partner_id=pid, state="failed"))[0]
    ok(hub.http.post(f"/deliveries/{failed['delivery_id']}/retry", headers=own), 202)
    wait_for(lambda: hub.deliveries(partner_id=pid, state="failed"))
    ok(hub.http.post(f"/partners/{pid}/recover?since=0", headers=hub.admin))
    pause(hub, pid)
    ok(hub.http.post(f"/partners/{pid}/cancel-pending", headers=hub.admin))
    ok(hub.http.delete(f"/partners/{pid}", headers=hub.admin))

    entries, cursor = [], None
    while True:  # page by 4, as a client would
        page = ok(hub.http.get("/audit", headers=hub.admin, params={"limit": 4, **({"cursor": cursor} if cursor else {})}))
        entries += page["items"]
        if not (cursor := page["next_cursor"]):
            break
    mine = [e for e in reversed(entries) if e["partner_id"] == pid]
    assert [(e["action"], e["actor"]) for e in mine] == [
        ("partner.registered", "admin"), ("partner.updated", "partner"), ("partner.suspended", "admin"),
        ("partner.activated", "admin"), ("partner.secret_rotated", "partner"), ("partner.secret_rotated", "admin"),
        ("partner.api_key_reissued", "partner"), ("delivery.retried", "partner"), ("partner.recovered", "admin"),
        ("partner.paused", "admin"), ("partner.pending_cancelled", "admin"), ("partner.deleted", "admin")]
    by_action = {e["action"]: e for e in mine}
    assert by_action["partner.registered"]["changes"]["events"] == ["payment.success"]
    assert by_action["partner.updated"]["changes"] == {"max_rate_per_s": {"from": None, "to": 50.0}}
    assert by_action["partner.suspended"]["changes"] == {"status": {"from": "active", "to": "suspended"},
                                                         "reason": {"from": None, "to": "fraud check"}}
    assert by_action["delivery.retried"]["target"] == failed["delivery_id"]
    assert by_action["partner.recovered"]["changes"] == {"since": 0, "requeued": 1}
    assert by_action["partner.deleted"]["changes"]["partner_name"] == "Tour Group"
    assert all(e["address"] == "127.0.0.1" and e["at"] > 0 for e in mine)
    text = json.dumps(entries)
    assert not [c for c in credentials if c in text]                  # never a secret or a key
    only = ok(hub.http.get("/audit", headers=hub.admin, params={"partner_id": pid, "action": "partner.suspended"}))
    assert [e["action"] for e in only["items"]] == ["partner.suspended"]
    assert hub.http.get("/audit", headers=own).status_code == 401      # the key was deleted with the partner
    other = hub.register("http://127.0.0.1:9/y", ["payment.success"], name="Other")
    assert hub.http.get("/audit", headers=bearer(other["api_key"])).status_code == 403  # the admin's only

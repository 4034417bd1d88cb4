"""The operator's API: ping a partner, recover failed deliveries, change a partner, read inbound."""

import json
import time

import signing
from conftest import bearer, wait_for
from payloads import BOOKING_CONFIRMED, PAYMENT_SUCCESS

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)


def test_test_ping_goes_to_that_partner_alone_without_a_subscription(hub, receiver_factory):
    target, other = receiver_factory(), receiver_factory()
    partner = hub.register(target.url, ["booking.cancelled"], name="Target")
    hub.register(other.url, ["booking.cancelled"], name="Other")
    r = hub.http.post(f"/partners/{partner['partner_id']}/test", headers=bearer(partner["api_key"]))
    assert r.status_code == 202 and r.json()["deliveries"] == 1
    wait_for(lambda: target.received)
    got = target.received[0]
    assert got.headers["x-webhook-event"] == "webhook.test" and got.json["partner_id"] == partner["partner_id"]
    hub.wait_until_nothing_is_due()
    assert other.received == []


def test_recover_requeues_failed_deliveries_since_a_time(hub, receiver_factory):
    receiver = receiver_factory(default=(500, 0))
    partner = hub.register(receiver.url, ["payment.success"])
    for i in range(3):
        hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"t{i}"})
    wait_for(lambda: len(hub.deliveries(state="failed")) == 3)
    receiver.default = (200, 0)
    future = hub.http.post(f"/partners/{partner['partner_id']}/recover", headers=hub.admin,
                           params={"since": int(time.time()) + 60})
    assert future.status_code == 200 and future.json() == {"requeued": 0}
    r = hub.http.post(f"/partners/{partner['partner_id']}/recover", headers=hub.admin, params={"since": 0})
    assert r.status_code == 200 and r.json() == {"requeued": 3}
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 3)
    bad = hub.http.post(f"/partners/{partner['partner_id']}/recover", headers=hub.admin, params={"since": "yesterday"})
    assert bad.status_code == 422


def test_patch_changes_url_and_events_with_the_same_validation(hub, receiver_factory):
    first, second = receiver_factory(), receiver_factory()
    partner = hub.register(first.url, ["payment.success"])
    pid = partner["partner_id"]
    bad = hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"webhook_url": "ftp://x/"})
    assert bad.status_code == 422 and "'webhook_url'" in bad.json()["error"]["message"]
    bad_events = hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"events": ["nope.nope"]})
    assert bad_events.status_code == 422
    bad_status = hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "disabled"})
    assert bad_status.status_code == 422
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={}).status_code == 422
    r = hub.http.patch(f"/partners/{pid}", headers=bearer(partner["api_key"]),
                       json={"webhook_url": second.url, "events": ["booking.confirmed"]})
    assert r.status_code == 200 and r.json()["events_subscribed"] == ["booking.confirmed"]
    assert hub.publish(PAYMENT_SUCCESS).json()["deliveries"] == 0
    assert hub.publish(BOOKING_CONFIRMED).json()["deliveries"] == 1
    wait_for(lambda: second.received)
    assert first.received == []


def test_a_paused_partner_holds_deliveries_until_resumed(hub, receiver_factory):
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    pid = partner["partner_id"]
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "paused"}).json()["status"] == "paused"
    hub.publish(PAYMENT_SUCCESS)
    hub.wait_until_nothing_is_due()
    assert receiver.received == [] and hub.deliveries()[0]["state"] == "pending"
    hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"})
    wait_for(lambda: receiver.received)
    wait_for(lambda: hub.deliveries()[0]["state"] == "delivered")


def test_inbound_list_filters_and_pages(hub):
    a = hub.register("http://127.0.0.1:9/a", ["payment.success"], name="A")
    b = hub.register("http://127.0.0.1:9/b", ["payment.success"], name="B")
    for partner, event, n in [(a, "tour.purchased", 1), (a, "tour.promoted", 2), (b, "tour.purchased", 3)]:
        body = json.dumps({"event": event, "n": n}).encode()
        r = hub.http.post("/webhooks/partners", content=body, headers={
            "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body), "X-Webhook-Event": event})
        assert r.status_code == 200
    everything = hub.http.get("/inbound", headers=hub.admin).json()["items"]
    assert [i["payload"]["n"] for i in everything] == [3, 2, 1]
    only_a = hub.http.get("/inbound", headers=hub.admin, params={"partner_id": a["partner_id"]}).json()["items"]
    assert {i["partner_id"] for i in only_a} == {a["partner_id"]} and len(only_a) == 2
    promoted = hub.http.get("/inbound", headers=hub.admin, params={"event": "tour.promoted"}).json()["items"]
    assert [i["payload"]["n"] for i in promoted] == [2]
    page = hub.http.get("/inbound", headers=hub.admin, params={"limit": 2}).json()
    rest = hub.http.get("/inbound", headers=hub.admin, params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert len(page["items"]) == 2 and len(rest["items"]) == 1 and rest["next_cursor"] is None


def test_only_the_admin_suspends_and_lifts_and_a_suspended_partner_gets_nothing(hub, receiver_factory):
    """The admin suspends with a reason the partner sees; the partner's own key can neither lift it
    nor suspend itself; nothing is sent and its inbound events are refused while it lasts; lifted,
    what waited goes out."""
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    pid, own = partner["partner_id"], bearer(partner["api_key"])

    def patch(headers, **body):
        return hub.http.patch(f"/partners/{pid}", headers=headers, json=body)

    assert patch(own, status="suspended", reason="me").status_code == 403
    r = patch(hub.admin, status="suspended")
    assert r.status_code == 422 and "'reason'" in r.json()["error"]["message"]
    assert patch(hub.admin, status="paused", reason="why").status_code == 422   # a reason only with suspended
    r = patch(hub.admin, status="suspended", reason="chargebacks under review")
    assert r.status_code == 200 and r.json()["status"] == "suspended"
    shown = hub.http.get(f"/partners/{pid}", headers=own).json()
    assert shown["suspended_reason"] == "chargebacks under review"
    for status in ("active", "paused"):
        r = patch(own, status=status)
        assert r.status_code == 403 and r.json()["error"]["code"] == "partner_suspended", r.text
        assert "chargebacks under review" in r.json()["error"]["message"]

    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    body = json.dumps({"event": "tour.purchased", "tour_id": "t1"}).encode()
    r = hub.http.post("/webhooks/partners", content=body, headers={
        "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body), "X-Webhook-Event": "tour.purchased",
        "X-Partner-Id": pid})
    assert r.status_code == 403 and r.json()["error"]["code"] == "partner_suspended"
    hub.wait_until_nothing_is_due()  # nothing may go out meanwhile
    assert receiver.received == []
    assert hub.deliveries(partner_id=pid)[0]["state"] == "pending"

    r = patch(hub.admin, status="active")
    assert r.status_code == 200 and r.json()["suspended_reason"] is None
    wait_for(lambda: event_id in receiver.event_ids)
    assert patch(own, status="paused").json()["status"] == "paused"      # the partner's own pause and resume
    assert patch(own, status="active").json()["status"] == "active"


def test_a_retry_for_a_held_partner_says_why_unless_asked_to_queue(hub, receiver_factory):
    """Nothing is sent to a paused partner: a retry or a recover is a 409 naming why, unless the
    caller asks to queue it anyway; queued, it goes out once the partner is active."""
    receiver = receiver_factory(default=(500, 0))
    partner = hub.register(receiver.url, ["payment.success"])
    pid = partner["partner_id"]
    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    failed = wait_for(lambda: (d := hub.deliveries(state="failed")) and d[0])
    receiver.default = (200, 0)
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "paused"}).status_code == 200
    for path in (f"/deliveries/{failed['delivery_id']}/retry", f"/partners/{pid}/recover?since=0"):
        r = hub.http.post(path, headers=hub.admin)
        assert r.status_code == 409 and r.json()["error"]["code"] == "partner_held", r.text
        assert "paused" in r.json()["error"]["message"] and "queue=true" in r.json()["error"]["message"]
    assert hub.http.post(f"/deliveries/{failed['delivery_id']}/retry?queue=maybe", headers=hub.admin).status_code == 422
    r = hub.http.post(f"/deliveries/{failed['delivery_id']}/retry?queue=true", headers=hub.admin)
    assert r.status_code == 202 and r.json()["state"] == "pending"
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"}).status_code == 200
    wait_for(lambda: hub.deliveries(state="delivered"))
    assert event_id in receiver.event_ids


def test_a_partners_own_writes_have_a_budget(webhookd_factory):
    """300 test events in a second through a partner key is what this stops: past its budget of
    writes (3 a minute here) a partner gets 429 with Retry-After; the admin does not; time refills it."""
    from conftest import ShiftedClock

    clock = ShiftedClock(frozen=True)
    hub = webhookd_factory(clock=clock, security__partner_writes_per_min=3)
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    own = bearer(partner["api_key"])
    codes = [hub.http.post(f"/partners/{partner['partner_id']}/test", headers=own).status_code for _ in range(5)]
    assert codes == [202, 202, 202, 429, 429]
    limited = hub.http.patch(f"/partners/{partner['partner_id']}", headers=own, json={"status": "paused"})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert hub.http.get(f"/partners/{partner['partner_id']}", headers=own).status_code == 200   # reads are free
    assert hub.http.post(f"/partners/{partner['partner_id']}/test", headers=hub.admin).status_code == 202
    clock.advance(20)  # one write's worth
    assert hub.http.post(f"/partners/{partner['partner_id']}/test", headers=own).status_code == 202


def test_a_reissued_api_key_replaces_the_old_one_at_once(hub):
    """For a leaked key: the partner (or the admin) gets a new one, shown once; the old one is a 401
    on the very next request; the new one works."""
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    pid, old = partner["partner_id"], bearer(partner["api_key"])
    r = hub.http.post(f"/partners/{pid}/api-key", headers=old)
    assert r.status_code == 200 and r.json()["api_key"].startswith("pak_") and r.json()["api_key"] != partner["api_key"]
    new = bearer(r.json()["api_key"])
    assert hub.http.get(f"/partners/{pid}", headers=old).status_code == 401
    assert hub.http.get(f"/partners/{pid}", headers=new).status_code == 200
    again = hub.http.post(f"/partners/{pid}/api-key", headers=hub.admin)
    assert again.status_code == 200
    assert hub.http.get(f"/partners/{pid}", headers=new).status_code == 401
    other = hub.register("http://127.0.0.1:9/y", ["payment.success"], name="Other")
    mine = bearer(other["api_key"])
    assert hub.http.post(f"/partners/{pid}/api-key", headers=mine).status_code == 404   # not another's key


def test_a_contact_email_is_kept_shown_to_both_sides_and_changed_with_patch(hub):
    """The guide's registration asks for a contact email: optional, checked for its shape, shown to
    the admin and the partner, changed or removed with PATCH."""
    def register(email):
        return hub.http.post("/partners/register", headers=hub.admin, json={
            "partner_name": "Mail Tours", "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"],
            "contact_email": email})

    for bad in ("not-an-email", "a@b", "two@@example.com", "ops@example.com\n", 42, "x" * 250 + "@example.com"):
        r = register(bad)
        assert r.status_code == 422 and "'contact_email'" in r.json()["error"]["message"], (bad, r.text)
    created = register("ops@tours.example.com")
    assert created.status_code == 201 and created.json()["contact_email"] == "ops@tours.example.com"
    pid, own = created.json()["partner_id"], bearer(created.json()['api_key'])
    assert hub.http.get(f"/partners/{pid}", headers=own).json()["contact_email"] == "ops@tours.example.com"
    r = hub.http.patch(f"/partners/{pid}", headers=own, json={"contact_email": "soporte@tours.example.com"})
    assert r.status_code == 200 and r.json()["contact_email"] == "soporte@tours.example.com"
    assert hub.http.patch(f"/partners/{pid}", headers=own, json={"contact_email": "nope"}).status_code == 422
    r = hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"contact_email": None})
    assert r.status_code == 200 and r.json()["contact_email"] is None
    assert hub.http.get(f"/partners/{pid}", headers=hub.admin).json()["contact_email"] is None
    trail = hub.http.get("/audit", headers=hub.admin, params={"partner_id": pid}).json()["items"]
    assert [e["changes"].get("contact_email") for e in trail] == [
        {"from": "soporte@tours.example.com", "to": None},
        {"from": "ops@tours.example.com", "to": "soporte@tours.example.com"}, "ops@tours.example.com"]

"""A suspended partner's key is read-only: every route a partner can write through, taken from the
route table so that a new one cannot be forgotten, answers 403 partner_suspended and changes
nothing; its reads still work, to see why; the admin is unaffected."""

import json

import pytest

import signing
import web
from conftest import bearer, wait_for
from payloads import PAYMENT_SUCCESS

REASON = "chargebacks under review"
# Every table a write could touch (not the liveness rows, nor the shared rate-limit buckets).
TABLES = ("partners", "subscriptions", "partner_channels", "events", "deliveries", "attempts", "inbound_events",
          "audit_log")
# The access rules under which a partner can write: its API key, an open registration (a key is
# checked when sent), its signature on an inbound event.
PARTNER_WRITES = (web.CALLER, web.REGISTRATION, web.SIGNED)


def snapshot(hub) -> dict[str, list[tuple]]:
    return {table: sorted(hub.rows(f"SELECT * FROM {table}"), key=repr) for table in TABLES}


def routes(hub, who: tuple[str, ...], writes: bool) -> set[tuple[str, str]]:
    """(method, path) of the route table's routes with one of these access rules, writes or reads."""
    return {(method, r.path) for r in hub.app.routes if getattr(r, "who", None) in who
            for method in r.methods - {"HEAD"} if (method not in web.READS) == writes}


def write_requests(partner: dict, delivery_id: str, elsewhere: str) -> dict[tuple[str, str], tuple[str, dict]]:
    """One request per partner-writable route, each one an active partner would be allowed to make
    (in this order: a retry before the recover that would requeue the same delivery, and the two
    that end the key last): (method, route path) → (URL, httpx arguments)."""
    pid, own = partner["partner_id"], bearer(partner["api_key"])
    inbound = json.dumps({"event": "tour.purchased", "tour_id": "tour_1"}).encode()
    signed = {"X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], inbound),
              "X-Webhook-Event": "tour.purchased", "X-Partner-Id": pid}
    return {
        ("POST", "/webhooks/partners"): ("/webhooks/partners", dict(headers=signed, content=inbound)),
        ("POST", "/partners/register"): ("/partners/register", dict(headers=own, json={
            "partner_name": "Sock Puppet", "webhook_url": elsewhere, "events": ["payment.success"]})),
        ("PATCH", "/partners/{partner_id}"): (f"/partners/{pid}", dict(headers=own, json={
            "webhook_url": elsewhere, "events": ["payment.success", "booking.confirmed"]})),
        ("POST", "/partners/{partner_id}/rotate-secret"): (f"/partners/{pid}/rotate-secret?revoke_old=true",
                                                            dict(headers=own)),
        ("POST", "/partners/{partner_id}/test"): (f"/partners/{pid}/test", dict(headers=own)),
        ("POST", "/partners/{partner_id}/check"): (f"/partners/{pid}/check", dict(headers=own)),
        ("POST", "/partners/{partner_id}/verify"): (f"/partners/{pid}/verify", dict(headers=own)),
        ("POST", "/deliveries/{delivery_id}/retry"): (f"/deliveries/{delivery_id}/retry?queue=true",
                                                       dict(headers=own)),
        ("POST", "/partners/{partner_id}/recover"): (f"/partners/{pid}/recover?since=0&queue=true",
                                                      dict(headers=own)),
        ("POST", "/partners/{partner_id}/replay"): (f"/partners/{pid}/replay?since=0&queue=true",
                                                     dict(headers=own)),
        # Last: with the fix off, each of these two would end the key the rows above use.
        ("POST", "/partners/{partner_id}/api-key"): (f"/partners/{pid}/api-key", dict(headers=own)),
        ("DELETE", "/partners/{partner_id}"): (f"/partners/{pid}", dict(headers=own)),
    }


def read_requests(partner: dict, delivery_id: str) -> dict[tuple[str, str], str]:
    pid = partner["partner_id"]
    return {("GET", "/partners/{partner_id}"): f"/partners/{pid}", ("GET", "/deliveries"): "/deliveries",
            ("GET", "/deliveries/{delivery_id}"): f"/deliveries/{delivery_id}", ("GET", "/me"): "/me",
            ("GET", "/event-types"): "/event-types",
            ("GET", "/partners/{partner_id}/events"): f"/partners/{pid}/events"}  # a push partner's pull reads only


@pytest.fixture
def suspended(hub_factory, receiver_factory):
    """A partner with a failed delivery, suspended by the admin; every delivery settled."""
    hub = hub_factory(security__open_registration=True, security__partner_self_delete=True,
                      delivery__max_attempts=1)
    receiver = receiver_factory(default=(500, 0.0))
    partner = hub.register(receiver.url, ["payment.success"], name="Suspect Tours")
    hub.publish(PAYMENT_SUCCESS)
    failed = wait_for(lambda: hub.deliveries(state="failed"))[0]
    receiver.default = (200, 0.0)
    r = hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin,
                       json={"status": "suspended", "reason": REASON})
    assert r.status_code == 200, r.text
    return hub, receiver, partner, failed["delivery_id"]


def test_every_partner_write_of_a_suspended_partner_is_403_and_changes_nothing(suspended, receiver_factory):
    hub, receiver, partner, delivery_id = suspended
    elsewhere = receiver_factory().url
    requests = write_requests(partner, delivery_id, elsewhere)
    assert routes(hub, PARTNER_WRITES, writes=True) == set(requests), \
        "a route a partner can write through has no row here: add one"
    before = snapshot(hub)
    for (method, path), (url, kwargs) in requests.items():
        r = hub.http.request(method, url, **kwargs)
        assert r.status_code == 403, (method, path, r.text)
        error = r.json()["error"]
        assert error["code"] == "partner_suspended", (method, path, r.text)
        assert REASON in error["message"], (method, path, r.text)
        if "Authorization" in kwargs["headers"]:
            assert "Contact the operator" in error["message"]
        assert snapshot(hub) == before, f"{method} {path} changed the data"
    assert len(receiver.received) == 1   # the failed attempt before the suspension, nothing since

    own = bearer(partner["api_key"])
    reads = read_requests(partner, delivery_id)
    assert routes(hub, (web.CALLER,), writes=False) == set(reads)
    for url in reads.values():
        assert hub.http.get(url, headers=own).status_code == 200, url    # its key still works, for reading
    me = hub.http.get("/me", headers=own).json()
    assert (me["status"], me["suspended_reason"], me["webhook_url"]) == ("suspended", REASON, receiver.url)
    assert [d["delivery_id"] for d in hub.http.get("/deliveries", headers=own).json()["items"]] == [delivery_id]


def test_the_admin_is_unaffected_and_lifting_the_suspension_gives_the_key_its_writes_back(suspended,
                                                                                         receiver_factory):
    hub, receiver, partner, delivery_id = suspended
    pid, own = partner["partner_id"], bearer(partner["api_key"])
    moved = receiver_factory()
    r = hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"webhook_url": moved.url})
    assert r.status_code == 200 and r.json()["status"] == "suspended"
    assert hub.http.post(f"/partners/{pid}/rotate-secret", headers=hub.admin).status_code == 200
    assert hub.http.post(f"/deliveries/{delivery_id}/retry?queue=true", headers=hub.admin).status_code == 202
    assert hub.http.post(f"/partners/{pid}/test", headers=hub.admin).status_code == 202
    assert hub.http.patch(f"/partners/{pid}", headers=own, json={"contact_email": "a@b.example"}).status_code == 403

    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"}).status_code == 200
    wait_for(lambda: len(moved.received) == 2)   # the retry and the test event, once lifted
    r = hub.http.patch(f"/partners/{pid}", headers=own, json={"contact_email": "ops@suspect.example.com"})
    assert r.status_code == 200 and r.json()["contact_email"] == "ops@suspect.example.com"


def test_a_suspension_made_in_another_process_counts_on_the_next_request(postgres_server, webhookd_factory):
    """On PostgreSQL the key is looked up in the database on every request, with its status: a
    suspension made through one process is refused by another at once, not after its NOTIFY."""
    database = postgres_server.new_database()
    first, second = webhookd_factory(storage__url=database), webhookd_factory(storage__url=database)
    partner = first.register("http://127.0.0.1:9/x", ["payment.success"])
    pid, own = partner["partner_id"], bearer(partner["api_key"])
    assert second.http.patch(f"/partners/{pid}", headers=own, json={"contact_email": "a@b.example"}).status_code == 200
    r = first.http.patch(f"/partners/{pid}", headers=first.admin, json={"status": "suspended", "reason": REASON})
    assert r.status_code == 200
    refused = second.http.patch(f"/partners/{pid}", headers=own, json={"contact_email": "c@d.example"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "partner_suspended"
    assert second.http.get(f"/partners/{pid}", headers=own).status_code == 200


def test_the_api_description_says_a_suspended_key_only_reads(hub):
    info = hub.http.get("/openapi.json").json()["info"]["description"]
    assert "suspended partner's API key is read-only" in info and "403 partner_suspended" in info

"""Proof the endpoint is the partner's (``security.verify_endpoints``), against real receivers on
127.0.0.1, on both engines: an endpoint that echoes the challenge becomes verified and then gets its
events; one that answers 2xx without it (or with another) stays unverified and gets nothing else —
shown after its failed requests are recorded and the delivery loop has found nothing to send; a new
URL gets a new challenge; the partner asks again with its own key; with the option off, nothing
changes. The challenge is in no answer of the API and no audit entry."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import signing
import verification
from conftest import ADMIN, ThreadServer, bearer, wait_for
from payloads import PAYMENT_SUCCESS

ON = {"security__verify_endpoints": True}
GATEWAY_TOKEN = "Bearer gw-3f9a0c1d2e4b5a6c7d8e9f00"


class ChallengeReceiver:
    """A partner endpoint that records every request (its signature is checked by ``signed``) and answers a
    ``webhook.verification`` as ``mode`` says: ``echo`` ({"challenge": ...}), ``plain`` (the
    challenge as text), ``ignore`` (200 {"status": "received"}, like a receiver that never heard of
    it) or ``wrong`` (another challenge); ``gateway`` echoes like ``echo`` behind a gateway that answers
    401 to a request without its bearer header. It records every request."""

    def __init__(self, mode: str = "echo"):
        self.mode = mode
        self.secret: str | None = None
        self.received: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.server = ThreadServer(Starlette(routes=[Route("/hooks", self._handle, methods=["POST"])])).start()

    @property
    def url(self) -> str:
        return self.server.url + "/hooks"

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        payload = json.loads(body)
        with self._lock:
            self.received.append({"event": request.headers.get("x-webhook-event"),
                                  "id": request.headers.get("x-webhook-id"), "payload": payload,
                                  "headers": dict(request.headers), "body": body})
        if self.mode == "gateway" and request.headers.get("authorization") != GATEWAY_TOKEN:
            return JSONResponse({"error": "the gateway wants its bearer token"}, status_code=401)
        if payload.get("event") != verification.VERIFICATION_EVENT:
            return JSONResponse({"status": "received"})
        if self.mode in ("echo", "gateway"):
            return JSONResponse({"challenge": payload["challenge"]})
        if self.mode == "plain":
            return PlainTextResponse(payload["challenge"] + "\n")
        if self.mode == "wrong":
            return JSONResponse({"challenge": "not-" + payload["challenge"]})
        return JSONResponse({"status": "received"})

    def signed(self, request: dict[str, Any]) -> bool:
        """Whether a recorded request's hex signature verifies over its raw body (checked after the
        fact: the first request may arrive before the test has read the secret from the registration)."""
        expected = hmac.new(self.secret.encode(), request["body"], hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected.encode(), request["headers"].get("x-webhook-signature", "").encode())

    def of(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.received if r["event"] == event]

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def receivers():
    made: list[ChallengeReceiver] = []

    def make(mode: str = "echo") -> ChallengeReceiver:
        made.append(ChallengeReceiver(mode))
        return made[-1]

    yield make
    for r in made:
        r.stop()


def register(hub, receiver: ChallengeReceiver) -> dict:
    partner = hub.register(receiver.url, ["payment.success"])
    receiver.secret = partner["shared_secret"]
    return partner


def verification_of(hub, partner_id: str) -> dict:
    r = hub.http.get(f"/partners/{partner_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["verification"]


def publish(hub) -> str:
    r = hub.publish(PAYMENT_SUCCESS)
    assert r.status_code == 202, r.text
    return r.json()["event_id"]


# --- An endpoint that echoes the challenge ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["echo", "plain"])
def test_an_endpoint_that_echoes_the_challenge_is_verified_then_gets_its_events(hub_factory, receivers, mode):
    hub = hub_factory(**ON)
    receiver = receivers(mode)
    partner = register(hub, receiver)
    assert partner["verification"]["state"] == "unverified"  # from the registration's own answer
    event_id = publish(hub)  # published while unverified: it waits, then goes

    wait_for(lambda: verification_of(hub, partner["partner_id"])["state"] == "verified", timeout=30)
    wait_for(lambda: receiver.of("payment.success"), timeout=30)
    first = receiver.received[0]
    assert first["event"] == "webhook.verification" and receiver.signed(first), first  # signed like any delivery
    assert first["payload"]["partner_id"] == partner["partner_id"]
    assert receiver.of("payment.success")[0]["payload"]["transaction_id"] == PAYMENT_SUCCESS["transaction_id"]
    assert [d["state"] for d in hub.deliveries(event_id=event_id)] == ["delivered"]
    shown = verification_of(hub, partner["partner_id"])
    assert shown["attempts"] == 1 and shown["last_error"] is None and shown["verified_at"] is not None


def test_an_endpoint_behind_a_gateway_gets_the_partners_extra_headers_on_its_challenge_too(hub_factory, receivers):
    """The challenge goes on the partner's own terms, as its deliveries will: a gateway that demands a
    bearer header answers 401 to a request without it, and the endpoint could never prove itself."""
    hub = hub_factory(**ON)
    receiver = receivers("gateway")
    r = hub.http.post("/partners/register", headers=hub.admin, json={
        "partner_name": "Gateway Tours", "webhook_url": receiver.url, "events": ["payment.success"],
        "extra_headers": {"Authorization": GATEWAY_TOKEN}})
    assert r.status_code == 201, r.text
    partner = r.json()
    receiver.secret = partner["shared_secret"]
    wait_for(lambda: verification_of(hub, partner["partner_id"])["state"] == "verified", timeout=30)
    first = receiver.of("webhook.verification")[0]
    assert first["headers"]["authorization"] == GATEWAY_TOKEN and receiver.signed(first)


def test_the_verification_request_is_signed_like_any_delivery(hub_factory, receivers):
    """Both signatures a partner already checks: the hex HMAC of the raw body (checked by the
    receiver above) and Standard Webhooks' ``webhook-signature`` over id, timestamp and body."""
    hub = hub_factory(**ON)
    receiver = receivers("echo")
    register(hub, receiver)
    [request] = wait_for(lambda: receiver.of("webhook.verification"), timeout=30)
    assert receiver.signed(request)
    h = request["headers"]
    assert h["webhook-id"] == h["x-webhook-id"] and h["content-type"] == "application/json"
    assert signing.standard_signature_matches(receiver.secret, h["webhook-id"], h["webhook-timestamp"],
                                              request["body"], h["webhook-signature"], now=time.time())


# --- An endpoint that does not echo it -------------------------------------------------------------


@pytest.mark.parametrize("mode, said", [("ignore", "without the challenge"), ("wrong", "another challenge")])
def test_an_endpoint_that_does_not_echo_the_challenge_stays_unverified_and_gets_nothing_else(
        hub_factory, receivers, mode, said):
    hub = hub_factory(**ON)
    receiver = receivers(mode)
    partner = register(hub, receiver)
    pid = partner["partner_id"]
    first = publish(hub)

    # Two requests failed and were recorded: the second is the backoff's retry, with an id of its own.
    wait_for(lambda: verification_of(hub, pid)["attempts"] >= 2, timeout=30)
    second = publish(hub)
    hub.wait_until_nothing_is_due()  # the delivery loop has looked, twice, and found nothing it may send

    shown = verification_of(hub, pid)
    assert shown["state"] == "unverified" and said in shown["last_error"], shown
    for event_id in (first, second):
        [delivery] = hub.deliveries(event_id=event_id)
        assert delivery["state"] == "pending" and delivery["attempt_count"] == 0, delivery  # waiting, not lost
    assert {r["event"] for r in receiver.received} == {"webhook.verification"}, receiver.received
    ids = [r["id"] for r in receiver.received]
    assert len(set(ids)) == len(ids)  # each request a new id: a receiver's deduplication never swallows one
    challenges = {r["payload"]["challenge"] for r in receiver.received}
    assert len(challenges) == 1  # retries of one challenge

    # Nothing else reaches it by hand either: a retry, and the receiver doctor's probes, are refused.
    [delivery] = hub.deliveries(event_id=first)
    r = hub.http.post(f"/deliveries/{delivery['delivery_id']}/retry", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "partner_held", r.text
    r = hub.http.post(f"/partners/{pid}/check", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "partner_unverified", r.text

    # The challenge is in no answer of the API and no audit entry; the failures are audited.
    [challenge] = challenges
    audit = hub.http.get("/audit", headers=ADMIN, params={"partner_id": pid}).json()["items"]
    assert challenge not in json.dumps(audit) and challenge not in hub.http.get(f"/partners/{pid}", headers=ADMIN).text
    failed = [e for e in audit if e["action"] == "partner.verification_failed"]
    assert len(failed) >= 2 and {e["actor"] for e in failed} == {"webhookd"}, audit


def test_the_partner_asks_again_with_its_own_key_and_the_waiting_deliveries_go_out(hub_factory, receivers):
    hub = hub_factory(**ON)
    receiver = receivers("ignore")
    partner = register(hub, receiver)
    pid, key = partner["partner_id"], bearer(partner["api_key"])
    event_id = publish(hub)
    wait_for(lambda: verification_of(hub, pid)["attempts"] >= 1, timeout=30)

    receiver.mode = "echo"  # the partner deploys the code the guide shows, and asks for a new challenge
    r = hub.http.post(f"/partners/{pid}/verify", headers=key)
    assert r.status_code == 202, r.text
    assert r.json()["verification"]["state"] == "unverified" and r.json()["verification"]["attempts"] == 0

    wait_for(lambda: [d["state"] for d in hub.deliveries(event_id=event_id)] == ["delivered"], timeout=30)
    assert verification_of(hub, pid)["state"] == "verified"
    assert len({r["payload"]["challenge"] for r in receiver.of("webhook.verification")}) == 2  # a new challenge
    actions = [e["action"] for e in hub.http.get("/audit", headers=ADMIN, params={"partner_id": pid}).json()["items"]]
    assert "partner.verification_requested" in actions and "partner.verified" in actions, actions


# --- A new URL -----------------------------------------------------------------------------------------


def test_a_new_url_gets_a_new_challenge_and_waits_for_it(hub_factory, receivers):
    hub = hub_factory(**ON)
    old, new = receivers("echo"), receivers("ignore")
    partner = register(hub, old)
    pid = partner["partner_id"]
    wait_for(lambda: verification_of(hub, pid)["state"] == "verified", timeout=30)

    new.secret = old.secret
    r = hub.http.patch(f"/partners/{pid}", headers=ADMIN, json={"webhook_url": new.url})
    assert r.status_code == 200 and r.json()["verification"]["state"] == "unverified", r.text
    event_id = publish(hub)
    wait_for(lambda: verification_of(hub, pid)["attempts"] >= 1, timeout=30)
    hub.wait_until_nothing_is_due()
    assert [d["state"] for d in hub.deliveries(event_id=event_id)] == ["pending"]
    assert {r["event"] for r in new.received} == {"webhook.verification"}
    assert not old.of("payment.success")  # nor to the old URL: it is no longer the partner's
    old_challenge = old.of("webhook.verification")[0]["payload"]["challenge"]
    assert new.received[0]["payload"]["challenge"] != old_challenge

    new.mode = "echo"
    hub.http.post(f"/partners/{pid}/verify", headers=ADMIN)
    wait_for(lambda: new.of("payment.success"), timeout=30)

    r = hub.http.patch(f"/partners/{pid}", headers=ADMIN, json={"webhook_url": new.url})  # the same URL: no change
    assert r.json()["verification"]["state"] == "verified", r.text


# --- Bounded retries, and the option off -------------------------------------------------------------


def test_requests_stop_after_the_last_attempt_and_say_how_to_ask_again(hub_factory, receivers, monkeypatch):
    monkeypatch.setattr(verification, "MAX_ATTEMPTS", 2)
    hub = hub_factory(**ON)
    partner = register(hub, receivers("ignore"))
    pid = partner["partner_id"]
    shown = wait_for(lambda: (v := verification_of(hub, pid))["attempts"] == 2 and v, timeout=30)
    assert shown["state"] == "unverified" and shown["next_attempt_at"] is None, shown
    assert f"POST /partners/{pid}/verify" in shown["last_error"]


def test_with_the_option_off_nothing_is_asked_and_a_partner_left_unverified_is_let_through(
        webhookd_factory, receivers):
    hub = webhookd_factory(**ON)
    receiver = receivers("ignore")
    partner = register(hub, receiver)
    pid = partner["partner_id"]
    event_id = publish(hub)
    wait_for(lambda: verification_of(hub, pid)["attempts"] >= 1, timeout=30)
    hub.stop()

    hub = webhookd_factory()  # the same database, the option off
    wait_for(lambda: [d["state"] for d in hub.deliveries(event_id=event_id)] == ["delivered"], timeout=30)
    assert verification_of(hub, pid) == {"state": "not_requested"}
    audit = hub.http.get("/audit", headers=ADMIN, params={"action": "partner.verification_lifted"}).json()["items"]
    assert [e["partner_id"] for e in audit] == [pid]

    other = receivers("ignore")
    later = register(hub, other)
    assert later["verification"] == {"state": "not_requested"}
    r = hub.http.post(f"/partners/{later['partner_id']}/verify", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "verification_off", r.text


# --- Judging an answer -------------------------------------------------------------------------------


def test_what_counts_as_an_echo():
    c = verification.new_challenge()
    assert len(c) >= 43 and c != verification.new_challenge()
    for body in (json.dumps({"challenge": c}), json.dumps({"status": "ok", "challenge": c}), c, f"  {c}\n",
                 json.dumps(c)):
        assert verification.echoed_challenge(body) == c, body
    for body in ("", "{}", json.dumps({"challenge": 1}), json.dumps([c]), "{not json", None):
        assert verification.echoed_challenge(body) is None, body


def test_the_request_body_is_canonical_json_naming_the_event():
    body = verification.request_body("partner_x", "abc", 1700000000.5)
    assert body == signing.canonical(json.loads(body))
    assert json.loads(body)["event"] == "webhook.verification" and json.loads(body)["challenge"] == "abc"


# --- The portal --------------------------------------------------------------------------------------


def test_the_portal_shows_an_unverified_partner_how_to_answer_and_sends_a_new_challenge(
        browser_ready, hub_factory, receivers, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from conftest import CHROMIUM, CHROMIUM_ARGS

    hub = hub_factory(**ON)
    receiver = receivers("ignore")
    partner = register(hub, receiver)
    pid = partner["partner_id"]
    wait_for(lambda: verification_of(hub, pid)["attempts"] >= 1, timeout=30)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, locale="en-US")
            page.set_default_timeout(10_000)
            expect.set_options(timeout=10_000)
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            tid = page.get_by_test_id
            page.goto(hub.url + "/portal")
            tid("key-input").fill(partner["api_key"])
            tid("key-submit").click()
            expect(tid("verification-state")).to_have_text("not verified yet: nothing else is sent to your URL")
            expect(tid("verification-how")).to_contain_text('{"challenge": "…"}')
            expect(tid("verification-error")).to_contain_text("without the challenge")
            expect(tid("check")).to_be_disabled()  # the endpoint check probes nothing unproved
            tid("lang-es").click()
            expect(tid("verification-state")).to_have_text("sin verificar todavía: no se envía nada más a tu URL")
            expect(tid("verification-how")).to_contain_text("devolviendo el reto")
            page.screenshot(path=tmp_path / "portal-unverified-es.png", full_page=True)

            receiver.mode = "echo"  # the partner fixes its receiver, then asks for a new challenge
            tid("verify-again").click()
            expect(tid("endpoint-notice")).to_contain_text("webhook.verification")
            expect(tid("verification-state")).to_have_text("verificado", timeout=30_000)
            expect(tid("verify-again")).to_be_hidden()
            expect(tid("check")).to_be_enabled()
            assert errors == []
        finally:
            browser.close()
    assert verification_of(hub, pid)["state"] == "verified"


def test_the_dashboard_marks_an_unverified_partner(browser_ready, webhookd_factory, receivers):
    from playwright.sync_api import expect, sync_playwright

    from conftest import ADMIN_TOKEN, CHROMIUM, CHROMIUM_ARGS

    hub = webhookd_factory(**ON)
    silent, echoing = receivers("ignore"), receivers("echo")
    waiting = register(hub, silent)
    proved = register(hub, echoing)
    wait_for(lambda: verification_of(hub, waiting["partner_id"])["attempts"] >= 1
             and verification_of(hub, proved["partner_id"])["state"] == "verified", timeout=30)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            tid = page.get_by_test_id
            page.goto(hub.url + "/dashboard")
            tid("token-input").fill(ADMIN_TOKEN)
            tid("token-submit").click()
            rows = tid("partner-row")
            expect(rows).to_have_count(2, timeout=10_000)
            unproved = page.locator(f'[data-partner-id="{waiting["partner_id"]}"]')
            expect(unproved.get_by_test_id("partner-unverified")).to_contain_text("unverified", timeout=10_000)
            assert "without the challenge" in unproved.get_by_test_id("partner-unverified").get_attribute("title")
            expect(page.locator(f'[data-partner-id="{proved["partner_id"]}"]').get_by_test_id(
                "partner-unverified")).to_have_count(0)
        finally:
            browser.close()


# --- The gate in the store and the delivery loop, on each engine ------------------------------------------


def test_an_unverified_partner_is_passed_by_the_claim_and_a_job_claimed_before_is_given_back(store_target):
    """A job claimed just before the URL changed begins with the partner as it is now: unverified, it is
    not sent (``DeliveryLoop._as_partner_is_now``); the claim and the loop's next due time pass the partner
    by until its endpoint echoes the challenge, then take its deliveries again."""
    import delivery
    from config import DeliverySettings
    from models import AuditEntry, NewEvent
    from storage import open_store

    store = open_store(store_target)
    try:
        partner = store.add_partner(partner_id="partner_1", name="P", webhook_url="http://127.0.0.1:9/old",
                                    events=["payment.success"], secret="sk_live_1", api_key_hash="h", now=100.0)
        assert partner.verification is None
        for n in (1, 2):
            store.publish(NewEvent(id=f"evt_{n}", type="payment.success", body=b"{}"), now=100.0, max_attempts=3,
                          new_delivery_id=lambda n=n: f"dlv_{n}")
        (job,) = store.claim_due(now=100.0, lease_s=30, limit=1, per_partner=1)
        store.update_partner(partner.id, webhook_url="http://127.0.0.1:9/new", verification_challenge="c_1", now=101.0)
        loop = delivery.DeliveryLoop(store, DeliverySettings(), clock=lambda: 102.0)
        assert loop._as_partner_is_now(job) is None
        store.release_claims([job.delivery_id], 102.0)
        assert store.claim_due(now=103.0, lease_s=30, limit=10, per_partner=10) == []
        assert store.next_due_at(now=103.0) is None  # nothing the loop may take: it does not spin on them

        (due,) = store.claim_verifications(now=103.0, lease_s=30, limit=10)
        assert (due.url, due.challenge, due.attempt, due.secrets) == ("http://127.0.0.1:9/new", "c_1", 1, ("sk_live_1",))
        assert store.claim_verifications(now=103.0, lease_s=30, limit=10) == []  # leased: one sender at a time
        audit = AuditEntry(id="aud_1", at=104.0, actor="webhookd", action="partner.verified", partner_id=partner.id,
                           changes={})
        assert not store.record_verification(partner.id, challenge="c_0", now=104.0, error=None, due_at=None,
                                             audit=audit)  # an answer to another challenge proves nothing
        assert store.record_verification(partner.id, challenge="c_1", now=104.0, error=None, due_at=None, audit=audit)
        assert store.get_partner(partner.id).verification.state == "verified"
        claimed = store.claim_due(now=105.0, lease_s=30, limit=10, per_partner=10)
        assert sorted(j.event_id for j in claimed) == ["evt_1", "evt_2"]
    finally:
        store.close()

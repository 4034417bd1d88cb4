"""Security properties, each with a test that fails without it: access rules on every route,
secret rotation, the replay window, rate limits, secrets kept out of logs."""

import json
import re
import time

import httpx
import pytest
import standardwebhooks

import signing
import web
from conftest import ADMIN, ADMIN_TOKEN, ShiftedClock, bearer, wait_for
from payloads import PAYMENT_SUCCESS

WHO = {web.PUBLIC, web.ADMIN, web.CALLER, web.SIGNED, web.REGISTRATION, web.METRICS}


def _routes(app):
    for r in app.routes:
        if hasattr(r, "methods"):
            for method in sorted(r.methods - {"HEAD"}):
                yield method, r


def _concrete(path):
    return re.sub(r"\{[^}]+\}", "x_0000000000000", path)


def test_every_route_declares_who_may_call_it(hub):
    routes = list(_routes(hub.app))
    assert len(routes) >= 15
    for method, r in routes:
        assert getattr(r, "who", None) in WHO, f"{method} {r.path} has no access rule"


def test_every_protected_route_refuses_missing_and_wrong_credentials(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    partner_key = bearer(partner["api_key"])
    checked = 0
    for method, r in _routes(hub.app):
        if r.who in (web.PUBLIC, web.SIGNED):
            continue
        url = _concrete(r.path)
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic abc"},
                        {"Authorization": "Bearer pak_not_a_real_key_0000000000000000000000"}):
            got = hub.http.request(method, url, headers=headers, json={})
            assert got.status_code == 401, (method, r.path, headers, got.text)
            assert got.json()["error"]["code"] in ("missing_credentials", "invalid_credentials")
        if r.who in (web.ADMIN, web.REGISTRATION, web.METRICS):
            got = hub.http.request(method, url, headers=partner_key, json={})
            assert got.status_code == 403, (method, r.path, got.text)
        checked += 1
    assert checked >= 12


def test_the_signed_route_refuses_missing_and_wrong_signatures(hub):
    hub.register("http://127.0.0.1:9/x", ["payment.success"])
    body = b'{"event":"tour.promoted"}'
    assert hub.http.post("/webhooks/partners", content=body).status_code == 400
    wrong = hub.http.post("/webhooks/partners", content=body, headers={
        "X-Webhook-Signature": "ab" * 32, "X-Webhook-Event": "tour.promoted"})
    assert wrong.status_code == 401


def test_registration_is_open_only_when_configured(webhookd_factory):
    closed = webhookd_factory()
    body = {"partner_name": "P", "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"]}
    assert closed.http.post("/partners/register", json=body).status_code == 401
    opened = webhookd_factory(security__open_registration=True)
    assert opened.http.post("/partners/register", json=body).status_code == 201


def test_a_partner_key_cannot_touch_another_partner(hub):
    a = hub.register("http://127.0.0.1:9/a", ["payment.success"], name="A")
    b = hub.register("http://127.0.0.1:9/b", ["payment.success"], name="B")
    key = bearer(a["api_key"])
    for method, path, body in [
        ("GET", f"/partners/{b['partner_id']}", None),
        ("PATCH", f"/partners/{b['partner_id']}", {"status": "paused"}),
        ("POST", f"/partners/{b['partner_id']}/rotate-secret", None),
        ("POST", f"/partners/{b['partner_id']}/test", None),
        ("POST", f"/partners/{b['partner_id']}/recover?since=0", None),
    ]:
        got = hub.http.request(method, path, headers=key, json=body)
        assert got.status_code == 404, (method, path, got.text)
    assert hub.http.get(f"/partners/{b['partner_id']}", headers=hub.admin).json()["status"] == "active"


def test_rotation_overlap_signs_with_both_then_only_the_new_secret(webhookd_factory, receiver_factory):
    """The old secret works for the whole overlap (an hour here, on a clock the test moves), then
    stops. No step has to fit in a short real-time window."""
    clock = ShiftedClock()
    hub = webhookd_factory(clock=clock, security__secret_overlap_s=3600)
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    old_secret, old_whsec = partner["shared_secret"], partner["standard_webhooks_secret"]
    r = hub.http.post(f"/partners/{partner['partner_id']}/rotate-secret",
                      headers=bearer(partner["api_key"]))
    assert r.status_code == 200
    rotated = r.json()
    new_secret = rotated["shared_secret"]
    assert new_secret != old_secret and rotated["standard_webhooks_secret"].startswith("whsec_")
    assert old_secret not in r.text

    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: receiver.received)
    got = receiver.received[0]
    assert got.headers["webhook-signature"].count("v1,") == 2
    assert got.headers["x-webhook-signature"] == signing.sign_hex(new_secret, got.body)
    for whsec in (old_whsec, rotated["standard_webhooks_secret"]):
        assert standardwebhooks.Webhook(whsec).verify(got.body, got.headers) == PAYMENT_SUCCESS

    assert _inbound(hub, old_secret, 1).status_code == 200
    assert _inbound(hub, new_secret, 2).status_code == 200
    clock.advance(3599)
    assert _inbound(hub, old_secret, 3).status_code == 200   # still inside the overlap
    clock.advance(2)                                          # the overlap has ended
    assert _inbound(hub, old_secret, 4).status_code == 401
    assert _inbound(hub, new_secret, 5).status_code == 200
    hub.publish({**PAYMENT_SUCCESS, "transaction_id": "after"})
    wait_for(lambda: len(receiver.received) == 2)
    later = receiver.received[1]
    assert later.headers["webhook-signature"].count("v1,") == 1
    assert later.headers["x-webhook-signature"] == signing.sign_hex(new_secret, later.body)


def _inbound(hub, secret, n):
    body = json.dumps({"event": "tour.purchased", "n": n}).encode()
    return hub.http.post("/webhooks/partners", content=body, headers={
        "X-Webhook-Signature": signing.sign_hex(secret, body), "X-Webhook-Event": "tour.purchased"})


def test_a_second_rotation_keeps_the_first_ones_promise(webhookd_factory):
    """A rotation promised the old secret an overlap: rotating again during it is a 409 that says
    how to revoke on purpose, and the old secret keeps working."""
    hub = webhookd_factory(security__secret_overlap_s=3600)
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    own = bearer(partner["api_key"])
    first = hub.http.post(f"/partners/{partner['partner_id']}/rotate-secret", headers=own)
    assert first.status_code == 200
    again = hub.http.post(f"/partners/{partner['partner_id']}/rotate-secret", headers=own)
    assert again.status_code == 409 and again.json()["error"]["code"] == "rotation_in_progress"
    assert "revoke_old=true" in again.json()["error"]["message"]
    assert _inbound(hub, partner["shared_secret"], 1).status_code == 200
    assert _inbound(hub, first.json()["shared_secret"], 2).status_code == 200


def test_revoke_old_ends_every_old_secret_at_once(webhookd_factory, receiver_factory):
    """For a leak: a rotation with ?revoke_old=true leaves only the new secret, in both directions."""
    hub = webhookd_factory(security__secret_overlap_s=3600)
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    own = bearer(partner["api_key"])
    first = hub.http.post(f"/partners/{partner['partner_id']}/rotate-secret", headers=own).json()
    r = hub.http.post(f"/partners/{partner['partner_id']}/rotate-secret?revoke_old=true", headers=own)
    assert r.status_code == 200 and r.json()["previous_secret_expires_at"] is None
    newest = r.json()["shared_secret"]
    for old in (partner["shared_secret"], first["shared_secret"]):
        assert _inbound(hub, old, 1).status_code == 401
    assert _inbound(hub, newest, 2).status_code == 200
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: receiver.received)
    assert receiver.received[0].headers["webhook-signature"].count("v1,") == 1
    bad = hub.http.post(f"/partners/{partner['partner_id']}/rotate-secret?revoke_old=yes", headers=own)
    assert bad.status_code == 422


# Past the 300 s window: 301 s old is refused however long the request takes; ahead of our clock,
# a minute's margin (a timestamp 301 s ahead is inside the window again once a second has passed).
@pytest.mark.parametrize("offset", [-301, 360, -10**6])
def test_inbound_outside_the_replay_window_is_refused(hub, offset):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    body = json.dumps({"event": "tour.purchased", "timestamp": int(time.time()) + offset}).encode()
    r = hub.http.post("/webhooks/partners", content=body, headers={
        "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body), "X-Webhook-Event": "tour.purchased"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "stale_timestamp"


def test_every_websocket_route_refuses_a_missing_token(hub):
    from starlette.routing import WebSocketRoute
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    ws_routes = [r for r in hub.app.routes if isinstance(r, WebSocketRoute)]
    assert ws_routes
    for r in ws_routes:
        with connect(hub.url.replace("http://", "ws://") + r.path, open_timeout=5) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=5)
        assert closed.value.rcvd.code == 1008


# The SSRF rule's tests are in test_targets.py, beside the module that holds it.


# --- Rate limits --------------------------------------------------------------------------


def test_open_registration_is_rate_limited_per_client_address(webhookd_factory):
    hub = webhookd_factory(clock=ShiftedClock(frozen=True), security__open_registration=True,
                           security__registration_rate_per_min=3.0)
    body = {"partner_name": "P", "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"]}
    assert [hub.http.post("/partners/register", json=body).status_code for _ in range(3)] == [201] * 3
    limited = hub.http.post("/partners/register", json=body)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert hub.http.post("/partners/register", json=body, headers=hub.admin).status_code == 201  # admin is not


def test_inbound_events_are_rate_limited_per_partner(webhookd_factory):
    hub = webhookd_factory(clock=ShiftedClock(frozen=True), security__inbound_rate_per_s=2.0)
    a = hub.register("http://127.0.0.1:9/a", ["payment.success"], name="A")
    b = hub.register("http://127.0.0.1:9/b", ["payment.success"], name="B")

    def send(partner, n):
        body = json.dumps({"event": "tour.purchased", "n": n}).encode()
        return hub.http.post("/webhooks/partners", content=body, headers={
            "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body), "X-Webhook-Event": "tour.purchased"})

    codes = [send(a, n).status_code for n in range(6)]
    assert codes == [200] * 4 + [429] * 2                   # a burst of 2 x rate, then limited
    assert send(b, 0).status_code == 200                    # another partner has its own bucket
    limited = send(a, 10)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"


# --- Secrets never in logs ---------------------------------------------------------------------


def test_no_secret_appears_in_any_log_line_of_a_full_flow(webhookd_factory, receiver_factory, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    hub = webhookd_factory()
    receiver = receiver_factory(default=(500, 0))
    partner = hub.register(receiver.url, ["payment.success"])
    pid, key = partner["partner_id"], bearer(partner["api_key"])
    rotated = hub.http.post(f"/partners/{pid}/rotate-secret", headers=key).json()
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: len(hub.deliveries(state="failed")) == 1)
    body = b'{"event":"tour.purchased"}'
    hub.http.post("/webhooks/partners", content=body, headers={
        "X-Webhook-Signature": signing.sign_hex(rotated["shared_secret"], body), "X-Webhook-Event": "tour.purchased"})
    hub.http.post("/webhooks/partners", content=body, headers={   # a refused one too
        "X-Webhook-Signature": signing.sign_hex("sk_live_wrong", body), "X-Webhook-Event": "tour.purchased"})
    token = hub.http.post("/realtime/tokens", headers=hub.admin, json={"user_id": "u"}).json()["token"]
    hub.http.get("/deliveries", headers=key)
    hub.http.get("/partners", headers={"Authorization": "Bearer wrong"})
    secrets_issued = [partner["shared_secret"], partner["standard_webhooks_secret"], partner["api_key"],
                      rotated["shared_secret"], rotated["standard_webhooks_secret"], token, hub.admin["Authorization"][7:]]
    logged = "\n".join(r.getMessage() + " " + str(r.args) for r in caplog.records)
    assert len(caplog.records) > 5
    for secret in secrets_issued:
        assert secret not in logged
        assert secret[:20] not in logged


def test_no_credential_reaches_the_access_log(serve_factory):
    """``webhookd serve`` with its access log on: a /ws token in the query string, a partner API key
    and an admin token sent as query parameters are written [redacted]; the request lines are there."""
    from websockets.sync.client import connect

    process = serve_factory(WEBHOOKD_SERVER_ACCESS_LOG="true")
    token = httpx.post(process.url + "/realtime/tokens", headers=ADMIN,
                       json={"user_id": "ana"}, timeout=10).json()["token"]
    with connect(process.url.replace("http://", "ws://") + f"/ws?token={token}", open_timeout=10):
        pass
    httpx.get(process.url + "/deliveries?api_key=pak_leaked_key_123456&limit=5", timeout=10)
    httpx.get(process.url + f"/stats?TOKEN={ADMIN_TOKEN}", timeout=10)
    wait_for(lambda: process.output().count("GET /") >= 3, timeout=10)
    log = process.output()
    for credential in (token, token.split(".")[0], "pak_leaked_key_123456", ADMIN_TOKEN):
        assert credential not in log
    assert "/ws?token=[redacted]" in log
    assert "/deliveries?api_key=[redacted]&limit=5" in log
    assert "/stats?TOKEN=[redacted]" in log

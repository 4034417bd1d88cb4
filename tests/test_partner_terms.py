"""Each partner on its own terms (partner_terms.py): its own retry schedule, timeout and backoff,
followed and told in the trace; extra headers that reach its endpoint and nothing else — no log
line, API answer, trace or audit entry holds a value; names and values that would break or hijack
the request refused with a 422 that changes nothing; a claim that outlives a partner's longer own
timeout; and only the admin sets either."""

from __future__ import annotations

import json
import logging
import secrets

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse

import partner_terms
import sender
from conftest import ADMIN, ADMIN_TOKEN, Receiver, ShiftedClock, bearer, wait_for, webhookd_cli
from payloads import PAYMENT_SUCCESS

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)


class Gateway(Receiver):
    """A receiver behind an API gateway: 401 to any request without ``Authorization: Bearer <token>``."""

    def __init__(self, token: str):
        self.token = token
        self.refused = 0
        super().__init__()

    async def _handle(self, request: Request):
        if request.headers.get("authorization") != f"Bearer {self.token}":
            self.refused += 1
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        return await super()._handle(request)


def register(hub, url: str, **terms) -> dict:
    r = hub.http.post("/partners/register", headers=ADMIN,
                      json={"partner_name": "Own Terms", "webhook_url": url, "events": ["payment.success"], **terms})
    assert r.status_code == 201, r.text
    return r.json()


def attempts_of(hub, delivery_id: str) -> list[dict]:
    return hub.delivery(delivery_id)["attempts"]


# --- Retry policy ------------------------------------------------------------------------------


def test_a_partner_with_its_own_schedule_is_retried_at_those_times_and_the_trace_says_so(hub_factory,
                                                                                          receiver_factory):
    clock = ShiftedClock()
    hub = hub_factory(clock=clock, delivery__breaker_threshold=100)
    down = receiver_factory(default=(500, 0.0))
    partner = register(hub, down.url, retry={"schedule": [5, 30, 300, 3600]})
    assert partner["retry"] == {"timeout_s": 1.0, "max_attempts": 5, "base_s": None, "max_s": None,
                                "schedule": [5, 30, 300, 3600], "own": ["max_attempts", "schedule"]}
    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    (delivery,) = wait_for(lambda: hub.deliveries(partner_id=partner["partner_id"]))
    wait_for(lambda: len(attempts_of(hub, delivery["delivery_id"])) == 1)

    for made, wait in enumerate([5, 30, 300, 3600], start=1):
        hub.wait_until_nothing_is_due()  # the loop looked, and found nothing due before the wait is over
        assert len(attempts_of(hub, delivery["delivery_id"])) == made
        clock.advance(wait)
        hub.app.state.ctx.loop.wake()
        wait_for(lambda n=made: len(attempts_of(hub, delivery["delivery_id"])) == n + 1, timeout=30)

    assert wait_for(lambda: hub.delivery(delivery["delivery_id"])["state"] == "failed")
    steps = hub.http.get(f"/events/{event_id}/trace", headers=ADMIN).json()["deliveries"][0]["steps"]
    attempts = [s for s in steps if s["step"] == "attempt"]
    assert [a["next"]["wait_s"] for a in attempts[:-1]] == [5, 30, 300, 3600]   # exactly: no jitter
    for n, (a, wait) in enumerate(zip(attempts, [5, 30, 300, 3600]), start=1):
        assert a["next"]["why"] == (f"the partner's own schedule after attempt {n} of 5: {wait} s "
                                    "(its waits: 5, 30, 300, 3600 s)")
        began_after = attempts[n]["at"] - (a["at"] + a["duration_ms"] / 1000)
        assert began_after >= wait - 0.01   # the loop never sends a retry before its time (by the clock)
    assert attempts[-1]["next"]["why"] == "attempt 5 of 5 failed: no attempt left"
    assert len(down.received) == 5


def test_own_timeout_and_backoff_apply_and_a_reset_brings_the_servers_back(hub, receiver_factory):
    slow = receiver_factory(default=(200, 2.0))       # answers after 2 s: past a 0.5 s timeout
    partner = register(hub, slow.url, retry={"timeout_s": 0.5, "max_attempts": 2, "base_s": 1, "max_s": 4})
    assert partner["retry"]["own"] == ["timeout_s", "max_attempts", "base_s", "max_s"]
    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    (delivery,) = wait_for(lambda: hub.deliveries(partner_id=partner["partner_id"], state="failed"), timeout=30)
    attempts = attempts_of(hub, delivery["delivery_id"])
    assert [a["error"] for a in attempts] == ["timeout", "timeout"]
    assert attempts[0]["error_detail"] == "no answer within 0.5 s"   # the server's is 1 s in these tests
    steps = hub.http.get(f"/events/{event_id}/trace", headers=ADMIN).json()["deliveries"][0]["steps"]
    why = next(s for s in steps if s["step"] == "attempt")["next"]["why"]
    assert why.startswith("backoff after attempt 1 of 2: 0.5-1 s (the partner's own: base 1 s doubled per "
                          "attempt, at most 4 s), drawn")

    r = hub.http.patch(f"/partners/{partner['partner_id']}", headers=ADMIN, json={"retry": None})
    assert r.status_code == 200, r.text
    assert r.json()["retry"] == {"timeout_s": 1.0, "max_attempts": 3, "base_s": 0.05, "max_s": 0.2,
                                 "schedule": None, "own": []}
    audit = hub.http.get("/audit", headers=ADMIN, params={"action": "partner.updated"}).json()["items"][0]
    assert audit["changes"]["retry"] == {"from": {"timeout_s": 0.5, "max_attempts": 2, "base_s": 1.0, "max_s": 4.0},
                                         "to": None}


def test_a_new_policy_counts_from_a_pending_deliverys_next_attempt_and_keeps_its_attempts(hub_factory,
                                                                                          receiver_factory):
    clock = ShiftedClock()
    hub = hub_factory(clock=clock, delivery__backoff_base_s=1000, delivery__backoff_max_s=1000,
                      delivery__breaker_threshold=100)
    down = receiver_factory(default=(500, 0.0))
    partner = register(hub, down.url)
    hub.publish(PAYMENT_SUCCESS)
    (delivery,) = wait_for(lambda: hub.deliveries(partner_id=partner["partner_id"]))
    wait_for(lambda: len(attempts_of(hub, delivery["delivery_id"])) == 1)
    r = hub.http.patch(f"/partners/{partner['partner_id']}", headers=ADMIN, json={"retry": {"schedule": [7]}})
    assert r.status_code == 200 and r.json()["retry"]["max_attempts"] == 2, r.text

    clock.advance(1000)   # the wait drawn before the change (500-1000 s) stands
    hub.app.state.ctx.loop.wake()
    wait_for(lambda: len(attempts_of(hub, delivery["delivery_id"])) == 2, timeout=30)
    second = attempts_of(hub, delivery["delivery_id"])[1]
    steps = hub.http.get(f"/events/{delivery['event_id']}/trace", headers=ADMIN).json()["deliveries"][0]["steps"]
    assert [s["next"]["why"] for s in steps if s["step"] == "attempt"][1] == (
        "the partner's own schedule after attempt 2 of 3: 7 s (its waits: 7 s)")   # its 3 attempts, the new wait
    clock.advance(7)
    hub.app.state.ctx.loop.wake()
    wait_for(lambda: hub.delivery(delivery["delivery_id"])["state"] == "failed", timeout=30)
    assert len(attempts_of(hub, delivery["delivery_id"])) == 3 and second["attempt"] == 2


def test_an_attempt_within_a_partners_longer_own_timeout_outlives_its_lease_and_is_sent_once(hub,
                                                                                            receiver_factory):
    slow = receiver_factory(default=(200, 13.0))   # past the lease the server's 1 s timeout gives (12 s)
    partner = register(hub, slow.url, retry={"timeout_s": 15})
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: hub.deliveries(partner_id=partner["partner_id"], state="delivered"), timeout=60)
    assert len(slow.received) == 1


def test_a_partners_own_max_attempts_reaches_its_new_deliveries(hub, receiver_factory):
    down = receiver_factory(default=(500, 0.0))
    own = register(hub, down.url, retry={"max_attempts": 5})
    plain = register(hub, down.url)
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: len(hub.deliveries(state="failed")) == 2, timeout=30)
    counts = {d["partner_id"]: d["attempt_count"] for d in hub.deliveries(state="failed")}
    assert counts == {own["partner_id"]: 5, plain["partner_id"]: 3}
    # A delivery made for one partner alone (its test event) takes its own number too.
    assert hub.http.post(f"/partners/{own['partner_id']}/test", headers=hub.admin).status_code == 202
    wait_for(lambda: len(hub.deliveries(state="failed")) == 3, timeout=30)
    assert [d["attempt_count"] for d in hub.deliveries(state="failed", partner_id=own["partner_id"])] == [5, 5]


# --- Extra headers -----------------------------------------------------------------------------


def test_a_receiver_that_demands_a_bearer_header_gets_it_and_the_value_is_nowhere_else(hub, caplog):
    caplog.set_level(logging.DEBUG)
    token = "tok_" + secrets.token_urlsafe(24)
    gateway = Gateway(token).start()
    try:
        answers = []   # every API answer of this test, searched for the token at the end
        partner = register(hub, gateway.url)
        neighbour = register(hub, gateway.url)   # the same URL, no header of its own
        pid = partner["partner_id"]
        event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
        wait_for(lambda: gateway.refused >= 2)   # each partner's first attempt: 401, no header yet

        r = hub.http.patch(f"/partners/{pid}", headers=ADMIN,
                           json={"extra_headers": {"Authorization": f"Bearer {token}", "X-Tenant": "acme"}})
        assert r.status_code == 200, r.text
        answers.append(r.text)
        assert r.json()["extra_headers"] == [
            {"name": "Authorization", "hint": f"Bear… ({len('Bearer ' + token)} characters)"},
            {"name": "X-Tenant", "hint": "4 characters"}]
        (delivered,) = wait_for(lambda: hub.deliveries(partner_id=pid, state="delivered"), timeout=30)
        assert [r.headers["authorization"] for r in gateway.received] == [f"Bearer {token}"]
        assert gateway.received[0].headers["x-tenant"] == "acme"
        wait_for(lambda: hub.deliveries(partner_id=neighbour["partner_id"], state="failed"), timeout=30)
        assert len(gateway.received) == 1   # the neighbour on the same URL never carried the header

        for path in [f"/partners/{pid}", "/partners", f"/deliveries/{delivered['delivery_id']}",
                     f"/events/{event_id}/trace", "/audit", f"/deliveries?partner_id={pid}", "/metrics"]:
            r = hub.http.get(path, headers=ADMIN)
            assert r.status_code == 200, (path, r.text)
            answers.append(r.text)
        answers.append(hub.http.get(f"/partners/{pid}", headers=bearer(partner["api_key"])).text)  # the portal's
        audit = hub.http.get("/audit", headers=ADMIN, params={"partner_id": pid}).json()["items"]
        assert {"extra_headers": {"set": ["Authorization", "X-Tenant"], "removed": []}} in [
            e["changes"] for e in audit]

        trace = hub.http.get(f"/events/{event_id}/trace", headers=ADMIN).json()
        logged = caplog.text + "".join(str(r.args) + r.getMessage() for r in caplog.records)
        tables = [str(row) for table in ("attempts", "audit_log", "deliveries", "events")
                  for row in hub.rows(f"SELECT * FROM {table}")]
        assert token not in logged
        for text in answers + tables + [json.dumps(trace)]:
            assert token not in text
        assert any(token in str(row) for row in hub.rows("SELECT extra_headers FROM partners"))  # kept, beside the secret
    finally:
        gateway.stop()


def test_removing_one_header_keeps_the_others_and_a_deleted_partner_loses_them(hub, receiver_factory):
    receiver = receiver_factory()
    partner = register(hub, receiver.url, extra_headers={"Authorization": "Bearer one-two-three", "X-A": "a"})
    pid = partner["partner_id"]
    assert [h["name"] for h in partner["extra_headers"]] == ["Authorization", "X-A"]
    r = hub.http.patch(f"/partners/{pid}", headers=ADMIN, json={"extra_headers": {"x-a": None, "X-B": "b"}})
    assert [h["name"] for h in r.json()["extra_headers"]] == ["Authorization", "X-B"]
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: receiver.received)
    headers = receiver.received[0].headers
    assert headers["authorization"] == "Bearer one-two-three" and headers["x-b"] == "b" and "x-a" not in headers
    assert hub.http.delete(f"/partners/{pid}", headers=ADMIN).status_code == 200
    assert hub.rows("SELECT extra_headers FROM partners WHERE id = :id", {"id": pid}) == [(None,)]


BAD_HEADERS = [
    *({name: "x"} for name in ["Host", "content-length", "Content-Type", "Transfer-Encoding", "Connection",
                                "Keep-Alive", "TE", "Upgrade", "Trailer", "User-Agent", "X-Webhook-Signature",
                                "x-webhook-id", "X-Webhook-Timestamp", "webhook-id", "webhook-signature",
                                "Webhook-Timestamp", "X-Webhook-Anything", "Proxy-Authorization", "traceparent"]),
    {"Bad Name": "x"}, {"Authorization: Bearer SECRETVALUE": "x"}, {"": "x"}, {"Ünicode": "x"}, {"a" * 65: "x"},
    {"X-Injected": "SECRETVALUE\r\nX-Evil: 1"}, {"X-Injected": "SECRETVALUE\nX-Evil: 1"},
    {"X-Nul": "SECRETVALUE\x00"}, {"X-Empty": ""}, {"X-Space": " SECRETVALUE"}, {"X-Long": "S" * 4097},
    {"X-Number": 123}, {"X-Accent": "SECRETVALUÉ"}, {"X-Null-At-Registration": None},
    {"X-A": "1", "x-a": "2"}, {f"X-{i}": "v" for i in range(11)},
]


def test_reserved_or_invalid_headers_are_refused_and_nothing_changes(hub, receiver_factory):
    receiver = receiver_factory()
    partner = register(hub, receiver.url, extra_headers={"Authorization": "Bearer kept-value"})
    pid = partner["partner_id"]
    before = (hub.http.get(f"/partners/{pid}", headers=ADMIN).json(), hub.rows("SELECT * FROM partners"),
              hub.rows("SELECT * FROM audit_log"))
    for bad in BAD_HEADERS:
        answers = [hub.http.post("/partners/register", headers=ADMIN, json={
            "partner_name": "Bad", "webhook_url": receiver.url, "events": ["payment.success"], "extra_headers": bad})]
        if None not in bad.values():   # with PATCH a null removes a header: not an error
            answers.append(hub.http.patch(f"/partners/{pid}", headers=ADMIN, json={"extra_headers": bad}))
        for r in answers:
            assert r.status_code == 422, (bad, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_field" and error["message"].startswith("'extra_headers' "), error
            assert "SECRETVALUE" not in r.text and "kept-value" not in r.text
    assert (hub.http.get(f"/partners/{pid}", headers=ADMIN).json(), hub.rows("SELECT * FROM partners"),
            hub.rows("SELECT * FROM audit_log")) == before
    assert hub.rows("SELECT extra_headers FROM partners WHERE id = :id", {"id": pid}) == \
        [(json.dumps({"Authorization": "Bearer kept-value"}),)]
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: receiver.received)
    assert receiver.received[0].headers["authorization"] == "Bearer kept-value"
    assert "x-evil" not in receiver.received[0].headers


# --- Who sets them -------------------------------------------------------------------------------


def test_only_the_admin_sets_a_partners_terms(webhookd_factory, receiver_factory):
    hub = webhookd_factory(security__open_registration=True)
    receiver = receiver_factory()
    partner = register(hub, receiver.url, retry={"max_attempts": 2})
    pid, own_key = partner["partner_id"], bearer(partner["api_key"])
    before = hub.rows("SELECT * FROM partners")
    for change in ({"retry": {"max_attempts": 25}}, {"retry": None}, {"extra_headers": {"X-Mine": "1"}},
                   {"extra_headers": None}):
        r = hub.http.patch(f"/partners/{pid}", headers=own_key, json=change)
        assert r.status_code == 403 and r.json()["error"]["code"] == "terms_admin_only", r.text
    for change in ({"retry": {"timeout_s": 30}}, {"extra_headers": {"X-Mine": "1"}}):
        r = hub.http.post("/partners/register", json={"partner_name": "Anyone", "webhook_url": receiver.url,
                                                      "events": ["payment.success"], **change})
        assert r.status_code == 403 and r.json()["error"]["code"] == "terms_admin_only", r.text
    assert hub.rows("SELECT * FROM partners") == before


# --- The prebuilt request head -----------------------------------------------------------------


def test_the_extra_headers_are_in_the_urls_prebuilt_head_once_per_url_and_headers():
    route = sender.plan_route("http://127.0.0.1:9/hook", (), "webhookd/test", (("Authorization", "Bearer x"),))
    assert route.head.endswith(b"User-Agent: webhookd/test\r\nAuthorization: Bearer x\r\n")
    assert partner_terms.header_lines((("A", "1"), ("B", "2"))) == ["A: 1", "B: 2"]
    assert ADMIN_TOKEN not in route.head.decode()


# --- From the command line ---------------------------------------------------------------------


def test_the_command_line_sets_and_resets_a_partners_terms_and_never_prints_a_value(serve_factory,
                                                                                   receiver_factory, tmp_path):
    receiver = receiver_factory()
    serve = serve_factory()
    headers_file = tmp_path / "headers.json"
    headers_file.write_text(json.dumps({"Authorization": "Bearer cli-secret-value-0123456789"}))

    def run(*args: str) -> str:
        done = webhookd_cli({**serve.env, "WEBHOOKD_SERVER_PORT": str(serve.port)}, "partners", *args)
        assert done.returncode == 0, done.stderr
        assert "cli-secret-value" not in done.stdout + done.stderr
        return done.stdout

    added = json.loads(run("add", "--name", "CLI Terms", "--url", receiver.url, "--events", "payment.success",
                           "--retry", '{"schedule": [2, 4]}', "--headers", f"@{headers_file}", "--json"))
    pid = added["partner_id"]
    assert added["retry"]["schedule"] == [2, 4] and added["retry"]["max_attempts"] == 3
    assert [h["name"] for h in added["extra_headers"]] == ["Authorization"]
    shown = run("retry", pid, "--retry", '{"timeout_s": 12}')
    assert '"timeout_s": 12.0' in shown and '"own": ["timeout_s"]' in shown
    assert json.loads(run("retry", pid, "--json"))["retry"]["own"] == []
    assert json.loads(run("headers", pid, "--json"))["extra_headers"] == []
    r = httpx.get(f"{serve.url}/partners/{pid}", headers=ADMIN)
    assert r.json()["extra_headers"] == [] and r.json()["retry"]["own"] == []


# --- The portal ----------------------------------------------------------------------------------


def test_the_portal_shows_the_partner_its_schedule_and_header_names_in_both_languages(browser_ready, hub,
                                                                                   receiver_factory):
    from playwright.sync_api import expect, sync_playwright

    from conftest import CHROMIUM, CHROMIUM_ARGS

    receiver = receiver_factory()
    token = "Bearer portal-secret-" + secrets.token_hex(12)
    partner = register(hub, receiver.url, retry={"timeout_s": 10, "schedule": [5, 30, 300, 3600]},
                       extra_headers={"Authorization": token})
    plain = register(hub, receiver.url)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(locale="en-US")
            page.set_default_timeout(10_000)
            expect.set_options(timeout=10_000)
            tid = page.get_by_test_id
            page.goto(hub.url + "/portal")
            tid("key-input").fill(partner["api_key"])
            tid("key-submit").click()
            expect(tid("meta-retryTerms")).to_have_text(
                "after a failure, webhookd waits 5, 30, 300, 3,600 s, in that order; at most 5 attempts, 10 s to "
                "answer each (your own, set by the operator)")
            expect(tid("meta-extraHeaders")).to_have_text(
                f"Authorization Bear… ({len(token)} characters) (set by the operator)")
            tid("lang-es").click()
            expect(tid("meta-retryTerms")).to_contain_text("tras un fallo, webhookd espera 5, 30, 300")
            expect(tid("meta-retryTerms")).to_contain_text("(propios, los fija el operador)")
            expect(tid("meta-extraHeaders")).to_have_text(
                f"Authorization Bear… ({len(token)} caracteres) (lo fija el operador)")
            assert token.split("-")[-1] not in page.content()

            tid("sign-out").click()
            tid("key-input").fill(plain["api_key"])
            tid("key-submit").click()
            expect(tid("meta-retryTerms")).to_contain_text("(los valores por defecto del servidor)")
            expect(tid("meta-extraHeaders")).to_have_text("ninguno (lo fija el operador)")
        finally:
            browser.close()

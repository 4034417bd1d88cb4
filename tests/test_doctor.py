"""The receiver doctor (``POST /partners/{id}/check``) against real receivers on 127.0.0.1.

The project's three example receivers pass every check; a receiver that answers 200 to anything
fails ``rejects_bad_signature``; the original guide's Express and PHP receivers (tests/seed_receivers/,
as that guide wrote them) fail ``verifies_raw_body`` with the raw-body fix, and Express, which answers
500 to a signature of another length, is told to answer 401; a slow receiver gets the timing warning;
an HTTPS receiver gets its certificate's expiry. Probes are marked, sent once, leave no delivery
behind, obey the SSRF rule like deliveries, and a check is rate-limited per partner.
"""

from __future__ import annotations

import datetime
import os
import shutil

import httpx
import pytest
import trustme
from test_examples import ExampleReceiver
from test_tls import TlsReceiver

import sitecustomize  # the loopback guard and its FAKE_DNS
from conftest import ADMIN, ROOT, ReceiverProcess, ShiftedClock, bearer, free_port, wait_for, webhookd_cli

CHECKS = ["accepts_signed", "accepts_retry", "rejects_bad_signature", "rejects_stale_timestamp",
          "verifies_raw_body", "answer_time", "https"]
PROBES = 11   # the signed one, its retry, two bad signatures, a stale one, six awkward bodies
SEED = ROOT / "tests" / "seed_receivers"


def run_check(hub, partner_id: str, headers: dict | None = None, **params: str) -> dict:
    r = hub.http.post(f"/partners/{partner_id}/check", headers=headers or ADMIN, params=params, timeout=90)
    assert r.status_code == 200, r.text
    report = r.json()
    assert all(c["result"] in ("pass", "warn", "fail") for c in report["checks"])
    return report


def by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def nothing_stored(hub) -> bool:
    return hub.rows("SELECT count(*) FROM deliveries")[0][0] == 0 and hub.rows("SELECT count(*) FROM events")[0][0] == 0


@pytest.mark.parametrize("language", ["python", "node", "php"])
def test_the_example_receivers_pass_every_check_in_both_languages(language, example_runtimes, webhookd_factory,
                                                                  tmp_path):
    hub = webhookd_factory(delivery__timeout_s=5.0)
    port = free_port()
    partner = hub.register(f"http://127.0.0.1:{port}/webhooks/events", ["payment.success"])
    receiver = ExampleReceiver(language, partner["shared_secret"], port, tmp_path)
    try:
        report = run_check(hub, partner["partner_id"])
        assert [c["name"] for c in report["checks"]] == CHECKS
        assert report["result"] == "pass", (report, receiver.output())
        assert all(c["fix"] is None for c in report["checks"])
        records = receiver.records()
        assert len(records) == PROBES and {r["event"] for r in records} == {"webhook.check"}
        assert [r["duplicate"] for r in records].count(True) == 1    # the retry probe, answered 200
        assert sorted(r["status"] for r in records) == [200] * 8 + [401] * 3
        spanish = run_check(hub, partner["partner_id"], lang="es")
        assert spanish["lang"] == "es" and spanish["result"] == "pass"
        assert by_name(spanish)["accepts_signed"]["detail"] == "Respondió 200 a un evento webhook.check bien firmado."
        assert nothing_stored(hub)
    finally:
        receiver.stop()


def test_a_receiver_that_answers_200_to_anything_fails_and_the_probes_are_marked(hub_factory, receiver_factory):
    hub = hub_factory()    # on both engines: on PostgreSQL the per-partner limit lives in the database
    anything = receiver_factory()                # verifies nothing, answers 200
    partner = hub.register(anything.url, ["payment.success"])
    report = run_check(hub, partner["partner_id"], headers=bearer(partner["api_key"]))
    found = by_name(report)
    assert report["result"] == "fail"
    assert found["rejects_bad_signature"]["result"] == "fail"
    assert "does not verify signatures" in found["rejects_bad_signature"]["detail"]
    assert "answer 401" in found["rejects_bad_signature"]["fix"]
    assert "section 2" in found["rejects_bad_signature"]["fix"]
    assert found["rejects_stale_timestamp"]["result"] == "warn"
    assert found["accepts_signed"]["result"] == found["verifies_raw_body"]["result"] == "pass"
    # Marked, sent once each (never retried), and not deliveries.
    assert len(anything.received) == PROBES
    for request in anything.received:
        assert request.headers["x-webhook-event"] == "webhook.check" and request.headers["x-webhook-check"] == "1"
        assert request.json["event"] == "webhook.check" and request.json["partner_id"] == partner["partner_id"]
        assert request.headers["user-agent"].endswith("(endpoint check)")
    ids = [r.headers["x-webhook-id"] for r in anything.received]
    assert len(set(ids)) == PROBES - 1 and ids[0] == ids[1]      # only the retry repeats an id
    assert nothing_stored(hub)
    assert hub.http.get("/deliveries", headers=hub.admin).json()["items"] == []


def test_the_other_probes_wait_for_a_2xx_to_the_first(webhookd_factory, receiver_factory, black_hole):
    hub = webhookd_factory()
    refusing = receiver_factory(default=(401, 0.0))
    partner = hub.register(refusing.url, ["payment.success"])
    report = run_check(hub, partner["partner_id"])
    assert [(c["name"], c["result"]) for c in report["checks"]] == [("accepts_signed", "fail"), ("https", "pass")]
    assert "Refused a correctly signed event with 401" in report["checks"][0]["detail"]
    assert "current shared secret" in report["checks"][0]["fix"] and len(refusing.received) == 1
    silent = hub.register(black_hole.url, ["payment.success"])
    unanswered = run_check(hub, silent["partner_id"])["checks"][0]
    assert unanswered["result"] == "fail" and "no answer within 1 s" in unanswered["detail"], unanswered
    assert wait_for(lambda: len(black_hole.accepted)) == 1     # one connection: no other probe was sent


class SeedReceiver(ReceiverProcess):
    """A receiver of the original partner guide (tests/seed_receivers/), started on 127.0.0.1:``port``."""

    def __init__(self, name: str, secret: str, port: int, tmp_path):
        source = (SEED / name).read_text()
        if name.endswith(".js"):  # the one change: a free port, on loopback only
            (tmp_path / name).write_text(source.replace("app.listen(3000);", f"app.listen({port}, '127.0.0.1');"))
            command = ["node", name]
        else:
            shutil.copy(SEED / name, tmp_path / name)
            command = ["php", "-S", f"127.0.0.1:{port}", name]
        env = {**os.environ, "PARTNER_SHARED_SECRET": secret,
               "NODE_PATH": str(ROOT / "examples" / "node" / "node_modules")}
        self.start(command, port=port, cwd=tmp_path, env=env, out_path=tmp_path / f"{name}.out")


@pytest.mark.parametrize("name", ["receiver.js", "receiver.php"])
def test_the_original_guides_receivers_fail_the_raw_body_check_with_its_fix(name, example_runtimes,
                                                                            webhookd_factory, tmp_path):
    hub = webhookd_factory(delivery__timeout_s=5.0)
    port = free_port()
    partner = hub.register(f"http://127.0.0.1:{port}/webhooks/events", ["payment.success"])
    receiver = SeedReceiver(name, partner["shared_secret"], port, tmp_path)
    try:
        found = by_name(run_check(hub, partner["partner_id"]))
        raw = found["verifies_raw_body"]
        assert raw["result"] == "fail", (found, receiver.output())
        assert "re-serialises the parsed JSON" in raw["detail"]
        assert "raw body" in raw["fix"] and "JSON.stringify or json_encode" in raw["fix"]
        failing = {"receiver.js": ["non-ASCII", "150.0", "2^53", "\"10\" before \"2\""],
                   "receiver.php": ["150.0", "empty objects", "a URL with \"/\""]}[name]
        assert all(what in raw["detail"] for what in failing), raw["detail"]
        assert found["accepts_signed"]["result"] == found["accepts_retry"]["result"] == "pass"
        assert found["rejects_stale_timestamp"]["result"] == "warn"   # neither looks at the time
        bad = found["rejects_bad_signature"]
        if name == "receiver.js":   # crypto.timingSafeEqual throws on another length: a 500
            assert bad["result"] == "warn" and "Answered 500 to a signature of half the length" in bad["detail"]
            assert bad["fix"].startswith("Answer 401 to any signature that does not verify")
        else:                       # hash_equals is false for another length: a 401
            assert bad["result"] == "pass"
        spanish = by_name(run_check(hub, partner["partner_id"], lang="es"))["verifies_raw_body"]
        assert "vuelve a serializar el JSON" in spanish["detail"] and "cuerpo crudo" in spanish["fix"]
        assert "guía para socios, sección 2" in spanish["fix"]
    finally:
        receiver.stop()


def test_a_slow_receiver_gets_the_timing_warning(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__timeout_s=2.0)
    slow = receiver_factory()
    slow.script = [(200, 1.2)]    # the first answer takes more than half of the 2 s timeout
    partner = hub.register(slow.url, ["payment.success"])
    timing = by_name(run_check(hub, partner["partner_id"]))["answer_time"]
    assert timing["result"] == "warn", timing
    assert "more than half of the 2 s timeout" in timing["detail"] and "queue the event" in timing["fix"]
    fast = by_name(run_check(hub, partner["partner_id"]))["answer_time"]
    assert fast["result"] == "pass", fast


HOST = "hooks.partner.example"


@pytest.mark.parametrize("days_left, result", [(400, "pass"), (5, "warn")])
def test_an_https_receiver_gets_its_certificates_expiry(days_left, result, webhookd_factory, tmp_path):
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    now = datetime.datetime.now(datetime.UTC)
    not_after = now + datetime.timedelta(days=days_left, hours=12)
    receiver = TlsReceiver(authority.issue_cert(HOST, not_before=now - datetime.timedelta(days=1),
                                                not_after=not_after)).start()
    sitecustomize.FAKE_DNS[HOST] = ["127.0.0.1"]
    try:
        hub = webhookd_factory(delivery__ca_file=str(tmp_path / "ca.pem"))
        partner = hub.register(f"https://{HOST}:{receiver.port}/in", ["payment.success"])
        tls = by_name(run_check(hub, partner["partner_id"]))["https"]
        assert tls["result"] == result, tls
        assert f"{not_after:%Y-%m-%d}" in tls["detail"] and f"{days_left} days" in tls["detail"]
        if result == "warn":
            assert "Renew the certificate" in tls["fix"]
        assert receiver.server_names and set(receiver.server_names) == {HOST}
    finally:
        receiver.stop()
        sitecustomize.FAKE_DNS.clear()


def test_a_plain_http_url_on_another_host_gets_the_https_warning(webhookd_factory, receiver_factory):
    hub = webhookd_factory()
    receiver = receiver_factory()
    sitecustomize.FAKE_DNS[HOST] = ["127.0.0.1"]
    try:
        partner = hub.register(f"http://{HOST}:{receiver.server.port}/in", ["payment.success"])
        found = by_name(run_check(hub, partner["partner_id"], lang="es"))["https"]
        assert found["result"] == "warn" and "sin cifrar" in found["detail"] and "https://" in found["fix"]
    finally:
        sitecustomize.FAKE_DNS.clear()


def test_a_check_obeys_the_address_rule_of_deliveries(webhookd_factory, receiver_factory):
    """Registered while its name pointed at a public address, the partner's host now resolves to
    127.0.0.1 (DNS rebinding): the check, like a delivery, refuses to connect there."""
    hub = webhookd_factory(security__allow_private_targets=False)
    inside = receiver_factory()
    sitecustomize.FAKE_DNS[HOST] = ["93.184.216.34"]
    try:
        partner = hub.register(f"http://{HOST}:{inside.server.port}/webhooks/events", ["payment.success"])
        sitecustomize.FAKE_DNS[HOST] = ["127.0.0.1"]
        report = run_check(hub, partner["partner_id"])
    finally:
        sitecustomize.FAKE_DNS.clear()
    assert [c["name"] for c in report["checks"]] == ["accepts_signed", "https"]
    refused = report["checks"][0]
    assert refused["result"] == "fail" and "non-public address 127.0.0.1" in refused["detail"], refused
    assert "public addresses only" in refused["fix"] and "section 1" in refused["fix"]
    assert inside.received == []


def test_checks_are_rate_limited_per_partner_and_only_for_the_admin_or_that_partner(webhookd_factory,
                                                                                    receiver_factory):
    clock = ShiftedClock(frozen=True)
    hub = webhookd_factory(clock=clock)
    receiver = receiver_factory()
    one = hub.register(receiver.url, ["payment.success"], name="One")
    two = hub.register(receiver.url, ["payment.success"], name="Two")
    path = f"/partners/{one['partner_id']}/check"
    assert hub.http.post(path).status_code == 401
    assert hub.http.post(path, headers=bearer(two["api_key"])).status_code == 404    # another partner's id
    bad = hub.http.post(path, headers=hub.admin, params={"lang": "fr"})
    assert bad.status_code == 422 and bad.json()["error"]["message"].startswith("'lang'")
    spanish = hub.http.post(path, headers={**hub.admin, "Accept-Language": "fr-CH, es;q=0.8, en;q=0.5"}, timeout=60)
    assert spanish.status_code == 200 and spanish.json()["lang"] == "es"
    for _ in range(2):
        assert hub.http.post(path, headers=bearer(one["api_key"]), timeout=60).status_code == 200
    limited = hub.http.post(path, headers=bearer(one["api_key"]))
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert limited.headers["Retry-After"] == "60"
    requests_sent = len(receiver.received)
    assert hub.http.post(path, headers=hub.admin).status_code == 429     # per partner, whoever asks
    assert len(receiver.received) == requests_sent                       # nothing was sent for them
    assert hub.http.post(f"/partners/{two['partner_id']}/check", headers=hub.admin, timeout=60).status_code == 200
    clock.advance(60)
    assert hub.http.post(path, headers=hub.admin, timeout=60).status_code == 200


def test_webhookd_check_prints_the_report_and_exits_1_on_a_failure(serve_factory, receiver_factory):
    serve = serve_factory()
    anything = receiver_factory()
    created = httpx.post(serve.url + "/partners/register", headers=ADMIN, timeout=10,
                         json={"partner_name": "CLI", "webhook_url": anything.url, "events": ["payment.success"]})
    partner_id = created.json()["partner_id"]
    env = {**serve.env, "WEBHOOKD_SERVER_PORT": str(serve.port)}   # the operator commands find this server
    done = webhookd_cli(env, "check", partner_id)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL  rejects_bad_signature" in done.stdout and "does not verify signatures" in done.stdout
    assert "PASS  accepts_signed" in done.stdout
    done = webhookd_cli(env, "check", partner_id, "--lang", "es", "--json")
    assert done.returncode == 1 and '"lang": "es"' in done.stdout and "no verifica las firmas" in done.stdout


def test_the_portals_button_shows_the_report_in_both_languages(browser_ready, webhookd_factory, receiver_factory,
                                                              tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from conftest import CHROMIUM, CHROMIUM_ARGS

    hub = webhookd_factory()
    anything = receiver_factory()
    partner = hub.register(anything.url, ["payment.success"], name="Andes Trails")
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400}, locale="en-US")
            page.set_default_timeout(20_000)
            expect.set_options(timeout=20_000)
            page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            tid = page.get_by_test_id
            page.goto(hub.url + "/portal")
            tid("key-input").fill(partner["api_key"])
            tid("key-submit").click()
            expect(tid("check")).to_have_text("Check my endpoint")
            expect(tid("check-report")).to_be_hidden()
            tid("check").click()
            items = tid("check-item")
            expect(items).to_have_count(len(CHECKS))
            bad = page.locator('[data-check="rejects_bad_signature"]')
            expect(bad.get_by_test_id("check-result")).to_have_text("fail")
            expect(bad.get_by_test_id("check-detail")).to_contain_text("does not verify signatures")
            expect(bad.get_by_test_id("check-fix")).to_contain_text("Fix: Compute the HMAC-SHA256 of the raw body")
            expect(tid("check-overall")).to_have_text("fail")
            expect(page.locator('[data-check="accepts_signed"]').get_by_test_id("check-fix")).to_have_count(0)
            page.screenshot(path=tmp_path / "portal-check.png", full_page=True)

            tid("lang-es").click()
            expect(tid("check")).to_have_text("Comprobar mi endpoint")
            tid("check").click()
            expect(bad.get_by_test_id("check-detail")).to_contain_text("no verifica las firmas")
            expect(bad.get_by_test_id("check-result")).to_have_text("fallo")
            expect(bad.get_by_test_id("check-fix")).to_contain_text("Solución: Calcula el HMAC-SHA256 del cuerpo crudo")
            expect(page.locator('[data-check="accepts_signed"]').get_by_test_id("check-result")).to_have_text("correcto")
            page.screenshot(path=tmp_path / "portal-check-es.png", full_page=True)
            print(f"screenshots: {tmp_path / 'portal-check.png'} {tmp_path / 'portal-check-es.png'}")
            assert errors == []
        finally:
            browser.close()
    assert len(anything.received) == 2 * PROBES

"""Portal links (portal_links.py, ``POST /partners/{id}/portal-link``): the API on both engines, and
a link opened in real headless Chromium as the partner it names, read-only or not, expired,
and revoked by a key reissue."""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import urlsplit

from test_portal import EXPECTED_CONSOLE, TIMEOUT_MS, catalog_missing

from conftest import CHROMIUM, CHROMIUM_ARGS, bearer, wait_for
from payloads import PAYMENT_SUCCESS


def mint(hub, partner_id: str, **fields) -> dict:
    r = hub.http.post(f"/partners/{partner_id}/portal-link", headers=hub.admin, json=fields)
    assert r.status_code == 201, r.text
    return r.json()


def token_of(link: dict) -> str:
    fragment = urlsplit(link["url"]).fragment
    assert fragment.startswith("token=ptl_")
    return fragment.removeprefix("token=")


def test_a_link_is_its_partner_alone_until_it_expires_or_the_key_is_reissued(hub_factory, receiver_factory,
                                                                           caplog):
    caplog.set_level(logging.DEBUG)
    offset = [0.0]
    hub = hub_factory(clock=lambda: time.time() + offset[0])
    mine, theirs = receiver_factory(), receiver_factory()
    partner = hub.register(mine.url, ["payment.success"], name="Andes Trails")
    other = hub.register(theirs.url, ["payment.success"], name="Other Tours")
    pid = partner["partner_id"]

    link = mint(hub, pid)                                       # defaults: an hour, may write
    assert link["url"].startswith(hub.url + "/portal#token=ptl_") and link["read_only"] is False
    assert link["expires_at"] - int(time.time() + offset[0]) in range(3595, 3601)
    token = token_of(link)
    me = hub.http.get("/me", headers=bearer(token))
    assert me.status_code == 200 and me.json()["partner_id"] == pid
    assert hub.http.get(f"/partners/{other['partner_id']}", headers=bearer(token)).status_code == 404
    assert hub.http.get("/partners", headers=bearer(token)).status_code == 403
    assert hub.http.post(f"/partners/{pid}/test", headers=bearer(token)).status_code == 202

    # Read-only: reads, never writes.
    read_only = token_of(mint(hub, pid, lifetime_s=600, read_only=True))
    assert hub.http.get("/deliveries", headers=bearer(read_only)).status_code == 200
    for method, path, body in [("POST", f"/partners/{pid}/test", None), ("POST", f"/partners/{pid}/rotate-secret", None),
                               ("POST", f"/partners/{pid}/api-key", None), ("POST", f"/partners/{pid}/check", None),
                               ("PATCH", f"/partners/{pid}", {"contact_email": "x@example.com"})]:
        refused = hub.http.request(method, path, headers=bearer(read_only), json=body)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "read_only_link", (path, refused.text)
        assert "read-only" in refused.json()["error"]["message"]
    # Altered: the read-only flag, the partner or the expiry changed, the MAC no longer matches.
    fields, mac = read_only.rsplit(".", 1)
    for forged in [read_only.replace(".1.", ".0."), fields.replace(pid, other["partner_id"]) + "." + mac,
                   fields.replace(fields.split(".")[1], "9999999999") + "." + mac]:
        answer = hub.http.get("/me", headers=bearer(forged))
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "portal_link_invalid", forged

    # Expired: the clock moves past its lifetime.
    short = token_of(mint(hub, pid, lifetime_s=60))
    offset[0] += 61
    expired = hub.http.get("/me", headers=bearer(short))
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "portal_link_expired"
    assert "expired" in expired.json()["error"]["message"]
    assert hub.http.get("/me", headers=bearer(token)).status_code == 200    # the hour-long one still works

    # A key reissue revokes every link minted before it.
    assert hub.http.post(f"/partners/{pid}/api-key", headers=hub.admin).status_code == 200
    revoked = hub.http.get("/me", headers=bearer(token))
    assert revoked.status_code == 401 and revoked.json()["error"]["code"] == "portal_link_invalid"
    assert hub.http.get("/me", headers=bearer(token_of(mint(hub, pid)))).status_code == 200  # a new one works

    # Audited when minted, without the token; no token in any log line.
    audit = hub.http.get("/audit", headers=hub.admin, params={"action": "partner.portal_link_created"})
    entries = audit.json()["items"]
    assert len(entries) == 4 and {e["partner_id"] for e in entries} == {pid}
    assert {(e["changes"]["lifetime_s"], e["changes"]["read_only"]) for e in entries} == {
        (3600, False), (600, True), (60, False)}
    tokens = [token, read_only, short]
    assert not any(t in audit.text for t in tokens)
    assert not any(t.split(".")[-1] in record.getMessage() for record in caplog.records for t in tokens)


def test_a_link_opens_the_portal_in_chromium_as_its_partner_read_only_expired_and_revoked(
        browser_ready, webhookd_factory, receiver_factory, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    offset = [0.0]
    hub = webhookd_factory(clock=lambda: time.time() + offset[0])
    mine, theirs = receiver_factory(), receiver_factory()
    partner = hub.register(mine.url, ["payment.success"], name="Andes Trails")
    other = hub.register(theirs.url, ["payment.success"], name="Other Tours")
    pid = partner["partner_id"]
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 2)
    theirs_id = hub.deliveries(partner_id=other["partner_id"])[0]["delivery_id"]
    link, read_only = mint(hub, pid, lifetime_s=600), mint(hub, pid, lifetime_s=600, read_only=True)
    short = mint(hub, pid, lifetime_s=60)

    errors: list[str] = []
    sent_urls: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            def page_at(width: int, height: int, locale: str = "en-US"):
                page = browser.new_context(viewport={"width": width, "height": height}, locale=locale).new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.on("console", lambda m: m.type == "error" and not EXPECTED_CONSOLE.search(m.text)
                        and not catalog_missing(m) and errors.append(f"console: {m.text}"))
                page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
                page.on("request", lambda r: sent_urls.append(r.url))
                return page

            expect.set_options(timeout=TIMEOUT_MS)
            # The link opens the portal as the partner, and its token leaves the address bar.
            page = page_at(1280, 800)
            page.goto(link["url"])
            tid = page.get_by_test_id
            expect(tid("partner-name")).to_have_text("Andes Trails")
            expect(tid("delivery-row")).to_have_count(1)
            assert page.locator(f'[data-delivery-id="{theirs_id}"]').count() == 0
            assert "token" not in page.url and page.url == hub.url + "/portal"
            expect(tid("read-only")).to_be_hidden()
            expect(tid("send-test")).to_be_enabled()
            page.screenshot(path=tmp_path / "portal-link-1280x800.png")

            # Read-only, on a phone: everything shows, nothing can be changed.
            phone = page_at(390, 844)
            phone.goto(read_only["url"])
            expect(phone.get_by_test_id("partner-name")).to_have_text("Andes Trails")
            expect(phone.get_by_test_id("read-only")).to_contain_text("Read-only link")
            for button in ("send-test", "rotate", "check"):
                expect(phone.get_by_test_id(button)).to_be_disabled()
            phone.screenshot(path=tmp_path / "portal-link-390x844.png", full_page=True)

            # Expired, in Spanish: the sign-in form says why.
            offset[0] += 61
            spanish = page_at(1280, 800, locale="es-ES")
            spanish.goto(short["url"])
            expect(spanish.get_by_test_id("login-error")).to_contain_text("ha caducado")

            # Revoked by a key reissue: the open page is signed out at its next refresh, in English.
            assert hub.http.post(f"/partners/{pid}/api-key", headers=hub.admin).status_code == 200
            page.reload()
            expect(tid("login-error")).to_contain_text("not valid")
            expect(tid("login-error")).to_contain_text("reissued")
            print(f"screenshots: {tmp_path / 'portal-link-1280x800.png'} {tmp_path / 'portal-link-390x844.png'}")
            assert errors == []
        finally:
            browser.close()
    # The fragment never reached the server: no request the pages made carried a token.
    assert sent_urls and not any("ptl_" in url for url in sent_urls)


def test_the_command_line_mints_links_and_erases_events(serve_factory):
    import httpx
    from test_cli import _ok, _run

    serve = serve_factory()
    pid = json.loads(_ok(_run(serve, "partners", "add", "--name", "CLI Tours", "--url", "http://127.0.0.1:9/x",
                              "--events", "payment.success", "--json")))["partner_id"]
    link = json.loads(_ok(_run(serve, "partners", "portal-link", pid, "--lifetime", "120", "--read-only", "--json")))
    assert link["read_only"] is True and link["url"].startswith(serve.url + "/portal#token=ptl_")
    token = token_of(link)
    assert httpx.get(serve.url + "/me", headers=bearer(token)).json()["partner_id"] == pid
    assert httpx.post(f"{serve.url}/partners/{pid}/test", headers=bearer(token)).status_code == 403
    too_short = _run(serve, "partners", "portal-link", pid, "--lifetime", "30")
    assert too_short.returncode == 1 and "lifetime_s" in too_short.stderr

    _ok(_run(serve, "partners", "pause", pid))                     # its delivery waits, pending
    data = json.dumps({k: v for k, v in PAYMENT_SUCCESS.items() if k != "event"})
    event_id = json.loads(_ok(_run(serve, "publish", "payment.success", "--data", data, "--json")))["event_id"]
    unconfirmed = _run(serve, "events", "erase", event_id)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    erased = json.loads(_ok(_run(serve, "events", "erase", event_id, "--yes", "--json")))
    assert erased["event_id"] == event_id and erased["cancelled_deliveries"] == 1

"""The partner portal (GET /portal) in real headless Chromium against a live webhookd: a partner
signs in with its API key, sees its own deliveries and nobody else's, retries a failed one and
watches it turn delivered, sends a test event, rotates its secret, checks a signature in the
page, and reads it all in Spanish; its channels and filter are shown read-only (the admin's to set),
and suspended it can only read; the admin token is refused."""

from __future__ import annotations

import hashlib
import hmac
import re

from conftest import ADMIN_TOKEN, CHROMIUM, CHROMIUM_ARGS, bearer, wait_for
from payloads import PAYMENT_SUCCESS

TIMEOUT_MS = 10_000
EXPECTED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a status of 40[13]")


def catalog_missing(message) -> bool:
    """A 404 from GET /event-types: a webhookd without the catalog route (the page leaves it out)."""
    return "status of 404" in message.text and message.location.get("url", "").endswith("/event-types")


def test_a_partner_signs_in_sees_only_its_own_retries_rotates_and_checks_a_signature(
        browser_ready, webhookd_factory, receiver_factory, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    hub = webhookd_factory()
    mine, theirs = receiver_factory(), receiver_factory()
    mine.script = [(500, 0.0)] * 3                      # the first delivery fails three times
    partner = hub.register(mine.url, ["payment.success"], name="Andes Trails")
    other = hub.register(theirs.url, ["payment.success"], name="Other Tours")
    audience = hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin, json={"channels": ["tour_1"]})
    assert audience.status_code == 200
    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    failed = wait_for(lambda: hub.deliveries(partner_id=partner["partner_id"], state="failed"))[0]
    wait_for(lambda: hub.deliveries(partner_id=other["partner_id"], state="delivered"))
    theirs_id = hub.deliveries(partner_id=other["partner_id"])[0]["delivery_id"]

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000}, locale="en-US")
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.on("console", lambda m: m.type == "error" and not EXPECTED_CONSOLE.search(m.text)
                    and not catalog_missing(m) and errors.append(f"console: {m.text}"))
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            page.on("dialog", lambda dialog: dialog.accept())
            tid = page.get_by_test_id
            page.goto(hub.url + "/portal")

            # The admin token is not a partner's key.
            tid("key-input").fill(ADMIN_TOKEN)
            tid("key-submit").click()
            expect(tid("login-error")).to_contain_text("admin token")
            tid("key-input").fill(partner["api_key"])
            tid("key-submit").click()
            expect(tid("partner-name")).to_have_text("Andes Trails")
            expect(tid("meta-url")).to_have_text(mine.url)
            expect(tid("meta-channels")).to_have_text("tour_1 (set by the operator)")
            expect(tid("meta-filter")).to_have_text("none (set by the operator)")
            assert tid("endpoint").locator("input, select, textarea").count() == 0   # nothing to edit them with
            expect(tid("read-only")).to_be_hidden()

            # Its deliveries only: its failed one, never the other partner's.
            rows = tid("delivery-row")
            expect(rows).to_have_count(1)
            expect(rows.first).to_have_attribute("data-delivery-id", failed["delivery_id"])
            assert page.locator(f'[data-delivery-id="{theirs_id}"]').count() == 0
            rows.first.click()
            expect(tid("attempt")).to_have_count(3)
            expect(tid("attempt-detail").first).to_have_text("the partner answered 500")
            tid("retry").click()
            expect(tid("detail-state")).to_have_text("delivered")
            expect(tid("attempt")).to_have_count(4)
            expect(rows.first.get_by_test_id("delivery-state")).to_have_text("delivered")
            assert event_id in mine.event_ids[3:]

            tid("send-test").click()
            expect(tid("endpoint-notice")).to_contain_text("webhook.test")
            wait_for(lambda: any(r.headers["x-webhook-event"] == "webhook.test" for r in mine.received))

            tid("rotate").click()
            new_secret = tid("new-shared-secret")
            expect(new_secret).to_contain_text("sk_live_")
            rotated = new_secret.inner_text()
            assert rotated != partner["shared_secret"]
            page.screenshot(path=tmp_path / "portal.png", full_page=True)

            # Check a signature in the page: the right one matches, a wrong one does not.
            body = '{"event":"payment.success","amount":150.0}'
            tid("v-secret").fill(rotated)
            tid("v-body").fill(body)
            tid("v-signature").fill(hmac.new(rotated.encode(), body.encode(), hashlib.sha256).hexdigest())
            tid("v-check").click()
            expect(tid("v-result")).to_have_text("Signature matches.")
            tid("v-signature").fill("00" * 32)
            tid("v-check").click()
            expect(tid("v-result")).to_contain_text("does NOT match")

            # In Spanish, and it stays Spanish on the next visit; the note of the last refresh too, at once.
            expect(tid("live-note")).to_contain_text("Updated at")
            tid("lang-es").click()
            expect(tid("send-test")).to_have_text("Enviar un evento de prueba")
            assert tid("live-note").inner_text().startswith("Actualizado a las"), tid("live-note").inner_text()
            page.reload()
            expect(tid("send-test")).to_have_text("Enviar un evento de prueba")
            expect(tid("meta-channels")).to_have_text("tour_1 (lo fija el operador)")
            page.screenshot(path=tmp_path / "portal-es.png", full_page=True)

            # Suspended by the admin: the page says it can only read, and offers no write.
            suspended = hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin,
                                       json={"status": "suspended", "reason": "chargebacks under review"})
            assert suspended.status_code == 200
            page.reload()
            expect(tid("read-only")).to_contain_text("Contacta al operador")
            expect(tid("meta-why")).to_have_text("chargebacks under review")
            expect(tid("send-test")).to_be_disabled()
            expect(tid("rotate")).to_be_disabled()
            rows.first.click()
            expect(tid("detail-state")).to_have_text("entregada")
            expect(tid("retry")).to_be_hidden()
            print(f"screenshots: {tmp_path / 'portal.png'} {tmp_path / 'portal-es.png'}")
            assert errors == []
        finally:
            browser.close()
    assert hub.http.get("/me", headers=bearer(partner["api_key"])).status_code == 200
    me_admin = hub.http.get("/me", headers=hub.admin)
    assert me_admin.status_code == 403 and me_admin.json()["error"]["code"] == "not_a_partner"

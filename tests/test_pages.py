"""The dashboard and the partner portal on a laptop (1280×800) and a phone (390×844), in real
headless Chromium against a live webhookd with real deliveries: no page scrolls sideways, every
table column is on screen or in a box that scrolls sideways itself, the story of a delivery keeps
Retry in view, the Spanish portal has no English state word left, and the portal's list follows a
delivery as it changes state without a reload. One browser for the module."""

from __future__ import annotations

import json
import re

from conftest import ADMIN_TOKEN, wait_for
from payloads import BOOKING_CONFIRMED, PAYMENT_SUCCESS

TIMEOUT_MS = 10_000
LAPTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
ENGLISH_STATE_WORDS = re.compile(r"\b(active|paused|pending|delivered|failed|open|half_open|concurrent|fifo|answered)\b", re.I)

# Every visible column header: on screen, or inside a box that scrolls sideways (which itself is).
FIT = """() => {
  const unreachable = [];
  let checked = 0;
  for (const th of document.querySelectorAll("th")) {
    if (!th.checkVisibility()) continue;
    checked++;
    let r = th.getBoundingClientRect(), ok = true;
    for (let a = th.parentElement; a && a !== document.documentElement; a = a.parentElement) {
      const cs = getComputedStyle(a);
      if (cs.overflowX === "visible") continue;
      const box = a.getBoundingClientRect();
      if ((cs.overflowX === "auto" || cs.overflowX === "scroll") && a.scrollWidth > a.clientWidth) { r = box; continue; }
      if (r.left < box.left - 1 || r.right > box.right + 1) { ok = false; break; }
    }
    if (!ok || r.left < -1 || r.right > innerWidth + 1) unreachable.push(th.textContent.trim());
  }
  return {page: document.scrollingElement.scrollWidth, inner: innerWidth, checked, unreachable};
}"""

# The text a reader sees, without what is in code style (the API's own values).
VISIBLE_TEXT = """() => {
  const parts = [];
  const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walk.nextNode(); n; n = walk.nextNode()) {
    const p = n.parentElement;
    if (p && !p.closest("code, script, style, option") && p.checkVisibility()) parts.push(n.textContent);
  }
  for (const o of document.querySelectorAll("select option")) parts.push(o.textContent);
  return parts.join(" ");
}"""


def catalog_missing(message) -> bool:
    """The browser's report of a 404 from GET /event-types (a webhookd without the catalog route:
    the portal then leaves the section out); every other console error counts."""
    return "status of 404" in message.text and message.location.get("url", "").endswith("/event-types")




def open_page(browser, url: str, errors: list[str], locale: str = "en-US"):
    page = browser.new_context(viewport=LAPTOP, locale=locale).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", lambda m: m.type == "error" and not catalog_missing(m) and errors.append(f"console: {m.text}"))
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.goto(url)
    return page


def assert_fits(page, size: dict, columns: int, shot) -> None:
    """At ``size``: the page is no wider than the window, and all ``columns`` headers are reachable."""
    page.set_viewport_size(size)
    page.wait_for_function("() => document.scrollingElement.scrollWidth <= innerWidth")
    fit = page.evaluate(FIT)
    assert fit["page"] <= fit["inner"], fit
    assert fit["checked"] == columns and fit["unreachable"] == [], fit
    page.screenshot(path=shot, full_page=True)


def sign_in_portal(page, api_key: str) -> None:
    page.get_by_test_id("key-input").fill(api_key)
    page.get_by_test_id("key-submit").click()


def test_dashboard_fits_a_laptop_and_a_phone_with_a_story_open(browser, webhookd_factory, receiver_factory, tmp_path):
    from playwright.sync_api import expect

    # A failing partner opens its circuit (three failures) and keeps it open for a minute.
    hub = webhookd_factory(delivery__breaker_threshold=3, delivery__breaker_span_s=0.01,
                           delivery__breaker_cooldown_s=60.0, delivery__breaker_cooldown_max_s=60.0)
    errors: list[str] = []
    page = open_page(browser, hub.url + "/dashboard", errors)
    tid = page.get_by_test_id
    tid("token-input").fill(ADMIN_TOKEN)
    tid("token-submit").click()

    # Nothing yet: each empty box says what to do next.
    expect(tid("partners-empty")).to_contain_text("register one with POST /partners/register or webhookd partners add")
    expect(tid("deliveries-empty")).to_contain_text("No deliveries yet — publish an event with POST /events")

    healthy, failing = receiver_factory(), receiver_factory(default=(500, 0))
    hub.register(healthy.url, ["payment.success", "booking.confirmed"], name="Andes Trails Expediciones Sostenibles S.A.")
    hub.register(failing.url, ["payment.success"], name="Broken Bus")
    assert hub.publish(PAYMENT_SUCCESS).status_code == 202
    for i in range(4):
        assert hub.publish({**BOOKING_CONFIRMED, "booking_id": f"res_{i}"}).status_code == 202
    (failed,) = wait_for(lambda: hub.deliveries(state="failed"), timeout=15)
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 5)

    # The page follows by itself; a filter that matches nothing offers to clear itself.
    expect(tid("partner-row")).to_have_count(2)
    expect(tid("partner-circuit")).to_contain_text("circuit open · probe in ")
    tid("filter-state").select_option("expired")
    expect(tid("deliveries-empty")).to_have_text("No deliveries match these filters — clear the filters.")
    tid("empty-clear").click()
    expect(tid("delivery-row")).to_have_count(6)

    # The failed delivery's story: signatures and signed strings folded until opened.
    page.locator(f'[data-delivery-id="{failed["delivery_id"]}"]').click()
    detail = tid("delivery-detail")
    expect(detail.get_by_test_id("attempt")).to_have_count(3)
    detail.get_by_test_id("story").locator("summary").first.click()
    expect(detail.get_by_test_id("story-step")).to_have_text(["queued", "attempt", "attempt", "attempt", "failed"])
    expect(detail.get_by_test_id("story-signed")).to_have_count(6)
    expect(detail.get_by_test_id("story-signed").first).to_be_hidden()
    expect(detail.get_by_test_id("story-body")).to_be_hidden()
    detail.screenshot(path=tmp_path / "dashboard-story-folded.png")
    for summary in detail.get_by_test_id("story").locator("details summary").all():
        summary.click()
    expect(detail.get_by_test_id("story-signed").first).to_be_visible()

    for size, name in ((LAPTOP, "laptop"), (PHONE, "phone")):
        assert_fits(page, size, 11, tmp_path / f"dashboard-{name}.png")
        # Read to the end of the story: Retry is still on screen.
        detail.get_by_test_id("story-steps").locator("li").last.scroll_into_view_if_needed()
        box = detail.get_by_test_id("retry").bounding_box()
        assert box and 0 <= box["y"] and box["y"] + box["height"] <= size["height"], (name, box)
        assert box["x"] >= 0 and box["x"] + box["width"] <= size["width"], (name, box)
    print(f"screenshots: {tmp_path}")
    assert errors == []


def test_portal_fits_and_speaks_spanish_throughout(browser, webhookd_factory, receiver_factory, tmp_path):
    from playwright.sync_api import expect

    hub = webhookd_factory(delivery__breaker_threshold=3, delivery__breaker_span_s=0.01,
                           delivery__breaker_cooldown_s=60.0, delivery__breaker_cooldown_max_s=60.0)
    mine = receiver_factory(default=(500, 0))
    mine.script = [(200, 0.0)]                                  # the first delivery succeeds, the rest fail
    partner = hub.register(mine.url, ["payment.success", "booking.confirmed"], name="Andes Trails")
    pid = partner["partner_id"]
    hub.publish(BOOKING_CONFIRMED)
    wait_for(lambda: hub.deliveries(partner_id=pid, state="delivered"))
    hub.publish(PAYMENT_SUCCESS)
    (failed,) = wait_for(lambda: hub.deliveries(partner_id=pid, state="failed"))
    hub.publish({**BOOKING_CONFIRMED, "booking_id": "res_held"})   # held: the circuit is open for a minute
    catalog = hub.http.get("/event-types", headers=hub.admin)
    assert catalog.status_code in (200, 404)

    errors: list[str] = []
    for locale, lang in (("en-US", "en"), ("es-ES", "es")):
        page = open_page(browser, hub.url + "/portal", errors, locale=locale)
        tid = page.get_by_test_id
        sign_in_portal(page, partner["api_key"])
        expect(tid("delivery-row")).to_have_count(3)
        page.locator(f'[data-delivery-id="{failed["delivery_id"]}"]').click()
        expect(tid("attempt")).to_have_count(3)
        for size, name in ((PHONE, "phone"), (LAPTOP, "laptop")):
            assert_fits(page, size, 4, tmp_path / f"portal-{lang}-{name}.png")
        text = page.evaluate(VISIBLE_TEXT)
        if lang == "en":
            expect(tid("partner-circuit")).to_contain_text("paused after repeated failures; next try in ")
            expect(tid("attempt-detail").first).to_have_text("the partner answered 500")
            assert re.search(r"\d{1,2}:\d{2}:\d{2}\s?[AP]M", text), "US English dates come from the browser's locale"
        else:
            # Chosen by the browser's language; every state word in Spanish, the API's values in code.
            expect(tid("send-test")).to_have_text("Enviar un evento de prueba")
            expect(tid("partner-circuit")).to_contain_text("en pausa tras fallos repetidos; próximo intento dentro de ")
            expect(tid("partner-status")).to_have_text("activo")
            expect(tid("meta-ordering")).to_have_text("en paralelo, sin orden fijo concurrent")
            expect(tid("detail-state")).to_have_text("fallida")
            expect(tid("attempt-detail").first).to_have_text("el socio respondió 500")
            expect(tid("delivery-state")).to_have_text(["pendiente", "fallida", "entregada"])
            assert tid("filter-state").locator("option").all_inner_texts() == [
                "Todos los estados", "pendiente", "entregada", "fallida", "caducada", "cancelada"]
            assert not ENGLISH_STATE_WORDS.findall(text), ENGLISH_STATE_WORDS.findall(text)
            assert not re.search(r"\b[AP]M\b", text)
        # The event types the partner receives, each with its example, when this webhookd lists them.
        if catalog.status_code == 200:
            shown = [e for e in catalog.json()["event_types"]
                     if e["type"] in partner["events_subscribed"] or e["type"] == "webhook.test"]
            expect(tid("event-type")).to_have_count(len(shown))
            examples = [json.loads(text) for text in tid("event-example").all_inner_texts()]
            assert examples == [e["example"] for e in shown]
        else:
            expect(tid("event-types")).to_be_hidden()
        page.context.close()
    print(f"screenshots: {tmp_path}")
    assert errors == []


def test_portal_list_and_detail_follow_a_delivery_without_a_reload(browser, webhookd_factory, receiver_factory):
    from playwright.sync_api import expect

    hub = webhookd_factory()
    mine = receiver_factory(default=(500, 0))
    partner = hub.register(mine.url, ["payment.success"], name="Andes Trails")
    errors: list[str] = []
    page = open_page(browser, hub.url + "/portal", errors)
    tid = page.get_by_test_id
    sign_in_portal(page, partner["api_key"])

    # Empty: it says how to get a first delivery; a state filter that matches nothing offers to drop it.
    expect(tid("no-deliveries")).to_contain_text("send a test event with the button above")
    tid("filter-state").select_option("failed")
    expect(tid("no-deliveries")).to_have_text("No deliveries in this state — show all states")
    tid("show-all").click()
    expect(tid("no-deliveries")).to_contain_text("send a test event")
    page.evaluate("window.__sameDocument = true")

    # A delivery fails three times: the list shows it, then its end, by itself.
    hub.publish(PAYMENT_SUCCESS)
    row = tid("delivery-row")
    expect(row).to_have_count(1)
    expect(row.get_by_test_id("delivery-state")).to_have_text("failed")
    expect(row.get_by_test_id("delivery-attempts")).to_have_text("3")
    row.click()
    expect(tid("detail-state")).to_have_text("failed")

    # The operator retries it elsewhere and the partner is up again: row and detail turn delivered together.
    mine.default = (200, 0)
    delivery_id = row.get_attribute("data-delivery-id")
    assert hub.http.post(f"/deliveries/{delivery_id}/retry", headers=hub.admin).status_code == 202
    expect(tid("detail-state")).to_have_text("delivered")
    expect(row.get_by_test_id("delivery-state")).to_have_text("delivered")
    expect(row.get_by_test_id("delivery-attempts")).to_have_text("4")
    expect(tid("attempt")).to_have_count(4)
    assert page.evaluate("window.__sameDocument") is True        # no reload
    tid("refresh").click()
    expect(tid("live-note")).to_contain_text("Updated at")
    assert errors == []

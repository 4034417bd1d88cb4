"""Time windows in the pages (and a trace id in the dashboard's story), in real headless Chromium against a live webhookd: the dashboard's
From/to (the browser's own time zone, sent as UTC) and the portal's From/before days (UTC), in
English and Spanish, each narrowing the deliveries list to the rows of its window. Deliveries are
written through the store at controlled times (three days ago, yesterday) beside one published now.
Screenshots at 1280×800 and 390×844."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from test_pages import LAPTOP, PHONE, TIMEOUT_MS, sign_in_portal
from test_windows import id_at

from conftest import ADMIN_TOKEN, wait_for
from models import NewEvent
from payloads import PAYMENT_SUCCESS

DAY_S = 86400
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"




def _three_days(hub, receiver) -> tuple[dict, float]:
    """A partner with a delivery at noon UTC three days ago, one at noon yesterday, one now; and
    today's midnight UTC."""
    partner = hub.register(receiver.url, ["payment.success"], name="Andes Trails")
    midnight = time.time() // DAY_S * DAY_S
    for t in (midnight - 3 * DAY_S + 12 * 3600, midnight - DAY_S + 12 * 3600):
        hub.store.publish(NewEvent(id=id_at("evt_", t), type="payment.success", body=b'{"event":"payment.success"}'),
                          now=t, max_attempts=3, new_delivery_id=lambda t=t: id_at("dlv_", t))
    assert hub.publish(PAYMENT_SUCCESS, headers={"traceparent": TRACEPARENT}).status_code == 202
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 3, timeout=60)
    return partner, midnight


def _local(ts: float, zone: str) -> str:
    """``ts`` as a datetime-local input holds it in ``zone``."""
    return datetime.fromtimestamp(ts, ZoneInfo(zone)).strftime("%Y-%m-%dT%H:%M")


def _day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _page(chromium, url, errors, locale="en-US", zone="UTC"):
    page = chromium.new_context(viewport=LAPTOP, locale=locale, timezone_id=zone).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", lambda m: m.type == "error" and "event-types" not in str(m.location)
            and errors.append(f"console: {m.text}"))
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.goto(url)
    return page


def _shots(page, tmp_path, name):
    for label, size in (("laptop", LAPTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        page.wait_for_function("() => document.scrollingElement.scrollWidth <= innerWidth")
        page.screenshot(path=tmp_path / f"{name}-{label}.png", full_page=True)
    page.set_viewport_size(LAPTOP)


def test_the_dashboards_window_narrows_the_list_in_the_browsers_time_zone(browser, webhookd_factory,
                                                                          receiver_factory, tmp_path):
    from playwright.sync_api import expect

    hub = webhookd_factory()
    _, midnight = _three_days(hub, receiver_factory())
    errors: list[str] = []
    zone = "America/Bogota"   # UTC-5: the page must turn its local times into UTC
    page = _page(browser, hub.url + "/dashboard", errors, zone=zone)
    tid = page.get_by_test_id
    tid("token-input").fill(ADMIN_TOKEN)
    tid("token-submit").click()
    rows = tid("delivery-row")
    expect(rows).to_have_count(3)
    tid("filter-since").fill(_local(midnight - 2 * DAY_S, zone))       # from two days ago, 00:00 UTC
    expect(rows).to_have_count(2)                                       # yesterday's and today's
    tid("filter-until").fill(_local(midnight, zone))                    # ...before today, 00:00 UTC
    expect(rows).to_have_count(1)                                       # yesterday's
    expect(tid("filter-clear")).to_be_visible()
    _shots(page, tmp_path, "dashboard-window")
    tid("filter-since").fill(_local(midnight + 3600, zone))             # a window that ends before it starts
    expect(page.locator("#list-error")).to_contain_text("'until' must not be before 'since'")
    tid("filter-clear").click()
    expect(rows).to_have_count(3)
    rows.first.click()                                                  # today's, published with a traceparent
    tid("story").locator("summary").first.click()
    expect(tid("story-trace")).to_contain_text("4bf92f3577b34da6a3ce929d0e0e4736")
    assert errors == ["console: Failed to load resource: the server responded with a status of 422 "
                      "(Unprocessable Entity)"]  # the backwards window's, said above; nothing else
    print(f"screenshots: {tmp_path}")


def test_the_portals_window_of_days_in_english_and_spanish(browser, webhookd_factory, receiver_factory, tmp_path):
    from playwright.sync_api import expect

    hub = webhookd_factory()
    partner, midnight = _three_days(hub, receiver_factory())
    other = hub.register("http://127.0.0.1:9/other", ["payment.success"], name="Other")
    assert other["partner_id"] != partner["partner_id"]
    errors: list[str] = []
    for locale, lang, before in (("en-US", "en", "before"), ("es-ES", "es", "antes del")):
        page = _page(browser, hub.url + "/portal", errors, locale=locale)
        tid = page.get_by_test_id
        sign_in_portal(page, partner["api_key"])
        rows = tid("delivery-row")
        expect(rows).to_have_count(3)                                   # its own only (Other's is not here)
        expect(page.locator("html")).to_have_attribute("lang", lang)
        expect(page.locator("label.window").last).to_contain_text(before)
        tid("filter-since").fill(_day(midnight - 2 * DAY_S))
        expect(rows).to_have_count(2)
        tid("filter-until").fill(_day(midnight))
        expect(rows).to_have_count(1)
        _shots(page, tmp_path, f"portal-window-{lang}")
        tid("filter-since").fill(_day(midnight + DAY_S))                # after the end: said, not asked for
        expect(tid("window-error")).to_be_visible()
        expect(tid("window-error")).to_have_text("The end date must come after the start date." if lang == "en"
                                                 else "La fecha final debe ser posterior a la inicial.")
        tid("filter-since").fill(_day(midnight + 2 * DAY_S))
        tid("filter-until").fill(_day(midnight + 3 * DAY_S))            # a window with nothing in it
        expect(tid("window-error")).to_be_hidden()
        expect(tid("no-deliveries")).to_be_visible()
        tid("show-all").click()
        expect(rows).to_have_count(3)
        page.context.close()
    assert errors == []
    print(f"screenshots: {tmp_path}")

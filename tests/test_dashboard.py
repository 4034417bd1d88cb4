"""The dashboard (GET /dashboard) in real headless Chromium against a live webhookd.

Debian's ``chromium`` is driven by Playwright's Python package through ``executable_path``;
``scripts/ensure-browser.sh`` installs both when missing (never ``playwright install``: no
browser download). The test signs in, reads partners, counters and the chart, pages and filters
the deliveries, opens a failed delivery's attempts, retries it and watches it turn delivered.
"""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from conftest import ADMIN_TOKEN, CHROMIUM, CHROMIUM_ARGS, ROOT, wait_for
from payloads import BOOKING_CONFIRMED, PAYMENT_SUCCESS

TIMEOUT_MS = 10_000
# The browser reports the wrong-token sign-in's 401 as a failed resource load; nothing else may fail.
EXPECTED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a status of 401")


def _sha256(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


@pytest.mark.parametrize("name", ["dashboard.html", "portal.html"])
def test_page_is_static_and_its_policy_allows_only_its_own_inline_code(name):
    """Both pages (the operator's and the partners'): one inline script and one inline style, each
    allowed by its hash and nothing else; no markup built from strings."""
    html = (ROOT / "static" / name).read_text(encoding="utf-8")
    assert "innerHTML" not in html and "eval(" not in html and "http://" not in html.replace("http://www.w3.org", "")
    (style,) = re.findall(r"<style>(.*?)</style>", html, re.S)
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.S)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', html).group(1)
    assert f"script-src 'sha256-{_sha256(script)}'" in csp, f"update the script hash to sha256-{_sha256(script)}"
    assert f"style-src 'sha256-{_sha256(style)}'" in csp, f"update the style hash to sha256-{_sha256(style)}"
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


CHART_PIXELS = """() => {
  const c = document.querySelector('[data-testid=chart]');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let painted = 0, green = 0, red = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] === 0) continue;
    painted++;
    const [r, g, b] = [d[i], d[i + 1], d[i + 2]];
    if (g > r + 60 && g > b + 60) green++;
    if (r > g + 100 && r > b + 100) red++;
  }
  return {painted, green, red};
}"""


def _no_placeholder_words(page) -> None:
    text = page.inner_text("body")
    assert not re.search(r"\b(null|undefined|NaN|\[object Object\])\b", text), text


def test_dashboard_shows_a_failed_delivery_and_retries_it(browser_ready, webhookd_factory, receiver_factory,
                                                          tmp_path):
    from playwright.sync_api import expect, sync_playwright

    # The failing partner's three failed attempts open its circuit for a minute; the dashboard's
    # Retry probes at once all the same.
    hub = webhookd_factory(delivery__breaker_threshold=3, delivery__breaker_span_s=0.01,
                           delivery__breaker_cooldown_s=60.0, delivery__breaker_cooldown_max_s=60.0)

    healthy = receiver_factory()
    failing = receiver_factory(default=(500, 0))
    good = hub.register(healthy.url, ["payment.success", "booking.confirmed"], name="Andes Trails")
    # Markup in a name must show as text, never become an element.
    bad_name = 'Broken <img src=x onerror="window.__xss=1"> Bus'
    bad = hub.register(failing.url, ["payment.success"], name=bad_name)
    assert hub.publish(PAYMENT_SUCCESS).status_code == 202            # both partners
    for i in range(27):                                                # the healthy one: 28 in all
        assert hub.publish({**BOOKING_CONFIRMED, "booking_id": f"res_{i}"}).status_code == 202
    wait_for(lambda: len(hub.deliveries(state="delivered", limit="200")) == 28
             and len(hub.deliveries(state="failed")) == 1, timeout=15)
    (failed,) = hub.deliveries(state="failed")
    assert failed["partner_id"] == bad["partner_id"] and failed["attempt_count"] == 3
    assert len(failing.received) == 3
    failing.default = (200, 0)

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            expect.set_options(timeout=TIMEOUT_MS)
            page.on("console", lambda m: m.type == "error" and not EXPECTED_CONSOLE.search(m.text)
                    and errors.append(f"console: {m.text}"))
            page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
            tid = page.get_by_test_id
            page.goto(hub.url + "/dashboard")

            # Sign in: a wrong token is refused and asked again; the right one is kept for the tab.
            expect(tid("login")).to_be_visible()
            tid("token-input").fill("not-the-token")
            tid("token-submit").click()
            expect(tid("login-error")).to_contain_text("not accepted")
            assert page.evaluate("sessionStorage.getItem('webhookd.adminToken')") is None
            tid("token-input").fill(ADMIN_TOKEN)
            tid("token-submit").click()
            expect(tid("app")).to_be_visible()
            expect(tid("login")).to_be_hidden()
            assert page.evaluate("sessionStorage.getItem('webhookd.adminToken')") == ADMIN_TOKEN

            # Counters and partners.
            expect(tid("count-delivered")).to_have_text("28")
            expect(tid("count-failed")).to_have_text("1")
            expect(tid("count-pending")).to_have_text("0")
            expect(tid("count-in-flight")).to_have_text("0")
            expect(tid("partner-row")).to_have_count(2)
            good_row = page.locator(f'[data-testid=partner-row][data-partner-id="{good["partner_id"]}"]')
            bad_row = page.locator(f'[data-testid=partner-row][data-partner-id="{bad["partner_id"]}"]')
            expect(good_row.get_by_test_id("partner-status")).to_have_text("active")
            expect(good_row.get_by_test_id("partner-rate")).to_have_text("100%")
            expect(good_row.get_by_test_id("partner-delivered")).to_have_text("28")
            expect(bad_row.get_by_test_id("partner-name")).to_have_text(bad_name)
            expect(bad_row.get_by_test_id("partner-rate")).to_have_text("0%")
            expect(bad_row.get_by_test_id("partner-failed")).to_have_text("1")
            expect(bad_row.get_by_test_id("partner-circuit")).to_contain_text("circuit open · probe in ")
            expect(good_row.get_by_test_id("partner-circuit")).to_have_count(0)
            assert page.locator("img").count() == 0 and page.evaluate("window.__xss") is None

            # The chart: drawn, with delivered (green) and failed (red) bars.
            page.wait_for_function(f"({CHART_PIXELS})().green > 0 && ({CHART_PIXELS})().red > 0",
                                   timeout=TIMEOUT_MS)
            assert page.evaluate(CHART_PIXELS)["painted"] > 0
            expect(tid("chart-readout")).to_have_text("Last 60 minutes: 28 delivered, 1 failed")

            # The list: newest first, 25 a page, "Load more" follows next_cursor.
            rows = tid("delivery-row")
            expect(rows).to_have_count(25)
            tid("load-more").click()
            expect(rows).to_have_count(29)
            expect(tid("load-more")).to_be_hidden()

            # Filters: partner, event type, state.
            tid("filter-partner").select_option(good["partner_id"])
            expect(rows).to_have_count(25)
            expect(tid("load-more")).to_be_visible()
            tid("filter-partner").select_option("")
            tid("filter-event").fill("payment.success")
            expect(rows).to_have_count(2)
            tid("filter-event").fill("")
            expect(rows).to_have_count(25)
            tid("filter-state").select_option("failed")
            expect(rows).to_have_count(1)
            row = rows.first
            expect(row).to_have_attribute("data-delivery-id", failed["delivery_id"])
            expect(row.get_by_test_id("delivery-partner")).to_have_text(bad_name)

            # Its attempts: three 500s, the response shown as text.
            row.click()
            detail = tid("delivery-detail")
            expect(detail.get_by_test_id("detail-id")).to_have_text(failed["delivery_id"])
            expect(detail.get_by_test_id("detail-state")).to_have_text("failed")
            expect(detail.get_by_test_id("attempt")).to_have_count(3)
            expect(detail.get_by_test_id("attempt-status")).to_have_text(["500", "500", "500"])
            expect(detail.get_by_test_id("attempt-snippet").first).to_have_text('{"status":"error"}')
            expect(detail.get_by_test_id("attempt-error-detail").first).to_have_text("the partner answered 500")

            # Its story: three attempts, each with the exact string it signed and why the next step came.
            detail.get_by_test_id("story").locator("summary").click()
            expect(detail.get_by_test_id("story-step")).to_have_text(
                ["queued", "attempt", "attempt", "attempt", "failed"])
            expect(detail.get_by_test_id("story-signed")).to_have_count(6)   # two schemes per attempt
            expect(detail.get_by_test_id("story-next").last).to_contain_text("no attempt left")
            detail.get_by_test_id("story").screenshot(path=tmp_path / "dashboard-story.png")

            _no_placeholder_words(page)
            page.screenshot(path=tmp_path / "dashboard-failed.png")

            # Retry: the same delivery turns delivered, with a fourth attempt, and the counters move.
            detail.get_by_test_id("retry").click()
            expect(detail.get_by_test_id("detail-state")).to_have_text("delivered")
            expect(detail.get_by_test_id("attempt")).to_have_count(4)
            expect(detail.get_by_test_id("attempt-status").first).to_have_text("200")
            expect(detail.get_by_test_id("retry")).to_have_count(0)
            expect(row.get_by_test_id("delivery-state")).to_have_text("delivered")
            expect(tid("count-delivered")).to_have_text("29")
            expect(tid("count-failed")).to_have_text("0")
            expect(bad_row.get_by_test_id("partner-rate")).to_have_text("100%")
            assert len(failing.received) == 4
            assert hub.delivery(failed["delivery_id"])["state"] == "delivered"

            expect(detail.get_by_test_id("detail-notice")).to_contain_text("Retry delivered")

            # All deliveries again: the retried one is the oldest, on the second page, still selected.
            tid("filter-state").select_option("")
            expect(rows).to_have_count(25)
            tid("load-more").click()
            expect(rows).to_have_count(29)
            expect(page.locator("tr.selected")).to_have_attribute("data-delivery-id", failed["delivery_id"])
            _no_placeholder_words(page)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=tmp_path / "dashboard.png", full_page=True)
            print(f"screenshot: {tmp_path / 'dashboard.png'}")
            assert errors == []
        finally:
            browser.close()

"""Pulling instead of receiving (``GET /partners/{id}/events``), end to end on a real webhookd on
127.0.0.1, on both engines: a pull-only partner takes its events in order across polls and verifies
them with the partner guide's own receiver code; its deliveries end delivered and are never sent;
a push partner reads without changing anything; another partner's key gets the 404 of an unknown
partner; a cursor whose events retention purged gets a 410 that says where to start again."""

from __future__ import annotations

import json
import os

import pytest
from test_cli import _ok, _run
from test_guide_snippets import receivers

from conftest import ADMIN_TOKEN, ShiftedClock, bearer, wait_for
from payloads import PAYMENT_SUCCESS

BOTH_ENGINES = True


def register_pull_only(hub, name: str = "Sin Puertos") -> dict:
    r = hub.http.post("/partners/register", headers=hub.admin,
                      json={"partner_name": name, "delivery": "pull", "events": ["payment.success"]})
    assert r.status_code == 201, r.text
    return r.json()


def poll(hub, partner: dict, key: str | None = None, **params) -> dict:
    r = hub.http.get(f"/partners/{partner['partner_id']}/events", headers=bearer(key or partner["api_key"]),
                     params=params)
    assert r.status_code == 200, r.text
    return r.json()


def guide_verifiers(secret: str, standard_secret: str, monkeypatch) -> tuple:
    """The guide's own Python receivers, run as written: ``signature_ok`` of receiver.py (hex
    signature over the raw body) and the ``wh`` of receiver_standard.py (Standard Webhooks)."""
    blocks = receivers("en")
    monkeypatch.setenv("PARTNER_SHARED_SECRET", secret)
    monkeypatch.setenv("PARTNER_STANDARD_WEBHOOKS_SECRET", standard_secret)
    hex_receiver: dict = {}
    exec(compile(blocks["receiver.py"].code, "receiver.py", "exec"), hex_receiver)
    standard_receiver: dict = {}
    exec(compile(blocks["receiver_standard.py"].code, "receiver_standard.py", "exec"), standard_receiver)
    return hex_receiver["signature_ok"], standard_receiver["wh"]


def test_a_pull_only_partner_takes_its_events_in_order_across_two_polls_and_verifies_them(hub, monkeypatch):
    partner = register_pull_only(hub)
    assert partner["webhook_url"] is None and partner["delivery"] == "pull"
    shown = hub.http.get(f"/partners/{partner['partner_id']}", headers=bearer(partner["api_key"])).json()
    assert shown["webhook_url"] is None and shown["delivery"] == "pull"
    published = hub.publish_many(5)
    hub.wait_until_nothing_is_due()  # the loop has nothing to send them to, and never tries
    waiting = hub.deliveries(partner_id=partner["partner_id"])
    assert {(d["state"], d["attempt_count"]) for d in waiting} == {("pending", 0)}
    assert hub.store.oldest_pending(exclude="") is None  # waiting to be read is no backlog of the loop's

    first = poll(hub, partner, limit=3)
    second = poll(hub, partner, limit=3)  # no cursor: continues where the first ended
    assert [i["event_id"] for i in first["items"]] == published[:3] and first["has_more"] is True
    assert [i["event_id"] for i in second["items"]] == published[3:] and second["has_more"] is False
    nothing_new = poll(hub, partner)
    assert nothing_new["items"] == [] and nothing_new["has_more"] is False
    assert poll(hub, partner, cursor=nothing_new["next_cursor"])["items"] == []  # on from the newest handed over

    signature_ok, standard = guide_verifiers(partner["shared_secret"], partner["standard_webhooks_secret"],
                                             monkeypatch)
    for item in first["items"] + second["items"]:
        body = item["body"].encode("utf-8")
        assert signature_ok(body, item["headers"]["X-Webhook-Signature"])
        assert standard.verify(body, item["headers"])["transaction_id"] == json.loads(body)["transaction_id"]
        assert item["headers"]["webhook-id"] == item["event_id"] == item["headers"]["X-Webhook-Id"]
        assert not signature_ok(body.replace(b"txn_", b"TXN_"), item["headers"]["X-Webhook-Signature"])
    states = {d["state"] for d in hub.deliveries(partner_id=partner["partner_id"])}
    assert states == {"delivered"}
    story = hub.http.get(f"/events/{published[0]}/trace", headers=hub.admin).json()  # the trace says how
    assert story["deliveries"][0]["steps"][-1]["detail"].startswith("taken by the partner's poll"), story

    again = poll(hub, partner, cursor=first["next_cursor"])  # an explicit cursor re-reads from there
    assert [i["event_id"] for i in again["items"]] == published[3:]
    assert {i["delivery_state"] for i in again["items"]} == {"delivered"}


def test_a_push_partner_and_the_admin_read_without_changing_anything(hub, receiver_factory):
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    pid = partner["partner_id"]
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "paused"}).status_code == 200
    published = hub.publish_many(2)
    read = poll(hub, partner)
    assert [i["event_id"] for i in read["items"]] == published
    assert {i["delivery_state"] for i in read["items"]} == {"pending"}
    assert {d["state"] for d in hub.deliveries(partner_id=pid)} == {"pending"}

    pull_only = register_pull_only(hub)
    published += hub.publish_many(1)  # to both
    by_admin = poll(hub, pull_only, key=ADMIN_TOKEN)
    assert [i["event_id"] for i in by_admin["items"]] == published[2:]
    assert {d["state"] for d in hub.deliveries(partner_id=pull_only["partner_id"])} == {"pending"}

    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"}).status_code == 200
    wait_for(lambda: sorted(receiver.event_ids) == sorted(published), timeout=30)


def test_another_partners_key_gets_the_404_of_an_unknown_partner(hub):
    mine, other = register_pull_only(hub, "Uno"), register_pull_only(hub, "Otro")
    hub.publish_many(1)
    r = hub.http.get(f"/partners/{mine['partner_id']}/events", headers=bearer(other["api_key"]))
    assert r.status_code == 404 and r.json()["error"]["code"] == "partner_not_found"
    assert {d["state"] for d in hub.deliveries(partner_id=mine["partner_id"])} == {"pending"}
    assert len(poll(hub, mine)["items"]) == 1


def test_a_cursor_whose_events_were_purged_gets_a_410_that_says_where_to_start_again(hub_factory):
    clock = ShiftedClock()
    hub = hub_factory(clock=clock, retention__max_age_s=3600, retention__interval_s=0.1)
    partner = register_pull_only(hub)
    hub.publish_many(1)
    old_cursor = poll(hub, partner)["next_cursor"]
    clock.advance(7200)
    wait_for(lambda: not hub.deliveries(partner_id=partner["partner_id"]), timeout=60)  # retention purged it
    fresh = hub.publish_many(1)

    r = hub.http.get(f"/partners/{partner['partner_id']}/events", headers=bearer(partner["api_key"]),
                     params={"cursor": old_cursor})
    assert r.status_code == 410, r.text
    error = r.json()["error"]
    assert error["code"] == "cursor_expired" and "start_cursor" in error["message"]
    restart = poll(hub, partner, cursor=error["start_cursor"])
    assert [i["event_id"] for i in restart["items"]] == fresh


@pytest.mark.parametrize("cursor", ["garbage", "ZGx2X3g", "!!", "cGFydG5lcl94eXo"])
def test_a_cursor_this_server_did_not_give_is_a_422(hub, cursor):
    partner = register_pull_only(hub)
    r = hub.http.get(f"/partners/{partner['partner_id']}/events", headers=bearer(partner["api_key"]),
                     params={"cursor": cursor})
    assert r.status_code == 422 and "cursor" in r.json()["error"]["message"]


def test_registration_says_what_a_pull_only_partner_may_not_send(hub):
    body = {"partner_name": "X", "events": ["payment.success"]}
    both = hub.http.post("/partners/register", headers=hub.admin,
                         json={**body, "delivery": "pull", "webhook_url": "https://example.com/hook"})
    assert both.status_code == 422 and both.json()["error"]["message"].startswith("'webhook_url' must be left out")
    odd = hub.http.post("/partners/register", headers=hub.admin, json={**body, "delivery": "email"})
    assert odd.status_code == 422 and odd.json()["error"]["message"].startswith("'delivery'")
    assert os.environ.get("PARTNER_SHARED_SECRET") is None  # the guide's receivers read it; monkeypatch undid it


def test_the_command_line_adds_a_pull_only_partner_and_reads_its_events(serve_factory):
    serve = serve_factory()
    added = json.loads(_ok(_run(serve, "partners", "add", "--name", "CLI Pull", "--pull", "--events",
                                "payment.success", "--json")))
    assert added["delivery"] == "pull" and added["webhook_url"] is None
    event = json.loads(_ok(_run(serve, "publish", "payment.success", "--data", json.dumps(
        {k: v for k, v in PAYMENT_SUCCESS.items() if k != "event"}), "--json")))
    table = _ok(_run(serve, "partners", "events", added["partner_id"]))
    assert table.splitlines()[0].split() == ["DELIVERY_ID", "EVENT_ID", "EVENT", "PUBLISHED_AT", "DELIVERY_STATE"]
    assert event["event_id"] in table and "pending" in table and "next_cursor: " in table
    answer = json.loads(_ok(_run(serve, "partners", "events", added["partner_id"], "--limit", "1", "--json")))
    assert answer["items"][0]["headers"]["webhook-id"] == event["event_id"]
    after = json.loads(_ok(_run(serve, "partners", "events", added["partner_id"], "--cursor",
                                answer["next_cursor"], "--json")))
    assert after["items"] == [] and after["has_more"] is False


def test_a_pull_only_partner_has_no_endpoint_to_check(hub):
    partner = register_pull_only(hub)
    r = hub.http.post(f"/partners/{partner['partner_id']}/check", headers=bearer(partner["api_key"]))
    assert r.status_code == 409 and r.json()["error"]["code"] == "partner_pulls"


def test_a_poll_searches_an_index_of_its_partner_alone(webhookd_factory):
    """SQLite keeps no statistics: a take reads the partner's own pending rows (the partial index
    of pending rows), not every partner's; a read walks the partner's deliveries in id order."""
    from polling import items_query

    store = webhookd_factory().store
    params = {"partner_id": "partner_x", "after": "dlv_", "n": 51}
    assert "USING INDEX deliveries_pending_order (partner_id=?)" in store.engine.explain(items_query(store, True),
                                                                                          params)
    assert "USING INDEX deliveries_by_partner (partner_id=? AND id>?)" in store.engine.explain(
        items_query(store, False), params)


def test_a_pull_only_partners_deliveries_never_expire_while_they_wait_to_be_read(hub_factory):
    clock = ShiftedClock()
    hub = hub_factory(clock=clock, delivery__max_pending_age_s=3600, retention__interval_s=0.1)
    partner = register_pull_only(hub)
    published = hub.publish_many(1)
    clock.advance(3601)
    hub.wait_for_a_retention_pass()
    hub.wait_for_a_retention_pass()  # a whole pass, expiry included, after the clock moved
    assert {d["state"] for d in hub.deliveries(partner_id=partner["partner_id"])} == {"pending"}
    assert [i["event_id"] for i in poll(hub, partner)["items"]] == published


def test_a_paused_pull_only_partner_is_handed_nothing_until_it_is_active_again(hub):
    partner = register_pull_only(hub)
    pid = partner["partner_id"]
    hub.publish_many(1)
    cursor = poll(hub, partner)["next_cursor"]
    assert hub.http.patch(f"/partners/{pid}", headers=bearer(partner["api_key"]),
                          json={"status": "paused"}).status_code == 200
    later = hub.publish_many(1)
    r = hub.http.get(f"/partners/{pid}/events", headers=bearer(partner["api_key"]))
    assert r.status_code == 409 and r.json()["error"]["code"] == "partner_not_active"
    read = poll(hub, partner, cursor=cursor)  # reading on with a cursor still works, and changes nothing
    assert [(i["event_id"], i["delivery_state"]) for i in read["items"]] == [(later[0], "pending")]
    assert hub.http.patch(f"/partners/{pid}", headers=bearer(partner["api_key"]),
                          json={"status": "active"}).status_code == 200
    assert [i["event_id"] for i in poll(hub, partner)["items"]] == later


def test_an_event_whose_content_was_erased_shows_its_metadata_without_a_body(hub):
    partner = register_pull_only(hub)
    event_id = hub.publish_many(1)[0]
    with hub.store._transaction() as db:  # what an erasure leaves: the row, without its content
        db.execute("UPDATE events SET body = :empty WHERE id = :id", {"empty": b"", "id": event_id})
    item = poll(hub, partner)["items"][0]
    assert item["event_id"] == event_id and item["body"] is None and item["content_erased"] is True
    assert item["headers"]["webhook-id"] == event_id and "webhook-signature" not in item["headers"]


def test_a_pull_only_partner_given_a_url_turns_push_and_its_waiting_events_are_posted(hub, receiver_factory):
    receiver = receiver_factory()
    partner = register_pull_only(hub)
    pid = partner["partner_id"]
    published = hub.publish_many(2)
    r = hub.http.patch(f"/partners/{pid}", headers=bearer(partner["api_key"]), json={"webhook_url": receiver.url})
    assert r.status_code == 200 and r.json()["delivery"] == "push"
    wait_for(lambda: sorted(receiver.event_ids) == sorted(published), timeout=30)
    audit = hub.http.get("/audit", headers=hub.admin, params={"partner_id": pid}).json()["items"]
    assert {"from": None, "to": receiver.url} in [e["changes"].get("webhook_url") for e in audit]


def test_the_portal_says_a_pull_only_partner_pulls_in_english_and_spanish(browser_ready, webhookd_factory, tmp_path):
    """A pull-only partner has no URL: its portal says how its events reach it instead of an empty row.
    Opened through a portal link, as an operator would hand it over."""
    from playwright.sync_api import expect, sync_playwright
    from test_portal import TIMEOUT_MS

    from conftest import CHROMIUM, CHROMIUM_ARGS

    hub = webhookd_factory()
    partner = register_pull_only(hub)
    r = hub.http.post(f"/partners/{partner['partner_id']}/portal-link", headers=hub.admin, json={"lifetime_s": 600})
    assert r.status_code == 201, r.text
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            for locale, words, (width, height) in (("en-US", "you pull your events", (1280, 800)),
                                                   ("es-ES", "recoges tus eventos", (390, 844))):
                page = browser.new_context(viewport={"width": width, "height": height}, locale=locale).new_page()
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(r.json()["url"])
                expect(page.get_by_test_id("meta-url")).to_contain_text(words, timeout=TIMEOUT_MS)
                expect(page.get_by_test_id("check")).to_be_hidden()  # no endpoint to check
                page.screenshot(path=tmp_path / f"pull-only-{width}x{height}.png", full_page=True)
        finally:
            browser.close()

"""The HTTP API: registration, publishing rules, credentials and the error shape."""


import pytest

from conftest import ADMIN_TOKEN, bearer, wait_for
from payloads import PAYMENT_SUCCESS

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)

GOOD = {"partner_name": "Tu Grupo - Nombre", "webhook_url": "https://127.0.0.1:9443/webhooks/events",
        "events": ["payment.success", "payment.failed"]}


def check_error(r, status, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    listed = body["error"].get("code") == "invalid_field" and "problems" in body["error"]  # a payload's every problem
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} | ({"problems"} if listed else set())
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


def _rows(hub, table):
    return hub.rows(f"SELECT * FROM {table}")


def test_registration_returns_the_secret_once_and_stores_only_a_hash_of_the_api_key(hub):
    r = hub.http.post("/partners/register", headers=hub.admin, json=GOOD)
    assert r.status_code == 201
    body = r.json()
    assert set(body) >= {"partner_id", "partner_name", "webhook_url", "shared_secret", "standard_webhooks_secret",
                         "api_key", "status", "events_subscribed", "created_at"}
    assert body["partner_id"].startswith("partner_") and len(body["partner_id"]) >= len("partner_") + 12
    assert body["shared_secret"].startswith("sk_live_") and len(body["shared_secret"]) >= 8 + 32
    assert body["api_key"].startswith("pak_") and len(body["api_key"]) >= 4 + 32
    assert body["standard_webhooks_secret"].startswith("whsec_")
    assert body["status"] == "active"
    assert body["events_subscribed"] == ["payment.failed", "payment.success"]
    (row,) = _rows(hub, "partners")
    assert body["api_key"] not in str(row)
    shown = hub.http.get(f"/partners/{body['partner_id']}", headers=hub.admin)
    assert shown.status_code == 200
    assert body["shared_secret"] not in shown.text and "secret" not in shown.text and "api_key" not in shown.text
    assert shown.json()["webhook_url"] == GOOD["webhook_url"]


def test_a_partner_reads_itself_with_its_api_key_but_not_others(hub):
    a = hub.register("http://127.0.0.1:9/a", ["payment.success"], name="A")
    b = hub.register("http://127.0.0.1:9/b", ["payment.success"], name="B")
    key = bearer(a["api_key"])
    assert hub.http.get(f"/partners/{a['partner_id']}", headers=key).status_code == 200
    check_error(hub.http.get(f"/partners/{b['partner_id']}", headers=key), 404, "partner_not_found")
    check_error(hub.http.get("/partners", headers=key), 403, "admin_only")
    check_error(hub.http.post("/events", headers=key, json=PAYMENT_SUCCESS), 403, "admin_only")


def test_registration_needs_the_admin_token_by_default(hub):
    check_error(hub.http.post("/partners/register", json=GOOD), 401, "missing_credentials")
    check_error(hub.http.post("/partners/register", json=GOOD, headers={"Authorization": "Bearer nope"}),
           401, "invalid_credentials")
    check_error(hub.http.post("/partners/register", json=GOOD, headers={"Authorization": f"Basic {ADMIN_TOKEN}"}), 401)
    assert _rows(hub, "partners") == []


def test_open_registration_lets_anyone_register(webhookd_factory):
    hub = webhookd_factory(security__open_registration=True)
    assert hub.http.post("/partners/register", json=GOOD).status_code == 201


@pytest.mark.parametrize("change, field", [
    ({"partner_name": ""}, "partner_name"),
    ({"partner_name": 5}, "partner_name"),
    ({"partner_name": "x" * 201}, "partner_name"),
    ({"partner_name": "bad\x00name"}, "partner_name"),
    ({"webhook_url": "ftp://127.0.0.1/x"}, "webhook_url"),
    ({"webhook_url": "http://user:pw@127.0.0.1/x"}, "webhook_url"),
    ({"webhook_url": "http://127.0.0.1/" + "a" * 2048}, "webhook_url"),
    ({"webhook_url": "http:///nohost"}, "webhook_url"),
    ({"webhook_url": "http://127.0.0.1:99999/x"}, "webhook_url"),
    ({"webhook_url": None}, "webhook_url"),
    ({"events": []}, "events"),
    ({"events": "payment.success"}, "events"),
    ({"events": ["payment.success", 3]}, "events"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_registrations_are_422_naming_the_field(hub, change, field):
    err = check_error(hub.http.post("/partners/register", headers=hub.admin, json={**GOOD, **change}), 422, "invalid_field")
    assert f"'{field}'" in err["message"]
    assert _rows(hub, "partners") == []


def test_unknown_event_type_lists_the_valid_ones(hub):
    err = check_error(hub.http.post("/partners/register", headers=hub.admin,
                               json={**GOOD, "events": ["payment.refunded"]}), 422)
    for valid in ("payment.success", "payment.failed", "booking.confirmed", "booking.cancelled"):
        assert valid in err["message"]


def test_private_targets_are_refused_when_not_allowed(webhookd_factory):
    hub = webhookd_factory(security__allow_private_targets=False)
    for url in ("http://127.0.0.1/x", "http://10.0.0.5/x", "http://169.254.169.254/latest",
                "http://[::1]/x", "http://localhost/x"):
        err = check_error(hub.http.post("/partners/register", headers=hub.admin, json={**GOOD, "webhook_url": url}), 422)
        assert "public address" in err["message"]


@pytest.mark.parametrize("payload, field", [
    ({"event": "payment.refunded"}, "event"),
    ({}, "event"),
    ({**PAYMENT_SUCCESS, "amount": "150"}, "amount"),
    ({**PAYMENT_SUCCESS, "amount": True}, "amount"),
    ({k: v for k, v in PAYMENT_SUCCESS.items() if k != "currency"}, "currency"),
    ({**PAYMENT_SUCCESS, "timestamp": "yesterday"}, "timestamp"),
])
def test_publishing_checks_the_catalog(hub, payload, field):
    err = check_error(hub.publish(payload), 422, "invalid_field")
    assert f"'{field}'" in err["message"]
    assert _rows(hub, "events") == []


@pytest.mark.parametrize("body, status, code", [
    (b"{", 400, "malformed_json"),
    (b'{"event": NaN}', 400, "malformed_json"),
    (b'{"event": "a", "event": "b"}', 400, "malformed_json"),
    (b"[]", 400, "not_an_object"),
    (b'"text"', 400, "not_an_object"),
    (b"\xff\xfe", 400, "malformed_json"),
    (b"", 400, "malformed_json"),
])
def test_malformed_bodies_are_400(hub, body, status, code):
    r = hub.http.post("/events", headers={**hub.admin, "Content-Type": "application/json"}, content=body)
    check_error(r, status, code)


def test_wrong_content_type_is_415_and_too_large_is_413(hub):
    check_error(hub.http.post("/events", headers={**hub.admin, "Content-Type": "text/plain"}, content=b"{}"), 415)
    big = b'{"event":"payment.success","pad":"' + b"x" * 300_000 + b'"}'
    check_error(hub.http.post("/events", headers={**hub.admin, "Content-Type": "application/json"}, content=big), 413)


def test_unknown_routes_and_methods_answer_the_json_error_shape(hub):
    check_error(hub.http.get("/nowhere"), 404, "not_found")
    check_error(hub.http.delete("/events", headers=hub.admin), 405, "method_not_allowed")
    check_error(hub.http.get("/deliveries/dlv_nosuch", headers=hub.admin), 404, "delivery_not_found")
    check_error(hub.http.get("/events/evt_nosuch", headers=hub.admin), 404, "event_not_found")


def test_pagination_parameters_are_checked(hub):
    check_error(hub.http.get("/deliveries?limit=0", headers=hub.admin), 422)
    check_error(hub.http.get("/deliveries?limit=201", headers=hub.admin), 422)
    check_error(hub.http.get("/deliveries?limit=ten", headers=hub.admin), 422)
    check_error(hub.http.get("/deliveries?cursor=!!!", headers=hub.admin), 422)
    check_error(hub.http.get("/deliveries?state=lost", headers=hub.admin), 422)


def test_partners_list_pages_with_a_cursor(hub):
    ids = [hub.register("http://127.0.0.1:9/x", ["payment.success"], name=f"P{i}")["partner_id"] for i in range(5)]
    seen, cursor = [], None
    while True:
        r = hub.http.get("/partners", headers=hub.admin, params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200
        seen += [p["partner_id"] for p in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(ids, reverse=True)


def test_a_partner_sees_only_its_own_deliveries(hub, receiver_factory):
    from conftest import wait_for

    ra, rb = receiver_factory(), receiver_factory()
    a = hub.register(ra.url, ["payment.success"], name="A")
    b = hub.register(rb.url, ["payment.success"], name="B")
    assert hub.publish(PAYMENT_SUCCESS).status_code == 202
    wait_for(lambda: ra.received and rb.received)
    key = bearer(a["api_key"])
    mine = hub.http.get("/deliveries", headers=key).json()["items"]
    assert [d["partner_id"] for d in mine] == [a["partner_id"]]
    check_error(hub.http.get("/deliveries", headers=key, params={"partner_id": b["partner_id"]}), 404)
    theirs = hub.deliveries(partner_id=b["partner_id"])[0]["delivery_id"]
    check_error(hub.http.get(f"/deliveries/{theirs}", headers=key), 404)
    check_error(hub.http.post(f"/deliveries/{theirs}/retry", headers=key), 404)


def test_event_shows_its_deliveries(hub, receiver_factory):
    r = receiver_factory()
    hub.register(r.url, ["payment.success"])
    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    shown = hub.http.get(f"/events/{event_id}", headers=hub.admin).json()
    assert shown["event_id"] == event_id and shown["payload"] == PAYMENT_SUCCESS
    assert len(shown["deliveries"]) == 1 and shown["deliveries"][0]["event_id"] == event_id


def test_health(hub):
    r = hub.http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_event_detail_says_how_many_deliveries_there_are(hub):
    for i in range(3):
        hub.register("http://127.0.0.1:9/x", ["payment.success"], name=f"P{i}")
    event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
    shown = hub.http.get(f"/events/{event_id}", headers=hub.admin).json()
    assert shown["fanout"] == 3 and len(shown["deliveries"]) == 3 and shown["more_deliveries"] is False


# --- Batch publish -------------------------------------------------------------------------------


def test_a_batch_answers_one_result_per_event_and_a_bad_one_refuses_only_itself(hub, receiver_factory):
    receiver = receiver_factory()
    hub.register(receiver.url, ["payment.success"])
    no_amount = {k: v for k, v in PAYMENT_SUCCESS.items() if k != "amount"}
    batch = {"events": [PAYMENT_SUCCESS, no_amount, "not an object", {**PAYMENT_SUCCESS, "transaction_id": "txn_2"}]}
    r = hub.http.post("/events/batch", headers=hub.admin, json=batch)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["accepted"], body["refused"]) == (2, 2)
    ok_first, missing, not_object, ok_last = body["results"]
    assert ok_first["deliveries"] == 1 and ok_last["deliveries"] == 1
    assert missing["status"] == 422 and missing["error"]["code"] == "invalid_field"
    assert "'amount'" in missing["error"]["message"]
    assert not_object["status"] == 400 and not_object["error"]["code"] == "not_an_object"
    wait_for(lambda: len(receiver.received) == 2)
    assert sorted(r.headers["x-webhook-id"] for r in receiver.received) == sorted(
        [ok_first["event_id"], ok_last["event_id"]])
    for result in (ok_first, ok_last):
        assert hub.http.get(f"/events/{result['event_id']}", headers=hub.admin).status_code == 200


def test_a_batch_sent_again_with_its_idempotency_key_stores_nothing_twice(hub):
    hub.register("http://127.0.0.1:9/x", ["payment.success"])
    events = [{**PAYMENT_SUCCESS, "transaction_id": f"txn_{i}"} for i in range(3)]
    key = {**hub.admin, "Idempotency-Key": "bookings-2026-11-30"}
    first = hub.http.post("/events/batch", headers=key, json={"events": events}).json()["results"]
    again = hub.http.post("/events/batch", headers=key, json={"events": events}).json()["results"]
    assert again == first and len(_rows(hub, "events")) == 3
    events[1] = {**events[1], "amount": 1.0}            # the same key for another body: that event alone is 409
    changed = hub.http.post("/events/batch", headers=key, json={"events": events}).json()["results"]
    assert changed[0] == first[0] and changed[2] == first[2]
    assert changed[1]["status"] == 409 and changed[1]["error"]["code"] == "idempotency_key_reused"
    assert len(_rows(hub, "events")) == 3


@pytest.mark.parametrize("body", [{}, {"events": []}, {"events": {"a": 1}}, {"events": [PAYMENT_SUCCESS] * 4},
                                  {"events": [PAYMENT_SUCCESS], "extra": 1}])
def test_a_batch_that_is_not_a_list_of_1_to_max_events_is_422_and_stores_nothing(webhookd_factory, body):
    hub = webhookd_factory(security__max_batch_events=3)
    r = hub.http.post("/events/batch", headers=hub.admin, json=body)
    check_error(r, 422, "invalid_field")
    assert _rows(hub, "events") == []


def test_a_batch_key_never_meets_a_single_events_key(hub):
    hub.register("http://127.0.0.1:9/x", ["payment.success"])
    key = {**hub.admin, "Idempotency-Key": "K#0"}
    single = hub.publish(PAYMENT_SUCCESS, headers={"Idempotency-Key": "K#0"}).json()["event_id"]
    batch = hub.http.post("/events/batch", headers={**key, "Idempotency-Key": "K"},
                          json={"events": [PAYMENT_SUCCESS]}).json()["results"]
    assert batch[0]["event_id"] != single and len(_rows(hub, "events")) == 2


def test_a_batch_event_may_nest_as_deep_as_it_could_alone(webhookd_factory):
    hub = webhookd_factory()
    deep: dict = {"leaf": 1}
    for _ in range(hub.config.security.max_json_depth - 2):   # the event itself is one more level
        deep = {"n": deep}
    event = {**PAYMENT_SUCCESS, "extra": deep}
    assert hub.publish(event).status_code == 202
    r = hub.http.post("/events/batch", headers=hub.admin, json={"events": [event]})
    assert r.status_code == 202 and r.json()["accepted"] == 1


def test_ids_are_base36_time_then_random_and_sort_by_creation():
    """``web.new_id``: the prefix, 9 base-36 digits of the time in ms, 12 random ones; each width's
    digits read back as the number they were made from (two digits a step, one left over)."""
    import random as _random

    import web

    for width in (1, 2, 9, 12):
        for number in [0, 36**width - 1] + [_random.getrandbits(80) for _ in range(500)]:
            digits = web._base36(number, width)
            assert len(digits) == width and int(digits, 36) == number % 36**width
    first, second = web.new_id("inb_"), web.new_id("inb_")
    assert first.startswith("inb_") and len(first) == 4 + 9 + 12
    assert first[4:13] <= second[4:13]

"""Each partner gets only what is theirs: events named for partners or published to channels, and
partners' payload filters — against a live server, with receivers that verify every signature."""


from conftest import bearer, wait_for
from payloads import BOOKING_CONFIRMED, PAYMENT_SUCCESS

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)


def register(hub, receiver, name: str, events: list[str], **extra) -> dict:
    r = hub.http.post("/partners/register", headers=hub.admin,
                      json={"partner_name": name, "webhook_url": receiver.url, "events": events, **extra})
    assert r.status_code == 201, r.text
    receiver.secret = r.json()["shared_secret"]  # the receiver verifies as the guide does
    return r.json()


def settle(hub, *receivers) -> None:
    """Wait until nothing is pending and the loop has nothing left to send: a wrong extra delivery
    would have shown up by then."""
    wait_for(lambda: not hub.deliveries(state="pending"))
    hub.wait_until_nothing_is_due()
    for receiver in receivers:
        assert all(r.guide_ok for r in receiver.received), "a webhook did not verify"


def test_an_event_for_some_partners_or_channels_reaches_those_and_no_one_else(hub, receiver_factory):
    """Two tour operators and a payments partner subscribed to booking.confirmed: an event named
    for one partner, or published to one operator's channel, reaches that operator alone; an event
    with no audience reaches every subscriber. The audience is not in what partners receive."""
    ra, rb, rc = receiver_factory(), receiver_factory(), receiver_factory()
    a = register(hub, ra, "Operator A", ["booking.confirmed"], channels=["tour_a", "operator:a"])
    b = register(hub, rb, "Operator B", ["booking.confirmed"], channels=["tour_b"])
    register(hub, rc, "Payments", ["booking.confirmed", "payment.success"])

    def publish(**audience):
        r = hub.publish({**BOOKING_CONFIRMED, **audience})
        assert r.status_code == 202, r.text
        return r.json()

    to_a = publish(partners=[a["partner_id"]])
    to_b = publish(channels=["tour_b"])
    to_both = publish(channels=["tour_a", "tour_b", "tour_zzz"])
    to_all = publish()
    to_nobody = publish(partners=[a["partner_id"]], channels=["tour_b"])   # both must hold: nobody
    assert [e["deliveries"] for e in (to_a, to_b, to_both, to_all, to_nobody)] == [1, 1, 2, 3, 0]
    batch = hub.http.post("/events/batch", headers=hub.admin, json={"events": [
        {**BOOKING_CONFIRMED, "channels": ["operator:a"]}, {**BOOKING_CONFIRMED, "partners": ["partner_nobody"]}]})
    assert batch.status_code == 202
    first, second = batch.json()["results"]
    assert first["deliveries"] == 1 and second["status"] == 422 and "'partners'" in second["error"]["message"]

    settle(hub, ra, rb, rc)
    assert sorted(ra.event_ids) == sorted([to_a["event_id"], to_both["event_id"], to_all["event_id"],
                                           first["event_id"]])
    assert sorted(rb.event_ids) == sorted([to_b["event_id"], to_both["event_id"], to_all["event_id"]])
    assert rc.event_ids == [to_all["event_id"]]
    for receiver in (ra, rb, rc):
        for got in receiver.received:
            assert "partners" not in got.json and "channels" not in got.json    # nobody sees the others' ids
            assert got.json["booking_id"] == BOOKING_CONFIRMED["booking_id"]

    shown = hub.http.get(f"/events/{to_b['event_id']}", headers=hub.admin).json()
    assert shown["channels"] == ["tour_b"] and shown["partners"] is None
    assert [d["partner_id"] for d in shown["deliveries"]] == [b["partner_id"]] and shown["fanout"] == 1
    assert hub.http.get(f"/events/{to_all['event_id']}", headers=hub.admin).json()["channels"] is None


def test_a_bad_audience_is_a_422_naming_it_and_stores_nothing(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["booking.confirmed"])
    for audience, field in (({"partners": []}, "partners"), ({"partners": "partner_x"}, "partners"),
                            ({"partners": ["partner_unknown"]}, "partners"), ({"partners": [7]}, "partners"),
                            ({"channels": []}, "channels"), ({"channels": ["has space"]}, "channels"),
                            ({"channels": ["x" * 101]}, "channels"), ({"channels": [f"c{i}" for i in range(11)]},
                                                                      "channels")):
        r = hub.publish({**BOOKING_CONFIRMED, **audience})
        assert r.status_code == 422 and f"'{field}'" in r.json()["error"]["message"], (audience, r.text)
    assert hub.deliveries() == []
    key = {"Idempotency-Key": "k-audience"}
    assert hub.publish({**BOOKING_CONFIRMED, "partners": [partner["partner_id"]]}, headers=key).status_code == 202
    again = hub.publish({**BOOKING_CONFIRMED, "channels": ["tour_a"]}, headers=key)   # same key, another audience
    assert again.status_code == 409 and again.json()["error"]["code"] == "idempotency_key_reused"


def test_a_payload_filter_routes_as_declared(hub, receiver_factory):
    """Filters on currency: an equality, a membership, none. An event lacking the field never passes
    a filter on it. An invalid filter at registration is a 422 naming it; null removes one."""
    eur, dollars, every = receiver_factory(), receiver_factory(), receiver_factory()
    p_eur = register(hub, eur, "Euro Tours", ["payment.success", "booking.confirmed"], filter={"currency": "EUR"})
    register(hub, dollars, "Dollar Tours", ["payment.success"], filter={"currency": ["USD", "CAD"]})
    register(hub, every, "All Tours", ["payment.success"])
    assert p_eur["filter"] == {"currency": ["EUR"]}
    ids = {c: hub.publish({**PAYMENT_SUCCESS, "currency": c}).json()["event_id"] for c in ("EUR", "USD", "JPY")}
    booking = hub.publish(BOOKING_CONFIRMED).json()   # no currency: Euro Tours' filter rules it out
    assert booking["deliveries"] == 0
    settle(hub, eur, dollars, every)
    assert eur.event_ids == [ids["EUR"]] and dollars.event_ids == [ids["USD"]]
    assert sorted(every.event_ids) == sorted(ids.values())

    for bad in ({"currency": {"in": ["EUR"]}}, {"": "x"}, "EUR", ["currency"], {"currency": []},
                {"currency": [None]}, {"currency": list(range(101))}, {f"f{i}": 1 for i in range(21)}):
        r = hub.http.post("/partners/register", headers=hub.admin, json={
            "partner_name": "Bad", "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"],
            "filter": bad})
        assert r.status_code == 422 and "'filter'" in r.json()["error"]["message"], (bad, r.text)
    r = hub.http.patch(f"/partners/{p_eur['partner_id']}", headers=hub.admin, json={"filter": None})
    assert r.status_code == 200 and r.json()["filter"] is None
    assert hub.publish({**PAYMENT_SUCCESS, "currency": "JPY"}).json()["deliveries"] == 2   # Euro Tours, now too


# --- The audience is the admin's: a partner's key never sets its channels or its filter ---------------

AUDIENCE_TABLES = ("partners", "partner_channels", "subscriptions", "audit_log")


def audience_rows(hub) -> dict[str, list[tuple]]:
    """What a refused change must leave as it was, straight from the database."""
    return {table: sorted(hub.rows(f"SELECT * FROM {table}"), key=repr) for table in AUDIENCE_TABLES}


def refused_as_audience(r, field: str) -> None:
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert error["code"] == "audience_admin_only" and error["message"].startswith(f"'{field}' is set by the admin")


def test_a_partner_cannot_widen_its_audience_and_the_admin_can(hub, receiver_factory):
    """Operator A adds operator B's channel with its own key, Payments C removes its filter: each
    is a 403 naming the field and the data stays as it was, so A gets none of B's bookings and C
    none of the payments its filter keeps out. Narrowing is refused too: the rule is "the admin
    only". The admin changes both, and they count from the next event."""
    ra, rb, rc = receiver_factory(), receiver_factory(), receiver_factory()
    a = register(hub, ra, "Operator A", ["booking.confirmed"], channels=["operator_a"])
    register(hub, rb, "Operator B", ["booking.confirmed"], channels=["operator_b"])
    c = register(hub, rc, "Payments C", ["payment.success"], filter={"currency": "EUR"})
    own_a = bearer(a["api_key"])
    own_c = bearer(c["api_key"])

    def patch(partner, headers, **body):
        return hub.http.patch(f"/partners/{partner['partner_id']}", headers=headers, json=body)

    before = audience_rows(hub)
    for partner, own, body, field in (
            (a, own_a, {"channels": ["operator_a", "operator_b"]}, "channels"),
            (a, own_a, {"channels": ["operator_b"], "contact_email": "ops@a.example.com"}, "channels"),
            (a, own_a, {"channels": []}, "channels"),                                  # narrowing: the admin's too
            (a, own_a, {"channels": "operator_b"}, "channels"),                        # malformed: still the admin's
            (a, own_a, {"filter": {"tour_id": "tour_uuid_here"}}, "filter"),
            (c, own_c, {"filter": None}, "filter"),
            (c, own_c, {"filter": {}}, "filter"),
            (c, own_c, {"filter": {"currency": ["EUR", "USD"]}}, "filter"),
            (c, own_c, {"channels": ["operator_b"]}, "channels")):
        refused_as_audience(patch(partner, own, **body), field)
    assert audience_rows(hub) == before                          # not a field, not an audit entry changed

    booking_b = hub.publish({**BOOKING_CONFIRMED, "booking_id": "res_b1", "channels": ["operator_b"]}).json()
    usd = hub.publish(PAYMENT_SUCCESS).json()                    # USD: C's filter keeps it out
    assert (booking_b["deliveries"], usd["deliveries"]) == (1, 0)
    wait_for(lambda: booking_b["event_id"] in rb.event_ids)
    wait_for(lambda: not hub.deliveries(state="pending"))
    assert hub.deliveries(partner_id=a["partner_id"]) == [] and hub.deliveries(partner_id=c["partner_id"]) == []
    assert ra.received == [] and rc.received == []               # nothing queued for them: nothing can come

    widened = patch(a, hub.admin, channels=["operator_a", "operator_b"])
    assert widened.status_code == 200 and widened.json()["channels"] == ["operator_a", "operator_b"]
    cleared = patch(c, hub.admin, filter=None)
    assert cleared.status_code == 200 and cleared.json()["filter"] is None
    booking_b2 = hub.publish({**BOOKING_CONFIRMED, "booking_id": "res_b2", "channels": ["operator_b"]}).json()
    usd2 = hub.publish({**PAYMENT_SUCCESS, "transaction_id": "txn_usd2"}).json()
    assert (booking_b2["deliveries"], usd2["deliveries"]) == (2, 1)
    wait_for(lambda: ra.event_ids == [booking_b2["event_id"]] and rc.event_ids == [usd2["event_id"]])
    assert all(r.guide_ok for r in ra.received + rc.received)
    trail = hub.http.get("/audit", headers=hub.admin, params={"action": "partner.updated"}).json()["items"]
    assert [(e["actor"], sorted(e["changes"])) for e in trail] == [("admin", ["filter"]), ("admin", ["channels"])]


def test_an_open_registration_cannot_choose_its_audience(hub_factory):
    """With open registration anyone may register, but not with channels or a filter (nor may a
    partner's key register one with them): 403 naming the field, and no partner is stored. Without
    them it registers, and the admin may register with both."""
    hub = hub_factory(security__open_registration=True)
    body = {"partner_name": "Newcomer", "webhook_url": "http://127.0.0.1:9/x", "events": ["booking.confirmed"]}
    existing = hub.register("http://127.0.0.1:9/y", ["booking.confirmed"], name="Existing")
    own = bearer(existing["api_key"])
    before = audience_rows(hub)
    for headers in ({}, own):
        for extra, field in (({"channels": ["operator_b"]}, "channels"), ({"channels": []}, "channels"),
                             ({"filter": None}, "filter"), ({"filter": {"currency": "EUR"}}, "filter")):
            refused_as_audience(hub.http.post("/partners/register", headers=headers, json={**body, **extra}), field)
    assert audience_rows(hub) == before
    plain = hub.http.post("/partners/register", json=body)
    assert plain.status_code == 201 and (plain.json()["channels"], plain.json()["filter"]) == ([], None)
    by_admin = hub.http.post("/partners/register", headers=hub.admin,
                             json={**body, "channels": ["operator_b"], "filter": {"currency": "EUR"}})
    assert by_admin.status_code == 201 and by_admin.json()["channels"] == ["operator_b"]


def test_the_api_description_says_the_audience_is_the_admins(hub):
    schemas = hub.http.get("/openapi.json").json()["components"]["schemas"]
    for schema in ("Registration", "PartnerUpdate"):
        for field in ("channels", "filter"):
            assert "403 audience_admin_only" in schemas[schema]["properties"][field]["description"], (schema, field)

"""Each partner gets only what is theirs: events named for partners or published to channels, and
partners' payload filters — against a live server, with receivers that verify every signature."""

import time

from conftest import wait_for
from payloads import BOOKING_CONFIRMED, PAYMENT_SUCCESS

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)


def register(hub, receiver, name: str, events: list[str], **extra) -> dict:
    r = hub.http.post("/partners/register", headers=hub.admin,
                      json={"partner_name": name, "webhook_url": receiver.url, "events": events, **extra})
    assert r.status_code == 201, r.text
    receiver.secret = r.json()["shared_secret"]  # the receiver verifies as the guide does
    return r.json()


def settle(hub, *receivers) -> None:
    """Wait until nothing is pending; then give a wrong extra delivery the time to show up."""
    wait_for(lambda: not hub.deliveries(state="pending"))
    time.sleep(0.3)
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
    r = hub.http.patch(f"/partners/{p_eur['partner_id']}", headers={"Authorization": f"Bearer {p_eur['api_key']}"},
                       json={"filter": None})
    assert r.status_code == 200 and r.json()["filter"] is None
    assert hub.publish({**PAYMENT_SUCCESS, "currency": "JPY"}).json()["deliveries"] == 2   # Euro Tours, now too

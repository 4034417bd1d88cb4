"""Replay: a partner that lost a day gets every event of the window again — delivered ones too,
with their original ids — and nothing outside the window, and never another partner's."""


from conftest import ShiftedClock, bearer, wait_for
from payloads import BOOKING_CONFIRMED, PAYMENT_SUCCESS


def test_replay_sends_the_window_again_with_the_original_ids_and_nothing_else(hub_factory, receiver_factory):
    clock = ShiftedClock()
    hub = hub_factory(clock=clock)
    mine, theirs = receiver_factory(), receiver_factory()
    partner = hub.register(mine.url, ["payment.success", "booking.confirmed"])
    hub.register(theirs.url, ["payment.success"], name="Other")
    pid, own = partner["partner_id"], bearer(partner["api_key"])
    mine.secret = partner["shared_secret"]

    def publish(payload):
        """Publish and wait until it is delivered: the clock jumps a day between publishes, and a
        delivery still in flight then would outlive its lease and be sent twice."""
        event_id = hub.publish(payload).json()["event_id"]
        wait_for(lambda: not hub.deliveries(state="pending"))
        return event_id

    before = publish(PAYMENT_SUCCESS)                 # day 1
    clock.advance(86400)
    since = int(clock())
    window = [publish(PAYMENT_SUCCESS), publish(BOOKING_CONFIRMED), publish({**PAYMENT_SUCCESS, "amount": 1})]
    clock.advance(86400)
    until = int(clock())
    after = publish(PAYMENT_SUCCESS)                  # day 3
    wait_for(lambda: len(mine.received) == 5 and len(theirs.received) == 4)
    first_round = len(mine.received)

    r = hub.http.post(f"/partners/{pid}/replay", headers=own, params={"since": since, "until": until, "limit": 2})
    assert r.status_code == 202 and r.json()["replayed"] == 2 and r.json()["next_cursor"], r.text
    rest = hub.http.post(f"/partners/{pid}/replay", headers=own,
                         params={"since": since, "until": until, "limit": 2, "cursor": r.json()["next_cursor"]})
    assert rest.status_code == 202 and rest.json() == {"replayed": 1, "next_cursor": None}
    wait_for(lambda: len(mine.received) == first_round + 3)
    hub.wait_until_nothing_is_due()  # anything more would be wrong: it would have gone out by now
    again = mine.event_ids[first_round:]
    assert sorted(again) == sorted(window) and before not in again and after not in again
    assert all(r.guide_ok for r in mine.received)
    assert len(theirs.received) == 4                  # the other partner: nothing again
    assert len(hub.deliveries(partner_id=pid, state="delivered")) == 8

    only = hub.http.post(f"/partners/{pid}/replay", headers=hub.admin,
                         params={"since": since, "until": until, "event": "booking.confirmed"})
    assert only.json() == {"replayed": 1, "next_cursor": None}
    wait_for(lambda: mine.event_ids.count(window[1]) == 3)

    for params, field in (({}, "since"), ({"since": "yesterday"}, "since"), ({"since": 5, "until": 5}, "until"),
                          ({"since": 5, "limit": 1001}, "limit"), ({"since": 5, "cursor": "x"}, "cursor")):
        bad = hub.http.post(f"/partners/{pid}/replay", headers=own, params=params)
        assert bad.status_code == 422 and f"'{field}'" in bad.json()["error"]["message"], (params, bad.text)
    other = hub.register("http://127.0.0.1:9/x", ["payment.success"], name="Third")
    stranger = bearer(other["api_key"])
    assert hub.http.post(f"/partners/{pid}/replay", headers=stranger, params={"since": 0}).status_code == 404
    trail = hub.http.get("/audit", headers=hub.admin, params={"partner_id": pid, "action": "partner.replayed"})
    assert [e["changes"]["replayed"] for e in trail.json()["items"]] == [1, 1, 2]


def test_a_replay_for_a_paused_partner_says_so_unless_asked_to_queue(hub_factory, receiver_factory):
    hub = hub_factory()
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    pid = partner["partner_id"]
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: hub.deliveries(partner_id=pid, state="delivered"))
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "paused"}).status_code == 200
    held = hub.http.post(f"/partners/{pid}/replay", headers=hub.admin, params={"since": 0})
    assert held.status_code == 409 and held.json()["error"]["code"] == "partner_held"
    queued = hub.http.post(f"/partners/{pid}/replay", headers=hub.admin, params={"since": 0, "queue": "true"})
    assert queued.json()["replayed"] == 1 and len(hub.deliveries(partner_id=pid, state="pending")) == 1


def test_a_replay_skips_what_is_still_pending_and_leaves_cancelled_ones_to_the_admin(hub_factory):
    """Calling twice queues once; what the admin cancelled stays cancelled unless the admin asks."""
    hub = hub_factory()
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    pid, own = partner["partner_id"], bearer(partner["api_key"])
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "paused"}).status_code == 200
    for _ in range(3):
        hub.publish(PAYMENT_SUCCESS)
    window = {"since": 0, "queue": "true"}

    def replay(headers, **params):
        r = hub.http.post(f"/partners/{pid}/replay", headers=headers, params={**window, **params})
        assert r.status_code == 202, r.text
        return r.json()["replayed"]

    assert replay(hub.admin) == 0 and replay(own) == 0           # all three are pending already
    assert len(hub.deliveries(partner_id=pid, state="pending")) == 3
    assert hub.http.post(f"/partners/{pid}/cancel-pending", headers=hub.admin).json()["cancelled_deliveries"] == 3
    assert replay(own) == 0 and replay(hub.admin) == 0           # cancelled: left out
    asked = hub.http.post(f"/partners/{pid}/replay", headers=own, params={**window, "include_cancelled": "true"})
    assert asked.status_code == 403 and asked.json()["error"]["code"] == "admin_only", asked.text
    bad = hub.http.post(f"/partners/{pid}/replay", headers=hub.admin, params={**window, "include_cancelled": "yes"})
    assert bad.status_code == 422 and "'include_cancelled'" in bad.json()["error"]["message"]
    assert replay(hub.admin, include_cancelled="true") == 3
    assert replay(hub.admin, include_cancelled="true") == 0      # pending again: not twice
    assert len(hub.deliveries(partner_id=pid, state="pending", event="payment.success")) == 3
    trail = hub.http.get("/audit", headers=hub.admin, params={"partner_id": pid, "action": "partner.replayed"})
    assert [e["changes"]["include_cancelled"] for e in trail.json()["items"]][:2] == [True, True]

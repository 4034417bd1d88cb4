"""Offers pushed live over WebSocket, with a real client against a live server."""

import json
import os
import re
import socket
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import signing
from conftest import ADMIN, wait_for
from payloads import PAYMENT_SUCCESS


def _token(hub, user_id):
    r = hub.http.post("/realtime/tokens", headers=hub.admin, json={"user_id": user_id})
    assert r.status_code == 201, r.text
    assert r.json()["expires_at"] >= int(time.time())
    return r.json()["token"]


def _ws(hub, token):
    return connect(hub.url.replace("http://", "ws://") + f"/ws?token={token}", open_timeout=5)


def _promote(hub, partner, payload, **headers):
    body = json.dumps({"event": "tour.promoted", **payload}).encode()
    r = hub.http.post("/webhooks/partners", content=body, headers={
        "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body), "X-Webhook-Event": "tour.promoted",
        **headers})
    assert r.status_code == 200, r.text


def _wait_connected(hub, n):
    wait_for(lambda: len(hub.app.state.ctx.notifier.clients) == n)


def test_targeted_and_broadcast_offers_reach_the_right_users(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    with _ws(hub, _token(hub, "ana")) as ana, _ws(hub, _token(hub, "ben")) as ben:
        _wait_connected(hub, 2)
        _promote(hub, partner, {"tour_id": "tour_1", "user_id": "ana", "price": 99.5})
        offer = json.loads(ana.recv(timeout=5))
        assert offer == {"type": "offer", "message": "Nueva oferta disponible", "partner_id": partner["partner_id"],
                         "tour_id": "tour_1", "data": {"event": "tour.promoted", "tour_id": "tour_1",
                                                       "user_id": "ana", "price": 99.5}}
        _promote(hub, partner, {"tour_id": "tour_2"})
        assert json.loads(ana.recv(timeout=5))["tour_id"] == "tour_2"
        assert json.loads(ben.recv(timeout=5))["tour_id"] == "tour_2"   # ben never saw tour_1
        _promote(hub, partner, {"tour_id": "tour_3"})                     # a later one, for everyone:
        assert json.loads(ben.recv(timeout=5))["tour_id"] == "tour_3"   # ...the next ben sees; nothing between


def test_a_duplicate_inbound_event_notifies_once(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    with _ws(hub, _token(hub, "ana")) as ana:
        _wait_connected(hub, 1)
        _promote(hub, partner, {"tour_id": "t", "n": 1})
        _promote(hub, partner, {"tour_id": "t", "n": 1})
        assert json.loads(ana.recv(timeout=5))["tour_id"] == "t"
        _promote(hub, partner, {"tour_id": "later"})                      # a later event, not a duplicate:
        assert json.loads(ana.recv(timeout=5))["tour_id"] == "later"    # ...the next ana sees; nothing between


@pytest.mark.parametrize("token", ["", "garbage", "eyJ1IjoiYW5hIiwiZXhwIjo5OTk5OTk5OTk5fQ.00", "a.b.c"])
def test_bad_tokens_are_closed_with_policy_violation(hub, token):
    with _ws(hub, token) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd.code == 1008


def test_an_expired_token_is_closed_with_policy_violation(webhookd_factory):
    hub = webhookd_factory()
    hub.app.state.ctx.tokens.ttl_s = 0.2
    token = _token(hub, "ana")
    time.sleep(0.4)
    with _ws(hub, token) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
    assert closed.value.rcvd.code == 1008 and "expired" in closed.value.rcvd.reason


def _stalled_client(hub, token):
    """A client that stops reading: tiny socket buffers, no compression, a one-message queue."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", hub.server.port))
    return connect(hub.url.replace("http://", "ws://") + f"/ws?token={token}", sock=sock, compression=None,
                   max_queue=1, open_timeout=5, close_timeout=0.5)


def test_a_client_that_stops_reading_blocks_nobody(hub):
    hub.app.state.ctx.notifier.queue_size = 5
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    got: list[int] = []
    with _stalled_client(hub, _token(hub, "stalled")), _ws(hub, _token(hub, "reader")) as reader:

        def read_all():
            try:
                while len(got) < 150:
                    got.append(json.loads(reader.recv(timeout=10))["data"]["n"])
            except (TimeoutError, ConnectionClosed):
                pass

        thread = threading.Thread(target=read_all)
        thread.start()
        _wait_connected(hub, 2)
        pad = os.urandom(30_000).hex()
        started = time.monotonic()
        for n in range(150):
            _promote(hub, partner, {"tour_id": "t", "n": n, "pad": pad}, **{"X-Partner-Id": partner["partner_id"]})
        publishing = time.monotonic() - started
        thread.join(timeout=20)
        assert got == list(range(150))                 # the reading client got everything, in order
        assert hub.app.state.ctx.notifier.dropped > 0  # the stalled one's queue overflowed: dropped, counted
        assert publishing < 15                         # inbound requests were never held up by it


def test_the_guides_whole_scenario_end_to_end(serve_factory, receiver_factory, monkeypatch):
    """Section 5 of the guide: a partner registers, gets payment.success, answers 200, promotes a
    combo back with the guide's own sender, and a connected user sees the offer live."""
    import httpx

    import guide_sender

    serve = serve_factory()
    receiver = receiver_factory()
    partner = httpx.post(serve.url + "/partners/register", headers=ADMIN, json={
        "partner_name": "Montaña Tours", "webhook_url": receiver.url, "events": ["payment.success"]}).json()
    receiver.secret = partner["shared_secret"]
    token = httpx.post(serve.url + "/realtime/tokens", headers=ADMIN, json={"user_id": "user_uuid_here"}).json()["token"]
    with connect(serve.url.replace("http://", "ws://") + f"/ws?token={token}", open_timeout=5) as user:
        wait_for(lambda: re.search(r"^webhookd_websocket_clients 1\.0$",  # the user is connected
                                   httpx.get(serve.url + "/metrics", headers=ADMIN).text, re.MULTILINE))
        assert httpx.post(serve.url + "/events", headers=ADMIN, json=PAYMENT_SUCCESS).status_code == 202
        wait_for(lambda: receiver.received)                    # 3. the partner receives and verifies
        got = receiver.received[0]
        assert got.guide_ok and got.raw_ok and got.json["transaction_id"] == PAYMENT_SUCCESS["transaction_id"]
        wait_for(lambda: httpx.get(serve.url + "/deliveries", headers=ADMIN).json()["items"][0]["state"] == "delivered")

        monkeypatch.setenv("PARTNER_SHARED_SECRET", partner["shared_secret"])    # 4. it promotes a combo
        monkeypatch.setattr(guide_sender, "WEBHOOK_URL", serve.url + "/webhooks/partners")
        combo = {"event": "tour.promoted", "timestamp": int(time.time()), "tour_id": "combo_1",
                 "tour_name": "Tour + alojamiento", "user_id": got.json["user_id"]}
        assert guide_sender.send_webhook_to_partner("tour.promoted", combo) is True

        offer = json.loads(user.recv(timeout=5))                # 5. the user sees it live
        assert offer["type"] == "offer" and offer["message"] == "Nueva oferta disponible"
        assert offer["partner_id"] == partner["partner_id"] and offer["tour_id"] == "combo_1"
        assert offer["data"] == combo


def test_user_id_that_names_no_one_reaches_no_one(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    with _ws(hub, _token(hub, "42")) as user42, _ws(hub, _token(hub, "alice")) as alice:
        _wait_connected(hub, 2)
        alice.send(b"\x00binary frames are ignored")
        _promote(hub, partner, {"tour_id": "t1", "user_id": 42})
        assert json.loads(user42.recv(timeout=5))["tour_id"] == "t1"
        for bad in (None, "", {"id": 1}):
            _promote(hub, partner, {"tour_id": "t-bad", "user_id": bad})
        _promote(hub, partner, {"tour_id": "t2"})  # no user_id: everyone
        assert json.loads(alice.recv(timeout=5))["tour_id"] == "t2"
        assert json.loads(user42.recv(timeout=5))["tour_id"] == "t2"


def test_the_token_can_travel_in_the_subprotocol_header_and_is_not_echoed(hub):
    """A browser cannot set Authorization on a WebSocket, but it can offer subprotocols: the token
    goes there ("token.<token>"), never in a URL; the server picks "webhookd" and does not echo it.
    A forged token offered the same way is refused with 1008."""
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    token = _token(hub, "ana")
    url = hub.url.replace("http://", "ws://") + "/ws"
    with connect(url, subprotocols=["webhookd", f"token.{token}"], open_timeout=5) as ana:
        assert ana.subprotocol == "webhookd"
        assert token not in str(ana.response.headers)
        _wait_connected(hub, 1)
        _promote(hub, partner, {"tour_id": "tour_h", "user_id": "ana"})
        assert json.loads(ana.recv(timeout=5))["tour_id"] == "tour_h"
    with connect(url, subprotocols=["webhookd", f"token.{token[:-4]}beef"], open_timeout=5) as forged:
        with pytest.raises(ConnectionClosed) as closed:
            forged.recv(timeout=5)
        assert closed.value.rcvd.code == 1008

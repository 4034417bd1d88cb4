"""POST /webhooks/partners: partners' signed events, as the guide's own sender sends them."""

import hashlib
import hmac
import json
import time

import pytest
import requests

import guide_sender
import signing
from conftest import ShiftedClock, holding_the_write_lock

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)


@pytest.fixture
def partner(hub):
    return hub.register("http://127.0.0.1:9/unused", ["payment.success"], name="Montaña Tours")


def _post(hub, body: bytes, signature: str | None, event: str | None = "tour.purchased", **extra):
    headers = {"Content-Type": "application/json", **extra}
    if signature is not None:
        headers["X-Webhook-Signature"] = signature
    if event is not None:
        headers["X-Webhook-Event"] = event
    return hub.http.post("/webhooks/partners", content=body, headers=headers)


def test_the_guides_sender_as_written_gets_200_and_is_stored_once(hub, partner, monkeypatch):
    monkeypatch.setenv("PARTNER_SHARED_SECRET", partner["shared_secret"])
    monkeypatch.setattr(guide_sender, "WEBHOOK_URL", hub.url + "/webhooks/partners")
    payload = guide_sender.tour_payload()
    assert guide_sender.send_webhook_to_partner("tour.purchased", payload) is True
    assert guide_sender.send_webhook_to_partner("tour.purchased", payload) is True  # a partner retry
    stored = hub.inbound()
    assert len(stored) == 1
    assert stored[0]["partner_id"] == partner["partner_id"]
    assert stored[0]["event"] == "tour.purchased"
    assert stored[0]["payload"] == payload


def test_the_sender_response_is_received_with_a_timestamp(hub, partner):
    payload = {"event": "tour.promoted", "tour_id": "t1", "timestamp": int(time.time())}
    body = json.dumps(payload).encode()
    r = _post(hub, body, signing.sign_hex(partner["shared_secret"], body), event="tour.promoted")
    assert r.status_code == 200
    assert r.json()["status"] == "received" and abs(r.json()["timestamp"] - time.time()) < 5
    again = _post(hub, body, signing.sign_hex(partner["shared_secret"], body), event="tour.promoted")
    assert again.json() == r.json()  # the duplicate gets the same 200
    assert len(hub.inbound()) == 1


def test_x_webhook_id_deduplicates_even_when_the_body_changes(hub, partner):
    secret = partner["shared_secret"]
    for price in (1, 2):
        body = json.dumps({"event": "tour.purchased", "price": price}).encode()
        r = _post(hub, body, signing.sign_hex(secret, body), **{"X-Webhook-Id": "msg_1"})
        assert r.status_code == 200
    assert len(hub.inbound()) == 1 and hub.inbound()[0]["payload"]["price"] == 1


def test_the_partner_is_found_by_x_partner_id(hub, partner):
    other = hub.register("http://127.0.0.1:9/other", ["payment.success"], name="Other")
    body = b'{"event":"tour.purchased","tour_id":"t9"}'
    signature = signing.sign_hex(other["shared_secret"], body)
    ok = _post(hub, body, signature, **{"X-Partner-Id": other["partner_id"]})
    assert ok.status_code == 200
    wrong = _post(hub, body, signature, **{"X-Partner-Id": partner["partner_id"]})
    assert wrong.status_code == 401
    unknown = _post(hub, body, signature, **{"X-Partner-Id": "partner_nosuchpartner00"})
    assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_signature"
    assert [i["partner_id"] for i in hub.inbound()] == [other["partner_id"]]


def test_a_wrong_secret_is_401_and_stores_nothing(hub, partner):
    body = b'{"event":"tour.purchased"}'
    r = _post(hub, body, signing.sign_hex("sk_live_not_the_secret", body))
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"code", "message"}
    assert partner["shared_secret"] not in r.text
    assert hub.inbound() == []


@pytest.mark.parametrize("missing", ["signature", "event", "both"])
def test_missing_headers_are_400(hub, partner, missing):
    body = b'{"event":"tour.purchased"}'
    signature = None if missing in ("signature", "both") else signing.sign_hex(partner["shared_secret"], body)
    event = None if missing in ("event", "both") else "tour.purchased"
    r = _post(hub, body, signature, event=event)
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_headers"


def test_checks_run_in_the_specs_order(hub, partner):
    big = b'{"pad":"' + b"x" * 300_000 + b'"}'
    assert _post(hub, big, None).status_code == 400          # headers before size
    assert _post(hub, big, "00").status_code == 413          # size before JSON and signature
    assert _post(hub, b"[1,2]", "00").status_code == 400     # JSON object before signature
    assert _post(hub, b"{oops", "00").status_code == 400
    stale = json.dumps({"event": "tour.purchased", "timestamp": int(time.time()) - 3600}).encode()
    assert _post(hub, stale, "00").json()["error"]["code"] == "invalid_signature"  # signature before timestamp
    r = _post(hub, stale, signing.sign_hex(partner["shared_secret"], stale))
    assert r.status_code == 401 and r.json()["error"]["code"] == "stale_timestamp"
    assert hub.inbound() == []


def test_a_non_ascii_signature_header_is_401_not_500(hub, partner):
    body = b'{"event":"tour.purchased"}'
    r = hub.http.post("/webhooks/partners", content=body, headers=[
        (b"X-Webhook-Signature", "é".encode("latin-1") * 64), (b"X-Webhook-Event", b"tour.purchased"),
        (b"Content-Type", b"application/json")])
    assert r.status_code == 401


def test_a_badly_formed_event_header_is_400(hub, partner):
    body = b'{"event":"tour.purchased"}'
    r = _post(hub, body, signing.sign_hex(partner["shared_secret"], body), event="not an event")
    assert r.status_code == 400


def test_requests_json_body_differs_from_the_signed_string():
    """Why raw-body-only verification would refuse the guide's sender."""
    payload = guide_sender.tour_payload()
    sent = requests.Request("POST", "http://127.0.0.1/", json=payload).prepare().body
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    assert sent != canonical
    secret = "sk_live_x"
    sig = hmac.new(secret.encode(), canonical, hashlib.sha256).hexdigest()
    assert not signing.signature_matches(secret, sent, sig)
    assert signing.verify(secret, sent, json.loads(sent), sig)


def _signed(hub, partner, payload, event=None, **headers):
    body = json.dumps(payload).encode()
    return hub.http.post("/webhooks/partners", content=body, headers={
        "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body),
        "X-Webhook-Event": event or payload.get("event", "tour.purchased"), **headers})


def test_event_header_must_match_the_signed_payload(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    r = _signed(hub, partner, {"event": "tour.promoted", "tour_id": "t"}, event="booking.cancelled")
    assert r.status_code == 400 and r.json()["error"]["code"] == "event_mismatch"


def test_the_type_must_be_inside_the_signed_body(hub):
    """X-Webhook-Event is not signed: a body without its own "event" is refused, so the same signed
    bytes cannot be replayed under another type (tour.promoted, which acts) with a new id."""
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    payload = {"tour_id": "t", "user_id": "ana"}
    for event, webhook_id in (("tour.purchased", "evt_1"), ("tour.promoted", "evt_2")):
        r = _signed(hub, partner, payload, event=event, **{"X-Webhook-Id": webhook_id})
        assert r.status_code == 400 and r.json()["error"]["code"] == "missing_event", r.text
    assert hub.http.get("/inbound", headers=hub.admin).json()["items"] == []


def test_a_huge_integer_timestamp_is_refused_not_a_500(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    r = _signed(hub, partner, {"event": "tour.promoted", "timestamp": 10 ** 400})
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_timestamp"


def test_refused_signatures_are_rate_limited_per_address(webhookd_factory):
    """Unnamed signatures (no X-Partner-Id: every secret is tried) that keep failing from one address
    are refused before that work, a valid unnamed one too, until the bucket refills (on a clock the
    test moves)."""
    clock = ShiftedClock(frozen=True)
    hub = webhookd_factory(clock=clock, security__inbound_failures_per_s=1.0)
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    body = b'{"event":"tour.purchased"}'
    bad = {"X-Webhook-Signature": "00" * 32, "X-Webhook-Event": "tour.purchased"}
    codes = [hub.http.post("/webhooks/partners", content=body, headers=bad).status_code for _ in range(6)]
    assert codes == [401] * 4 + [429] * 2
    assert _signed(hub, partner, {"event": "tour.purchased", "n": 1}).status_code == 429  # until the bucket refills
    clock.advance(1.0)
    assert _signed(hub, partner, {"event": "tour.purchased", "n": 2}).status_code == 200


def test_a_forger_behind_the_same_address_cannot_lock_a_named_partner_out(webhookd_factory):
    """Behind a reverse proxy every client has the proxy's address. A forger who exhausts the
    refused-signature limit, unnamed or claiming the partner's id, gets 429s; the partner, naming
    itself with X-Partner-Id and signing correctly, is never refused."""
    hub = webhookd_factory(clock=ShiftedClock(frozen=True), security__inbound_failures_per_s=1.0)
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    body = b'{"event":"tour.purchased"}'
    for claimed in ({}, {"X-Partner-Id": partner["partner_id"]}):
        forged = {"X-Webhook-Signature": "00" * 32, "X-Webhook-Event": "tour.purchased", **claimed}
        codes = [hub.http.post("/webhooks/partners", content=body, headers=forged).status_code for _ in range(6)]
        assert codes == [401] * 4 + [429] * 2, claimed
    for n in range(3):
        r = _signed(hub, partner, {"event": "tour.purchased", "n": n}, **{"X-Partner-Id": partner["partner_id"]})
        assert r.status_code == 200, r.text


def _standard(hub, partner, payload, msg_id, timestamp=None, **extra):
    """A partner's event signed the Standard Webhooks way, with the official library and its whsec_ secret."""
    import datetime

    import standardwebhooks

    body = json.dumps(payload)
    at = datetime.datetime.fromtimestamp(timestamp or time.time(), tz=datetime.UTC)
    signature = standardwebhooks.Webhook(partner["standard_webhooks_secret"]).sign(msg_id, at, body)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())), "webhook-signature": signature,
               **extra}
    return hub.http.post("/webhooks/partners", content=body.encode(), headers=headers)


def test_standard_webhooks_inbound_signs_the_id_and_time(hub):
    """Signed with the official library: accepted and deduplicated on webhook-id; the same bytes
    and signature replayed with a new id, or the same request late, do not verify."""
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    payload = {"type": "tour.purchased", "tour_id": "tour_9", "user_id": "ana"}
    first = _standard(hub, partner, payload, "msg_1")
    assert first.status_code == 200, first.text
    assert _standard(hub, partner, payload, "msg_1").status_code == 200           # a retry: stored once
    stored = hub.http.get("/inbound", headers=hub.admin).json()["items"]
    assert len(stored) == 1 and stored[0]["event"] == "tour.purchased" and stored[0]["partner_id"] == partner["partner_id"]

    replay = dict(first.request.headers)
    replay["webhook-id"] = "msg_2"                                                 # a new id on the old signature
    r = hub.http.post("/webhooks/partners", content=first.request.content,
                      headers={k: v for k, v in replay.items() if k.startswith("webhook-")})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_signature"
    late = _standard(hub, partner, payload, "msg_3", timestamp=time.time() - 3600)
    assert late.status_code == 401 and late.json()["error"]["code"] == "stale_timestamp"
    assert len(hub.http.get("/inbound", headers=hub.admin).json()["items"]) == 1


def test_standard_webhooks_inbound_needs_all_three_headers_and_a_signed_type(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    r = hub.http.post("/webhooks/partners", content=b'{"type":"tour.purchased"}',
                      headers={"webhook-signature": "v1,AAAA", "webhook-id": "msg_1"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_headers"
    r = _standard(hub, partner, {"tour_id": "t"}, "msg_4")
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_event"
    r = _standard(hub, partner, {"type": "tour.purchased"}, "msg_5", **{"X-Webhook-Event": "tour.promoted"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "event_mismatch"


# --- What an unnamed request may cost ---------------------------------------------------------


def _register_many(hub, n):
    return [hub.register(f"http://127.0.0.1:9/p{i}", ["payment.success"], name=f"P{i}") for i in range(n)]


def _padded(size):
    """A tour.purchased body of exactly ``size`` bytes."""
    head = b'{"event":"tour.purchased","pad":"'
    return head + b"x" * (size - len(head) - 2) + b'"}'


def _at_once(hub, bodies, headers):
    """``bodies`` posted unnamed at the same moment: every connection is opened first, then every
    request written, then the answers read; meanwhile GET /health must keep answering. Returns the
    status codes and the seconds it all took."""
    import socket

    started = time.monotonic()
    conns = [socket.create_connection(("127.0.0.1", hub.server.port), timeout=30) for _ in bodies]
    try:
        for conn, body in zip(conns, bodies):
            head = "".join(f"{k}: {v}\r\n" for k, v in {
                "Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": len(body),
                "Connection": "close", **headers(body)}.items())
            conn.sendall(f"POST /webhooks/partners HTTP/1.1\r\n{head}\r\n".encode() + body)
        health = hub.http.get("/health")
        codes = [_status_of(conn) for conn in conns]
    finally:
        for conn in conns:
            conn.close()
    assert health.status_code == 200, health.text
    return codes, time.monotonic() - started


def _status_of(conn):
    answer = b""
    while b"\r\n" not in answer:
        chunk = conn.recv(4096)
        assert chunk, f"the connection closed without an answer: {answer!r}"
        answer += chunk
    return int(answer.split(b" ", 2)[1])


def _answer_to_a_head_alone(hub, content_length):
    """The status answered to an unnamed request whose head promises ``content_length`` bytes of
    body that never come."""
    import socket

    with socket.create_connection(("127.0.0.1", hub.server.port), timeout=10) as conn:
        conn.sendall(f"POST /webhooks/partners HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {content_length}\r\nX-Webhook-Signature: {'00' * 32}\r\n"
                     "X-Webhook-Event: tour.purchased\r\n\r\n".encode())
        return _status_of(conn)


def test_an_unnamed_event_names_its_partner_past_a_small_search(hub):
    """Without X-Partner-Id every partner's secret is tried: the guide's flow (few partners, a small
    body) still works, but a body over 16 KiB or more than 50 partners is a clear 400 that says to
    send X-Partner-Id; named, the same events are accepted."""
    import inbound

    first = hub.register("http://127.0.0.1:9/first", ["payment.success"], name="First")
    secret, named = first["shared_secret"], {"X-Partner-Id": first["partner_id"]}
    small = json.dumps({"event": "tour.purchased", "tour_id": "t1"}).encode()
    assert _post(hub, small, signing.sign_hex(secret, small)).status_code == 200

    large = _padded(inbound.UNNAMED_MAX_BODY_BYTES + 1)
    refused = _post(hub, large, signing.sign_hex(secret, large))
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "partner_id_required", refused.text
    assert "X-Partner-Id" in refused.json()["error"]["message"]
    assert _post(hub, large, signing.sign_hex(secret, large), **named).status_code == 200
    garbled = b"{oops" + large                                  # refused before it is parsed
    assert _post(hub, garbled, "00" * 32).json()["error"]["code"] == "partner_id_required"
    assert _answer_to_a_head_alone(hub, len(large)) == 400       # before it is even read

    _register_many(hub, inbound.UNNAMED_MAX_PARTNERS)
    other = json.dumps({"event": "tour.purchased", "tour_id": "t2"}).encode()
    r = _post(hub, other, signing.sign_hex(secret, other))
    assert r.status_code == 400 and r.json()["error"]["code"] == "partner_id_required"
    assert _post(hub, other, signing.sign_hex(secret, other), **named).status_code == 200

    flood = [_padded(200_000 + n) for n in range(20)]
    forged = {"X-Webhook-Signature": "00" * 32, "X-Webhook-Event": "tour.purchased"}
    codes, _ = _at_once(hub, flood, lambda body: forged)
    assert codes == [400] * 20
    assert sorted(i["payload"].get("tour_id", "large") for i in hub.inbound()) == ["large", "t1", "t2"]


def _partners_tried(hub):
    text = hub.http.get("/metrics", headers=hub.admin).text
    (line,) = [line for line in text.splitlines() if line.startswith("webhookd_inbound_partners_tried_total ")]
    return float(line.split()[1])


def test_concurrent_unnamed_forgeries_are_charged_before_the_search(hub_factory):
    """Each unnamed search takes one of its address's refused-signature tokens before it starts, so
    forgeries sent all at once cannot all pass the limit before the first of them fails: at most
    the burst (4) plus what refilled meanwhile are searched (401; the metric counts the partners
    tried), the rest are 429 without a search, /health answers throughout; the partner, naming
    itself, still gets through."""
    import inbound

    hub = hub_factory(security__inbound_failures_per_s=1.0)
    partners = _register_many(hub, inbound.UNNAMED_MAX_PARTNERS)  # the largest search allowed
    forged = [_padded(inbound.UNNAMED_MAX_BODY_BYTES - n) for n in range(30)]
    codes, took_s = _at_once(hub, forged, lambda body: {"X-Webhook-Signature": "00" * 32,
                                                        "X-Webhook-Event": "tour.purchased"})
    assert set(codes) <= {401, 429} and codes.count(429) > 0, codes
    searches = _partners_tried(hub) / len(partners)
    assert searches == codes.count(401) <= 4 + 1.0 * took_s, (searches, codes, took_s)
    mine = partners[-1]
    body = json.dumps({"event": "tour.purchased", "tour_id": "mine"}).encode()
    r = _post(hub, body, signing.sign_hex(mine["shared_secret"], body), **{"X-Partner-Id": mine["partner_id"]})
    assert r.status_code == 200, r.text


def test_a_valid_unnamed_signature_gives_its_token_back(webhookd_factory):
    """The token an unnamed search takes is returned when the signature verifies: a partner that
    does not name itself is limited by its own rate, not by the refused-signature limit."""
    hub = webhookd_factory(clock=ShiftedClock(frozen=True), security__inbound_failures_per_s=1.0)
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    codes = [_signed(hub, partner, {"event": "tour.purchased", "n": n}).status_code for n in range(10)]
    assert codes == [200] * 10


def test_many_hmacs_run_on_threads_of_their_own(hub):
    """A large search runs on webhookd-signatures threads, never in the default executor where
    every route's store calls (/health's among them) wait for a thread."""
    import threading

    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    body = _padded(200_000)
    r = _post(hub, body, signing.sign_hex(partner["shared_secret"], body), **{"X-Partner-Id": partner["partner_id"]})
    assert r.status_code == 200, r.text
    assert any(t.name.startswith("webhookd-signatures") for t in threading.enumerate())


# --- The commit ------------------------------------------------------------------------------------


def test_an_event_that_cannot_be_stored_in_time_is_a_503_that_stored_nothing(hub, partner):
    """The commit is awaited on the event loop (no worker thread), within the same deadline as every
    route's store call: while a transaction elsewhere holds what the write needs, a signed event gets
    503 database_busy, and nothing of it is stored; the partner's retry, once the lock is gone, is
    stored once, as new."""
    body = json.dumps({"event": "tour.purchased", "tour_id": "t-locked"}).encode()
    named = {"X-Partner-Id": partner["partner_id"], "X-Webhook-Id": "msg_locked"}
    signature = signing.sign_hex(partner["shared_secret"], body)
    with holding_the_write_lock(hub, partner["partner_id"]):
        locked = _post(hub, body, signature, **named)
    assert locked.status_code == 503 and locked.json()["error"]["code"] == "database_busy", locked.text
    assert hub.inbound() == []
    retried = _post(hub, body, signature, **named)
    assert retried.status_code == 200, retried.text
    assert [i["payload"]["tour_id"] for i in hub.inbound()] == ["t-locked"]


# --- A suspended partner ------------------------------------------------------------------------


def _suspend(hub, partner, reason="chargebacks under review"):
    r = hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin,
                       json={"status": "suspended", "reason": reason})
    assert r.status_code == 200, r.text


def test_only_a_suspended_partners_own_signature_learns_it_is_suspended(hub):
    """A request naming a suspended partner with a bad signature gets the 401 any bad signature
    gets, without a word of the suspension; the partner's own signature gets the 403 and the
    admin's reason; unnamed, its secrets are not tried."""
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    _suspend(hub, partner)
    body = json.dumps({"event": "tour.purchased", "tour_id": "t1"}).encode()
    named = {"X-Partner-Id": partner["partner_id"]}
    forged = _post(hub, body, signing.sign_hex("sk_live_not_the_secret", body), **named)
    assert forged.status_code == 401 and forged.json()["error"]["code"] == "invalid_signature"
    assert "suspend" not in forged.text and "chargebacks" not in forged.text
    own = _post(hub, body, signing.sign_hex(partner["shared_secret"], body), **named)
    assert own.status_code == 403 and own.json()["error"]["code"] == "partner_suspended"
    assert "chargebacks under review" in own.json()["error"]["message"]
    unnamed = _post(hub, body, signing.sign_hex(partner["shared_secret"], body))
    assert unnamed.status_code == 401 and unnamed.json()["error"]["code"] == "invalid_signature"
    assert hub.inbound() == []


def test_forgeries_naming_a_suspended_partner_count_as_refused_signatures(webhookd_factory):
    hub = webhookd_factory(clock=ShiftedClock(frozen=True), security__inbound_failures_per_s=1.0)
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    _suspend(hub, partner)
    body = b'{"event":"tour.purchased"}'
    named = {"X-Partner-Id": partner["partner_id"]}
    codes = [_post(hub, body, "00" * 32, **named).status_code for _ in range(6)]
    assert codes == [401] * 4 + [429] * 2
    assert _post(hub, body, signing.sign_hex(partner["shared_secret"], body), **named).status_code == 403


def test_the_partner_guide_and_the_api_document_state_the_bounds_the_code_uses(hub):
    import inbound
    from conftest import ROOT

    bounds = (f"{inbound.UNNAMED_MAX_BODY_BYTES} bytes", f"{inbound.UNNAMED_MAX_PARTNERS} ")
    header = next(p for p in hub.http.get("/openapi.json").json()["paths"]["/webhooks/partners"]["post"]["parameters"]
                  if p["name"] == "X-Partner-Id")
    for text in ((ROOT / "docs" / "partners.md").read_text(), (ROOT / "docs" / "partners.es.md").read_text(),
                 header["description"]):
        assert "partner_id_required" in text and all(bound in text for bound in bounds)

"""One event's story (GET /events/{id}/trace): every attempt with the strings it signed, which an
independent HMAC recomputes, the answer, and why what came next came next; never a secret."""

import base64
import hashlib
import hmac
import json

from conftest import bearer, wait_for
from payloads import PAYMENT_SUCCESS

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)


def test_a_trace_tells_three_attempts_with_their_signed_strings_and_no_secret(hub, receiver_factory):
    steady, flaky = receiver_factory(), receiver_factory()
    flaky.script = [(500, 0.0), (503, 0.0)]              # fails twice, then succeeds
    steady.script = [(500, 0.0)] * 3                     # out of attempts; a retry by hand then succeeds
    partner = hub.register(flaky.url, ["payment.success"], name="Flaky")
    other = hub.register(steady.url, ["payment.success"], name="Failing")
    r = hub.publish(PAYMENT_SUCCESS, headers={"Idempotency-Key": "order-7"})
    event_id = r.json()["event_id"]
    wait_for(lambda: hub.deliveries(partner_id=partner["partner_id"], state="delivered"))
    failed = wait_for(lambda: hub.deliveries(partner_id=other["partner_id"], state="failed"))[0]
    assert hub.http.post(f"/deliveries/{failed['delivery_id']}/retry", headers=hub.admin).status_code == 202
    wait_for(lambda: hub.deliveries(partner_id=other["partner_id"], state="delivered"))

    r = hub.http.get(f"/events/{event_id}/trace", headers=hub.admin)
    assert r.status_code == 200, r.text
    story = r.json()
    assert story["idempotency_key"] == "order-7" and story["fanout"] == 2
    body = story["body"]
    assert json.loads(body)["transaction_id"] == PAYMENT_SUCCESS["transaction_id"]
    mine = next(d for d in story["deliveries"] if d["partner_id"] == partner["partner_id"])
    assert [s["step"] for s in mine["steps"]] == ["queued", "attempt", "attempt", "attempt", "delivered"]
    attempts = [s for s in mine["steps"] if s["step"] == "attempt"]
    assert [a["status_code"] for a in attempts] == [500, 503, 200]
    assert [a["next"]["state"] for a in attempts] == ["pending", "pending", "delivered"]
    assert "backoff after attempt 1 of 3" in attempts[0]["next"]["why"] and attempts[0]["next"]["wait_s"] > 0

    key = partner["shared_secret"].encode()
    whsec = base64.b64decode(partner["standard_webhooks_secret"].removeprefix("whsec_"))
    assert len(flaky.received) == 3
    for attempt, received in zip(attempts, flaky.received):
        sent = attempt["request_headers"]
        assert sent["X-Webhook-Signature"] == received.headers["x-webhook-signature"]   # what really went out
        assert sent["webhook-signature"] == received.headers["webhook-signature"]
        assert sent["webhook-timestamp"] == received.headers["webhook-timestamp"]
        hex_string = attempt["signed"]["X-Webhook-Signature"]["string_to_sign"]
        assert hex_string.encode() == received.body
        assert hmac.new(key, hex_string.encode(), hashlib.sha256).hexdigest() == sent["X-Webhook-Signature"]
        std_string = attempt["signed"]["webhook-signature"]["string_to_sign"]
        assert std_string == f"{event_id}.{sent['webhook-timestamp']}.{body}"
        expected = base64.b64encode(hmac.new(whsec, std_string.encode(), hashlib.sha256).digest()).decode()
        assert f"v1,{expected}" in sent["webhook-signature"].split(" ")

    theirs = next(d for d in story["deliveries"] if d["partner_id"] == other["partner_id"])
    assert [s["step"] for s in theirs["steps"]] == ["queued", "attempt", "attempt", "attempt", "retried", "attempt",
                                                   "delivered"]
    assert "no attempt left" in theirs["steps"][3]["next"]["why"]
    assert "the admin" in theirs["steps"][4]["detail"]

    text = r.text
    for secret in (partner["shared_secret"], partner["standard_webhooks_secret"], partner["api_key"],
                   other["shared_secret"], other["api_key"]):
        assert secret not in text
    assert hub.http.get("/events/evt_nope/trace", headers=hub.admin).status_code == 404
    own = bearer(partner["api_key"])
    assert hub.http.get(f"/events/{event_id}/trace", headers=own).status_code == 403

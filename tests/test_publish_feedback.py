"""Publishing says what happened: an event that reached no partner is answered with why, and a
payload with several problems gets them all in one 422 (the first still the message)."""

import json
import subprocess
import sys

from conftest import ROOT
from payloads import PAYMENT_SUCCESS

FAILED = {"event": "payment.failed", "transaction_id": "t1", "reason": "card declined", "user_id": "u1",
          "amount": 10.0}


def test_an_event_no_partner_subscribes_to_says_so(hub):
    hub.register("http://127.0.0.1:9/x", ["payment.success"])
    answer = hub.publish(FAILED)
    assert answer.status_code == 202
    body = answer.json()
    assert body["deliveries"] == 0 and body["event_id"].startswith("evt_")
    assert body["note"]["code"] == "no_subscriber"
    assert "No partner subscribes to payment.failed" in body["note"]["message"]

    reached = hub.publish(PAYMENT_SUCCESS).json()
    assert reached["deliveries"] == 1 and "note" not in reached   # an event on its way has no note


def test_an_event_whose_audience_leaves_every_subscriber_out_says_so(hub):
    hub.register("http://127.0.0.1:9/x", ["payment.success"])
    hub.register("http://127.0.0.1:9/y", ["payment.success"], name="Otra")
    body = hub.publish({**PAYMENT_SUCCESS, "channels": ["tour_nobody_listens_on"]}).json()
    assert body["deliveries"] == 0 and body["note"]["code"] == "no_match"
    assert body["note"]["message"].startswith("2 partners subscribe to payment.success, and none matched")

    batch = hub.http.post("/events/batch", headers=hub.admin, json={"events": [FAILED, PAYMENT_SUCCESS]}).json()
    assert batch["results"][0]["note"]["code"] == "no_subscriber"
    assert batch["results"][1]["deliveries"] == 2 and "note" not in batch["results"][1]


def test_a_payload_422_lists_every_problem_at_once(hub):
    answer = hub.publish({"event": "booking.confirmed", "booking_id": 7, "user_id": "u1", "timestamp": "today"})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "invalid_field"
    assert [p["field"] for p in error["problems"]] == ["booking_id", "tour_id", "start_date", "end_date", "timestamp"]
    assert error["message"] == error["problems"][0]["message"] == "'booking_id' must be of type string for booking.confirmed."
    assert error["problems"][2]["message"] == "'start_date' is required for booking.confirmed (string)."

    batch = hub.http.post("/events/batch", headers=hub.admin, json={"events": [{"event": "booking.cancelled"}]})
    refused = batch.json()["results"][0]
    assert refused["status"] == 422 and [p["field"] for p in refused["error"]["problems"]] == ["booking_id", "user_id"]


def test_the_command_line_says_when_an_event_reached_no_partner(serve_factory):
    serve = serve_factory()
    env = {**serve.env, "WEBHOOKD_SERVER_PORT": str(serve.port)}
    data = json.dumps({k: v for k, v in FAILED.items() if k != "event"})
    published = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", str(ROOT / "webhookd.toml"),
                                "publish", "payment.failed", "--data", data],
                               capture_output=True, text=True, env=env, timeout=60)
    assert published.returncode == 0, published.stderr
    assert "deliveries  0" in published.stdout
    assert published.stderr.startswith("webhookd: reached no partner: No partner subscribes to payment.failed")
    assert published.stderr.count("\n") == 1

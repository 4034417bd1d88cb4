"""W3C Trace Context across the hop: a publish's traceparent reaches the partner with the same trace
id and a new span id per attempt, and shows in the trace view; an inbound traceparent reaches the
/ws offer and the inbound record; an invalid one is ignored, never refused."""

import json

import pytest
from test_realtime import _promote, _token, _wait_connected, _ws

import trace_context
from conftest import wait_for
from payloads import PAYMENT_SUCCESS

BOTH_ENGINES = True  # these tests touch storage: each runs on SQLite and on PostgreSQL (conftest.hub)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_each_attempt_sends_the_trace_id_with_a_span_of_its_own_and_the_trace_view_shows_it(hub, receiver_factory):
    receiver = receiver_factory()
    receiver.script = [(500, 0.0), (503, 0.0)]  # two failures, then a 200: three attempts
    partner = hub.register(receiver.url, ["payment.success"])
    r = hub.publish(PAYMENT_SUCCESS, headers={"traceparent": PARENT, "tracestate": "congo=t61rcWkgMzE"})
    assert r.status_code == 202, r.text
    wait_for(lambda: hub.deliveries(partner_id=partner["partner_id"], state="delivered"), timeout=60)

    sent = [received.headers["traceparent"] for received in receiver.received]
    assert len(sent) == 3
    for traceparent in sent:
        assert trace_context.parse_traceparent(traceparent) == traceparent  # valid, version 00
        assert traceparent.startswith(f"00-{TRACE_ID}-") and traceparent.endswith("-01")
        assert traceparent != PARENT                                          # a span of its own
    assert len({t.split("-")[2] for t in sent}) == 3                          # one per attempt
    assert {received.headers["tracestate"] for received in receiver.received} == {"congo=t61rcWkgMzE"}

    story = hub.http.get(f"/events/{r.json()['event_id']}/trace", headers=hub.admin).json()
    assert story["trace_id"] == TRACE_ID and story["traceparent"] == PARENT
    attempts = [s for s in story["deliveries"][0]["steps"] if s["step"] == "attempt"]
    assert [a["request_headers"]["traceparent"] for a in attempts] == sent   # each attempt's span, as sent


@pytest.mark.parametrize("bad", ["00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                                 f"00-{TRACE_ID}-0000000000000000-01", f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",
                                 f"ff-{TRACE_ID}-00f067aa0ba902b7-01", f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",
                                 "not a traceparent"])
def test_an_invalid_traceparent_is_ignored_not_refused(hub, receiver_factory, bad):
    receiver = receiver_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    r = hub.publish(PAYMENT_SUCCESS, headers={"traceparent": bad, "tracestate": "congo=t61rcWkgMzE"})
    assert r.status_code == 202, r.text
    wait_for(lambda: hub.deliveries(partner_id=partner["partner_id"], state="delivered"), timeout=60)
    assert "traceparent" not in receiver.received[0].headers and "tracestate" not in receiver.received[0].headers
    assert hub.http.get(f"/events/{r.json()['event_id']}/trace", headers=hub.admin).json()["trace_id"] is None


def test_an_inbound_traceparent_reaches_the_offer_and_the_inbound_record(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    with _ws(hub, _token(hub, "ana")) as ana:
        _wait_connected(hub, 1)
        _promote(hub, partner, {"tour_id": "tour_1", "user_id": "ana"}, traceparent=PARENT, tracestate="rojo=1")
        offer = json.loads(ana.recv(timeout=10))
        assert offer["tour_id"] == "tour_1" and offer["traceparent"] == PARENT
        _promote(hub, partner, {"tour_id": "tour_2", "user_id": "ana"}, traceparent="00-zz")  # invalid: left out
        assert "traceparent" not in json.loads(ana.recv(timeout=10))
    stored = {item["payload"]["tour_id"]: item for item in hub.inbound()}
    assert (stored["tour_1"]["traceparent"], stored["tour_1"]["tracestate"]) == (PARENT, "rojo=1")
    assert (stored["tour_2"]["traceparent"], stored["tour_2"]["tracestate"]) == (None, None)


def test_the_contracts_rules_for_traceparent_and_tracestate():
    assert trace_context.parse_traceparent(f" {PARENT} ") == PARENT
    later = f"cc-{TRACE_ID}-00f067aa0ba902b7-09-what-a-later-version-adds"
    assert trace_context.parse_traceparent(later) == f"00-{TRACE_ID}-00f067aa0ba902b7-09"  # first four fields
    assert trace_context.parse_traceparent(f"00-{TRACE_ID}-00f067aa0ba902b7") is None
    span = trace_context.new_span(PARENT)
    assert span[:36] == PARENT[:36] and span[-3:] == "-01" and span[36:52] != "0" * 16
    assert trace_context.parse_tracestate("a=1,,b=2") == "a=1,b=2"
    assert trace_context.parse_tracestate("a=1,b") is None                        # malformed: dropped whole
    many = ",".join(f"k{i}=v" for i in range(40))
    assert trace_context.parse_tracestate(many).count(",") == 31                  # 32 members at most
    wide = ",".join(f"k{i}={'v' * 100}" for i in range(10))
    assert len(trace_context.parse_tracestate(wide)) <= 512
    assert trace_context.from_headers({"tracestate": "a=1"}) == (None, None)      # no traceparent: no tracestate


def test_a_batchs_traceparent_goes_with_each_of_its_events(hub):
    hub.register("http://127.0.0.1:9/x", ["payment.success"])
    r = hub.http.post("/events/batch", headers={**hub.admin, "traceparent": PARENT},
                      json={"events": [PAYMENT_SUCCESS, {**PAYMENT_SUCCESS, "transaction_id": "txn_2"}]})
    assert r.status_code == 202 and r.json()["accepted"] == 2, r.text
    for result in r.json()["results"]:
        story = hub.http.get(f"/events/{result['event_id']}/trace", headers=hub.admin).json()
        assert story["trace_id"] == TRACE_ID

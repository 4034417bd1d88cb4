"""FIFO partners: one attempt at a time, in publish order; a failing head holds the rest — in one
process, across a kill -9 and a restart, and across processes on one PostgreSQL."""

import signal

import httpx
import pytest

from conftest import ADMIN_TOKEN, wait_for
from payloads import PAYMENT_SUCCESS

BOTH_ENGINES = True  # the in-process test runs on SQLite and on PostgreSQL (conftest.hub)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def in_order(received) -> list[str]:
    """The event ids as the receiver saw them, a repeat of the one just before dropped (a retry,
    or an attempt cut by a crash and sent again): what must equal the publish order."""
    ids: list[str] = []
    for r in received:
        if not ids or ids[-1] != r.headers["x-webhook-id"]:
            ids.append(r.headers["x-webhook-id"])
    return ids


def register_fifo(url: str, receiver_url: str) -> dict:
    r = httpx.post(url + "/partners/register", headers=ADMIN, timeout=10, json={
        "partner_name": "Ledger Tours", "webhook_url": receiver_url, "events": ["payment.success"],
        "ordering": "fifo"})
    assert r.status_code == 201 and r.json()["ordering"] == "fifo", r.text
    return r.json()


def publish(urls: list[str], count: int) -> list[str]:
    """``count`` events, one after the other (each 202 before the next is sent), through each
    process in turn: their publish order is defined."""
    ids = []
    for i in range(count):
        r = httpx.post(urls[i % len(urls)] + "/events", headers=ADMIN, timeout=10,
                       json={**PAYMENT_SUCCESS, "transaction_id": f"t{i}"})
        assert r.status_code == 202, r.text
        ids.append(r.json()["event_id"])
    return ids


def test_a_fifo_partner_gets_one_at_a_time_in_publish_order_and_a_failing_head_holds_the_rest(hub, receiver_factory):
    receiver = receiver_factory(default=(200, 0.02))
    receiver.script = [(500, 0.0), (500, 0.0)]          # the first event fails twice, then succeeds
    partner = register_fifo(hub.url, receiver.url)
    pid = partner["partner_id"]
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "paused"}).status_code == 200
    ids = publish([hub.url], 8)
    queue = sorted(hub.deliveries(partner_id=pid), key=lambda d: ids.index(d["event_id"]))
    head = queue[0]["delivery_id"]
    assert queue[0]["held_behind"] is None and {d["held_behind"] for d in queue[1:]} == {head}
    assert hub.http.get(f"/deliveries/{queue[3]['delivery_id']}", headers=hub.admin).json()["held_behind"] == head
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"}).status_code == 200
    wait_for(lambda: len(hub.deliveries(partner_id=pid, state="delivered")) == 8, timeout=30)
    assert in_order(receiver.received) == ids
    assert receiver.event_ids[:3] == [ids[0]] * 3 and len(receiver.received) == 10
    assert receiver.max_in_flight == 1


def test_a_concurrent_partner_is_not_held_back_by_a_failing_delivery(hub, receiver_factory):
    """The default, for contrast: the same backlog goes out at once, side by side, and the two that
    fail are retried while the others are delivered."""
    receiver = receiver_factory(default=(200, 0.1))
    receiver.script = [(500, 0.1)] * 2
    partner = hub.register(receiver.url, ["payment.success"])
    pid = partner["partner_id"]
    assert partner["ordering"] == "concurrent"
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "paused"}).status_code == 200
    publish([hub.url], 4)
    assert {d["held_behind"] for d in hub.deliveries(partner_id=pid)} == {None}
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"}).status_code == 200
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 4, timeout=30)
    assert len(receiver.received) == 6 and receiver.max_in_flight >= 2


@pytest.mark.slow
def test_fifo_order_holds_across_a_kill_9_and_a_restart(serve_factory, receiver_factory):
    receiver = receiver_factory(default=(200, 0.1))    # slow answers: the kill comes mid-request
    receiver.script = [(500, 0.0), (500, 0.0)]
    serve = serve_factory()
    register_fifo(serve.url, receiver.url)
    ids = publish([serve.url], 20)
    wait_for(lambda: len(receiver.received) >= 8, timeout=30)
    serve.stop(signal.SIGKILL)
    assert len(in_order(receiver.received)) < 20, "everything went out before the kill"
    again = serve_factory(port=serve.port)             # the same database file
    wait_for(lambda: httpx.get(again.url + "/stats", headers=ADMIN).json()["totals"]["delivered"] == 20, timeout=60)
    assert in_order(receiver.received) == ids
    assert receiver.max_in_flight == 1


@pytest.mark.slow
def test_fifo_order_holds_across_three_processes_on_postgresql(serve_factory, postgres_server, receiver_factory):
    receiver = receiver_factory(default=(200, 0.02))
    receiver.script = [(500, 0.0), (500, 0.0)]
    url = postgres_server.new_database()
    processes = [serve_factory(WEBHOOKD_STORAGE_URL=url) for _ in range(3)]
    register_fifo(processes[0].url, receiver.url)
    ids = publish([p.url for p in processes], 30)
    wait_for(lambda: httpx.get(processes[1].url + "/stats", headers=ADMIN).json()["totals"]["delivered"] == 30,
             timeout=60)
    assert in_order(receiver.received) == ids
    assert receiver.max_in_flight == 1

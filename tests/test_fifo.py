"""FIFO partners: one attempt at a time, in publish order; a failing head holds the rest — in one
process, across a kill -9 and a restart, and across processes on one PostgreSQL."""

import asyncio
import signal
import threading
import time

import httpx
import pytest

from conftest import ADMIN, Receiver, wait_for
from payloads import PAYMENT_SUCCESS

BOTH_ENGINES = True  # the in-process test runs on SQLite and on PostgreSQL (conftest.hub)


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


class HoldingReceiver(Receiver):
    """A Receiver whose answers wait while ``hold`` is set. It notes each request as it arrives
    (``arrived``) and the most it ever had open at once, the hold included (``most_open``)."""

    def __init__(self):
        super().__init__()
        self.hold = threading.Event()
        self.arrived: list[str] = []
        self.open = self.most_open = 0

    async def _handle(self, request):
        with self._lock:
            self.arrived.append(request.headers.get("x-webhook-id", ""))
            self.open += 1
            self.most_open = max(self.most_open, self.open)
        try:
            while self.hold.is_set():
                await asyncio.sleep(0.01)
            return await super()._handle(request)
        finally:
            with self._lock:
                self.open -= 1


def test_a_retry_by_hand_waits_for_the_delivery_on_the_wire_then_goes_before_the_rest(hub_factory):
    """An old failed delivery retried by hand is the partner's head again (publish order) while a
    newer one is on the wire: nothing goes beside it; once it ends, the retried one goes, then the
    rest in order."""
    hub = hub_factory(delivery__max_attempts=1, delivery__timeout_s=30.0)  # held answers are not cut off
    receiver = HoldingReceiver().start()
    try:
        receiver.script = [(500, 0.0)]
        partner = register_fifo(hub.url, receiver.url)
        receiver.secret = partner["shared_secret"]
        pid = partner["partner_id"]
        (old,) = publish([hub.url], 1)
        (failed,) = wait_for(lambda: hub.deliveries(partner_id=pid, state="failed"), timeout=30)
        receiver.hold.set()
        later = publish([hub.url], 2)
        wait_for(lambda: receiver.arrived == [old, later[0]], timeout=30)  # the head, held at the receiver

        claims: list[tuple[float, list[str]]] = []    # (when each claim began, the events it took)
        retried_at: list[float] = []
        claim_due, retry_delivery = hub.store.claim_due, hub.store.retry_delivery

        def watched_claim(**kw):
            began = time.monotonic()
            jobs = claim_due(**kw)
            claims.append((began, [j.event_id for j in jobs]))
            return jobs

        def watched_retry(*a, **kw):
            queued = retry_delivery(*a, **kw)
            retried_at.append(time.monotonic())
            return queued

        hub.store.claim_due, hub.store.retry_delivery = watched_claim, watched_retry
        r = hub.http.post(f"/deliveries/{failed['delivery_id']}/retry", headers=hub.admin)
        assert r.status_code == 202 and r.json()["held_behind"] is None, r.text  # the head again
        after = wait_for(lambda: [taken for began, taken in list(claims) if began > retried_at[0]], timeout=30)
        assert after[0] == [], "a delivery of the FIFO partner was claimed while its head was on the wire"

        receiver.hold.clear()
        wait_for(lambda: len(hub.deliveries(partner_id=pid, state="delivered")) == 3, timeout=30)
        assert in_order(receiver.received) == [old, later[0], old, later[1]]
        assert receiver.most_open == 1
        assert all(r.raw_ok for r in receiver.received[1:])
    finally:
        receiver.stop()


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

"""`webhookd serve` as a real process: stop, crash (kill -9) and restart lose nothing."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import ADMIN, ROOT, Receiver, ServeProcess, free_port, wait_for
from payloads import PAYMENT_SUCCESS

pytestmark = pytest.mark.slow


def _register(url, receiver_url):
    r = httpx.post(url + "/partners/register", headers=ADMIN, json={
        "partner_name": "Restart", "webhook_url": receiver_url, "events": ["payment.success"]})
    assert r.status_code == 201, r.text
    return r.json()


def _deliveries(url):
    r = httpx.get(url + "/deliveries", headers=ADMIN)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_pending_deliveries_survive_a_stop_and_restart(serve_factory):
    receiver_port = free_port()
    # Nobody listens yet: attempts fail with connection_refused and the delivery stays pending.
    serve = serve_factory(WEBHOOKD_DELIVERY_MAX_ATTEMPTS="50", WEBHOOKD_DELIVERY_BACKOFF_BASE_S="0.5",
                          WEBHOOKD_DELIVERY_BACKOFF_MAX_S="1")
    partner = _register(serve.url, f"http://127.0.0.1:{receiver_port}/hook")
    r = httpx.post(serve.url + "/events", headers=ADMIN, json=PAYMENT_SUCCESS)
    assert r.status_code == 202
    event_id = r.json()["event_id"]
    wait_for(lambda: _deliveries(serve.url)[0]["attempt_count"] >= 1)
    serve.stop(signal.SIGTERM)
    assert "delivery loop stopped" in serve.output() and "Traceback" not in serve.output()

    receiver = Receiver(secret=partner["shared_secret"], port=receiver_port).start()
    try:
        again = serve_factory(port=serve.port, WEBHOOKD_DELIVERY_MAX_ATTEMPTS="50",
                              WEBHOOKD_DELIVERY_BACKOFF_BASE_S="0.5", WEBHOOKD_DELIVERY_BACKOFF_MAX_S="1")
        wait_for(lambda: receiver.received, timeout=15)
        got = receiver.received[0]
        assert got.headers["x-webhook-id"] == event_id and got.guide_ok and got.raw_ok
        wait_for(lambda: _deliveries(again.url)[0]["state"] == "delivered")
    finally:
        receiver.stop()


def test_a_send_cut_by_kill_9_is_sent_again_once_its_lease_runs_out(serve_factory, receiver_factory, tmp_path):
    receiver = receiver_factory(default=(200, 0.7))   # slow enough to kill the sender mid-request
    serve = serve_factory()
    partner = _register(serve.url, receiver.url)
    receiver.secret = partner["shared_secret"]
    event_id = httpx.post(serve.url + "/events", headers=ADMIN, json=PAYMENT_SUCCESS).json()["event_id"]
    wait_for(lambda: receiver.received)              # the request is in flight now
    serve.stop(signal.SIGKILL)

    db_path = serve.env["WEBHOOKD_STORAGE_PATH"]
    with sqlite3.connect(db_path) as db:
        (state, leased_until, attempts) = db.execute(
            "SELECT state, leased_until, attempt_count FROM deliveries").fetchone()
        assert state == "pending" and leased_until is not None and attempts == 0  # claimed, never finished
        # Let the lease run out without waiting for it: move it into the past.
        db.execute("UPDATE deliveries SET leased_until = :t, next_attempt_at = :t", {"t": time.time() - 1})

    receiver.default = (200, 0)
    again = serve_factory(port=serve.port)
    wait_for(lambda: len(receiver.received) == 2, timeout=15)
    assert {r.headers["x-webhook-id"] for r in receiver.received} == {event_id}
    wait_for(lambda: _deliveries(again.url)[0]["state"] == "delivered")
    assert "deliveries re-queued because their lease ran out (an earlier run stopped mid-send): 1" in again.output()


def test_sigterm_drains_attempts_in_flight(serve_factory, receiver_factory):
    receiver = receiver_factory(default=(200, 0.6))
    serve = serve_factory()
    _register(serve.url, receiver.url)
    for i in range(3):
        assert httpx.post(serve.url + "/events", headers=ADMIN,
                          json={**PAYMENT_SUCCESS, "transaction_id": f"t{i}"}).status_code == 202
    wait_for(lambda: len(receiver.received) == 3)   # all three are in flight now
    serve.stop(signal.SIGTERM)
    assert "delivery loop stopped; every attempt in flight finished" in serve.output()
    with sqlite3.connect(serve.env["WEBHOOKD_STORAGE_PATH"]) as db:
        rows = db.execute("SELECT state, leased_until FROM deliveries").fetchall()
    assert rows == [("delivered", None)] * 3


def test_sigterm_starts_no_new_send_and_a_restart_sends_the_rest_once(serve_factory, receiver_factory):
    """``concurrency = 1``, one attempt in flight and two due behind it when SIGTERM comes: the one
    in flight finishes and is recorded; nothing new is claimed or sent, no lease is left behind,
    so a restart sends the other two at once and exactly once. (A job claimed but not begun when
    the stop comes is released: test_delivery.py.)"""
    receiver = receiver_factory(default=(200, 0.8))
    serve = serve_factory(WEBHOOKD_DELIVERY_CONCURRENCY="1", WEBHOOKD_DELIVERY_TIMEOUT_S="5")
    _register(serve.url, receiver.url)
    for i in range(3):
        assert httpx.post(serve.url + "/events", headers=ADMIN,
                          json={**PAYMENT_SUCCESS, "transaction_id": f"t{i}"}).status_code == 202
    db_path = serve.env["WEBHOOKD_STORAGE_PATH"]

    def leased():
        with sqlite3.connect(db_path) as db:
            return db.execute("SELECT COUNT(*) FROM deliveries WHERE leased_until IS NOT NULL").fetchone()[0]

    wait_for(lambda: len(receiver.received) == 1 and leased() == 1)  # one in flight, two due behind it
    serve.stop(signal.SIGTERM)
    assert len(receiver.received) == 1
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT state, attempt_count, leased_until FROM deliveries ORDER BY id").fetchall()
    assert sorted(rows) == [("delivered", 1, None), ("pending", 0, None), ("pending", 0, None)]

    restarted = serve_factory(port=serve.port, WEBHOOKD_STORAGE_PATH=db_path)
    wait_for(lambda: all(d["state"] == "delivered" for d in _deliveries(restarted.url)), timeout=30)
    ids = [r.headers["x-webhook-id"] for r in receiver.received]
    assert len(ids) == 3 == len(set(ids))


def test_kill_9_in_a_burst_of_2000_deliveries_loses_nothing(serve_factory, receiver_factory):
    receiver = receiver_factory(default=(200, 0.03))   # slow enough that the burst is still going
    env = {"WEBHOOKD_DELIVERY_TIMEOUT_S": "0.5",        # lease = 2 x 0.5 + 10 = 11 s
           "WEBHOOKD_DELIVERY_PER_PARTNER_CONCURRENCY": "4"}  # 20 in flight: the burst lasts seconds
    serve = serve_factory(**env)
    for i in range(5):
        r = httpx.post(serve.url + "/partners/register", headers=ADMIN, json={
            "partner_name": f"P{i}", "webhook_url": f"{receiver.server.url}/p{i}", "events": ["payment.success"]})
        assert r.status_code == 201
    event_ids = []
    with httpx.Client(base_url=serve.url, headers=ADMIN) as client:
        for i in range(400):
            r = client.post("/events", json={**PAYMENT_SUCCESS, "transaction_id": f"t{i}"})
            assert r.status_code == 202
            event_ids.append(r.json()["event_id"])
    expected = {(f"/p{p}", e) for p in range(5) for e in event_ids}   # 2,000 deliveries
    wait_for(lambda: len(receiver.received) >= 600, timeout=30)
    serve.stop(signal.SIGKILL)
    received_at_kill = len(receiver.received)
    assert received_at_kill < 2000, "the burst finished before the kill; slow the receiver down"
    with sqlite3.connect(serve.env["WEBHOOKD_STORAGE_PATH"]) as db:
        (in_flight,) = db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE state = 'pending' AND leased_until IS NOT NULL").fetchone()

    restarted = serve_factory(port=serve.port, **env)  # leases run out by themselves (11 s)
    wait_for(lambda: {(r.path, r.headers["x-webhook-id"]) for r in receiver.received} >= expected, timeout=60)

    def every_result_recorded():  # all 2,000 delivered and none in flight: no duplicate can still come
        totals = httpx.get(restarted.url + "/stats", headers=ADMIN, timeout=10).json()["totals"]
        return totals["delivered"] == len(expected) and totals["in_flight"] == 0

    wait_for(every_result_recorded, timeout=60)
    got = [(r.path, r.headers["x-webhook-id"]) for r in receiver.received]
    assert set(got) == expected
    duplicates = len(got) - len(expected)
    assert duplicates <= in_flight, (duplicates, in_flight)


def test_kill_9_right_after_a_batch_answer_loses_none_of_its_events(serve_factory):
    serve = serve_factory()
    _register(serve.url, f"http://127.0.0.1:{free_port()}/nobody")  # deliveries stay pending; events matter here
    events = [{**PAYMENT_SUCCESS, "transaction_id": f"txn_{i}"} for i in range(200)]
    r = httpx.post(serve.url + "/events/batch", headers=ADMIN, json={"events": events}, timeout=30)
    serve.stop(signal.SIGKILL)                         # at once: the 202 is all the proof there is
    assert r.status_code == 202 and r.json()["accepted"] == 200
    ids = [result["event_id"] for result in r.json()["results"]]
    restarted = serve_factory(port=serve.port, WEBHOOKD_STORAGE_PATH=serve.env["WEBHOOKD_STORAGE_PATH"])
    for event_id in ids:
        assert httpx.get(f"{restarted.url}/events/{event_id}", headers=ADMIN).status_code == 200


class ServeWithAStalledLog(ServeProcess):
    """``webhookd serve`` whose log goes to a pipe the test can stop reading (``stop_reading``).
    Once the pipe is full every log write blocks, and so does the recorder, which logs each
    attempt it writes (at DEBUG for a success: the test runs it at ``server.log_level = "debug"``):
    a recorder that falls behind, as a stuck log collector or a slow disk makes it in production,
    while the claims and the sends could go on."""

    def start(self) -> "ServeWithAStalledLog":
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "--config", str(ROOT / "webhookd.toml"),
             "serve", "--port", str(self.port)],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT))
        self.copied = bytearray()    # what the copy has read so far
        self.reading = threading.Event()
        self.reading.set()
        self.copier = threading.Thread(target=self._copy_log, daemon=True)
        self.copier.start()
        wait_for(self._responds, timeout=20, interval=0.1)
        return self

    def _copy_log(self) -> None:
        while self.reading.wait() and (chunk := os.read(self.proc.stdout.fileno(), 4096)):
            self.copied += chunk
            self.log.write(chunk.decode(errors="replace"))

    def stop_reading(self, after: str) -> None:
        """Stop reading the log once the line holding ``after`` is read (the pipe is empty then)."""
        wait_for(lambda: after.encode() in self.copied, timeout=30)
        self.reading.clear()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
        self.reading.set()           # read to the end of the pipe, then close the copy
        self.copier.join(timeout=10)
        self.log.close()


def _settled(receiver: Receiver, total: int, quiet_s: float = 2.0):
    """A wait_for predicate: every delivery arrived, or none arrived for ``quiet_s``."""
    last = {"count": -1, "at": 0.0}

    def check() -> bool:
        count = len(receiver.received)
        if count >= total:
            return True
        if count != last["count"]:
            last.update(count=count, at=time.monotonic())
            return False
        return time.monotonic() - last["at"] >= quiet_s

    return check


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_kill_9_behind_a_stalled_recorder_sends_again_at_most_concurrency(engine, request, tmp_path, serve_factory,
                                                                          receiver_factory):
    """A burst of 2,000 deliveries to a fast partner, ``concurrency = 20``; the recorder stalls
    (its log pipe is full) while the partner keeps answering 200. Answered results wait to be
    written, and each one holds its place in flight, so the loop stops claiming at 20: a kill -9
    then sends again at most those 20 — never the thousands answered behind a stalled recorder."""
    concurrency, total = 20, 2000
    env = {"WEBHOOKD_DELIVERY_CONCURRENCY": str(concurrency),
           "WEBHOOKD_DELIVERY_PER_PARTNER_CONCURRENCY": str(total),  # out of the way: the bound is concurrency
           "WEBHOOKD_DELIVERY_TIMEOUT_S": "0.5",               # lease = 2 x 0.5 + 10 = 11 s
           "WEBHOOKD_SERVER_LOG_LEVEL": "debug"}               # a line per successful attempt: what stalls
    if engine == "postgresql":
        env["WEBHOOKD_STORAGE_URL"] = request.getfixturevalue("postgres_server").new_database()
    receiver = receiver_factory()
    serve = ServeWithAStalledLog(tmp_path, free_port(), env).start()
    try:
        partner = _register(serve.url, receiver.url)
        receiver.secret = partner["shared_secret"]
        partner_url = f"{serve.url}/partners/{partner['partner_id']}"
        assert httpx.patch(partner_url, headers=ADMIN, json={"status": "paused"}).status_code == 200
        with httpx.Client(base_url=serve.url, headers=ADMIN, timeout=30) as client:
            for first in range(0, total, 500):
                r = client.post("/events/batch", json={"events": [
                    {**PAYMENT_SUCCESS, "transaction_id": f"t{i}"} for i in range(first, first + 500)]})
                assert r.status_code == 202 and r.json()["accepted"] == 500, r.text
        serve.stop_reading(after=f"published {r.json()['results'][-1]['event_id']}")
        assert httpx.patch(partner_url, headers=ADMIN, json={"status": "active"}).status_code == 200
        wait_for(_settled(receiver, total), timeout=60)
    finally:
        serve.kill()
    answered_before_the_kill = len({r.headers["x-webhook-id"] for r in receiver.received})

    again = serve_factory(port=serve.port, **env)       # the leases run out by themselves (11 s)
    wait_for(lambda: httpx.get(again.url + "/stats", headers=ADMIN).json()["totals"]["delivered"] == total,
             timeout=90, interval=0.2)
    ids = [r.headers["x-webhook-id"] for r in receiver.received]
    assert len(set(ids)) == total and all(r.guide_ok and r.raw_ok for r in receiver.received)
    duplicates = len(ids) - total
    assert duplicates <= concurrency, (duplicates, answered_before_the_kill)
    assert answered_before_the_kill < total, "the recorder did not stall: the scenario tested nothing"

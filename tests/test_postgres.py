"""Several `webhookd serve` processes on one PostgreSQL: limits and leases that hold across all of them.

Each test starts its own processes (``serve_factory``) on a fresh database of the session's
throwaway PostgreSQL (``postgres_server``, tests/pg.py) and real receivers on 127.0.0.1.
"""

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import signing
from conftest import ADMIN, ROOT, bearer, holding_the_write_lock, wait_for, wait_until_nothing_is_due
from payloads import PAYMENT_SUCCESS

pytestmark = pytest.mark.slow


def _processes(serve_factory, postgres_server, n, **env):
    url = postgres_server.new_database()
    return [serve_factory(WEBHOOKD_STORAGE_URL=url, **env) for _ in range(n)]


def _register(process, url, name="P"):
    r = httpx.post(process.url + "/partners/register", headers=ADMIN,
                   json={"partner_name": name, "webhook_url": url, "events": ["payment.success"]})
    assert r.status_code == 201, r.text
    return r.json()


def _publish_round_robin(processes, count, client_timeout=10):
    """``count`` events, published through each process in turn (so every one of them has work)."""
    ids = []
    clients = [httpx.Client(base_url=p.url, headers=ADMIN, timeout=client_timeout) for p in processes]
    try:
        for i in range(count):
            r = clients[i % len(clients)].post("/events", json={**PAYMENT_SUCCESS, "transaction_id": f"t{i}"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["event_id"])
    finally:
        for client in clients:
            client.close()
    return ids


def _states(process):
    counts = httpx.get(process.url + "/stats", headers=ADMIN, timeout=10).json()["totals"]
    return counts


def test_a_partners_cap_holds_across_three_processes(serve_factory, postgres_server, receiver_factory):
    """A partner that answers after 200 ms, a cap of 4, three processes that all have its work:
    the receiver's own count of open requests never passes 4."""
    receiver = receiver_factory(default=(200, 0.2))
    processes = _processes(serve_factory, postgres_server, 3, WEBHOOKD_DELIVERY_PER_PARTNER_CONCURRENCY="4")
    _register(processes[0], receiver.url)
    _publish_round_robin(processes, 40)
    wait_for(lambda: len(receiver.received) >= 40, timeout=60)
    wait_for(lambda: _states(processes[1])["delivered"] == 40, timeout=30)
    assert receiver.max_in_flight <= 4, receiver.max_in_flight
    assert receiver.max_in_flight >= 2  # the processes did share the work at once
    assert len(set(receiver.event_ids)) == 40
    listed = httpx.get(processes[1].url + "/stats", headers=ADMIN, timeout=10).json()["processes"]
    assert len(listed) == 3 and [p["this"] for p in listed].count(True) == 1
    assert {p["pid"] for p in listed} == {p.proc.pid for p in processes}


def test_a_partners_pace_is_shared_by_the_processes(serve_factory, postgres_server, receiver_factory):
    """``max_rate_per_s`` 4 and two processes with its work: each sends at half the pace, so the
    receiver sees about 4 a second, not 8. (A slower machine only spreads them further.)"""
    receiver = receiver_factory()
    processes = _processes(serve_factory, postgres_server, 2)
    partner = _register(processes[0], receiver.url)
    r = httpx.patch(f"{processes[0].url}/partners/{partner['partner_id']}", headers=ADMIN, timeout=10,
                    json={"max_rate_per_s": 4})
    assert r.status_code == 200, r.text
    for p in processes:  # each knows of the other (heartbeats every 2 s)
        wait_for(lambda p=p: len(httpx.get(p.url + "/stats", headers=ADMIN, timeout=10).json()["processes"]) == 2,
                 timeout=30)
    _publish_round_robin(processes, 40)
    wait_for(lambda: len(receiver.received) >= 40, timeout=60)
    arrivals = sorted(r.at for r in receiver.received)
    spread = arrivals[-1] - arrivals[0]
    assert spread >= 0.8 * 39 / 4, f"40 deliveries in {spread:.1f} s: faster than the partner's pace of 4/s"


def test_shared_rate_limits_count_requests_to_every_process(serve_factory, postgres_server, receiver_factory):
    """Open registration (2 a minute per address) and refused signatures (a burst of 4 per address)
    are limited once for all the processes, not once per process."""
    receiver = receiver_factory()
    a, b = _processes(serve_factory, postgres_server, 2, WEBHOOKD_SECURITY_OPEN_REGISTRATION="true",
                      WEBHOOKD_SECURITY_REGISTRATION_RATE_PER_MIN="2", WEBHOOKD_SECURITY_INBOUND_FAILURES_PER_S="1")
    for process in (a, a):
        r = httpx.post(process.url + "/partners/register", timeout=10, json={
            "partner_name": "Open", "webhook_url": receiver.url, "events": ["payment.success"]})
        assert r.status_code == 201, r.text
    r = httpx.post(b.url + "/partners/register", timeout=10, json={
        "partner_name": "Open", "webhook_url": receiver.url, "events": ["payment.success"]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
    assert int(r.headers["Retry-After"]) > 0

    body = json.dumps({"event": "tour.purchased", "tour_id": "t1"}).encode()
    forged = {"X-Webhook-Signature": "0" * 64, "X-Webhook-Event": "tour.purchased"}
    for _ in range(4):
        assert httpx.post(a.url + "/webhooks/partners", content=body, headers=forged, timeout=10).status_code == 401
    r = httpx.post(b.url + "/webhooks/partners", content=body, headers=forged, timeout=10)
    assert r.status_code == 429, r.text


def test_a_partner_registered_through_one_process_is_known_to_another_at_once(serve_factory, postgres_server):
    """No second of 404s: a read through another process finds the partner (a miss reads the
    partners again), with the admin token and with the partner's own key."""
    a, b = _processes(serve_factory, postgres_server, 2)
    for n in range(5):
        partner = _register(a, "http://127.0.0.1:9/x", name=f"P{n}")
        r = httpx.get(f"{b.url}/partners/{partner['partner_id']}", headers=ADMIN, timeout=10)
        assert r.status_code == 200, r.text
        own = bearer(partner["api_key"])
        r = httpx.get(f"{b.url}/partners/{partner['partner_id']}", headers=own, timeout=10)
        assert r.status_code == 200, r.text


def test_kill_9_of_one_of_three_processes_loses_nothing(serve_factory, postgres_server, receiver_factory):
    """Three processes, thirty partners, 21,000 deliveries; one process is killed mid-burst. Every
    delivery arrives; the duplicates are at most what the dead process held (the partners' caps:
    30 × 4), which the others take over once its leases run out (2 × 1 s + 10 s here).

    The partners are paused while the events are published, so the burst starts all at once;
    at 120 in flight and 0.05 s per answer it lasts half a minute or more, and the kill comes
    after 4,000."""
    partners_n, events_n = 30, 700
    receiver = receiver_factory(default=(200, 0.05))
    processes = _processes(serve_factory, postgres_server, 3, WEBHOOKD_DELIVERY_PER_PARTNER_CONCURRENCY="4")
    partners = [_register(processes[0], f"{receiver.server.url}/p{k}", name=f"P{k}") for k in range(partners_n)]
    with httpx.Client(base_url=processes[0].url, headers=ADMIN, timeout=10) as admin:
        for p in partners:
            assert admin.patch(f"/partners/{p['partner_id']}", json={"status": "paused"}).status_code == 200
        event_ids = _publish_round_robin(processes, events_n)
        for p in partners:
            assert admin.patch(f"/partners/{p['partner_id']}", json={"status": "active"}).status_code == 200
    expected = {(f"/p{k}", e) for k in range(partners_n) for e in event_ids}
    wait_for(lambda: len(receiver.received) >= 4000, timeout=120)
    processes[2].stop(signal.SIGKILL)
    assert len(receiver.received) < len(expected), "the burst finished before the kill"
    wait_for(lambda: {(r.path, r.headers["x-webhook-id"]) for r in receiver.received} >= expected, timeout=300)
    got = [(r.path, r.headers["x-webhook-id"]) for r in receiver.received]
    assert set(got) == expected
    assert len(got) - len(expected) <= partners_n * 4, len(got) - len(expected)
    wait_for(lambda: _states(processes[0])["delivered"] == len(expected), timeout=120)


def test_a_circuit_opened_by_one_process_pauses_the_others(serve_factory, postgres_server, receiver_factory):
    """A partner that always answers 500. The first process's attempts open its circuit, and it
    records the pause in the database. Two processes started afterwards have never seen the
    partner fail, yet they show its circuit open and send nothing, though its new events wait
    in the database. An operator's recover ends the pause, and what waited goes out."""
    receiver = receiver_factory(default=(500, 0.0))
    url = postgres_server.new_database()
    env = dict(WEBHOOKD_STORAGE_URL=url, WEBHOOKD_DELIVERY_BREAKER_THRESHOLD="3",
               WEBHOOKD_DELIVERY_BREAKER_SPAN_S="0.3", WEBHOOKD_DELIVERY_BREAKER_COOLDOWN_S="60",
               WEBHOOKD_DELIVERY_BREAKER_COOLDOWN_MAX_S="60", WEBHOOKD_DELIVERY_MAX_ATTEMPTS="50")
    first = serve_factory(**env)
    partner = _register(first, receiver.url)

    def circuit(process):
        answer = httpx.get(f"{process.url}/partners/{partner['partner_id']}", headers=ADMIN, timeout=10)
        return answer.json()["circuit"] if answer.status_code == 200 else {"state": "unknown yet"}

    _publish_round_robin([first], 9)
    wait_for(lambda: circuit(first)["state"] == "open", timeout=30)
    others = [serve_factory(**env), serve_factory(**env)]
    shown = wait_for(lambda: (c := [circuit(p) for p in others]) and all(x["state"] == "open" for x in c) and c,
                     timeout=10)
    assert {x["reason"] for x in shown} == {"paused_by_another_process"}
    sent = len(receiver.received)
    _publish_round_robin(others, 6)  # new work, published through the processes that never failed
    for process in others:            # each of them looks for due work every second
        wait_until_nothing_is_due(process.url)
    assert len(receiver.received) == sent, "a process sent to a partner another process had paused"
    receiver.default = (200, 0.0)
    r = httpx.post(f"{others[0].url}/partners/{partner['partner_id']}/recover?since=0", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    # The first process's own breaker (60 s of cooldown) is reset by the operator too.
    wait_for(lambda: circuit(first)["state"] != "open", timeout=5)
    wait_for(lambda: _states(others[1])["delivered"] == 15, timeout=60)


def test_while_the_database_is_away_the_api_says_503_and_then_everything_is_delivered(
        webhookd_factory, postgres_server, receiver_factory):
    """PostgreSQL crashes mid-stream: `/health` and a publish answer 503 (never a 202 for an event
    that was not stored, never a 500); once it is back, the same process reconnects by itself and
    every accepted event is delivered."""
    receiver = receiver_factory()
    hub = webhookd_factory(storage__url=postgres_server.new_database())
    hub.register(receiver.url, ["payment.success"])
    accepted = [hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"before{i}"}).json()["event_id"] for i in range(5)]
    postgres_server.crash()
    try:
        assert hub.http.get("/health").status_code == 503
        refused = hub.http.post("/events", headers=hub.admin, json={**PAYMENT_SUCCESS, "transaction_id": "away"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "database_unavailable"
    finally:
        postgres_server.start_again()
    wait_for(lambda: hub.http.get("/health").status_code == 200, timeout=30)
    # The pool's connections come back one by one: a publish made while the writer still waits for
    # one may be told 503 "nothing was stored; try again", as a client would, until it is a 202.
    def published(transaction_id: str) -> httpx.Response | None:
        r = hub.publish({**PAYMENT_SUCCESS, "transaction_id": transaction_id})
        return None if r.status_code == 503 else r

    for i in range(5):
        r = wait_for(lambda: published(f"after{i}"), timeout=30, interval=0.5)  # noqa: B023 (called at once)
        assert r.status_code == 202, r.text
        accepted.append(r.json()["event_id"])
    wait_for(lambda: set(accepted) <= set(receiver.event_ids), timeout=60)
    assert "away" not in {r.json.get("transaction_id") for r in receiver.received}


def test_migrate_store_moves_partners_and_work_from_the_sqlite_file(webhookd_factory, postgres_server,
                                                                     receiver_factory, tmp_path):
    """A SQLite webhookd with a partner whose secret was rotated (the old one still in its
    overlap), one delivered, one failed and one pending delivery: after `webhookd migrate-store`,
    a webhookd on PostgreSQL sends the pending one, shows the failed one, and accepts an inbound
    event signed with the partner's old secret."""
    receiver = receiver_factory()
    old_hub = webhookd_factory(delivery__max_attempts=1)
    partner = old_hub.register(receiver.url, ["payment.success"])
    pid = partner["partner_id"]
    old_hub.publish({**PAYMENT_SUCCESS, "transaction_id": "delivered"})
    wait_for(lambda: old_hub.deliveries(state="delivered"))
    receiver.default = (500, 0.0)
    old_hub.publish({**PAYMENT_SUCCESS, "transaction_id": "failed"})
    wait_for(lambda: old_hub.deliveries(state="failed"))
    assert old_hub.http.patch(f"/partners/{pid}", headers=old_hub.admin, json={"status": "paused"}).status_code == 200
    old_hub.publish({**PAYMENT_SUCCESS, "transaction_id": "pending"})
    rotated = old_hub.http.post(f"/partners/{pid}/rotate-secret", headers=old_hub.admin).json()
    sqlite_path = old_hub.config.storage.path
    old_hub.stop()

    url = postgres_server.new_database()

    def migrate():
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", str(ROOT / "webhookd.toml"),
                               "migrate-store", "--to", url], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "WEBHOOKD_STORAGE_PATH": sqlite_path})

    run = migrate()
    assert run.returncode == 0, run.stderr
    assert "partners 1" in run.stdout and "deliveries 3" in run.stdout
    again = migrate()  # into a database that is no longer empty
    assert again.returncode != 0 and "not empty" in again.stderr

    receiver.default = (200, 0.0)
    hub = webhookd_factory(storage__url=url, delivery__max_attempts=1)
    states = sorted(d["state"] for d in hub.deliveries())
    assert states == ["delivered", "failed", "pending"]
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"status": "active"}).status_code == 200
    wait_for(lambda: "pending" in [r.json.get("transaction_id") for r in receiver.received], timeout=30)
    body = json.dumps({"event": "tour.purchased", "tour_id": "tour_1", "user_id": "u1", "price": 10.0}).encode()
    for secret in (partner["shared_secret"], rotated["shared_secret"]):  # the old one is still in its overlap
        r = hub.http.post("/webhooks/partners", content=body, headers={
            "X-Webhook-Signature": signing.sign_hex(secret, body), "X-Webhook-Event": "tour.purchased",
            "X-Webhook-Id": f"evt_{secret[-6:]}"})
        assert r.status_code == 200, r.text


def test_an_offer_received_by_one_process_reaches_a_user_connected_to_another(serve_factory, postgres_server):
    """A `tour.promoted` posted to process A reaches the WebSocket client of process B (through a
    NOTIFY), once: B relays it, A does not relay its own back. (Each process listens before it
    serves, and ana's handshake is complete when `connect` returns.)"""
    from websockets.sync.client import connect

    a, b = _processes(serve_factory, postgres_server, 2)
    partner = _register(a, "http://127.0.0.1:9/x")
    token = httpx.post(b.url + "/realtime/tokens", headers=ADMIN, json={"user_id": "ana"}, timeout=10).json()["token"]
    with connect(b.url.replace("http://", "ws://") + f"/ws?token={token}", open_timeout=10) as ana:
        body = json.dumps({"event": "tour.promoted", "tour_id": "tour_9", "user_id": "ana", "price": 10.0}).encode()
        r = httpx.post(a.url + "/webhooks/partners", content=body, timeout=10, headers={
            "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body),
            "X-Webhook-Event": "tour.promoted"})
        assert r.status_code == 200, r.text
        offer = json.loads(ana.recv(timeout=15))
        assert offer["tour_id"] == "tour_9" and offer["partner_id"] == partner["partner_id"]
        with pytest.raises(TimeoutError):
            ana.recv(timeout=1.0)  # once


def test_metrics_show_the_oldest_open_transaction_and_dead_rows(webhookd_factory, postgres_server):
    """The known PostgreSQL queue cliff — a transaction left open stalls SKIP LOCKED claims and
    vacuum — is visible in /metrics before it bites."""
    import psycopg
    from prometheus_client.parser import text_string_to_metric_families

    url = postgres_server.new_database()
    hub = webhookd_factory(storage__url=url)

    def gauges():
        text = hub.http.get("/metrics", headers=hub.admin).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    assert gauges()["webhookd_db_oldest_transaction_seconds"] < 60
    assert "webhookd_db_deliveries_dead_rows" in gauges()
    with psycopg.connect(url) as idle:
        idle.execute("SELECT 1")        # a transaction opened and left open
        wait_for(lambda: gauges()["webhookd_db_oldest_transaction_seconds"] >= 1.0, timeout=30)


# --- Time bounds: a lock held elsewhere, a database away, a deadlock ------------------------------

# docs/postgresql.md promises a route's 503 within 3 s of the request (its store calls give up after
# web.DB_DEADLINE_S, 2.5 s, their wait for a thread, a connection or a row lock included). On a
# loaded 2-core machine, with this test's own clients in the same process, each answer is allowed
# that plus a generous margin; without the bounds they took 9.7 s and more, or never came.
PROMISED_S = 3.0
LOAD_MARGIN_S = 4.0


def _call_all(base_url, calls, bound_s):
    """Make every call at once, each on its own thread; for each: (status or None if it took
    longer than ``bound_s``, the JSON answer, the seconds it took)."""
    from concurrent.futures import ThreadPoolExecutor

    def call(spec):
        method, path, headers, body = spec
        started = time.monotonic()
        try:
            r = httpx.request(method, base_url + path, headers=headers, json=body, timeout=bound_s)
        except httpx.TimeoutException:
            return None, None, time.monotonic() - started
        return r.status_code, r.json(), time.monotonic() - started

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(call, calls))


def _transaction_ids(receiver):
    return {r.json.get("transaction_id") for r in receiver.received}


def test_a_lock_held_elsewhere_costs_the_publishes_a_503_and_no_other_route_waits(hub_factory, receiver_factory):
    """A transaction left open elsewhere holds what every publish needs. Twelve publishes and a
    partner update give up with a 503 within the promised 3 s (on PostgreSQL the lock timeout, cut to
    what is left of a late caller's time); /health, /me and GET /deliveries answer at once meanwhile.
    Once the lock is released everything works, and every event accepted arrives."""
    receiver = receiver_factory()
    hub = hub_factory()
    partner = hub.register(receiver.url, ["payment.success"])
    pid, own = partner["partner_id"], bearer(partner["api_key"])
    accepted = [hub.publish({**PAYMENT_SUCCESS, "transaction_id": "before"}).json()["event_id"]]
    publishes = [("POST", "/events", ADMIN, {**PAYMENT_SUCCESS, "transaction_id": f"locked{i}"}) for i in range(12)]
    others = [("GET", "/health", {}, None), ("GET", "/me", own, None), ("GET", "/deliveries", ADMIN, None)] * 3
    update = [("PATCH", f"/partners/{pid}", ADMIN, {"max_rate_per_s": 50})]
    bound_s = PROMISED_S + LOAD_MARGIN_S
    with holding_the_write_lock(hub, pid):
        answers = _call_all(hub.url, publishes + update + others, bound_s + 30)  # the bound is checked below
    for (method, path, _, _), (status, body, seconds) in zip(publishes + update + others, answers):
        assert status is not None, f"{method} {path} did not answer at all"
        if (method, path) in (("POST", "/events"), ("PATCH", f"/partners/{pid}")):
            assert status == 503 and body["error"]["code"] == "database_busy", (path, status, body)
        else:
            assert status == 200, (path, status, body)
        assert seconds <= bound_s, f"{method} {path} answered {status} after {seconds:.1f} s"
    for i in range(5):
        r = hub.publish({**PAYMENT_SUCCESS, "transaction_id": f"after{i}"})
        assert r.status_code == 202, r.text
        accepted.append(r.json()["event_id"])
    assert hub.http.patch(f"/partners/{pid}", headers=hub.admin, json={"max_rate_per_s": 50}).status_code == 200
    wait_for(lambda: set(accepted) <= set(receiver.event_ids), timeout=60)
    assert not {f"locked{i}" for i in range(12)} & _transaction_ids(receiver)  # a 503 stored nothing


def test_while_the_database_is_away_every_route_answers_503_within_3_s_under_concurrent_requests(
        webhookd_factory, postgres_server, receiver_factory):
    """PostgreSQL stopped, 48 requests at once to five routes that need it: three times the threads
    the routes have, each call of which waits for a connection. Every one answers 503 JSON within
    the promised 3 s (plus the margin for a loaded machine): the wait for a thread counts against the
    same deadline. Once the database is back, everything works again."""
    receiver = receiver_factory()
    hub = webhookd_factory(storage__url=postgres_server.new_database())
    partner = hub.register(receiver.url, ["payment.success"])
    pid, own = partner["partner_id"], bearer(partner["api_key"])
    event_id = hub.publish({**PAYMENT_SUCCESS, "transaction_id": "before"}).json()["event_id"]
    calls = [("POST", "/events", ADMIN, {**PAYMENT_SUCCESS, "transaction_id": "away"}), ("GET", "/health", {}, None),
             ("GET", "/deliveries", ADMIN, None), ("GET", f"/events/{event_id}", ADMIN, None),
             ("GET", "/me", own, None), ("PATCH", f"/partners/{pid}", ADMIN, {"max_rate_per_s": 50})] * 8
    bound_s = PROMISED_S + LOAD_MARGIN_S
    postgres_server.crash()
    try:
        answers = _call_all(hub.url, calls, bound_s + 30)  # the bound is checked below, with a message
    finally:
        postgres_server.start_again()
    for (method, path, _, _), (status, body, seconds) in zip(calls, answers):
        assert status == 503, (method, path, status, body)
        assert body["error"]["code"] in ("database_unavailable", "database_busy"), body
        assert seconds <= bound_s, f"{method} {path} answered its 503 after {seconds:.1f} s"
    wait_for(lambda: hub.http.get("/health").status_code == 200, timeout=30)
    r = hub.publish({**PAYMENT_SUCCESS, "transaction_id": "after"})
    assert r.status_code == 202, r.text
    assert hub.http.get("/me", headers=own).status_code == 200
    wait_for(lambda: {"before", "after"} <= _transaction_ids(receiver), timeout=60)
    assert "away" not in _transaction_ids(receiver)


def test_an_attempt_that_fails_while_the_database_is_away_is_recorded_once_it_is_back(
        webhookd_factory, postgres_server, caplog):
    """A partner with a failing streak in the store, this process new to it: its failed attempt
    needs the partner's history (``last_failed_attempt_at``), and PostgreSQL crashes while the
    attempt is on the wire. The attempt is neither dropped nor logged as a crash: the recorder
    keeps trying, one warning line at a time, and once the database is back the attempt is there."""
    import asyncio
    import threading

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from conftest import ThreadServer

    arrived, answer = threading.Event(), threading.Event()

    async def failing(request):
        arrived.set()
        await asyncio.to_thread(answer.wait, 60)
        return JSONResponse({"error": "down"}, status_code=500)

    receiver = ThreadServer(Starlette(routes=[Route("/hook", failing, methods=["POST"])])).start()
    url = postgres_server.new_database()
    hub = webhookd_factory(storage__url=url, delivery__timeout_s=30.0)
    try:
        pid = hub.register(receiver.url + "/hook", ["payment.success"])["partner_id"]
        with hub.store._transaction() as db:  # failing since a minute ago, as another run left it
            db.execute("UPDATE partners SET failing_since = :t WHERE id = :id", {"t": time.time() - 60, "id": pid})
        caplog.clear()
        hub.publish({**PAYMENT_SUCCESS, "transaction_id": "t1"})
        assert arrived.wait(30)
        postgres_server.crash()
        try:
            answer.set()  # the attempt ends 500 with the database away
            retries = "recording 1 attempts failed"  # it keeps trying, longer than it used to
            wait_for(lambda: sum(retries in r.getMessage() for r in caplog.records) >= 3, timeout=60)
        finally:
            postgres_server.start_again()
        wait_for(lambda: (1, 500) in hub.rows("SELECT attempt, status_code FROM attempts"), timeout=60)
    finally:
        hub.stop()
        receiver.stop()
    traced = [r for r in caplog.records if r.exc_info]
    assert not traced, [f"{r.name}: {r.getMessage()}" for r in traced]
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]


def test_a_deadlock_runs_the_transaction_again_and_it_succeeds(postgres_server):
    """Two transactions lock two rows in opposite orders: PostgreSQL breaks the deadlock by rolling
    ours back (the other waits longer before it looks), and ours runs again and succeeds — no
    DatabaseUnavailable, no 503."""
    import threading

    import psycopg

    from storage import open_store
    from store import retry_on_conflict

    url = postgres_server.new_database()
    store = open_store(url, lock_timeout_s=10)  # the deadlock is found (after 1 s) long before a lock times out
    try:
        with store._transaction() as db:
            db.execute("INSERT INTO roles (name, holder, until) VALUES ('a', 'x', 0), ('b', 'x', 0)")
        runs, ours_holds_a, theirs_holds_b = [], threading.Event(), threading.Event()

        @retry_on_conflict
        def a_then_b():
            with store._transaction() as db:
                runs.append(len(runs) + 1)
                db.execute("SELECT * FROM roles WHERE name = 'a' FOR UPDATE")
                if len(runs) == 1:
                    ours_holds_a.set()
                    assert theirs_holds_b.wait(10)
                db.execute("SELECT * FROM roles WHERE name = 'b' FOR UPDATE")
                db.execute("UPDATE roles SET holder = 'ours' WHERE name IN ('a', 'b')")
            return len(runs)

        def b_then_a():
            with psycopg.connect(url) as conn:
                conn.execute("SET deadlock_timeout = '20s'")  # so PostgreSQL picks ours to roll back
                conn.execute("SELECT * FROM roles WHERE name = 'b' FOR UPDATE")
                theirs_holds_b.set()
                assert ours_holds_a.wait(10)
                conn.execute("SELECT * FROM roles WHERE name = 'a' FOR UPDATE")

        theirs = threading.Thread(target=b_then_a)
        theirs.start()
        assert a_then_b() == 2
        theirs.join(timeout=30)
        assert {r[0] for r in _rows(store, "SELECT holder FROM roles")} == {"ours"}
    finally:
        store.close()


def _rows(store, sql):
    with store._reader() as db:
        return [tuple(row) for row in db.execute(sql)]


def test_the_claim_locks_partners_in_id_order(postgres_server):
    """``_LOCK_PARTNERS`` returns each row as it locks it: partners registered in a shuffled order,
    and updated since (so the table's order is neither), come back — are locked — in id order, the
    order the recorder's health writes lock them in (sorted ids)."""
    import random

    import store_postgres
    from storage import open_store

    store = open_store(postgres_server.new_database())
    try:
        ids = [f"ptr_{n:04d}" for n in range(40)]
        random.Random(7).shuffle(ids)
        for pid in ids:
            store.add_partner(partner_id=pid, name=pid, webhook_url="http://127.0.0.1:9/x", events=["payment.success"],
                              secret="s" * 32, api_key_hash=pid, now=time.time())
        with store._transaction() as db:
            for pid in ids[::3]:
                db.execute("UPDATE partners SET failing_since = 1 WHERE id = :id", {"id": pid})
        with store._transaction(durable=False) as db:
            locked = [row["id"] for row in db.execute(store_postgres._LOCK_PARTNERS, {"now": time.time()})]
        assert sorted(locked) == sorted(ids)
        assert locked == sorted(ids)
    finally:
        store.close()

"""The store on both engines — a real SQLite file and a real PostgreSQL — claims, leases,
transactions; and what is SQLite's own (file modes, WAL, the claim's index)."""

import json
import os
import re
import stat
import threading
import time
from contextlib import contextmanager

import pytest

import openapi
from models import Attempt, NewEvent, Outcome
from storage import open_store
from store_history import DELIVERY_FILTERS

_counter = iter(range(10**9))


def _id(prefix):
    return f"{prefix}{next(_counter):012d}"


@pytest.fixture
def store(store_target):
    s = open_store(store_target)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path):
    s = open_store(str(tmp_path / "data" / "w.db"))
    yield s
    s.close()


def _partner(store, events=("payment.success",), status_secret="sk_live_s"):
    return store.add_partner(partner_id=_id("partner_"), name="P", webhook_url="http://127.0.0.1:9/x",
                             events=list(events), secret=status_secret, api_key_hash=_id("h"), now=1000.0)


def _finish(store, delivery_id, attempt, state, now):
    """Record one attempt through ``finish_attempts``; True if it was recorded."""
    outcome = Outcome(delivery_id=delivery_id, partner_id="", attempt=attempt, state=state, next_attempt_at=now)
    return not store.finish_attempts([outcome], now=now)


def _publish(store, now=1000.0, **kw):
    event = NewEvent(id=_id("evt_"), type="payment.success", body=b'{"a":1}', **kw)
    return store.publish(event, now=now, max_attempts=3, new_delivery_id=lambda: _id("dlv_"))


def test_database_file_and_folder_are_private(tmp_path, sqlite_store):
    path = tmp_path / "data" / "w.db"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_publishes_and_inbound_events_commit_durably_on_the_writer(store):
    """The 202 of a publish and the 200 of an inbound event promise the commit is on disk: every
    transaction they run in is read, on the very connection that commits it, as FULL (SQLite) or
    synchronous_commit on (PostgreSQL). Bookkeeping, which may be lost, is the opposite."""
    seen: list[tuple[str, list[str]]] = []  # (the writer's mode, the statements of that transaction)
    real = store.engine.transaction
    query = "SHOW synchronous_commit" if store.shared else "PRAGMA synchronous"

    class Recording:
        def __init__(self, db, statements):
            self.db, self.statements = db, statements

        def execute(self, sql, *params):
            self.statements.append(sql)
            return self.db.execute(sql, *params)

        def executemany(self, sql, params):
            self.statements.append(sql)
            return self.db.executemany(sql, params)

    @contextmanager
    def watched(durable=True):
        with real(durable) as db:
            statements: list[str] = []
            seen.append((str(db.execute(query).fetchone()[0]), statements))
            yield Recording(db, statements)

    store.engine.transaction = watched
    partner = _partner(store)
    seen.clear()
    _publish(store)
    store.add_inbound(inbound_id="inb_1", partner_id=partner.id, event_type="tour.purchased", dedupe_key="k",
                      body=b"{}", now=1000.0)
    durable = "on" if store.shared else "2"  # PRAGMA synchronous: 2 is FULL
    for table in ("INSERT INTO events", "INSERT INTO inbound_events"):
        modes = [mode for mode, statements in seen if any(table in sql for sql in statements)]
        assert modes == [durable], (table, seen)
    seen.clear()
    if store.shared:  # claims and results: one statement each on the bookkeeping connections
        with store.engine._bookkeeping.connection() as conn:
            assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "off"
    else:
        store.claim_due(now=2000.0, lease_s=10, limit=10, per_partner=5)
        assert seen and {mode for mode, _ in seen} == {"1"}, seen  # NORMAL


def test_wal_and_full_sync_are_on(sqlite_store):
    with sqlite_store._reader() as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_the_claim_query_uses_the_due_index(store):
    """SQLite searches deliveries_partner_due; PostgreSQL its partial index of pending rows only,
    so delivered history, however long, never slows a claim."""
    plan = store.explain_claim()
    if store.shared:
        assert "Index Scan using deliveries_partner_pending" in plan, plan
        assert "on deliveries_leased" in plan or "using deliveries_leased" in plan, plan
        assert "Seq Scan on deliveries" not in plan, plan
    else:
        assert "USING INDEX deliveries_partner_due" in plan
        assert "SCAN d" not in plan  # never a full scan of deliveries


def test_publish_creates_one_delivery_per_subscriber_in_one_transaction(store):
    subscribed = [_partner(store) for _ in range(3)]
    _partner(store, events=["booking.confirmed"])
    event, created = _publish(store)
    assert created and event.fanout == 3
    page = store.list_deliveries(limit=50, event_id=event.id)
    assert sorted(d.partner_id for d in page.items) == sorted(p.id for p in subscribed)
    assert all(d.state == "pending" and d.attempt_count == 0 for d in page.items)


def test_a_failing_publish_leaves_nothing_behind(store):
    _partner(store)

    def broken_id():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.publish(NewEvent(id="evt_x", type="payment.success", body=b"{}"), now=1.0,
                      max_attempts=3, new_delivery_id=broken_id)
    assert store.get_event("evt_x") is None
    assert store.list_deliveries(limit=10).items == []


def test_claimed_rows_are_leased_not_deleted_and_come_back_when_the_lease_runs_out(store):
    _partner(store)
    _publish(store, now=1000.0)
    jobs = store.claim_due(now=1000.0, lease_s=30, limit=10, per_partner=100)
    assert len(jobs) == 1 and jobs[0].attempt == 1
    assert store.claim_due(now=1001.0, lease_s=30, limit=10, per_partner=100) == []  # held by the lease
    d = store.get_delivery(jobs[0].delivery_id)
    assert d.state == "pending" and d.leased_until == 1030.0
    # the holder "crashed": after the lease the same delivery is claimed again, same attempt number
    again = store.claim_due(now=1031.0, lease_s=30, limit=10, per_partner=100)
    assert [j.delivery_id for j in again] == [jobs[0].delivery_id] and again[0].attempt == 1


def test_a_late_finish_after_the_lease_was_taken_over_records_once(store):
    _partner(store)
    _publish(store)
    first = store.claim_due(now=1000.0, lease_s=30, limit=1, per_partner=100)[0]
    second = store.claim_due(now=1031.0, lease_s=30, limit=1, per_partner=100)[0]
    ok = Attempt(attempt=1, started_at=1031.0, duration_ms=5, status_code=200, error=None, response_snippet="")
    assert _finish(store, second.delivery_id, ok, "delivered", now=1032.0)
    assert not _finish(store, first.delivery_id, ok, "delivered", now=1033.0)
    assert len(store.get_delivery(first.delivery_id).attempts) == 1


def test_a_batch_of_results_records_those_still_expected_and_names_the_others(store):
    """One batch: results of deliveries that still expect them, one whose delivery was cancelled
    meanwhile and one already recorded. The first are written with their attempts, whatever the
    order; the other two are named as not recorded and leave their rows as they were."""
    _partner(store)
    for _ in range(4):
        _publish(store)
    jobs = store.claim_due(now=1000.0, lease_s=30, limit=4, per_partner=100)
    assert len(jobs) == 4
    ok = Attempt(attempt=1, started_at=1000.0, duration_ms=5, status_code=200, error=None, response_snippet="ok")
    assert _finish(store, jobs[3].delivery_id, ok, "delivered", now=1001.0)      # recorded once already
    with store._transaction() as db:
        db.execute("UPDATE deliveries SET state = 'cancelled' WHERE id = :id", {"id": jobs[1].delivery_id})

    def outcome(job, state):
        return Outcome(delivery_id=job.delivery_id, partner_id=job.partner_id, attempt=ok, state=state,
                       next_attempt_at=1005.0)

    batch = [outcome(jobs[0], "delivered"), outcome(jobs[1], "delivered"), outcome(jobs[2], "pending"),
             outcome(jobs[3], "delivered")]
    assert sorted(store.finish_attempts(batch, now=1002.0)) == sorted([jobs[1].delivery_id, jobs[3].delivery_id])
    states = {j.delivery_id: store.get_delivery(j.delivery_id) for j in jobs}
    assert [states[j.delivery_id].state for j in jobs] == ["delivered", "cancelled", "pending", "delivered"]
    assert [len(states[j.delivery_id].attempts) for j in jobs] == [1, 0, 1, 1]
    assert states[jobs[2].delivery_id].next_attempt_at == 1005.0 and states[jobs[2].delivery_id].attempt_count == 1
    assert states[jobs[3].delivery_id].updated_at == 1001.0   # untouched by the batch


def test_requeue_expired_leases_counts_and_clears_them(store):
    _partner(store)
    _publish(store)
    store.claim_due(now=1000.0, lease_s=30, limit=1, per_partner=100)
    assert store.requeue_expired_leases(now=1010.0) == 0
    assert store.requeue_expired_leases(now=1031.0) == 1
    assert store.list_deliveries(limit=1).items[0].leased_until is None


def test_paused_partners_hold_their_deliveries(store):
    p = _partner(store)
    _publish(store)
    with store._transaction() as db:
        db.execute("UPDATE partners SET status = 'paused' WHERE id = :id", {"id": p.id})
    assert store.claim_due(now=2000.0, lease_s=30, limit=10, per_partner=100) == []
    assert store.next_due_at() is None
    assert store.list_deliveries(limit=10).items[0].state == "pending"


def test_concurrent_claimers_never_claim_the_same_delivery_twice(store_target):
    path = store_target
    setup = open_store(path)
    for _ in range(5):
        _partner(setup)
    for _ in range(200):
        _publish(setup)  # 1000 deliveries
    setup.close()
    stores = [open_store(path) for _ in range(4)]  # separate writers, like separate processes
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(s):
        while True:
            jobs = s.claim_due(now=time.time(), lease_s=60, limit=7, per_partner=300)  # no cap in the way
            if not jobs:
                return
            with lock:
                claimed.extend(j.delivery_id for j in jobs)

    threads = [threading.Thread(target=claimer, args=(stores[i % 4],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in stores:
        s.close()
    assert len(claimed) == 1000
    assert len(set(claimed)) == 1000


def test_idempotency_key_returns_the_first_event(store):
    _partner(store)
    first, created = _publish(store, idempotency_key="k1", request_hash="h1")
    again, created_again = _publish(store, idempotency_key="k1", request_hash="h1")
    assert created and not created_again and again.id == first.id
    assert len(store.list_deliveries(limit=10).items) == 1


def test_inbound_is_stored_once_per_partner_and_key(store):
    p = _partner(store)
    first, created = store.add_inbound(inbound_id="inb_1", partner_id=p.id, event_type="tour.purchased",
                                       dedupe_key="id:x", body=b"{}", now=5.0)
    again, created_again = store.add_inbound(inbound_id="inb_2", partner_id=p.id, event_type="tour.purchased",
                                             dedupe_key="id:x", body=b"{}", now=6.0)
    assert created and not created_again and again.id == "inb_1" and again.received_at == 5.0


def test_inbound_events_of_one_group_commit_are_written_in_one_statement_with_each_answer_right(store):
    """The group commit writes a batch's inbound events together (``InboundWrite.together``): each
    still gets its own answer, in order, beside a work of another kind — new, a resend of one stored
    before, and two with one key in the same batch (the first is new, the second its resend)."""
    from models import InboundEvent
    from store import work_together
    from store_history import InboundWrite

    p = _partner(store)
    store.add_inbound(inbound_id="inb_old", partner_id=p.id, event_type="tour.purchased", dedupe_key="id:old",
                      body=b'{"n":0}', now=1.0)

    def event(inbound_id, key):
        return InboundEvent(id=inbound_id, partner_id=p.id, type="tour.purchased", dedupe_key=key,
                            body=b'{"n":1}', received_at=2.0)

    works = [InboundWrite(event("inb_a", "id:a")), lambda db: "another kind", InboundWrite(event("inb_b", "id:old")),
             InboundWrite(event("inb_c", "id:c")), InboundWrite(event("inb_d", "id:c"))]
    with store._transaction() as db:
        results = work_together(db, works)
    assert results[1] == "another kind"
    answers = [(stored.id, created) for stored, created in results[:1] + results[2:]]
    assert answers == [("inb_a", True), ("inb_old", False), ("inb_c", True), ("inb_c", False)]
    assert results[2][0].received_at == 1.0 and results[2][0].body == b'{"n":0}'
    with store._transaction() as db:
        assert work_together(db, [InboundWrite(event("inb_e", "id:e"))])[0] == (event("inb_e", "id:e"), True)
    assert sorted(i.id for i in store.list_inbound(limit=10).items) == ["inb_a", "inb_c", "inb_e", "inb_old"]


def test_list_deliveries_pages_newest_first(store):
    _partner(store)
    for _ in range(5):
        _publish(store)
    page1 = store.list_deliveries(limit=2)
    page2 = store.list_deliveries(limit=2, cursor=page1.next_cursor)
    page3 = store.list_deliveries(limit=2, cursor=page2.next_cursor)
    ids = [d.id for d in page1.items + page2.items + page3.items]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 5
    assert page3.next_cursor is None


def _deliveries_filters() -> set[str]:
    """The query parameters GET /deliveries offers, read from the OpenAPI document (so a filter added
    there is checked here too), but the page size."""
    doc = openapi.document({}, "test")
    return {p["name"] for p in doc["paths"]["/deliveries"]["get"]["parameters"] if p["in"] == "query"} - {
        "limit", "since", "until"}  # the window's plan: tests/test_windows.py


def test_every_filter_of_get_deliveries_reads_through_an_index(store):
    """Each filter, alone, after a cursor, and beside the others, is searched through an index of
    its column (never a scan of every delivery); alone it also reads in id order, so a page stops
    at its limit."""
    assert _deliveries_filters() == set(DELIVERY_FILTERS)  # every filter the API offers, the store builds
    columns = {name: re.search(r"(\w+) [=<] :", condition).group(1) for name, condition in DELIVERY_FILTERS.items()}
    filters = sorted(set(DELIVERY_FILTERS) - {"cursor"})
    for name in filters:
        for given in ({name: "x"}, {name: "x", "cursor": "dlv_x"}, {f: "x" for f in filters}):
            plan = store.explain_deliveries(**given)
            if store.shared:
                assert "Seq Scan on deliveries" not in plan, (given, plan)
                if len(given) <= 2:
                    assert re.search(rf"Index Cond: \(.*\b{columns[name]} = ", plan), (given, plan)
            else:
                assert "SCAN d" not in plan, (given, plan)
                assert re.search(r"SEARCH d USING (COVERING )?INDEX \w+ \((\w+)=", plan), (given, plan)
                if len(given) <= 2:
                    assert f"({columns[name]}=?" in plan and "TEMP B-TREE" not in plan, (given, plan)


def test_each_filter_of_list_deliveries_finds_its_rows_alone_and_together(store):
    """The statement built from the filters given returns what each asks for, and pages."""
    a, b = _partner(store), _partner(store, events=("payment.success", "booking.confirmed"))
    paid = [_publish(store)[0] for _ in range(3)]
    booked = store.publish(NewEvent(id=_id("evt_"), type="booking.confirmed", body=b"{}"), now=1000.0,
                           max_attempts=3, new_delivery_id=lambda: _id("dlv_"))[0]
    first = store.list_deliveries(limit=50, event_id=paid[0].id).items
    assert {d.partner_id for d in first} == {a.id, b.id} and {d.event_id for d in first} == {paid[0].id}
    assert [d.event for d in store.list_deliveries(limit=50, event="booking.confirmed").items] == ["booking.confirmed"]
    assert len(store.list_deliveries(limit=50, partner_id=b.id, event="payment.success").items) == 3
    assert len(store.list_deliveries(limit=50, state="pending").items) == 7
    assert store.list_deliveries(limit=50, state="delivered").items == []
    both = store.list_deliveries(limit=50, partner_id=b.id, state="pending", event="booking.confirmed",
                                 event_id=booked.id)
    assert [(d.partner_id, d.event_id) for d in both.items] == [(b.id, booked.id)]
    page = store.list_deliveries(limit=2, partner_id=b.id)
    rest = store.list_deliveries(limit=2, partner_id=b.id, cursor=page.next_cursor)
    assert len(page.items) == 2 and len(rest.items) == 2 and rest.next_cursor is None
    assert max(d.id for d in rest.items) < min(d.id for d in page.items)


def test_claims_respect_the_per_partner_cap_and_what_is_already_in_flight(store):
    p = _partner(store)
    for _ in range(20):
        _publish(store)
    assert len(store.claim_due(now=1000.0, lease_s=30, limit=16, per_partner=4)) == 4
    # The caller's room (its own in-flight count and breaker) is obeyed; PostgreSQL, shared by
    # several processes, also counts what is leased in the database: four are, so none more.
    assert len(store.claim_due(now=1000.0, lease_s=30, limit=16, per_partner=4)) == (0 if store.shared else 4)
    later = 1031.0  # the leases above ran out: nothing is in flight any more
    assert len(store.claim_due(now=later, lease_s=30, limit=16, per_partner=4, room={p.id: 1})) == 1
    assert store.claim_due(now=later, lease_s=30, limit=16, per_partner=4, room={p.id: 0}) == []


def test_a_partner_with_a_huge_backlog_does_not_crowd_out_the_others(store):
    big = _partner(store)
    for _ in range(100):
        _publish(store, now=500.0)  # older than anything the small partner has
    small = _partner(store)
    _publish(store, now=900.0)       # reaches both partners
    jobs = store.claim_due(now=1000.0, lease_s=30, limit=8, per_partner=8)
    partners = [j.partner_id for j in jobs]
    assert small.id in partners and partners.count(big.id) <= 7


def _tried(attempt, status):
    return Attempt(attempt=attempt, started_at=1000.0, duration_ms=5, status_code=status,
                   error=None if status < 300 else "http_error", response_snippet="")


def test_a_fifo_partner_gets_nothing_while_one_of_its_deliveries_is_in_flight(store):
    """A retry by hand of an old failed delivery makes it the head again (publish order) while a
    newer one is on the wire: it waits for that one to end, then goes before the rows behind."""
    store.add_partner(partner_id=_id("partner_"), name="Ledger", webhook_url="http://127.0.0.1:9/x",
                      events=["payment.success"], secret="sk_live_s", api_key_hash=_id("h"), now=1000.0,
                      ordering="fifo")
    _publish(store, now=1000.0)
    (old,) = store.claim_due(now=1000.0, lease_s=30, limit=10, per_partner=10)
    assert _finish(store, old.delivery_id, _tried(1, 500), "failed", now=1001.0)
    _publish(store, now=1002.0)
    _publish(store, now=1002.0)
    (wire,) = store.claim_due(now=1003.0, lease_s=30, limit=10, per_partner=10)  # leased until 1033
    assert store.retry_delivery(old.delivery_id, now=1004.0).held_behind is None  # the head again
    assert store.claim_due(now=1005.0, lease_s=30, limit=10, per_partner=10) == []
    assert store.next_due_at(now=1005.0) == 1033.0  # not before the lease in force ends
    assert _finish(store, wire.delivery_id, _tried(1, 200), "delivered", now=1006.0)
    assert [j.delivery_id for j in store.claim_due(now=1007.0, lease_s=30, limit=10, per_partner=10)] == [
        old.delivery_id]
    assert _finish(store, old.delivery_id, _tried(2, 200), "delivered", now=1008.0)
    (last,) = store.claim_due(now=1009.0, lease_s=30, limit=10, per_partner=10)
    assert last.delivery_id not in (old.delivery_id, wire.delivery_id)


def _statements_run(store, work) -> list[str]:
    """The SQL statements ``work()`` runs through the store's transactions and readers."""
    statements: list[str] = []

    def watching(real):
        @contextmanager
        def watched(*args):
            with real(*args) as db:
                yield Watched(db)
        return watched

    class Watched:
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *params):
            statements.append(sql)
            return self.db.execute(sql, *params)

    real_transaction, real_reader = store.engine.transaction, store.engine.reader
    store.engine.transaction, store.engine.reader = watching(real_transaction), watching(real_reader)
    try:
        work()
    finally:
        store.engine.transaction, store.engine.reader = real_transaction, real_reader
    return statements


def test_claims_and_next_due_at_cost_no_more_with_many_idle_partners(store):
    """A claim and the loop's look for the next due time visit the partners with pending rows,
    not every partner: registered partners that get nothing add no statement."""
    busy = _partner(store)
    fifo = store.add_partner(partner_id=_id("partner_"), name="Ledger", webhook_url="http://127.0.0.1:9/x",
                             events=["payment.success"], secret="sk_live_s", api_key_hash=_id("h"), now=1000.0,
                             ordering="fifo")

    def claim_and_look() -> list[str]:
        """Three events due; the statements of a claim, the look for the next due time, and a
        claim that finds nothing (the FIFO partner's head in flight, the other partner's cap)."""
        for _ in range(3):
            _publish(store, now=1000.0)
        claimed = []

        def work():
            claimed.extend(store.claim_due(now=1000.0, lease_s=30, limit=10, per_partner=2))
            store.next_due_at()
            store.claim_due(now=1000.0, lease_s=30, limit=10, per_partner=2, room={busy.id: 0})

        statements = _statements_run(store, work)
        assert sorted(j.partner_id for j in claimed) == sorted([busy.id, busy.id, fifo.id])
        for job in claimed:
            assert _finish(store, job.delivery_id, _tried(1, 200), "delivered", now=1000.0)
        return statements

    alone = claim_and_look()
    for _ in range(40):
        _partner(store, events=["booking.confirmed"])  # registered, active, never sent anything
    beside = claim_and_look()
    assert len(beside) == len(alone), (len(alone), len(beside))


def test_retention_purges_old_delivered_events_in_batches_and_keeps_the_rest(store):
    _partner(store)
    old = [_publish(store, now=100.0)[0] for _ in range(5)]
    fresh = _publish(store, now=5000.0)[0]
    ok = Attempt(attempt=1, started_at=100.0, duration_ms=1, status_code=200, error=None, response_snippet="")
    bad = Attempt(attempt=1, started_at=100.0, duration_ms=1, status_code=500, error="http_error", response_snippet="")
    by_event = {j.event_id: j for j in store.claim_due(now=500.0, lease_s=30, limit=10, per_partner=10)}
    for event in old[:4]:
        assert _finish(store, by_event[event.id].delivery_id, ok, "delivered", now=500.0)   # ended long ago
    assert _finish(store, by_event[old[4].id].delivery_id, bad, "failed", now=500.0)
    fresh_job = store.claim_due(now=6000.0, lease_s=30, limit=10, per_partner=10)[0]
    assert _finish(store, fresh_job.delivery_id, ok, "delivered", now=6000.0)
    purged, cursor = store.purge_delivered(before=1000.0, batch=3)   # looks at old[0..2]
    assert purged == 3 and cursor is not None
    assert store.purge_delivered(before=1000.0, batch=3, after=cursor) == (1, None)   # old[3], and old[4] kept
    assert store.purge_delivered(before=1000.0, batch=3) == (0, None)
    assert store.get_event(fresh.id) is not None          # too young
    assert store.get_event(old[4].id) is not None         # failed: kept, visible, retryable
    remaining = store.list_deliveries(limit=50).items
    assert {d.event_id for d in remaining} == {fresh.id, old[4].id}
    with store._reader() as db:
        assert db.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 2


def test_group_commit_isolates_a_failing_request_from_the_others_in_its_batch(store):
    _partner(store)
    results: dict[int, object] = {}

    def publish(n):
        def ids():
            if n == 7:
                raise RuntimeError("boom")
            return _id("dlv_")
        try:
            results[n] = store.publish(NewEvent(id=f"evt_g{n:03d}", type="payment.success", body=b"{}"),
                                       now=1.0, max_attempts=3, new_delivery_id=ids)[0].id
        except RuntimeError as exc:
            results[n] = exc

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert isinstance(results[7], RuntimeError)
    assert sorted(v for k, v in results.items() if k != 7) == sorted(f"evt_g{n:03d}" for n in range(20) if n != 7)
    assert store.get_event("evt_g007") is None
    assert len(store.list_deliveries(limit=50).items) == 19


def test_a_failing_inbound_event_written_in_one_statement_with_others_fails_alone(store):
    """A batch's inbound events are one INSERT; when it fails (here an event of a partner that does
    not exist), the group commit writes each request again on its own: only that one fails."""
    from models import InboundEvent
    from store import _GroupWrite
    from store_history import InboundWrite

    p = _partner(store)

    def request(inbound_id, partner_id):
        return _GroupWrite(InboundWrite(InboundEvent(id=inbound_id, partner_id=partner_id, type="tour.purchased",
                                                     dedupe_key=f"id:{inbound_id}", body=b"{}", received_at=1.0)))

    batch = [request("inb_g1", p.id), request("inb_g2", "partner_nosuchpartner00"), request("inb_g3", p.id)]
    store._write_together(batch)
    assert [r.error is None for r in batch] == [True, False, True]
    assert [r.result[0].id for r in (batch[0], batch[2])] == ["inb_g1", "inb_g3"]
    assert sorted(i.id for i in store.list_inbound(limit=10).items) == ["inb_g1", "inb_g3"]


def test_the_in_memory_partners_follow_every_write(store):
    p = _partner(store)
    assert store.get_partner(p.id).secret == "sk_live_s"
    store.rotate_secret(p.id, new_secret="sk_live_new", previous_until=2000.0, now=1000.0)
    assert store.get_partner(p.id).secret == "sk_live_new"
    assert store.get_partner(p.id).valid_secrets(1500.0) == ["sk_live_new", "sk_live_s"]
    store.update_partner(p.id, now=1001.0, status="paused")
    assert store.get_partner(p.id).status == "paused"
    store.update_partner(p.id, now=1002.0, status="active")
    _publish(store)
    job = store.claim_due(now=1003.0, lease_s=30, limit=1, per_partner=1)[0]
    gone = Attempt(attempt=1, started_at=1003.0, duration_ms=1, status_code=410, error="http_error",
                   response_snippet="")
    store.finish_attempts([Outcome(delivery_id=job.delivery_id, partner_id=p.id, attempt=gone, state="pending",
                                   next_attempt_at=1004.0, partner_failing_since=1003.0,
                                   partner_failing_changed=True, disable_reason="410 Gone")], now=1003.0)
    shown = store.get_partner(p.id)
    assert shown.status == "disabled" and shown.disabled_reason == "410 Gone" and shown.failing_since == 1003.0
    assert store.partners_accepting_inbound() == []


def test_memory_only_reads_never_touch_sqlite(store, monkeypatch):
    """The reads the event loop may call directly (see ``Store``) must not block on the
    database: with every connection made unusable they still answer, after a write too."""
    p = _partner(store)
    store.update_partner(p.id, now=1001.0, webhook_url="http://127.0.0.1:9/y", max_rate_per_s=5.0)

    def no_sqlite(*args, **kwargs):
        raise AssertionError("a memory-only read touched SQLite")

    monkeypatch.setattr(store, "_reader", no_sqlite)
    monkeypatch.setattr(store, "_transaction", no_sqlite)
    assert store.get_partner(p.id).webhook_url == "http://127.0.0.1:9/y"
    assert [x.id for x in store.all_partners()] == [p.id]
    assert [x.id for x in store.partners_accepting_inbound()] == [p.id]
    assert store.paces() == {p.id: 5.0}


def test_a_failed_reload_of_partners_does_not_fail_the_committed_write(store, monkeypatch):
    """The partner write is on disk once it commits: if reading partners back into memory fails,
    the write still returns its partner, and the next reload (the delivery loop's) catches up."""
    real_reload = store._reload_partners

    def broken():
        raise OSError("disk went away for a moment")

    monkeypatch.setattr(store, "_reload_partners", broken)
    p = _partner(store)
    assert p.id and store.partners_stale and store.get_partner(p.id) is None
    monkeypatch.setattr(store, "_reload_partners", real_reload)
    store.reload_partners()
    assert not store.partners_stale and store.get_partner(p.id).id == p.id


def test_inbound_events_are_purged_by_their_own_age_without_outbound_work(store):
    partner = _partner(store)
    for i in range(5):
        store.add_inbound(inbound_id=_id("inb_"), partner_id=partner.id, event_type="tour.purchased",
                          dedupe_key=f"k{i}", body=b"{}", now=100.0)
    assert store.purge_inbound(before=1000.0, batch=2) == 2
    assert store.purge_inbound(before=1000.0, batch=2) == 2
    assert store.purge_inbound(before=1000.0, batch=2) == 1
    assert store.list_inbound(limit=10).items == []


def test_a_purge_batch_looks_at_a_bounded_number_of_kept_events(store):
    """Old events kept because a delivery failed are walked once per pass: a batch looks at
    ``batch`` events whatever they are and says where the next one starts, instead of searching
    past every kept failure again for each batch of purgeable ones behind them."""
    _partner(store)
    kept = [_publish(store, now=100.0 + i)[0] for i in range(4)]
    gone = [_publish(store, now=200.0 + i)[0] for i in range(3)]
    bad = Attempt(attempt=1, started_at=300.0, duration_ms=1, status_code=500, error="http_error", response_snippet="")
    ok = Attempt(attempt=1, started_at=300.0, duration_ms=1, status_code=200, error=None, response_snippet="")
    by_event = {j.event_id: j for j in store.claim_due(now=300.0, lease_s=30, limit=10, per_partner=10)}
    for event in kept:
        assert _finish(store, by_event[event.id].delivery_id, bad, "failed", now=300.0)
    for event in gone:
        assert _finish(store, by_event[event.id].delivery_id, ok, "delivered", now=300.0)
    batches, cursor, purged = [], None, 0
    while True:
        n, cursor = store.purge_delivered(before=1000.0, batch=2, after=cursor)
        batches.append(n)
        purged += n
        if cursor is None:
            break
    assert batches == [0, 0, 2, 1] and purged == 3      # 7 events looked at once each, 2 at a time
    assert all(store.get_event(e.id) for e in kept) and not any(store.get_event(e.id) for e in gone)


def test_a_delivery_that_ended_recently_is_kept_even_when_its_event_is_old(store):
    """Deliveries age by when they ended: an event published long ago and delivered a moment ago
    (after a long outage, or a manual retry) keeps its delivery and attempts for the full age."""
    _partner(store)
    event = _publish(store, now=100.0)[0]
    job = store.claim_due(now=9000.0, lease_s=30, limit=1, per_partner=1)[0]
    ok = Attempt(attempt=1, started_at=9000.0, duration_ms=1, status_code=200, error=None, response_snippet="")
    assert _finish(store, job.delivery_id, ok, "delivered", now=9000.0)
    assert store.purge_delivered(before=5000.0, batch=10) == (0, None)  # the event is old, its delivery is not
    assert store.get_event(event.id) is not None
    assert store.purge_delivered(before=9001.0, batch=10) == (1, None)


def test_the_last_failed_attempt_of_a_partner_is_read_back(store):
    p = _partner(store)
    assert store.last_failed_attempt_at(p.id) is None
    _publish(store)
    _publish(store)
    first, second = store.claim_due(now=1000.0, lease_s=30, limit=2, per_partner=2)
    bad = Attempt(attempt=1, started_at=1010.0, duration_ms=1, status_code=500, error="http_error", response_snippet="")
    ok = Attempt(attempt=1, started_at=1020.0, duration_ms=1, status_code=200, error=None, response_snippet="")
    assert _finish(store, first.delivery_id, bad, "pending", now=1011.0)
    assert _finish(store, second.delivery_id, ok, "delivered", now=1021.0)
    assert store.last_failed_attempt_at(p.id) == 1010.0


def test_a_database_written_by_a_newer_webhookd_is_refused(store_target):
    """Migrations this code does not know mean a newer version upgraded the schema: starting on it
    could run old SQL against new tables, so the store refuses, naming what it found."""
    from store import SchemaTooNew

    first = open_store(store_target)
    with first._transaction() as db:
        db.execute("INSERT INTO schema_migrations (name, applied_at) VALUES ('from.the.future', 1.0)")
    first.close()
    with pytest.raises(SchemaTooNew, match="from.the.future"):
        open_store(store_target)


def test_one_idempotency_key_published_at_once_by_two_processes_is_stored_once(store_target):
    """Two stores on one database (two processes) publish the same key at the same moment: one
    event is stored, both callers get its id, neither gets an error."""
    stores = [open_store(store_target) for _ in range(2)]
    try:
        _partner(stores[0])
        results, start = [], threading.Barrier(8)

        def publish(s):
            start.wait()
            results.append(_publish(s, idempotency_key="same-key", request_hash="h"))

        threads = [threading.Thread(target=publish, args=(stores[n % 2],)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(results) == 8
        assert len({event.id for event, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert len(stores[1].list_deliveries(limit=50).items) == 1
    finally:
        for s in stores:
            s.close()


def test_one_process_at_a_time_holds_a_role_until_it_stops_renewing(store):
    assert store.hold_role("sweeper", "proc_a", ttl_s=30, now=1000.0)
    assert not store.hold_role("sweeper", "proc_b", ttl_s=30, now=1010.0)   # proc_a holds it
    assert store.hold_role("sweeper", "proc_a", ttl_s=30, now=1020.0)       # renewed until 1050
    assert not store.hold_role("sweeper", "proc_b", ttl_s=30, now=1049.0)
    assert store.hold_role("sweeper", "proc_b", ttl_s=30, now=1051.0)       # proc_a stopped renewing
    assert not store.hold_role("sweeper", "proc_a", ttl_s=30, now=1052.0)


def test_a_deleted_partners_history_goes_with_retention_and_then_its_tombstone(store):
    """Deleting cancels what waited; retention then purges the partner's deliveries whatever their
    state (a failed one included: nobody can retry it), and once none is left, the tombstone."""
    gone, kept = _partner(store), _partner(store)
    first, second = (_publish(store, now=100.0)[0] for _ in range(2))   # each to both partners
    ok = Attempt(attempt=1, started_at=100.0, duration_ms=1, status_code=200, error=None, response_snippet="")
    bad = Attempt(attempt=1, started_at=100.0, duration_ms=1, status_code=500, error="http_error", response_snippet="")
    for job in store.claim_due(now=200.0, lease_s=30, limit=10, per_partner=10):
        if job.event_id == first.id:    # failed for gone, delivered to kept; the second waits
            assert _finish(store, job.delivery_id, bad if job.partner_id == gone.id else ok,
                           "failed" if job.partner_id == gone.id else "delivered", now=200.0)
        else:
            store.release_claims([job.delivery_id], now=200.0)
    assert store.delete_partner(gone.id, now=300.0) == 1          # its pending one; its failed one stays failed
    assert store.delete_partner(gone.id, now=300.0) is None       # once
    assert store.get_partner(gone.id) is None and store.purge_deleted_partners(before=10_000.0) == 0
    assert store.cancel_pending(kept.id, now=300.0) == 1
    assert store.purge_delivered(before=150.0, batch=10) == (0, None)   # every delivery ended after 150
    assert store.purge_delivered(before=1000.0, batch=10) == (2, None)
    assert store.get_event(first.id) is None and store.get_event(second.id) is None
    assert store.purge_deleted_partners(before=200.0) == 0              # deleted at 300
    assert store.purge_deleted_partners(before=1000.0) == 1
    with store._reader() as db:
        assert [r["id"] for r in db.execute("SELECT id FROM partners")] == [kept.id]


def test_expiry_ends_old_pending_deliveries_and_a_retry_by_hand_starts_their_age_again(store):
    partner = _partner(store)
    first = _publish(store, now=100.0)[0]
    _publish(store, now=900.0)
    assert store.expire_pending(queued_before=500.0, now=1000.0) == {partner.id: 1}
    (expired,) = store.list_deliveries(limit=10, state="expired").items
    assert expired.event_id == first.id
    assert store.retry_delivery(expired.id, now=2000.0).state == "pending"
    assert store.expire_pending(queued_before=1500.0, now=2100.0) == {partner.id: 1}   # the second, not the retried
    assert store.expire_pending(queued_before=2500.0, now=3000.0) == {partner.id: 1}   # queued again at 2000


def test_audit_entries_page_newest_first_and_age_out(store):
    from models import AuditEntry

    partner = _partner(store)
    for n, at in enumerate((100.0, 200.0, 300.0)):
        entry = AuditEntry(id=f"aud_{n:03d}", at=at, actor="admin", action="partner.updated", partner_id=partner.id,
                           changes={"status": {"from": "active", "to": "paused"}})
        store.update_partner(partner.id, now=at, status="paused", audit=entry)
    page = store.list_audit(limit=2)
    assert [e.id for e in page.items] == ["aud_002", "aud_001"] and page.next_cursor == "aud_001"
    assert [e.id for e in store.list_audit(limit=2, cursor=page.next_cursor).items] == ["aud_000"]
    assert store.list_audit(limit=5, action="partner.deleted").items == []
    assert store.purge_audit(before=250.0, batch=1) == 1 and store.purge_audit(before=250.0, batch=5) == 1
    assert [e.id for e in store.list_audit(limit=5).items] == ["aud_002"]
    assert store.list_audit(limit=5).items[0].changes == {"status": {"from": "active", "to": "paused"}}


def test_a_migration_redacts_the_urls_kept_whole_before(store_target):
    """Attempts and audit entries written by an earlier version kept a URL's query (a partner's
    token): the migration "urls_redacted" takes it out of them, on both engines."""
    store = open_store(store_target)
    partner = _partner(store)
    _publish(store)
    delivery = store.list_deliveries(limit=1).items[0]
    with store._transaction() as db:  # as the earlier version wrote them
        db.execute("""INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, url)
                      VALUES (:id, 1, 1000.0, 5, 'https://x.example/hook?token=tok_old_1')""", {"id": delivery.id})
        db.execute("""INSERT INTO audit_log (id, at, actor, action, partner_id, changes)
                      VALUES ('aud_old', 1000.0, 'admin', 'partner.updated', :partner, :changes)""",
                   {"partner": partner.id, "changes": json.dumps({"webhook_url": {
                       "from": "https://x.example/hook?token=tok_old_1", "to": "https://y.example/in?k=tok_old_2"}})})
        db.execute("DELETE FROM schema_migrations WHERE name = 'urls_redacted'")
    store.close()
    store = open_store(store_target)
    try:
        assert store.migrated == ["urls_redacted"]
        assert [a.url for a in store.get_delivery(delivery.id).attempts] == ["https://x.example/hook?…"]
        entry = store.list_audit(limit=10, action="partner.updated").items[0]
        assert entry.changes == {"webhook_url": {"from": "https://x.example/hook?…", "to": "https://y.example/in?…"}}
    finally:
        store.close()


def test_an_engines_transaction_commits_whole_or_not_at_all(store):
    """The engine's face the store stands on (``transaction``, ``reader``, ``statement``): a block
    that raises leaves nothing behind, and the writer is free again after it."""
    engine = store.engine

    def xs() -> list[int]:
        with engine.reader() as db:
            return [row["x"] for row in db.execute("SELECT x FROM t ORDER BY x")]

    with engine.transaction() as db:
        db.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
        db.execute("INSERT INTO t (x) VALUES (:x)", {"x": 1})
        db.executemany("INSERT INTO t (x) VALUES (:x)", [{"x": 2}])
    with pytest.raises(RuntimeError, match="the block fails"), engine.transaction() as db:
        db.execute("INSERT INTO t (x) VALUES (:x)", {"x": 3})
        raise RuntimeError("the block fails")
    assert xs() == [1, 2]
    assert [row["x"] for row in engine.statement("INSERT INTO t (x) VALUES (4) RETURNING x", {})] == [4]
    assert xs() == [1, 2, 4]


# --- The two engines, side by side ------------------------------------------------------------

# What one engine has and the other has not, and why: PostgreSQL has no rowid, so publish order is
# a column of its own; and only a shared store keeps the rate limits' buckets in the database.
ONLY_ON_POSTGRES = {"deliveries": {"seq"}, "rate_buckets": {"key", "tokens", "at"}}


def _tables_and_columns(store) -> dict[str, set[str]]:
    """Each table of a store's database with the names of its columns, whichever engine."""
    from store_sqlite import SQLiteStore

    sql = ("SELECT m.name, c.name FROM sqlite_master m JOIN pragma_table_info(m.name) c WHERE m.type = 'table'"
           if isinstance(store, SQLiteStore) else
           "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'")
    tables: dict[str, set[str]] = {}
    with store._reader() as db:
        for table, column in db.execute(sql).fetchall():
            tables.setdefault(table, set()).add(column)
    return tables


def test_both_engines_have_the_same_tables_and_columns(tmp_path, postgres_server):
    """A fresh store on each engine: the same tables, each with the same columns, but for the
    differences ``ONLY_ON_POSTGRES`` names (a column added to one engine only fails here)."""
    lite, pg = open_store(str(tmp_path / "w.db")), open_store(postgres_server.new_database())
    try:
        on_sqlite, on_postgres = _tables_and_columns(lite), _tables_and_columns(pg)
    finally:
        lite.close()
        pg.close()
    for table, columns in ONLY_ON_POSTGRES.items():
        on_postgres[table] -= columns
    assert {t: c for t, c in on_postgres.items() if c} == on_sqlite


def test_both_stores_expose_the_same_public_methods_and_each_is_the_whole_contract():
    """Code above the store holds a ``Store`` and may call any of its methods, whichever engine:
    each engine writes every method the contract leaves to it, and adds no public one of its own."""
    from store import Store
    from store_postgres import PostgresStore
    from store_sqlite import SQLiteStore

    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))}

    assert public(SQLiteStore) == public(PostgresStore) == public(Store)
    assert not SQLiteStore.__abstractmethods__ and not PostgresStore.__abstractmethods__
    assert (SQLiteStore.shared, PostgresStore.shared) == (False, True)


def test_an_attempt_s_flat_json_is_the_text_json_dumps_writes():
    """store_rows.json_or_none writes an attempt's signatures and decision without json.dumps: the
    same text, whatever the strings hold; anything else still goes through json.dumps."""
    import json

    from store_rows import json_or_none

    for value in [{"X-Webhook-Signature": "ab12", "webhook-signature": "v1,abc= v1,def="},
                  {"state": "pending", "wait_s": 12.345, "why": 'the partner\'s "Retry-After" é\n\u2028'},
                  {"n": 10**20, "f": 1e-7, "g": -0.0, "é": "ü"}, {"b": True, "none": None}, {"x": float("inf")},
                  {"k": [1, {"a": 2}]}, {}]:
        assert json_or_none(value) == json.dumps(value)
    assert json_or_none(None) is None

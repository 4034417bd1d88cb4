"""The store: what both engines share, behind a narrow face of domain objects (models.py).

The data model, in one paragraph: a **partner** subscribes to event types
(**subscriptions**). Publishing stores one **event** (its canonical body, the exact
bytes we send) and, in the same transaction, one **delivery** per subscribed
partner. A delivery is a row with a state — ``pending`` until it is ``delivered``
or ``failed`` — that is never deleted when it is taken: the delivery loop *claims*
due rows by pushing their ``next_attempt_at`` forward by a lease and marking
``leased_until``. If the process dies mid-send the lease simply runs out, the row
is due again and another claim takes it: at-least-once, nothing lost. Every try
is an **attempt** row. Events partners send to us are **inbound_events**,
deduplicated on (partner, dedupe key).

Two engines keep these tables, each in a file of its own: SQLite, one file, the default
(``store_sqlite.py``), and PostgreSQL (``storage.url``), which several webhookd processes may
share (``store_postgres.py``); ``storage.py`` opens the one the configuration names. Each
engine's file holds its schema, its migrations, its connections, and its own publish → claim →
finish, the statements that differ. This file holds what both share, top to bottom:

1. the errors a caller may see, and the deadline a route puts on its calls (``answer_by``);
2. how the schema is applied (``Store._apply_schema``; the SQL both engines write alike is in
   ``store_schema.py``, each engine's own in its file);
3. the group commit's request (``_GroupWrite``): publishes and inbound events — the writes we
   answer a 202 or a 200 for — queue for one thread, which writes whatever has queued in one
   transaction and one durable flush;
4. ``Store``, the contract both engines fulfil: what each must write itself (marked
   ``abstractmethod``) and what both run as written — the schema applied, then the publish
   (``Store.publish``) followed by the group commit that writes it (``Store._in_group_commit``),
   and the claim's other half (releases, leases that ran out, when the next one is due). Three parts of it live in files
   of their own: the partners and their in-memory copy (``store_partners.py``); the history —
   reads, retries, retention, audit, inbound (``store_history.py``); and the processes that
   share a database — hints, roles, heartbeats (``store_processes.py``). Rows become objects in
   ``store_rows.py``.

Code above the store never asks which engine it has: it asks what the store can do
(``shared``: several processes may share this database). Every multi-statement write runs in
one transaction. Nothing outside the store sees a cursor.

The errors::

    DatabaseUnavailable        the database cannot be reached now (503)
     ├── DatabaseBusy          it answers but did not finish in time (503)
     │    └── Conflict         PostgreSQL broke a deadlock; runs again by itself
     └── StorageUnavailable    it answers but cannot write: the disk is full (503)
    SchemaTooNew               a newer webhookd wrote this database
"""

from __future__ import annotations

import abc
import contextvars
import functools
import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

from config import VERSION
from models import Event, Job, NewEvent, Outcome
from store_history import History
from store_partners import Partners
from store_processes import WORK_CHANNEL, Processes
from store_rows import event_from_row, numbered, placeholders
from store_schema import Migration

T = TypeVar("T")

logger = logging.getLogger("webhookd.store")

CONFLICT_RETRIES = 4  # a transaction PostgreSQL rolled back for a deadlock runs again this often, at most


# --- Errors ---------------------------------------------------------------------------------

class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached now (PostgreSQL down or restarting, no connection free in
    time). The API answers 503, never a 202 for what was not stored; the delivery loop tries again."""


class DatabaseBusy(DatabaseUnavailable):
    """The database answers but did not finish in time: a row lock held elsewhere past
    ``storage.lock_timeout_s``, a statement past ``storage.statement_timeout_s``, or the call waited
    past its deadline (``answer_by``) for a thread or a connection. Nothing was written; the API
    answers 503, and trying again shortly is the remedy."""


class Conflict(DatabaseBusy):
    """PostgreSQL rolled a transaction back to break a deadlock or a serialization failure: nothing
    of it was written, and it may simply run again (``retry_on_conflict``)."""


class StorageUnavailable(DatabaseUnavailable):
    """The database answers but cannot write: the disk is full (or failing). Reads still work; the
    API answers 503 ``storage_unavailable`` to writes and ``/health`` says so until a write
    succeeds again."""




class SchemaTooNew(RuntimeError):
    """The database holds migrations this code does not know: a newer webhookd wrote it."""


# --- Deadlines and conflicts ------------------------------------------------------------------

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("webhookd_db_deadline", default=None)


@contextmanager
def answer_by(deadline: float) -> Iterator[None]:
    """Calls made inside the block give up waiting — for a PostgreSQL connection, for the
    group commit — at ``deadline`` (``time.monotonic()``) with ``DatabaseUnavailable``, rather than
    after their own full wait: a route promises its 503 within a few seconds of the request,
    however long the request queued first."""
    token = _deadline.set(deadline)
    try:
        yield
    finally:
        _deadline.reset(token)


def current_deadline() -> float | None:
    """The deadline ``answer_by`` set for this call, or None (no deadline: the delivery loop)."""
    return _deadline.get()


def seconds_left(at_most: float) -> float:
    """How long this call may still wait: ``at_most``, or less when its deadline is nearer."""
    deadline = _deadline.get()
    return at_most if deadline is None else min(at_most, deadline - time.monotonic())


def retry_on_conflict(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` again, after a short random pause, when PostgreSQL rolled its transaction back to
    break a deadlock or a serialization failure (``Conflict``): a collision of two transactions, not
    a database away, so the caller should not see it. At most ``CONFLICT_RETRIES`` more runs; then
    the ``Conflict`` (a 503 ``database_busy``) goes up. ``fn`` must be one transaction with no
    effect outside it, so that running it again is safe."""

    @functools.wraps(fn)
    def again_after_a_conflict(*args: Any, **kwargs: Any) -> T:
        for retry in range(CONFLICT_RETRIES):
            try:
                return fn(*args, **kwargs)
            except Conflict as exc:
                logger.info("%s collided with another transaction (%s); running it again", fn.__name__, exc)
                time.sleep(random.uniform(0.01, 0.05) * (retry + 1))  # out of step with the other one
        return fn(*args, **kwargs)

    return again_after_a_conflict


# --- The group commit ---------------------------------------------------------------------------

GROUP_COMMIT_MAX = 256  # requests written per group commit, at most
ANNOUNCE_GAP_S = 0.05  # at most one WORK_CHANNEL notification per process this often


def take_batch(waiting: queue.SimpleQueue, limit: int, timeout: float | None = None) -> tuple[list[Any], bool]:
    """Wait for one item (at most ``timeout`` seconds: then none), then take whatever else is
    already queued, up to ``limit``. A ``None`` in the queue means stop: returns the real items
    and whether to stop."""
    try:
        batch = [waiting.get(timeout=timeout)]
    except queue.Empty:
        return [], False
    while len(batch) < limit:
        try:
            batch.append(waiting.get_nowait())
        except queue.Empty:
            break
    return [item for item in batch if item is not None], None in batch


def work_together(db: Any, works: list[Callable[[Any], Any]]) -> list[Any]:
    """A group commit's works run in its transaction, their results in order. Works that can be
    written many at once (a ``together(db, works)`` attribute, e.g. ``store_history.InboundWrite``)
    are, one call for each kind, after the others: one statement for a batch rather than one per
    request, each a hand-off of the GIL between the writer thread and a busy event loop."""
    results: list[Any] = [None] * len(works)
    kinds: dict[Callable[[Any, list[Any]], list[Any]], list[int]] = {}
    for n, work in enumerate(works):
        together = getattr(work, "together", None)
        if together is None:
            results[n] = work(db)
        else:
            kinds.setdefault(together, []).append(n)
    for together, indexes in kinds.items():
        for n, result in zip(indexes, together(db, [works[n] for n in indexes])):
            results[n] = result
    return results


class _GroupWrite:
    """One request waiting for the group-commit writer: its work, then its result or error;
    ``announce``: a channel to notify once it is committed (other processes have work);
    ``deadline``: when its caller stops waiting (``answer_by``), or None.

    Exactly one of two things happens to a request: the writer takes it (``take``), and then its
    caller waits for the commit's outcome, or its caller gives it up before that (``give_up``),
    and then the writer skips it. So a caller that gave up knows nothing of it was written."""

    def __init__(self, work: Callable[[Any], Any], announce: str | None = None, deadline: float | None = None,
                 on_done: Callable[[], None] | None = None):
        self.work = work
        self.announce = announce
        self.deadline = deadline
        self.on_done = on_done  # called in the writer's thread once it is finished (a caller on an event loop)
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._taken = self._given_up = False

    def take(self) -> bool:
        """The writer's side: True if the request is still wanted, and from now on it is the writer's."""
        with self._lock:
            self._taken = not self._given_up
            return self._taken

    def give_up(self) -> bool:
        """The caller's side: True if the writer had not taken it, and now never will."""
        with self._lock:
            self._given_up = not self._taken
            return self._given_up

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()
        if self.on_done is not None:
            try:
                self.on_done()
            except Exception:  # the caller's loop is gone (a stop): nobody waits for this answer
                logger.exception("telling a caller its write is committed failed")


# --- The store ------------------------------------------------------------------------------------


class Store(Partners, History, Processes, abc.ABC):
    """The store both engines are: ``store_sqlite.SQLiteStore`` and ``store_postgres.PostgresStore``
    (``storage.open_store`` opens one). Thread-safe: each engine serializes or pools its connections.

    Which calls may run on the event loop: only ``get_partner``, ``all_partners``, ``paces`` and
    ``partners_accepting_inbound``, which read the in-memory copy of the partners table
    and never touch the database, and ``publish_soon`` and ``add_inbound_soon``, which only queue
    for the group commit. Every other method blocks on it, so it is called
    from a thread: a route writes ``await db(store.method, ...)``, the delivery loop
    ``asyncio.to_thread``, and its sender and recorder threads call it directly.
    """

    # What each engine states about itself (its class attributes):
    shared: bool                  # several processes may share the database (and tell each other things)
    SCHEMA: list[str]             # the tables as the oldest supported database had them
    MIGRATIONS: list[Migration]   # named changes from the oldest supported database, in order
    _pending_partners: str        # PENDING_PARTNERS in the engine's words

    def __init__(self, target: str, *, lock_timeout_s: float = 2.0, statement_timeout_s: float = 10.0):
        """``target``: the file path or the URL; ``lock_timeout_s``, ``statement_timeout_s``: the
        bounds on each statement of an engine that has row locks to wait for (PostgreSQL)."""
        self.engine = self._open_engine(target, lock_timeout_s=lock_timeout_s, statement_timeout_s=statement_timeout_s)
        self._claim_round = 0  # which partner the next claim starts with
        self._start_partners_copy()
        self._probed_at = 0.0  # when storage_writable last wrote its probe
        try:
            self._apply_schema()
            self._reload_partners()
        except BaseException:
            self.engine.close()  # a refused or unreachable database leaves no pool behind
            raise
        self._announced_at: dict[str, float] = {}  # channel -> when the group writer last notified it
        self._group_queue: queue.SimpleQueue[_GroupWrite | None] = queue.SimpleQueue()
        self._group_thread = threading.Thread(target=self._group_writer, name="webhookd-group-commit", daemon=True)
        self._group_thread.start()

    @property
    def write_fault(self) -> str | None:
        """Why a write failed for lack of storage (a full disk), until a durable write succeeds again."""
        return self.engine.write_fault

    def storage_writable(self) -> bool:
        """After a write failed for lack of storage: whether there is room again, found by writing a
        page's worth (a probe row, deleted in the same transaction) at most once a second. So
        ``/health`` recovers by itself even while a load balancer keeps the publishes away."""
        if self.write_fault is None:
            return True
        if time.monotonic() - self._probed_at < 1.0:
            return False
        self._probed_at = time.monotonic()
        try:
            with self._transaction() as db:
                db.execute("INSERT INTO roles (name, holder, until) VALUES ('storage-probe', :filler, 0)",
                           {"filler": "x" * 4096})
                db.execute("DELETE FROM roles WHERE name = 'storage-probe'")
        except DatabaseUnavailable:
            return False
        return True

    def close(self) -> None:
        self._group_queue.put(None)
        self._group_thread.join(timeout=10)
        self.engine.close()

    def _transaction(self, durable: bool = True) -> Any:
        """A write transaction (see the engine's ``transaction``): committed at the end of the block, rolled
        back on any exception. ``durable=False`` only for bookkeeping whose loss is a resend."""
        return self.engine.transaction(durable)

    def _reader(self, snapshot: bool = False) -> Any:
        return self.engine.reader(snapshot)

    def _apply_schema(self) -> None:
        """Create what is missing, then apply the migrations not yet recorded, in order, each
        recorded with the version that applied it (``self.migrated`` lists them). A database
        with migrations this code does not know was written by a newer webhookd: refuse it,
        naming that version, rather than run old SQL on a new schema."""
        schema, migrations = self.SCHEMA, self.MIGRATIONS
        with self._transaction() as db:
            self._begin_schema(db)
            for statement in schema:
                db.execute(statement)
            recorded = {row["name"]: {k: row[k] for k in row.keys()} for row in db.execute("SELECT * FROM schema_migrations")}
            unknown = sorted(recorded.keys() - {name for name, _ in migrations})
            if unknown:
                newer = sorted({str(recorded[name].get("version")) for name in unknown if recorded[name].get("version")})
                raise SchemaTooNew(
                    f"the database {self.engine.describe()} was upgraded by "
                    f"{'webhookd ' + newer[-1] if newer else 'a newer webhookd'} (migrations this one, {VERSION}, "
                    f"does not know: {', '.join(unknown)}): run webhookd {newer[-1] if newer else 'that version'} "
                    "or newer on it, or restore a backup made before the upgrade")
            self.migrated = [name for name, _ in migrations if name not in recorded]
            for name, statements in migrations:
                if name in self.migrated:
                    for step in statements:
                        if callable(step):
                            step(db)
                        else:
                            db.execute(step)
                    db.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (:name, :now)",
                               {"name": name, "now": time.time()})
            if self.migrated:
                db.execute(f"UPDATE schema_migrations SET version = :v WHERE name IN "
                           f"({placeholders('m', self.migrated)})", {"v": VERSION, **numbered("m", self.migrated)})

    def _begin_schema(self, db: Any) -> None:
        """The first statements of the schema's transaction: nothing to do where one writer applies
        it at a time (SQLite); a shared database makes processes that start together take turns."""

    def ping(self) -> bool:
        with self._reader() as db:
            return db.execute("SELECT 1").fetchone()[0] == 1

    # --- Events and their fan-out: the publish, then the group commit that writes it ----

    def publish(self, event: NewEvent, *, now: float, max_attempts: int,
                new_delivery_id: Callable[[], str]) -> tuple[Event, bool]:
        """Store an event and one pending delivery per subscriber, in one transaction.

        Returns ``(event, created)``. With an ``idempotency_key`` already used, nothing is
        written and the first event comes back with ``created`` False. Who gets a delivery:
        the partners subscribed to its type, narrowed by the event's ``audience`` and each
        partner's payload filter (each engine's ``_insert_event`` writes the rule in its own
        SQL). ``only_partner`` targets one partner whatever its subscriptions (the
        ``webhook.test`` ping). Paused and disabled partners get their rows too: they stay
        ``pending`` until the partner is active again.
        """
        passed = self._filters_passed(event)
        return self._in_group_commit(
            lambda db: self._insert_event(db, event, now, max_attempts, new_delivery_id, passed), announce=WORK_CHANNEL)

    def publish_soon(self, event: NewEvent, *, now: float, max_attempts: int, new_delivery_id: Callable[[], str],
                     deadline: float, on_done: Callable[[], None]) -> _GroupWrite:
        """``publish`` for a caller on an event loop, which must not block: the request is queued for
        the group commit and returned at once; the writer's thread calls ``on_done()`` once it is
        committed or failed (then its ``result`` or ``error``). Until the writer takes it, a caller
        past its ``deadline`` may ``give_up`` it, and nothing of it is written. No worker thread
        waits in between: the hops of a thread pool cost a publish more than its share of the commit."""
        passed = self._filters_passed(event)
        return self._group_commit_soon(lambda db: self._insert_event(db, event, now, max_attempts, new_delivery_id,
                                                                     passed), WORK_CHANNEL, deadline, on_done)

    def _group_commit_soon(self, work: Callable[[Any], Any], announce: str | None, deadline: float,
                           on_done: Callable[[], None]) -> _GroupWrite:
        """``work`` queued for the group commit, not waited for (see ``publish_soon``)."""
        request = _GroupWrite(work, announce, deadline, on_done)
        self._group_queue.put(request)
        return request

    def publish_batch(self, events: list[NewEvent], *, now: float, max_attempts: int,
                      new_delivery_id: Callable[[], str]) -> list[tuple[Event, bool]]:
        """``publish`` for many events, in one transaction and one durable commit."""
        passed = [self._filters_passed(event) for event in events]
        return self._in_group_commit(
            lambda db: [self._insert_event(db, event, now, max_attempts, new_delivery_id, p)
                        for event, p in zip(events, passed)],
            announce=WORK_CHANNEL)

    def _in_group_commit(self, work: Callable[[Any], T], announce: str | None = None) -> T:
        """Run ``work(db)`` in the group-commit writer's next transaction; return after its commit.

        Requests that arrive while a commit is being flushed to disk wait for the next one
        together, so under load one ``FULL`` flush covers many publishes and inbound
        events (the write-thread pattern). If any of them fails, the transaction is rolled
        back and each request runs again in a transaction of its own: the one that fails
        alone gets the exception, the others are written. (No SAVEPOINT per request: on
        PostgreSQL each would cost two more round trips, and a failure is rare.)

        A caller with a deadline (``answer_by``: a route) that is still queued when it
        passes gives its request up and gets ``DatabaseBusy``: nothing of it is written. One the
        writer has taken is waited for, bounded by the writer's own waits (a connection, and
        PostgreSQL's lock and statement timeouts).
        """
        request = _GroupWrite(work, announce, current_deadline())
        self._group_queue.put(request)
        wait = None if request.deadline is None else max(0.0, request.deadline - time.monotonic())
        if not request.done.wait(wait):
            if request.give_up():
                raise DatabaseBusy("the write waited its whole deadline behind other writes and was not made")
            request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def _group_writer(self) -> None:
        while True:
            queued, stopping = take_batch(self._group_queue, GROUP_COMMIT_MAX)
            batch = [request for request in queued if request.take()]
            if batch:
                # The batch waits for a connection no longer than its most hurried caller would.
                deadlines = [r.deadline for r in batch if r.deadline is not None]
                with answer_by(min(deadlines)) if deadlines else nullcontext():
                    self._write_together(batch)
            # One notification after the commit and outside it, however many publishes it held, and
            # at most one per ANNOUNCE_GAP_S: the others also look every second by themselves.
            for channel in {r.announce for r in batch if r.announce and r.error is None}:
                if time.monotonic() - self._announced_at.get(channel, -ANNOUNCE_GAP_S) >= ANNOUNCE_GAP_S:
                    self._announced_at[channel] = time.monotonic()
                    self.announce(channel)
            if stopping:
                return

    def _write_together(self, batch: list[_GroupWrite]) -> None:
        """One transaction for the whole batch; after a failure, one each (see ``_in_group_commit``)."""
        try:
            results = self._commit_together(batch)
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, DatabaseUnavailable):  # the database is away or busy: all failed
                for request in batch:
                    request.finish(error=exc)
                return
            for request in batch:
                self._write_together([request])
            return
        for request, result in zip(batch, results):
            request.finish(result)

    @retry_on_conflict
    def _commit_together(self, batch: list[_GroupWrite]) -> list[Any]:
        with self._transaction() as db:
            return work_together(db, [request.work for request in batch])

    def get_event(self, event_id: str) -> Event | None:
        with self._reader() as db:
            row = db.execute("SELECT * FROM events WHERE id = :id", {"id": event_id}).fetchone()
        return event_from_row(row) if row else None

    # --- The delivery loop's side: claim, finish, release ---------------------------

    @abc.abstractmethod
    def claim_due(self, *, now: float, lease_s: float, limit: int, per_partner: int,
                  room: Mapping[str, int] | None = None) -> list[Job]:
        """Take up to ``limit`` due deliveries, at most ``per_partner`` per partner.

        ``room`` overrides how many a given partner may get now (fewer when some are
        already in flight, none while its circuit is open). Partners take turns, and each
        gets its oldest due rows up to its free room: one partner with a huge backlog cannot
        crowd out the others. A FIFO partner gets its head alone, and nothing while a delivery
        of it is in flight. The lease is written into ``next_attempt_at``, so a row whose
        attempt never finishes (the process died) becomes due again when the lease runs out.
        """

    @abc.abstractmethod
    def finish_attempts(self, outcomes: list[Outcome], now: float) -> list[str]:
        """Record many attempts in one transaction (group commit); return the ids not recorded.

        Each update applies only while the row still expects that attempt number, so
        an attempt that finishes after its lease ran out and the row was taken again
        cannot record twice. Partner health (failing streak, auto-disable) is written
        in the same transaction (``write_partner_health``).
        """

    def release_claims(self, delivery_ids: list[str], now: float) -> int:
        """Give back claimed deliveries that were never sent (the process is stopping): due
        again at ``now``, attempt count unchanged. Returns how many were released."""
        with self._transaction(durable=False) as db:
            return sum(db.execute(
                """UPDATE deliveries SET leased_until = NULL, next_attempt_at = :now
                   WHERE id = :id AND state = 'pending' AND leased_until IS NOT NULL""",
                {"id": delivery_id, "now": now}).rowcount for delivery_id in delivery_ids)

    def requeue_expired_leases(self, now: float) -> int:
        """Forget leases that ran out (their holder died); those rows are due again. Returns how many."""
        with self._transaction(durable=False) as db:
            return db.execute(
                """UPDATE deliveries SET leased_until = NULL
                   WHERE state = 'pending' AND leased_until IS NOT NULL AND leased_until <= :now""",
                {"now": now},
            ).rowcount

    def next_due_at(self, skip: list[str] | None = None, now: float | None = None) -> float | None:
        """When a claim may next take a delivery of an active partner not in ``skip``: the
        earliest pending due time, a FIFO partner's counting only its head and only once nothing
        of it is in flight. ``now`` (the clock by default) tells a lease in force from one that
        ran out. One statement, whatever the number of partners (``PENDING_PARTNERS``)."""
        skipped = set(skip or ())
        with self._reader() as db:
            rows = self._partners_with_pending(db, time.time() if now is None else now)
        due = [claimable_at(row) for row in rows if row["id"] not in skipped]
        return min(due) if due else None

    def _partners_with_pending(self, db: Any, now: float) -> list[Any]:
        """The active partners with a pending delivery, with when each may be claimed from
        (``PENDING_PARTNERS``): one index seek per such partner, none for the idle ones."""
        return db.execute(self._pending_partners, {"now": now}).fetchall()

    # --- What each engine writes itself ---------------------------------------------

    @abc.abstractmethod
    def _open_engine(self, target: str, *, lock_timeout_s: float, statement_timeout_s: float) -> Any:
        """The engine's connections: ``transaction(durable)``, ``reader(snapshot)``, ``statement``,
        ``explain``, ``notify``, ``listen``, ``describe``, ``close`` and ``write_fault``."""

    @abc.abstractmethod
    def _insert_event(self, db: Any, event: NewEvent, now: float, max_attempts: int,
                      new_delivery_id: Callable[[], str], passed: list[str] | None) -> tuple[Event, bool]:
        """One event and its fan-out (see ``publish``), inside the caller's transaction."""

    @abc.abstractmethod
    def _forget_old_versions(self) -> None:
        """After an erasure (a deleted partner), leave no earlier version of its rows where a
        reader of the files could find them."""

    @abc.abstractmethod
    def database_health(self) -> dict[str, float]:
        """The engine's own gauges for /metrics (empty when it has none)."""

    @abc.abstractmethod
    def explain_claim(self) -> str:
        """The query plan of the claim's search, for tests that check it uses an index."""

    @abc.abstractmethod
    def explain_deliveries(self, **given: Any) -> str:
        """The query plan of ``list_deliveries`` with these filters, for tests that check it uses an index."""


# The partners a claim (on SQLite) and next_due_at look at: the active ones with a pending
# delivery, found by walking the pending rows' index one partner at a time (an index seek each;
# neither engine skips through an index by itself), so a partner with nothing pending costs
# nothing. For each, its earliest pending due time; for a FIFO partner also its head (its oldest
# pending delivery in publish order, {order}) and the end of its latest lease in force: the head
# goes only when it is due and nothing of the partner is in flight (a retry by hand of an older
# delivery becomes the head while a newer one is on the wire). A lease is written into
# next_attempt_at too, so the leases in force are found through deliveries_partner_due.
# Differs by engine in {indexed}: without statistics SQLite's planner would take deliveries_due and
# sort every pending row at each step; PostgreSQL picks a partial index of pending rows itself.
PENDING_PARTNERS = """
    WITH RECURSIVE pending (partner_id) AS (
        SELECT ''  -- before every partner id: where the walk starts (no partner joins it)
        UNION ALL
        SELECT (SELECT d.partner_id FROM deliveries d {indexed}
                WHERE d.state = 'pending' AND d.partner_id > pending.partner_id ORDER BY d.partner_id LIMIT 1)
        FROM pending WHERE pending.partner_id IS NOT NULL
    )
    SELECT p.id, p.ordering,
           (SELECT MIN(next_attempt_at) FROM deliveries
            WHERE partner_id = p.id AND state = 'pending') AS due_at,
           CASE WHEN p.ordering = 'fifo' THEN (
               SELECT id FROM deliveries WHERE partner_id = p.id AND state = 'pending'
               ORDER BY {order} LIMIT 1) END AS head_id,
           CASE WHEN p.ordering = 'fifo' THEN (
               SELECT next_attempt_at FROM deliveries WHERE partner_id = p.id AND state = 'pending'
               ORDER BY {order} LIMIT 1) END AS head_due_at,
           CASE WHEN p.ordering = 'fifo' THEN (
               SELECT MAX(leased_until) FROM deliveries
               WHERE partner_id = p.id AND state = 'pending' AND next_attempt_at > :now
                 AND leased_until > :now) END AS leased_until
    FROM pending JOIN partners p ON p.id = pending.partner_id
    WHERE p.status = 'active' AND p.webhook_url <> ''  -- a pull-only partner (no URL) takes its own (polling.py)
"""


def claimable_at(partner: Any) -> float:
    """When a partner found by ``PENDING_PARTNERS`` may be claimed from: its earliest due row;
    a FIFO partner, its head, and not before its latest lease in force ends."""
    if partner["ordering"] != "fifo":
        return partner["due_at"]
    return max(partner["head_due_at"], partner["leased_until"] or partner["head_due_at"])



def audience_params(event: NewEvent, passed: list[str]) -> dict[str, Any]:
    """The parameters of an engine's subscribers' statement: the event's type, its audience's
    lists (None: not narrowed), the partners whose filter it passed, and the audience as stored."""
    audience = event.audience or {}
    return {"type": event.type, "recipients": audience.get("partners"), "channels": audience.get("channels"),
            "passed": passed, "audience": json.dumps(audience, sort_keys=True) if audience else None}


def write_partner_health(db: Any, outcomes: list[Outcome], now: float) -> None:
    """What a batch of attempts says of their partners — a failing streak's start, a pause, a
    reason to disable — one update per partner, in partner order: two processes recording at
    once then lock partner rows in the same order and never deadlock (PostgreSQL)."""
    health: dict[str, dict[str, Any]] = {}
    for o in outcomes:
        h = health.setdefault(o.partner_id, {})
        if o.partner_failing_changed:
            h["since"] = o.partner_failing_since
        if o.paused_until is not None:
            h["until"] = max(h.get("until", 0.0), o.paused_until)
        if o.disable_reason:
            h.setdefault("reason", o.disable_reason)
    for partner_id in sorted(health):
        h = health[partner_id]
        if "since" in h:
            db.execute("UPDATE partners SET failing_since = :since WHERE id = :id", {"id": partner_id, "since": h["since"]})
        if "until" in h:
            db.execute("""UPDATE partners SET paused_until = :until
                          WHERE id = :id AND (paused_until IS NULL OR paused_until < :until)""",
                       {"id": partner_id, "until": h["until"]})
        if "reason" in h:
            db.execute("""UPDATE partners SET status = 'disabled', disabled_reason = :reason, updated_at = :now
                          WHERE id = :id AND status = 'active'""", {"id": partner_id, "reason": h["reason"], "now": now})

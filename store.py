"""Every SQL statement webhookd runs, behind a narrow face of domain objects (models.py).

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

Two engines run the same statements (``engines.py``): SQLite, one file, the default; or
PostgreSQL (``storage.url``), which several webhookd processes may share. The schema of
each sits below, side by side, with its migrations. Every multi-statement write runs in
one transaction. Publishes and inbound events — the writes we answer a 202 or a 200 for —
queue for the group-commit thread, which writes whatever has queued in one transaction
and one durable flush. Nothing outside this module sees a cursor.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

from config import VERSION
from engines import (DatabaseBusy, DatabaseUnavailable, PostgresEngine, SQLiteEngine, answer_by, current_deadline,
                     is_postgres_url, retry_on_conflict)
from models import (
    Attempt,
    AuditEntry,
    Delivery,
    Event,
    InboundEvent,
    Job,
    NewEvent,
    Outcome,
    Page,
    Partner,
    valid_secrets,
)
from targets import redacted_url, url_origin

logger = logging.getLogger("webhookd.store")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS partners (
        id                    TEXT PRIMARY KEY,
        name                  TEXT NOT NULL,
        webhook_url           TEXT NOT NULL,
        status                TEXT NOT NULL,        -- active | paused | disabled | suspended | deleted
        secret                TEXT NOT NULL,
        previous_secret       TEXT,                 -- still valid until previous_secret_until
        previous_secret_until REAL,
        api_key_hash          TEXT NOT NULL UNIQUE, -- sha256 of the partner API key
        failing_since         REAL,                 -- first failed attempt of the current failing streak
        disabled_reason       TEXT,                 -- why the delivery loop disabled it
        created_at            REAL NOT NULL,
        updated_at            REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS subscriptions (
        partner_id TEXT NOT NULL REFERENCES partners(id),
        event_type TEXT NOT NULL,
        PRIMARY KEY (event_type, partner_id)
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        id              TEXT PRIMARY KEY,
        type            TEXT NOT NULL,
        body            BLOB NOT NULL,      -- canonical JSON: exactly the bytes we send
        idempotency_key TEXT UNIQUE,
        request_hash    TEXT,               -- sha256 of the request, to spot a reused key
        fanout          INTEGER NOT NULL,   -- deliveries created at publish time
        created_at      REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_age ON events (created_at, id)",
    """CREATE TABLE IF NOT EXISTS deliveries (
        id              TEXT PRIMARY KEY,
        event_id        TEXT NOT NULL REFERENCES events(id),
        partner_id      TEXT NOT NULL REFERENCES partners(id),
        state           TEXT NOT NULL,      -- pending | delivered | failed | expired | cancelled
        attempt_count   INTEGER NOT NULL DEFAULT 0,
        max_attempts    INTEGER NOT NULL,
        next_attempt_at REAL NOT NULL,      -- when pending: due time, or lease end while in flight
        leased_until    REAL,               -- set while an attempt is in flight
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS deliveries_partner_due ON deliveries (partner_id, state, next_attempt_at)",
    "CREATE INDEX IF NOT EXISTS deliveries_by_partner ON deliveries (partner_id, id)",
    "CREATE INDEX IF NOT EXISTS deliveries_by_event ON deliveries (event_id)",
    """CREATE TABLE IF NOT EXISTS attempts (
        delivery_id      TEXT NOT NULL REFERENCES deliveries(id),
        attempt          INTEGER NOT NULL,
        started_at       REAL NOT NULL,
        duration_ms      INTEGER NOT NULL,
        status_code      INTEGER,           -- null when no HTTP response came back
        error            TEXT,              -- timeout, connection_refused, http_error, redirect, ...
        response_snippet TEXT,              -- first 1 KiB of the response body
        PRIMARY KEY (delivery_id, attempt)
    )""",
    """CREATE TABLE IF NOT EXISTS inbound_events (
        id          TEXT PRIMARY KEY,
        partner_id  TEXT NOT NULL REFERENCES partners(id),
        type        TEXT NOT NULL,
        dedupe_key  TEXT NOT NULL,          -- X-Webhook-Id, else sha256 of the canonical body
        body        BLOB NOT NULL,          -- canonical JSON of what the partner sent
        received_at REAL NOT NULL,
        UNIQUE (partner_id, dedupe_key)
    )""",
    "CREATE INDEX IF NOT EXISTS inbound_by_age ON inbound_events (received_at)",
    """CREATE TABLE IF NOT EXISTS schema_migrations (
        name       TEXT PRIMARY KEY,
        applied_at REAL NOT NULL
    )""",
]

# One row per role a single process holds at a time (the sweeps), renewed while it lives.
ROLES_TABLE = """CREATE TABLE IF NOT EXISTS roles (
    name   TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    until  DOUBLE PRECISION NOT NULL
)"""

# The processes serving from this database, each renewing its row every few seconds (heartbeats).
PROCESSES_TABLE = """CREATE TABLE IF NOT EXISTS processes (
    id         TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    seen_at    DOUBLE PRECISION NOT NULL
)"""

# PostgreSQL only: the token buckets of the rate limits that protect us (open registration,
# refused signatures, a partner's inbound events), shared by every process. UNLOGGED: a crash
# that empties them only hands everybody a full bucket.
RATE_BUCKETS_TABLE = """CREATE UNLOGGED TABLE IF NOT EXISTS rate_buckets (
    key    TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    at     DOUBLE PRECISION NOT NULL
)"""

# The channels a partner listens on: an event published to channels reaches only subscribers of one.
CHANNELS_TABLE = """CREATE TABLE IF NOT EXISTS partner_channels (
    partner_id TEXT NOT NULL REFERENCES partners(id),
    channel    TEXT NOT NULL,
    PRIMARY KEY (channel, partner_id)
)"""

# Every write an admin or a partner makes (GET /audit): who, when, what changed — never a secret.
AUDIT_TABLE = """CREATE TABLE IF NOT EXISTS audit_log (
    id         TEXT PRIMARY KEY,           -- aud_ + time-sorted, like every id
    at         DOUBLE PRECISION NOT NULL,
    actor      TEXT NOT NULL,              -- admin | partner (itself) | anonymous (open registration)
    address    TEXT,                       -- the caller's address
    action     TEXT NOT NULL,              -- partner.registered, partner.suspended, delivery.retried, ...
    partner_id TEXT,                       -- no foreign key: the trail outlives a deleted partner
    target     TEXT,                       -- a delivery id, when the action was on one
    changes    TEXT NOT NULL               -- JSON
)"""
AUDIT_INDEX = "CREATE INDEX IF NOT EXISTS audit_by_partner ON audit_log (partner_id, id)"

# The indexes of GET /deliveries' filters that the tables above lack (see the migration
# "deliveries.event_type"); the partner's and the event's are deliveries_by_partner and deliveries_by_event.
DELIVERIES_READ_INDEXES = ["CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (state, id)",
                           "CREATE INDEX IF NOT EXISTS deliveries_by_type ON deliveries (event_type, id)"]
DELIVERIES_EVENT_TYPE_BACKFILL = ("UPDATE deliveries SET event_type = "
                                  "(SELECT e.type FROM events e WHERE e.id = deliveries.event_id)")


def _redact_stored_urls(db: Any) -> None:
    """A migration in Python: the URLs the attempts and the audit trail kept whole before they were
    written redacted, redacted now (``targets.redacted_url``: a query may hold a partner's token)."""
    for row in db.execute("SELECT DISTINCT url FROM attempts WHERE url LIKE :query OR url LIKE :user OR url LIKE :rest",
                          {"query": "%?%", "user": "%@%", "rest": "%#%"}).fetchall():
        db.execute("UPDATE attempts SET url = :redacted WHERE url = :url",
                   {"url": row["url"], "redacted": redacted_url(row["url"])})
    _rewrite_audit_urls(db, "SELECT id, changes FROM audit_log WHERE changes LIKE :url", {"url": "%://%"},
                        redacted_url)


# A migration is a list of steps, each a statement or a function of the transaction (``db``).
Migration = tuple[str, list[str | Callable[[Any], None]]]

# Named schema changes, applied once each in order and recorded in schema_migrations.
MIGRATIONS: list[Migration] = [
    ("attempts.url", ["ALTER TABLE attempts ADD COLUMN url TEXT"]),  # where the attempt went
    ("partners.max_rate_per_s", ["ALTER TABLE partners ADD COLUMN max_rate_per_s REAL"]),  # a partner's pace
    ("events_by_age.id", ["DROP INDEX IF EXISTS events_by_age",                 # retention walks it in order
                          "CREATE INDEX events_by_age ON events (created_at, id)"]),
    ("partners.paused_until", ["ALTER TABLE partners ADD COLUMN paused_until REAL"]),  # a shared circuit pause
    ("roles", [ROLES_TABLE.replace("DOUBLE PRECISION", "REAL")]),   # which process runs the sweeps
    ("processes", [PROCESSES_TABLE.replace("DOUBLE PRECISION", "REAL")]),  # heartbeats
    ("attempts.error_detail", ["ALTER TABLE attempts ADD COLUMN error_detail TEXT"]),  # what happened, in words
    ("partners.suspended_reason", ["ALTER TABLE partners ADD COLUMN suspended_reason TEXT"]),  # the admin's why
    ("audit_log", [AUDIT_TABLE.replace("DOUBLE PRECISION", "REAL"), AUDIT_INDEX]),
    # When a pending delivery was queued (published, or retried by hand; null: created_at): its age
    # for delivery.max_pending_age_s.
    ("deliveries.queued_at", ["ALTER TABLE deliveries ADD COLUMN queued_at REAL"]),
    ("partners.contact_email", ["ALTER TABLE partners ADD COLUMN contact_email TEXT"]),
    ("partner_channels", [CHANNELS_TABLE]),
    ("partners.payload_filter", ["ALTER TABLE partners ADD COLUMN payload_filter TEXT"]),  # JSON {field: [values]}
    ("events.audience", ["ALTER TABLE events ADD COLUMN audience TEXT"]),  # JSON {"partners", "channels"}
    # A FIFO partner's deliveries go in publish order: the order of insertion, which is rowid
    # order on SQLite; this index holds a partner's pending rows in that order.
    ("partners.ordering", ["ALTER TABLE partners ADD COLUMN ordering TEXT NOT NULL DEFAULT 'concurrent'",
                           "CREATE INDEX deliveries_pending_order ON deliveries (partner_id) WHERE state = 'pending'"]),
    # For an event's trace: the signature headers as sent, and what came next and why (JSON).
    ("attempts.trace", ["ALTER TABLE attempts ADD COLUMN signatures TEXT",
                        "ALTER TABLE attempts ADD COLUMN decision TEXT"]),
    # Which webhookd applied each migration: a database too new names the version to run.
    ("schema_migrations.version", ["ALTER TABLE schema_migrations ADD COLUMN version TEXT"]),
    # GET /deliveries filters by state and by event type: an index of its own for each, ending in the id,
    # so a page is read newest first and stops at its limit. The type is kept on the delivery (its
    # event's, which never changes) so that filter needs no join.
    ("deliveries.event_type", ["ALTER TABLE deliveries ADD COLUMN event_type TEXT",
                               DELIVERIES_EVENT_TYPE_BACKFILL, *DELIVERIES_READ_INDEXES]),
    # Attempts and audit entries keep a URL without its query (it may hold a partner's token).
    ("urls_redacted", [_redact_stored_urls]),
]


# The same tables in PostgreSQL: times are DOUBLE PRECISION seconds, bodies BYTEA.
SCHEMA_POSTGRES = [
    """CREATE TABLE IF NOT EXISTS partners (
        id                    TEXT PRIMARY KEY,
        name                  TEXT NOT NULL,
        webhook_url           TEXT NOT NULL,
        status                TEXT NOT NULL,
        secret                TEXT NOT NULL,
        previous_secret       TEXT,
        previous_secret_until DOUBLE PRECISION,
        api_key_hash          TEXT NOT NULL UNIQUE,
        failing_since         DOUBLE PRECISION,
        disabled_reason       TEXT,
        created_at            DOUBLE PRECISION NOT NULL,
        updated_at            DOUBLE PRECISION NOT NULL,
        max_rate_per_s        DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS subscriptions (
        partner_id TEXT NOT NULL REFERENCES partners(id),
        event_type TEXT NOT NULL,
        PRIMARY KEY (event_type, partner_id)
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        id              TEXT PRIMARY KEY,
        type            TEXT NOT NULL,
        body            BYTEA NOT NULL,
        idempotency_key TEXT UNIQUE,
        request_hash    TEXT,
        fanout          INTEGER NOT NULL,
        created_at      DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_age ON events (created_at, id)",
    """CREATE TABLE IF NOT EXISTS deliveries (
        id              TEXT PRIMARY KEY,
        event_id        TEXT NOT NULL REFERENCES events(id),
        partner_id      TEXT NOT NULL REFERENCES partners(id),
        state           TEXT NOT NULL,
        attempt_count   INTEGER NOT NULL DEFAULT 0,
        max_attempts    INTEGER NOT NULL,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        leased_until    DOUBLE PRECISION,
        created_at      DOUBLE PRECISION NOT NULL,
        updated_at      DOUBLE PRECISION NOT NULL
    )""",
    # Fewer indexes than SQLite: every claim and every result rewrites the row and, since
    # next_attempt_at changes, adds an entry to each index. The claim's own indexes come with
    # the migrations below (partial: pending rows, leased rows).
    "CREATE INDEX IF NOT EXISTS deliveries_by_partner ON deliveries (partner_id, id)",
    "CREATE INDEX IF NOT EXISTS deliveries_by_event ON deliveries (event_id)",
    """CREATE TABLE IF NOT EXISTS attempts (
        delivery_id      TEXT NOT NULL REFERENCES deliveries(id),
        attempt          INTEGER NOT NULL,
        started_at       DOUBLE PRECISION NOT NULL,
        duration_ms      INTEGER NOT NULL,
        status_code      INTEGER,
        error            TEXT,
        response_snippet TEXT,
        url              TEXT,
        PRIMARY KEY (delivery_id, attempt)
    )""",
    """CREATE TABLE IF NOT EXISTS inbound_events (
        id          TEXT PRIMARY KEY,
        partner_id  TEXT NOT NULL REFERENCES partners(id),
        type        TEXT NOT NULL,
        dedupe_key  TEXT NOT NULL,
        body        BYTEA NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        UNIQUE (partner_id, dedupe_key)
    )""",
    "CREATE INDEX IF NOT EXISTS inbound_by_age ON inbound_events (received_at)",
    """CREATE TABLE IF NOT EXISTS schema_migrations (
        name       TEXT PRIMARY KEY,
        applied_at DOUBLE PRECISION NOT NULL
    )""",
]

# PostgreSQL's schema started at SQLite's third migration: the first ones are in its tables.
MIGRATIONS_POSTGRES: list[Migration] = [
    ("attempts.url", []),
    ("partners.max_rate_per_s", []),
    ("events_by_age.id", []),
    ("partners.paused_until", ["ALTER TABLE partners ADD COLUMN paused_until DOUBLE PRECISION"]),
    ("roles", [ROLES_TABLE]),
    # The claim searches pending rows only: delivered history grows, this index does not.
    ("deliveries_partner_pending", ["CREATE INDEX IF NOT EXISTS deliveries_partner_pending "
                                    "ON deliveries (partner_id, next_attempt_at) WHERE state = 'pending'"]),
    # What every process has in flight for a partner (the claim's global cap): leased rows only.
    ("deliveries_leased", ["CREATE INDEX IF NOT EXISTS deliveries_leased "
                           "ON deliveries (partner_id) WHERE leased_until IS NOT NULL"]),
    # The two partial indexes above do their work: the full ones only cost every write.
    ("deliveries_full_due_indexes_dropped", ["DROP INDEX IF EXISTS deliveries_due",
                                             "DROP INDEX IF EXISTS deliveries_partner_due"]),
    ("processes", [PROCESSES_TABLE]),
    ("rate_buckets", [RATE_BUCKETS_TABLE]),
    ("attempts.error_detail", ["ALTER TABLE attempts ADD COLUMN IF NOT EXISTS error_detail TEXT"]),
    ("partners.suspended_reason", ["ALTER TABLE partners ADD COLUMN IF NOT EXISTS suspended_reason TEXT"]),
    ("audit_log", [AUDIT_TABLE, AUDIT_INDEX]),
    ("deliveries.queued_at", ["ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS queued_at DOUBLE PRECISION"]),
    ("partners.contact_email", ["ALTER TABLE partners ADD COLUMN IF NOT EXISTS contact_email TEXT"]),
    ("partner_channels", [CHANNELS_TABLE]),
    ("partners.payload_filter", ["ALTER TABLE partners ADD COLUMN IF NOT EXISTS payload_filter TEXT"]),
    ("events.audience", ["ALTER TABLE events ADD COLUMN IF NOT EXISTS audience TEXT"]),
    # PostgreSQL has no rowid: a FIFO partner's publish order is an identity column, numbered at insert.
    ("partners.ordering", ["ALTER TABLE partners ADD COLUMN IF NOT EXISTS ordering TEXT NOT NULL DEFAULT 'concurrent'",
                           "ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS seq BIGINT GENERATED BY DEFAULT AS IDENTITY",
                           "CREATE INDEX IF NOT EXISTS deliveries_pending_order ON deliveries (partner_id, seq) "
                           "WHERE state = 'pending'"]),
    ("attempts.trace", ["ALTER TABLE attempts ADD COLUMN IF NOT EXISTS signatures TEXT",
                        "ALTER TABLE attempts ADD COLUMN IF NOT EXISTS decision TEXT"]),
    ("schema_migrations.version", ["ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS version TEXT"]),
    ("deliveries.event_type", ["ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS event_type TEXT",
                               DELIVERIES_EVENT_TYPE_BACKFILL, *DELIVERIES_READ_INDEXES]),
    ("urls_redacted", [_redact_stored_urls]),
]


class SchemaTooNew(RuntimeError):
    """The database holds migrations this code does not know: a newer webhookd wrote it."""


def _partner_from_row(row: Any, events: tuple[str, ...], channels: tuple[str, ...] = ()) -> Partner:
    return Partner(
        id=row["id"], name=row["name"], webhook_url=row["webhook_url"], status=row["status"],
        events=events, secret=row["secret"], previous_secret=row["previous_secret"],
        previous_secret_until=row["previous_secret_until"],
        created_at=row["created_at"], updated_at=row["updated_at"],
        failing_since=row["failing_since"], disabled_reason=row["disabled_reason"],
        max_rate_per_s=row["max_rate_per_s"], paused_until=row["paused_until"],
        suspended_reason=row["suspended_reason"], contact_email=row["contact_email"], channels=channels,
        payload_filter=json.loads(row["payload_filter"]) if row["payload_filter"] else None, ordering=row["ordering"],
    )


def _event_from_row(row: Any) -> Event:
    return Event(
        id=row["id"], type=row["type"], body=bytes(row["body"]), fanout=row["fanout"],
        created_at=row["created_at"], idempotency_key=row["idempotency_key"],
        request_hash=row["request_hash"], audience=json.loads(row["audience"]) if row["audience"] else None,
    )


def _delivery_from_row(row: Any, attempts: tuple[Attempt, ...] = ()) -> Delivery:
    return Delivery(
        id=row["id"], event_id=row["event_id"], event=row["event"], partner_id=row["partner_id"],
        state=row["state"], attempt_count=row["attempt_count"], max_attempts=row["max_attempts"],
        next_attempt_at=row["next_attempt_at"], leased_until=row["leased_until"],
        created_at=row["created_at"], updated_at=row["updated_at"], attempts=attempts,
        held_behind=row["head"] if row["head"] != row["id"] else None,
    )


def _attempt_from_row(row: Any) -> Attempt:
    return Attempt(
        attempt=row["attempt"], started_at=row["started_at"], duration_ms=row["duration_ms"],
        status_code=row["status_code"], error=row["error"], error_detail=row["error_detail"],
        response_snippet=row["response_snippet"], url=row["url"],
        signatures=json.loads(row["signatures"]) if row["signatures"] else None,
        decision=json.loads(row["decision"]) if row["decision"] else None,
    )


def _inbound_from_row(row: Any) -> InboundEvent:
    return InboundEvent(
        id=row["id"], partner_id=row["partner_id"], type=row["type"], dedupe_key=row["dedupe_key"],
        body=bytes(row["body"]), received_at=row["received_at"],
    )


GROUP_COMMIT_MAX = 256  # requests written per group commit, at most
WORK_CHANNEL = "webhookd_work"      # NOTIFY after publishes: deliveries are due
ANNOUNCE_GAP_S = 0.05               # at most one such NOTIFY per process this often
OFFERS_CHANNEL = "webhookd_offers"  # NOTIFY with a /ws offer, for the users connected to other processes
PARTNERS_CHANNEL = "webhookd_partners"  # NOTIFY after a partner changed, or an operator reset its circuit


def take_batch(waiting: queue.SimpleQueue, limit: int) -> tuple[list[Any], bool]:
    """Wait for one item, then take whatever else is already queued, up to ``limit``.
    A ``None`` in the queue means stop: returns the real items and whether to stop."""
    batch = [waiting.get()]
    while len(batch) < limit:
        try:
            batch.append(waiting.get_nowait())
        except queue.Empty:
            break
    return [item for item in batch if item is not None], None in batch
T = TypeVar("T")


class _GroupWrite:
    """One request waiting for the group-commit writer: its work, then its result or error;
    ``announce``: a channel to notify once it is committed (other processes have work);
    ``deadline``: when its caller stops waiting (``engines.answer_by``), or None.

    Exactly one of two things happens to a request: the writer takes it (``take``), and then its
    caller waits for the commit's outcome, or its caller gives it up before that (``give_up``),
    and then the writer skips it. So a caller that gave up knows nothing of it was written."""

    def __init__(self, work: Callable[[Any], Any], announce: str | None = None, deadline: float | None = None):
        self.work = work
        self.announce = announce
        self.deadline = deadline
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


class Store:
    """The store. Thread-safe: each engine serializes or pools its connections (engines.py).

    Which calls may run on the event loop: only ``get_partner``, ``all_partners``, ``paces`` and
    ``partners_accepting_inbound``, which read the in-memory copy of the partners table
    and never touch the database. Every other method blocks on it, so it is called
    from a thread: a route writes ``await db(store.method, ...)``, the delivery loop
    ``asyncio.to_thread``, and its sender and recorder threads call it directly.

    ``target`` is a file path (SQLite) or a ``postgresql://`` URL.
    """

    def __init__(self, target: str, *, lock_timeout_s: float = 2.0, statement_timeout_s: float = 10.0):
        """``lock_timeout_s``, ``statement_timeout_s``: PostgreSQL's bounds on each statement (see
        ``engines.PostgresEngine``); SQLite has one writer and no row locks to wait for."""
        self.engine = (PostgresEngine(target, lock_timeout_s=lock_timeout_s, statement_timeout_s=statement_timeout_s)
                       if is_postgres_url(target) else SQLiteEngine(target))
        self._claim_round = 0  # which partner the next claim starts with
        self._order = "seq" if self.engine.name == "postgresql" else "rowid"  # deliveries in insertion order
        self._delivery_select = _DELIVERY_SELECT.format(order=self._order)
        self._pending_partners = _PENDING_PARTNERS.format(
            order=self._order, indexed="" if self.postgres else "INDEXED BY deliveries_pending_order")
        self._partners: dict[str, Partner] = {}  # see _reload_partners
        self._paces: dict[str, float] = {}       # partner -> max_rate_per_s, for the partners that set one
        self._filtered: list[Partner] = []       # the partners with a payload filter
        self.partners_stale = False              # a reload after a write failed (see below)
        self._partners_read_at = 0.0             # when the last reload began (time.monotonic)
        self._probed_at = 0.0                    # when storage_writable last wrote its probe
        self._partners_lock = threading.Lock()
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
        return getattr(self.engine, "write_fault", None)

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

    @property
    def postgres(self) -> bool:
        return self.engine.name == "postgresql"
    shared = postgres  # a capability, for the code above the store: several processes may share this database

    def close(self) -> None:
        self._group_queue.put(None)
        self._group_thread.join(timeout=10)
        self.engine.close()

    def _transaction(self, durable: bool = True) -> Any:
        """A write transaction (see ``engines.py``): committed at the end of the block, rolled
        back on any exception. ``durable=False`` only for bookkeeping whose loss is a resend."""
        return self.engine.transaction(durable)

    def _reader(self, snapshot: bool = False) -> Any:
        return self.engine.reader(snapshot)

    def _in_group_commit(self, work: Callable[[Any], T], announce: str | None = None) -> T:
        """Run ``work(db)`` in the group-commit writer's next transaction; return after its commit.

        Requests that arrive while a commit is being flushed to disk wait for the next one
        together, so under load one ``FULL`` flush covers many publishes and inbound
        events (the write-thread pattern). If any of them fails, the transaction is rolled
        back and each request runs again in a transaction of its own: the one that fails
        alone gets the exception, the others are written. (No SAVEPOINT per request: on
        PostgreSQL each would cost two more round trips, and a failure is rare.)

        A caller with a deadline (``engines.answer_by``: a route) that is still queued when it
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
            return [request.work(db) for request in batch]

    def _apply_schema(self) -> None:
        """Create what is missing, then apply the migrations not yet recorded, in order, each
        recorded with the version that applied it (``self.migrated`` lists them). A database
        with migrations this code does not know was written by a newer webhookd: refuse it,
        naming that version, rather than run old SQL on a new schema."""
        schema, migrations = (SCHEMA_POSTGRES, MIGRATIONS_POSTGRES) if self.postgres else (SCHEMA, MIGRATIONS)
        with self._transaction() as db:
            if self.postgres:  # processes starting together take turns (SQLite's writer is one already)
                # ...and a migration may wait for the one before it, or build an index on a big table,
                # for longer than any API statement may: no time bounds in this transaction.
                db.execute("SET LOCAL lock_timeout = 0")
                db.execute("SET LOCAL statement_timeout = 0")
                db.execute("SELECT pg_advisory_xact_lock(72071)")
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
                           f"({_placeholders('m', self.migrated)})", {"v": VERSION, **_numbered("m", self.migrated)})

    # --- Telling the other processes (PostgreSQL; nothing to do on SQLite) ---------------------

    def announce(self, channel: str, payload: str = "") -> None:
        """A hint to every process on the database (``NOTIFY``); a failure is only logged."""
        try:
            self.engine.notify(channel, payload)
        except Exception as exc:
            logger.warning("notifying %s failed (%s); the other processes will find out by polling", channel, exc)

    def listen(self, handlers: dict[str, Callable[[str], None]]) -> Callable[[], None]:
        """Call ``handlers[channel](payload)`` for each hint another process (or this one) sends,
        from a thread; returns the function that stops listening."""
        return self.engine.listen(lambda channel, payload: handlers[channel](payload), list(handlers))

    def hold_role(self, name: str, holder: str, ttl_s: float, now: float) -> bool:
        """Take or renew ``name`` for ``holder`` until ``now + ttl_s``; True if ``holder`` has it.
        Another process gets it only once its holder stopped renewing (died, or stopped)."""
        with self._transaction(durable=False) as db:
            row = db.execute(
                """INSERT INTO roles (name, holder, until) VALUES (:name, :holder, :until)
                   ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until
                   WHERE roles.holder = excluded.holder OR roles.until < :now
                   RETURNING holder""",
                {"name": name, "holder": holder, "until": now + ttl_s, "now": now}).fetchone()
        return row is not None

    def heartbeat(self, process_id: str, *, host: str, pid: int, started_at: float, now: float,
                  alive_s: float) -> list[dict[str, Any]]:
        """Renew this process's row; forget rows silent for an hour; return the processes
        seen within ``alive_s`` (this one included), oldest first."""
        with self._transaction(durable=False) as db:
            db.execute("""INSERT INTO processes (id, host, pid, started_at, seen_at)
                          VALUES (:id, :host, :pid, :started, :now)
                          ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at""",
                       {"id": process_id, "host": host, "pid": pid, "started": started_at, "now": now})
            db.execute("DELETE FROM processes WHERE seen_at < :gone", {"gone": now - 3600})
            rows = db.execute("SELECT * FROM processes WHERE seen_at >= :alive ORDER BY started_at, id",
                              {"alive": now - alive_s}).fetchall()
        return [{key: row[key] for key in row.keys()} for row in rows]

    def forget_process(self, process_id: str) -> None:
        """A process that stops says so (its heartbeats would only run out)."""
        with self._transaction(durable=False) as db:
            db.execute("DELETE FROM processes WHERE id = :id", {"id": process_id})

    def take_token(self, key: str, *, rate: float, burst: float, now: float, only_if_left: bool,
                   cost: float = 1.0) -> float | None:
        """PostgreSQL: spend ``cost`` tokens (one; -1 gives one back) of the shared bucket ``key``
        (``rate_buckets``) and return what is left; with ``only_if_left``, spend only if one is
        left, else return None."""
        refill = "LEAST(:burst, rate_buckets.tokens + (:now - rate_buckets.at) * :rate)"
        rows = self.engine.statement(
            f"""INSERT INTO rate_buckets (key, tokens, at) VALUES (:key, LEAST(:burst, :burst - :cost), :now)
                ON CONFLICT (key) DO UPDATE SET tokens = LEAST(:burst, GREATEST(0, {refill} - :cost)), at = :now
                {f"WHERE {refill} >= 1" if only_if_left else ""}
                RETURNING tokens""", {"key": key, "rate": rate, "burst": burst, "now": now, "cost": cost})
        return rows[0]["tokens"] if rows else None

    def tokens_left(self, key: str, *, rate: float, burst: float, now: float) -> float:
        """PostgreSQL: the tokens in the shared bucket ``key`` now, without spending one."""
        with self._reader() as db:
            row = db.execute("SELECT LEAST(:burst, tokens + (:now - at) * :rate) FROM rate_buckets WHERE key = :key",
                             {"key": key, "rate": rate, "burst": burst, "now": now}).fetchone()
        return burst if row is None else row[0]

    def purge_rate_buckets(self, *, before: float) -> int:
        """Forget buckets untouched since ``before`` (full again long ago)."""
        with self._transaction(durable=False) as db:
            return db.execute("DELETE FROM rate_buckets WHERE at < :before", {"before": before}).rowcount

    def ping(self) -> bool:
        with self._reader() as db:
            return db.execute("SELECT 1").fetchone()[0] == 1

    def explain_claim(self) -> str:
        """The query plan of the claim's search, for tests that check it uses an index: on SQLite
        the walk over the partners with pending rows, then one partner's due rows."""
        if self.postgres:
            return self.engine.explain(_CLAIM, {"partners": ["p"], "fifo": [False], "now": 0.0, "lease": 1.0, "limit": 1,
                                                "per_partner": 1, "round": "0", "room_ids": [], "room_n": []})
        return "\n".join([self.engine.explain(self._pending_partners, {"now": 0.0}),
                          self.engine.explain(_DUE_FOR_PARTNER, {"partner_id": "", "now": 0.0, "limit": 1})])

    # --- Partners -----------------------------------------------------------------

    def add_partner(
        self, *, partner_id: str, name: str, webhook_url: str, events: list[str], secret: str,
        api_key_hash: str, now: float, max_rate_per_s: float | None = None, contact_email: str | None = None,
        channels: list[str] | None = None, payload_filter: dict[str, list[Any]] | None = None,
        ordering: str = "concurrent", audit: AuditEntry | None = None,
    ) -> Partner:
        with self._partner_write(partner_id) as db:
            db.execute(
                """INSERT INTO partners (id, name, webhook_url, status, secret, api_key_hash,
                                         max_rate_per_s, contact_email, payload_filter, ordering, created_at,
                                         updated_at)
                   VALUES (:id, :name, :url, 'active', :secret, :api_key_hash, :rate, :email, :filter, :ordering,
                           :now, :now)""",
                {"id": partner_id, "name": name, "url": webhook_url, "secret": secret,
                 "api_key_hash": api_key_hash, "rate": max_rate_per_s, "email": contact_email,
                 "filter": _filter_json(payload_filter), "ordering": ordering, "now": now},
            )
            _write_subscriptions(db, partner_id, events)
            _write_channels(db, partner_id, channels or [])
            _write_audit(db, audit)
            return _read_partner(db, partner_id)  # type: ignore[return-value]

    def update_partner(self, partner_id: str, *, now: float, webhook_url: str | None = None,
                       events: list[str] | None = None, status: str | None = None,
                       max_rate_per_s: float | None = None, reason: str | None = None,
                       contact_email: str | None = None, channels: list[str] | None = None,
                       payload_filter: dict[str, list[Any]] | None = None, ordering: str | None = None,
                       audit: AuditEntry | None = None) -> Partner | None:
        """Change what is given; None if there is no such partner. Made active again, a
        partner starts with a clean failure record. ``max_rate_per_s`` 0 removes the pace,
        ``contact_email`` "" the address, and ``payload_filter`` {} the filter.
        ``reason`` goes with ``status="suspended"`` (the admin's why, shown to the partner)."""
        with self._partner_write(partner_id, "reactivated" if status == "active" else "changed") as db:
            if _read_partner(db, partner_id) is None:
                return None
            if webhook_url is not None:
                db.execute("UPDATE partners SET webhook_url = :url WHERE id = :id", {"id": partner_id, "url": webhook_url})
            if max_rate_per_s is not None:
                db.execute("UPDATE partners SET max_rate_per_s = :rate WHERE id = :id",
                           {"id": partner_id, "rate": max_rate_per_s or None})
            if events is not None:
                _write_subscriptions(db, partner_id, events)
            if contact_email is not None:
                db.execute("UPDATE partners SET contact_email = :email WHERE id = :id",
                           {"id": partner_id, "email": contact_email or None})
            if channels is not None:
                _write_channels(db, partner_id, channels)
            if payload_filter is not None:
                db.execute("UPDATE partners SET payload_filter = :filter WHERE id = :id",
                           {"id": partner_id, "filter": _filter_json(payload_filter)})
            if ordering is not None:
                db.execute("UPDATE partners SET ordering = :ordering WHERE id = :id",
                           {"id": partner_id, "ordering": ordering})
            if status is not None:
                db.execute(
                    """UPDATE partners SET status = :status, failing_since = NULL, disabled_reason = NULL,
                                           paused_until = NULL, suspended_reason = :reason
                       WHERE id = :id""", {"id": partner_id, "status": status, "reason": reason})
            db.execute("UPDATE partners SET updated_at = :now WHERE id = :id", {"id": partner_id, "now": now})
            _write_audit(db, audit)
            return _read_partner(db, partner_id)

    def rotate_secret(self, partner_id: str, *, new_secret: str, previous_until: float,
                      now: float, revoke_old: bool = False, audit: AuditEntry | None = None) -> Partner | None:
        """Make ``new_secret`` current; the current one stays valid until ``previous_until``
        (``revoke_old``: no old secret stays valid at all)."""
        with self._partner_write(partner_id) as db:
            changed = db.execute(
                """UPDATE partners SET previous_secret = CASE WHEN :revoke THEN NULL ELSE secret END,
                                       previous_secret_until = CASE WHEN :revoke THEN NULL ELSE :until END,
                                       secret = :secret, updated_at = :now
                   WHERE id = :id AND status <> 'deleted'""",
                {"id": partner_id, "secret": new_secret, "until": previous_until, "now": now, "revoke": revoke_old},
            ).rowcount
            if changed:
                _write_audit(db, audit)
            return _read_partner(db, partner_id) if changed else None

    def reissue_api_key(self, partner_id: str, *, api_key_hash: str, now: float,
                        audit: AuditEntry | None = None) -> Partner | None:
        """Replace the partner's API key (its hash): the old key stops at once, in every process
        (keys are looked up in the database on every request)."""
        with self._partner_write(partner_id) as db:
            changed = db.execute("""UPDATE partners SET api_key_hash = :hash, updated_at = :now
                                    WHERE id = :id AND status <> 'deleted'""",
                                 {"id": partner_id, "hash": api_key_hash, "now": now}).rowcount
            if changed:
                _write_audit(db, audit)
            return _read_partner(db, partner_id) if changed else None

    def delete_partner(self, partner_id: str, *, now: float, audit: AuditEntry | None = None) -> int | None:
        """Delete a partner; how many of its deliveries were cancelled, or None if there is no such
        partner (or it is deleted already).

        At once: its secrets, API key, URL and subscriptions are erased (its signatures stop
        verifying, its key stops working, nothing more is published to it), and its pending and
        expired deliveries end ``cancelled``, never sent. An attempt already on the wire finishes,
        but its result is not recorded. The row stays as a tombstone (``status = 'deleted'``, its
        name) so the history and the audit trail still say whose it was; the retention purge
        removes its history at ``retention.max_age_s`` like everyone's, then the tombstone. The URLs
        its attempts and audit entries kept are cut down to their origin (``https://x/…``)."""
        with self._partner_write(partner_id, "deleted") as db:
            if not db.execute(
                    """UPDATE partners SET status = 'deleted', secret = '', previous_secret = NULL,
                                           previous_secret_until = NULL, api_key_hash = :tombstone,
                                           webhook_url = '', contact_email = NULL, payload_filter = NULL,
                                           failing_since = NULL, paused_until = NULL,
                                           updated_at = :now
                       WHERE id = :id AND status <> 'deleted'""",
                    {"id": partner_id, "tombstone": f"deleted:{partner_id}", "now": now}).rowcount:
                return None
            db.execute("DELETE FROM subscriptions WHERE partner_id = :id", {"id": partner_id})
            db.execute("DELETE FROM partner_channels WHERE partner_id = :id", {"id": partner_id})
            cancelled = _cancel(db, partner_id, ("pending", "expired"), now)
            _forget_partner_urls(db, partner_id)
            _write_audit(db, audit, cancelled_deliveries=cancelled)
        self._forget_old_versions()
        return cancelled

    def _forget_old_versions(self) -> None:
        """After an erasure, leave no earlier version of the rows in the files: SQLite keeps them in
        its write-ahead log, and the database file its last checkpoint's pages, until a checkpoint
        copies the new pages over them; this one also empties the log. Differs on PostgreSQL, whose
        old row versions are invisible to every query and go at the next vacuum."""
        if self.postgres:
            return
        try:
            with self._reader() as db:
                busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except Exception as exc:  # the erasure is committed: a failed checkpoint must not fail it
            busy = exc
        if busy:
            logger.warning("the write-ahead log could not be emptied after an erasure (%s); "
                           "the next checkpoint copies the new rows over the old ones", busy)

    def cancel_pending(self, partner_id: str, *, now: float, audit: AuditEntry | None = None) -> int | None:
        """End every pending delivery of the partner ``cancelled`` (never sent; in flight: its result
        is not recorded). How many; None if there is no such partner."""
        with self._transaction() as db:
            if _read_partner(db, partner_id) is None:
                return None
            cancelled = _cancel(db, partner_id, ("pending",), now)
            _write_audit(db, audit, cancelled_deliveries=cancelled)
            return cancelled

    def ensure_system_partner(self, partner_id: str, *, name: str, url: str, secret: str, now: float) -> None:
        """A partner of webhookd's own (the alerts' receiver), made to match the config: created,
        or its URL and secret set again, and active. It has no usable API key."""
        with self._partner_write(partner_id) as db:
            db.execute(
                """INSERT INTO partners (id, name, webhook_url, status, secret, api_key_hash, created_at, updated_at)
                   VALUES (:id, :name, :url, 'active', :secret, :key, :now, :now)
                   ON CONFLICT (id) DO UPDATE SET name = :name, webhook_url = :url, secret = :secret,
                                                  status = 'active', updated_at = :now""",
                {"id": partner_id, "name": name, "url": url, "secret": secret, "key": f"system:{partner_id}",
                 "now": now})

    @contextmanager
    def _partner_write(self, partner_id: str, action: str = "changed") -> Iterator[Any]:
        """A transaction that changes a partner; the in-memory copy is read again after its
        commit, and the other processes are told (``tell_partner_changed``)."""
        with self._transaction() as db:
            yield db
        self._reload_partners_after_write()
        self.tell_partner_changed(partner_id, action)

    def tell_partner_changed(self, partner_id: str, action: str = "changed") -> None:
        """PostgreSQL: tell every process (``PARTNERS_CHANNEL``) that a partner changed, so it
        reads the partners again at once rather than at its next poll; ``action`` "probe" or
        "reactivated" is an operator's reset that each process applies to its own breaker."""
        if self.postgres:
            self.announce(PARTNERS_CHANNEL, json.dumps({"partner_id": partner_id, "action": action}))

    def _reload_partners_after_write(self) -> None:
        """Reload after a commit. The write is on disk whatever happens here, so a failed
        reload must not fail it: it is logged and ``partners_stale`` set, and the delivery loop
        (from a thread) calls ``reload_partners`` again."""
        try:
            self._reload_partners()
        except Exception:
            self.partners_stale = True
            logger.exception("reading partners into memory failed; the delivery loop will try again")

    def reload_partners(self, at_most_every_s: float = 0.0) -> None:
        """Read the partners again: after a reload that failed (``partners_stale``), or because
        on PostgreSQL another process changed them (a registration, a pause, a rotation, a
        circuit it opened). From a thread. ``at_most_every_s``: not if the last reload began
        less than that ago (a caller anyone can trigger, such as an unknown partner id)."""
        if time.monotonic() - self._partners_read_at >= at_most_every_s:
            self._reload_partners()

    def _reload_partners(self) -> None:
        """Read every partner into memory, in one read transaction.

        Runs in the thread that has just written (or in ``__init__``), never on the event
        loop, and before that write returns: whoever wrote reads its own write. Reloads
        take turns, so the last one to finish read after every commit before it. Readers
        keep the previous copy until the new one is complete. (Several processes on one
        database would need a time limit on this copy too.)
        """
        with self._partners_lock:
            self._partners_read_at = time.monotonic()
            with self._reader(snapshot=True) as db:
                rows = db.execute("SELECT * FROM partners WHERE status <> 'deleted'").fetchall()
                events: dict[str, list[str]] = {}
                for sub in db.execute("SELECT partner_id, event_type FROM subscriptions ORDER BY event_type"):
                    events.setdefault(sub["partner_id"], []).append(sub["event_type"])
                channels: dict[str, list[str]] = {}
                for c in db.execute("SELECT partner_id, channel FROM partner_channels ORDER BY channel"):
                    channels.setdefault(c["partner_id"], []).append(c["channel"])
            self._partners = {row["id"]: _partner_from_row(row, tuple(events.get(row["id"], ())),
                                                           tuple(channels.get(row["id"], ()))) for row in rows}
            self._filtered = [p for p in self._partners.values() if p.payload_filter]
            self._paces = {p.id: p.max_rate_per_s for p in self._partners.values() if p.max_rate_per_s}
            self.partners_stale = False

    # Memory only: the reads below never touch SQLite, so they may run on the event loop.

    def get_partner(self, partner_id: str) -> Partner | None:
        """One partner (memory only)."""
        return self._partners.get(partner_id)

    def all_partners(self) -> list[Partner]:
        """Every partner, newest first (memory only)."""
        return sorted(self._partners.values(), key=lambda p: p.id, reverse=True)

    def paces(self) -> dict[str, float]:
        """``max_rate_per_s`` of every partner that set one (memory only; the delivery loop asks
        before each claim, so it is kept ready rather than computed)."""
        return self._paces

    def partners_accepting_inbound(self) -> list[Partner]:
        """Partners whose secrets may verify an inbound event: all but the disabled and the suspended
        ones (memory only)."""
        return sorted((p for p in self._partners.values() if p.status not in ("disabled", "suspended")),
                      key=lambda p: p.id)

    # From here on every method reads or writes SQLite: call it from a thread.

    def api_key_owner(self, api_key_hash: str) -> tuple[str, str, str | None] | None:
        """The partner whose API key this is: its id, its status and why it was suspended. Read
        from the database on every request, never from memory, so that a reissued key, a deletion
        or a suspension made by any process counts from the very next request."""
        with self._reader() as db:
            row = db.execute(
                "SELECT id, status, suspended_reason FROM partners WHERE api_key_hash = :h", {"h": api_key_hash}
            ).fetchone()
        return (row["id"], row["status"], row["suspended_reason"]) if row else None

    def list_partners(self, *, limit: int, cursor: str | None) -> Page:
        with self._reader() as db:
            rows = db.execute(
                """SELECT id FROM partners WHERE status <> 'deleted' AND (CAST(:cursor AS TEXT) IS NULL OR id < :cursor)
                   ORDER BY id DESC LIMIT :n""",
                {"cursor": cursor, "n": limit + 1},
            ).fetchall()
            partners = [_read_partner(db, r["id"]) for r in rows]
        return _page(partners, limit)

    # --- Events and their fan-out ---------------------------------------------------

    def publish(self, event: NewEvent, *, now: float, max_attempts: int,
                new_delivery_id: Callable[[], str]) -> tuple[Event, bool]:
        """Store an event and one pending delivery per subscriber, in one transaction.

        Returns ``(event, created)``. With an ``idempotency_key`` already used, nothing is
        written and the first event comes back with ``created`` False. Who gets a delivery is
        ``_SUBSCRIBERS``' rule: the partners subscribed to its type, narrowed by the event's
        ``audience`` and each partner's payload filter. ``only_partner`` targets one partner
        whatever its subscriptions (the ``webhook.test`` ping). Paused and disabled partners
        get their rows too: they stay ``pending`` until the partner is active again.
        """
        insert = _insert_event_postgres if self.postgres else _insert_event
        passed = self._filters_passed(event)
        return self._in_group_commit(lambda db: insert(db, event, now, max_attempts, new_delivery_id, passed),
                                     announce=WORK_CHANNEL)

    def publish_batch(self, events: list[NewEvent], *, now: float, max_attempts: int,
                      new_delivery_id: Callable[[], str]) -> list[tuple[Event, bool]]:
        """``publish`` for many events, in one transaction and one durable commit."""
        insert = _insert_event_postgres if self.postgres else _insert_event
        passed = [self._filters_passed(event) for event in events]
        return self._in_group_commit(
            lambda db: [insert(db, event, now, max_attempts, new_delivery_id, p) for event, p in zip(events, passed)],
            announce=WORK_CHANNEL)

    def _filters_passed(self, event: NewEvent) -> list[str] | None:
        """The partners with a payload filter that this event passes (memory only: filters are
        judged here, in Python, and the statement keeps a filtered partner only if it is named);
        None when no partner has a filter (the statement then need not look)."""
        if not self._filtered:
            return None
        if event.only_partner is not None:
            return []
        payload = json.loads(event.body)
        return [p.id for p in self._filtered if p.accepts(payload)]

    def get_event(self, event_id: str) -> Event | None:
        with self._reader() as db:
            row = db.execute("SELECT * FROM events WHERE id = :id", {"id": event_id}).fetchone()
        return _event_from_row(row) if row else None

    # --- The delivery loop's side: claim, finish, release ---------------------------

    def claim_due(self, *, now: float, lease_s: float, limit: int, per_partner: int,
                  room: Mapping[str, int] | None = None) -> list[Job]:
        """Take up to ``limit`` due deliveries, at most ``per_partner`` per partner.

        ``room`` overrides how many a given partner may get now (fewer when some are
        already in flight, none while its circuit is open). Partners are visited
        in turn, starting one further along at each call, and each gets its oldest due
        rows up to its free room: one partner with a huge backlog cannot crowd out the
        others. A FIFO partner gets its head alone, and nothing while a delivery of it is
        in flight. The lease is written into ``next_attempt_at``, so a row whose attempt
        never finishes (the process died) becomes due again when the lease runs out.
        """
        room = dict(room or {})
        lease_until = now + lease_s
        self._claim_round += 1
        if self.postgres:
            return self._claim_in_one_statement(now, lease_until, limit, per_partner, room)
        if limit <= 0:
            return []
        with self._transaction(durable=False) as db:
            # Only the partners with something due are visited: idle ones cost nothing.
            heads = {row["id"]: row["head_id"] for row in self._partners_with_pending(db, now)
                     if _claimable_at(row) <= now}  # partner -> its FIFO head (None: not FIFO)
            partners = sorted(heads)
            if not partners:
                return []
            start = self._claim_round % len(partners)
            in_turn = partners[start:] + partners[:start]
            taken = {p: 0 for p in partners}
            ids: list[str] = []
            # First pass: an equal share each; second pass: fill what is left, up to the cap.
            # Leasing each batch at once takes it out of the next search.
            for cap in (max(1, limit // len(partners)), per_partner):
                for partner_id in in_turn:
                    allowed = min(cap, room.get(partner_id, per_partner)) - taken[partner_id]
                    wanted = min(allowed, limit - len(ids))
                    if wanted <= 0:
                        continue
                    if heads[partner_id] is not None:  # FIFO: its head alone, once; never a row behind it
                        batch = [] if taken[partner_id] else [heads[partner_id]]
                    else:
                        batch = [r["id"] for r in db.execute(
                            _DUE_FOR_PARTNER, {"partner_id": partner_id, "now": now, "limit": wanted})]
                    if batch:
                        db.execute(f"UPDATE deliveries SET leased_until = :lease, next_attempt_at = :lease "
                                   f"WHERE id IN ({_placeholders('id', batch)})",
                                   {"lease": lease_until, **_numbered("id", batch)})
                    taken[partner_id] += len(batch)
                    ids += batch
            return _read_jobs(db, ids, now)

    def _partners_with_pending(self, db: Any, now: float) -> list[Any]:
        """The active partners with a pending delivery, with when each may be claimed from
        (``_PENDING_PARTNERS``): one index seek per such partner, none for the idle ones."""
        return db.execute(self._pending_partners, {"now": now}).fetchall()

    @retry_on_conflict
    def _claim_in_one_statement(self, now: float, lease_until: float, limit: int, per_partner: int,
                                room: dict[str, int]) -> list[Job]:
        """PostgreSQL, where several processes claim at once: lock the partners (``_LOCK_PARTNERS``),
        then the claim itself in one statement (``_CLAIM``). Each partner's room is cut to its cap
        less what *every* process has in flight for it, so three processes never send a partner
        three times its cap."""
        if limit <= 0:
            return []
        with self._transaction(durable=False) as db:
            locked = db.execute(_LOCK_PARTNERS, {"now": now}).fetchall()
            if not locked:
                return []
            rows = db.execute(_CLAIM, {
                "partners": [row["id"] for row in locked], "fifo": [row["ordering"] == "fifo" for row in locked],
                "now": now, "lease": lease_until, "limit": limit, "per_partner": per_partner,
                "round": str(self._claim_round), "room_ids": list(room), "room_n": list(room.values())}).fetchall()
        return [_job_from_row(row, now) for row in rows]

    @retry_on_conflict
    def finish_attempts(self, outcomes: list[Outcome], now: float) -> list[str]:
        """Record many attempts in one transaction (group commit); return the ids not recorded.

        Each update applies only while the row still expects that attempt number, so
        an attempt that finishes after its lease ran out and the row was taken again
        cannot record twice. Partner health (failing streak, auto-disable) is written
        in the same transaction.
        """
        health = any(o.partner_failing_changed or o.disable_reason or o.paused_until for o in outcomes)
        if self.postgres and not health:  # the usual case: one statement, one round trip
            recorded = _record_at_once(self.engine, outcomes, now)
        else:
            with self._transaction(durable=False) as db:
                recorded = (_record_at_once if self.postgres else _record_one_by_one)(db, outcomes, now)
                _write_partner_health(db, [o for o in outcomes if o.delivery_id in recorded], now)
        lost = [o.delivery_id for o in outcomes if o.delivery_id not in recorded]
        if health:
            self._reload_partners_after_write()
        return lost

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

    def last_failed_attempt_at(self, partner_id: str) -> float | None:
        """When the partner's latest failed attempt started, among its 1,000 newest deliveries
        (a bounded read: asked once per partner after a restart, to pick up a failing streak)."""
        with self._reader() as db:
            row = db.execute(
                """SELECT MAX(a.started_at) FROM attempts a
                   WHERE a.error IS NOT NULL AND a.delivery_id IN
                         (SELECT id FROM deliveries WHERE partner_id = :p ORDER BY id DESC LIMIT 1000)""",
                {"p": partner_id}).fetchone()
        return row[0]

    def database_health(self) -> dict[str, float]:
        """PostgreSQL's view, for /metrics: the oldest open transaction's age (a long one stalls
        every claim's SKIP LOCKED search and vacuum) and the dead rows of the hot table. Empty
        on SQLite, which has neither."""
        if not self.postgres:
            return {}
        with self._reader() as db:
            oldest = db.execute(
                """SELECT COALESCE(MAX(EXTRACT(EPOCH FROM now() - xact_start)), 0) FROM pg_stat_activity
                   WHERE datname = current_database() AND xact_start IS NOT NULL
                     AND pid <> pg_backend_pid()""").fetchone()[0]
            dead = db.execute("SELECT COALESCE(SUM(n_dead_tup), 0) FROM pg_stat_user_tables "
                              "WHERE relname = 'deliveries'").fetchone()[0]
        return {"oldest_transaction_seconds": float(oldest), "deliveries_dead_rows": float(dead)}

    def count_by_state(self) -> dict[str, int]:
        """How many deliveries are in each state (for the metrics gauges)."""
        with self._reader() as db:
            rows = db.execute("SELECT state, COUNT(*) AS n FROM deliveries GROUP BY state").fetchall()
        return {row["state"]: row["n"] for row in rows}

    def partner_delivery_counts(self) -> dict[str, dict[str, int]]:
        """For each partner: how many of its deliveries are in each state."""
        counts: dict[str, dict[str, int]] = {}
        with self._reader() as db:
            for row in db.execute("SELECT partner_id, state, COUNT(*) AS n FROM deliveries GROUP BY partner_id, state"):
                counts.setdefault(row["partner_id"], {})[row["state"]] = row["n"]
        return counts

    def outcomes_per_minute(self, since: float) -> list[tuple[int, str, int]]:
        """(minute, final state, count) for deliveries that ended since ``since``."""
        with self._reader() as db:
            rows = db.execute(
                f"""SELECT {"FLOOR(updated_at / 60)" if self.postgres else "CAST(updated_at / 60 AS INTEGER)"} * 60
                          AS minute, state, COUNT(*) AS n
                   FROM deliveries WHERE state IN ('delivered', 'failed') AND updated_at >= :since
                   GROUP BY minute, state ORDER BY minute""", {"since": since}).fetchall()
        return [(int(row["minute"]), row["state"], row["n"]) for row in rows]

    def oldest_pending(self, *, exclude: str) -> tuple[str, float] | None:
        """The partner and publish time of the oldest pending delivery of an active partner (but
        ``exclude``): what the backlog alert watches. A scan of the pending rows."""
        with self._reader() as db:
            row = db.execute("""SELECT d.partner_id, d.created_at FROM deliveries d JOIN partners p ON p.id = d.partner_id
                                WHERE d.state = 'pending' AND p.status = 'active' AND d.partner_id <> :exclude
                                ORDER BY d.created_at LIMIT 1""", {"exclude": exclude}).fetchone()
        return (row["partner_id"], row["created_at"]) if row else None

    def next_due_at(self, skip: list[str] | None = None, now: float | None = None) -> float | None:
        """When a claim may next take a delivery of an active partner not in ``skip``: the
        earliest pending due time, a FIFO partner's counting only its head and only once nothing
        of it is in flight. ``now`` (the clock by default) tells a lease in force from one that
        ran out. One statement, whatever the number of partners (``_PENDING_PARTNERS``)."""
        skipped = set(skip or ())
        with self._reader() as db:
            rows = self._partners_with_pending(db, time.time() if now is None else now)
        due = [_claimable_at(row) for row in rows if row["id"] not in skipped]
        return min(due) if due else None

    def purge_delivered(self, *, before: float, batch: int,
                        after: tuple[float, str] | None = None) -> tuple[int, tuple[float, str] | None]:
        """Look at the next ``batch`` events published before ``before`` (oldest first, from
        ``after``) and delete those whose every delivery ended — delivered or cancelled, or
        any state for a deleted partner — before ``before`` (deliveries age by when they ended,
        not by when their event was published), with their deliveries and attempts. Pending,
        failed and expired ones of a partner that exists are kept: they are work to do or to
        retry by hand.

        Returns how many events went, and where the next batch starts (None: no older event
        is left to look at). A batch looks at ``batch`` events, purgeable or not, so a year
        of kept failures is walked once per pass, not once per batch."""
        with self._transaction(durable=False) as db:
            rows = db.execute(
                """SELECT id, created_at, NOT EXISTS (
                          SELECT 1 FROM deliveries d WHERE d.event_id = e.id
                          AND (d.updated_at >= :before OR (d.state NOT IN ('delivered', 'cancelled') AND EXISTS (
                               SELECT 1 FROM partners p WHERE p.id = d.partner_id AND p.status <> 'deleted'))))
                          AS purgeable
                   FROM events e
                   WHERE created_at < :before AND (CAST(:after_at AS DOUBLE PRECISION) IS NULL OR (created_at, id) > (:after_at, :after_id))
                   ORDER BY created_at, id LIMIT :batch""",
                {"before": before, "batch": batch, "after_at": after[0] if after else None,
                 "after_id": after[1] if after else None}).fetchall()
            ids = [r["id"] for r in rows if r["purgeable"]]
            for event_id in ids:
                db.execute("""DELETE FROM attempts WHERE delivery_id IN
                              (SELECT id FROM deliveries WHERE event_id = :id)""", {"id": event_id})
                db.execute("DELETE FROM deliveries WHERE event_id = :id", {"id": event_id})
                db.execute("DELETE FROM events WHERE id = :id", {"id": event_id})
        more = len(rows) == batch
        return len(ids), (rows[-1]["created_at"], rows[-1]["id"]) if more else None

    def purge_inbound(self, *, before: float, batch: int) -> int:
        """Delete up to ``batch`` inbound events received before ``before``; returns how many."""
        with self._transaction(durable=False) as db:
            return db.execute(
                """DELETE FROM inbound_events WHERE id IN
                   (SELECT id FROM inbound_events WHERE received_at < :before ORDER BY received_at LIMIT :batch)""",
                {"before": before, "batch": batch}).rowcount

    def purge_deleted_partners(self, *, before: float) -> int:
        """Remove the tombstones of partners deleted before ``before`` once no delivery or inbound
        event refers to them any more (the purges above took their history). Returns how many."""
        with self._transaction(durable=False) as db:
            return db.execute(
                """DELETE FROM partners WHERE status = 'deleted' AND updated_at < :before
                   AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.partner_id = partners.id)
                   AND NOT EXISTS (SELECT 1 FROM inbound_events i WHERE i.partner_id = partners.id)""",
                {"before": before}).rowcount

    def purge_audit(self, *, before: float, batch: int) -> int:
        """Delete up to ``batch`` audit entries written before ``before``; returns how many."""
        with self._transaction(durable=False) as db:
            return db.execute(
                """DELETE FROM audit_log WHERE id IN
                   (SELECT id FROM audit_log WHERE at < :before ORDER BY id LIMIT :batch)""",
                {"before": before, "batch": batch}).rowcount

    # --- The audit trail ---------------------------------------------------------------

    def list_audit(self, *, limit: int, cursor: str | None = None, partner_id: str | None = None,
                   action: str | None = None) -> Page:
        """Audit entries newest first; each filter applies only when given."""
        where, params = _where(AUDIT_FILTERS, {"cursor": cursor, "partner_id": partner_id, "action": action})
        with self._reader() as db:
            rows = db.execute(f"SELECT * FROM audit_log {where} ORDER BY id DESC LIMIT :n",
                              {**params, "n": limit + 1}).fetchall()
        return _page([_audit_from_row(r) for r in rows], limit)

    # --- Reading and retrying deliveries ---------------------------------------------

    def get_delivery(self, delivery_id: str) -> Delivery | None:
        with self._reader() as db:
            row = db.execute(self._delivery_select + " WHERE d.id = :id", {"id": delivery_id}).fetchone()
            if row is None:
                return None
            attempts = tuple(_attempt_from_row(a) for a in db.execute(
                "SELECT * FROM attempts WHERE delivery_id = :id ORDER BY attempt", {"id": delivery_id}))
        return _delivery_from_row(row, attempts)

    def event_deliveries(self, event_id: str, *, limit: int) -> list[Delivery]:
        """An event's deliveries, oldest first, each with its attempts (an event's trace)."""
        with self._reader(snapshot=True) as db:
            rows = db.execute(self._delivery_select + " WHERE d.event_id = :id ORDER BY d.id LIMIT :n",
                              {"id": event_id, "n": limit}).fetchall()
            attempts: dict[str, list[Attempt]] = {}
            for a in db.execute("""SELECT a.* FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                                   WHERE d.event_id = :id ORDER BY a.delivery_id, a.attempt""", {"id": event_id}):
                attempts.setdefault(a["delivery_id"], []).append(_attempt_from_row(a))
        return [_delivery_from_row(r, tuple(attempts.get(r["id"], ()))) for r in rows]

    def audit_for(self, targets: list[str]) -> list[AuditEntry]:
        """The audit entries about these targets (deliveries), oldest first."""
        if not targets:
            return []
        with self._reader() as db:
            rows = db.execute(f"SELECT * FROM audit_log WHERE target IN ({_placeholders('t', targets)}) ORDER BY id",
                              _numbered("t", targets)).fetchall()
        return [_audit_from_row(r) for r in rows]

    def list_deliveries(
        self, *, limit: int, cursor: str | None = None, partner_id: str | None = None,
        state: str | None = None, event: str | None = None, event_id: str | None = None,
    ) -> Page:
        """Deliveries newest first; each filter applies only when given (``DELIVERY_FILTERS``)."""
        sql, params = self._deliveries_query(limit=limit, cursor=cursor, partner_id=partner_id, state=state,
                                             event=event, event_id=event_id)
        with self._reader() as db:
            rows = db.execute(sql, params).fetchall()
        return _page([_delivery_from_row(r) for r in rows], limit)

    def _deliveries_query(self, *, limit: int, **given: Any) -> tuple[str, dict[str, Any]]:
        """``list_deliveries``' statement for the filters ``given`` (None: not given), and its parameters."""
        where, params = _where(DELIVERY_FILTERS, given)
        return f"{self._delivery_select} {where} ORDER BY d.id DESC LIMIT :n", {**params, "n": limit + 1}

    def explain_deliveries(self, **given: Any) -> str:
        """The query plan of ``list_deliveries`` with these filters, for tests that check it uses an index."""
        sql, params = self._deliveries_query(limit=50, **given)
        if self.postgres:  # a test database is tiny: ask whether an index *can* serve, not whether it pays
            with self.engine.reader() as db:
                db.execute("SET enable_seqscan = off", {})
                try:
                    return "\n".join(row[0] for row in db.execute("EXPLAIN " + sql, params))
                finally:
                    db.execute("RESET enable_seqscan", {})
        return self.engine.explain(sql, params)

    def retry_delivery(self, delivery_id: str, now: float, audit: AuditEntry | None = None) -> Delivery | None:
        """Queue one more attempt of a ``failed`` or ``expired`` delivery and return it as queued (read
        in the same transaction, so before any process can send it); None if it is neither. Its age
        for ``max_pending_age_s`` starts again now."""
        with self._transaction() as db:
            retried = db.execute(
                """UPDATE deliveries
                   SET state = 'pending', max_attempts = attempt_count + 1, queued_at = :now,
                       next_attempt_at = :now, leased_until = NULL, updated_at = :now
                   WHERE id = :id AND state IN ('failed', 'expired')""",
                {"id": delivery_id, "now": now},
            ).rowcount > 0
            if not retried:
                return None
            _write_audit(db, audit)
            # An operator's retry probes at once, in every process.
            db.execute("""UPDATE partners SET paused_until = NULL
                          WHERE id = (SELECT partner_id FROM deliveries WHERE id = :id)""", {"id": delivery_id})
            return _delivery_from_row(db.execute(self._delivery_select + " WHERE d.id = :id", {"id": delivery_id}).fetchone())

    def recover_failed(self, partner_id: str, *, since: float, extra_attempts: int, now: float,
                       audit: AuditEntry | None = None) -> int:
        """Give every ``failed`` or ``expired`` delivery of the partner created at or after ``since``
        a fresh round of ``extra_attempts``. Returns how many were re-queued."""
        with self._transaction() as db:
            db.execute("UPDATE partners SET paused_until = NULL WHERE id = :id", {"id": partner_id})
            requeued = db.execute(
                """UPDATE deliveries
                   SET state = 'pending', max_attempts = attempt_count + :extra, queued_at = :now,
                       next_attempt_at = :now, leased_until = NULL, updated_at = :now
                   WHERE partner_id = :partner_id AND state IN ('failed', 'expired') AND created_at >= :since""",
                {"partner_id": partner_id, "since": since, "extra": extra_attempts, "now": now},
            ).rowcount
            _write_audit(db, audit, requeued=requeued)
            return requeued

    def replay(self, partner_id: str, *, since: float, until: float, event_type: str | None, after: str | None,
               limit: int, now: float, max_attempts: int, new_delivery_id: Callable[[], str],
               include_cancelled: bool = False, audit: AuditEntry | None = None) -> tuple[int, str | None]:
        """Queue a new delivery to the partner of every event it had a delivery of, published in
        ``[since, until)`` (of ``event_type``, if given), delivered ones included: the partner
        restored a backup and lost a day. In event id order from ``after``, at most ``limit``.
        The new deliveries carry the same event, so its id (``X-Webhook-Id``) is the same.

        Left out (``REPLAY_SKIPS``): an event with a delivery to the partner still pending (a second
        call queues nothing twice), and one whose latest delivery to it was cancelled (the admin
        cancelled that backlog) unless ``include_cancelled``.
        Returns how many were queued and the last event id queued if more are left (the cursor)."""
        where, params = _where(REPLAY_FILTERS, {"since": since, "until": until, "type": event_type, "after": after})
        skips = REPLAY_SKIPS if include_cancelled else REPLAY_SKIPS + REPLAY_SKIPS_CANCELLED
        with self._transaction() as db:
            if self.postgres:  # two replays of one partner at once take turns (SQLite's one writer does already)
                db.execute("SELECT id FROM partners WHERE id = :id FOR NO KEY UPDATE", {"id": partner_id})
            rows = db.execute(
                f"SELECT e.id, e.type FROM events e {where} {skips} ORDER BY e.id LIMIT :n",
                {**params, "partner_id": partner_id, "n": limit + 1}).fetchall()
            events = rows[:limit]
            if events:
                db.executemany(
                    """INSERT INTO deliveries (id, event_id, event_type, partner_id, state, max_attempts,
                                               next_attempt_at, queued_at, created_at, updated_at)
                       VALUES (:id, :event_id, :type, :partner_id, 'pending', :max_attempts, :now, :now, :now, :now)""",
                    [{"id": new_delivery_id(), "event_id": row["id"], "type": row["type"], "partner_id": partner_id,
                      "max_attempts": max_attempts, "now": now} for row in events])
            _write_audit(db, audit, replayed=len(events))
        if events and self.postgres:
            self.announce(WORK_CHANNEL)
        return len(events), events[-1]["id"] if len(rows) > limit else None

    def expire_pending(self, *, queued_before: float, now: float) -> dict[str, int]:
        """End ``expired`` every pending delivery queued before ``queued_before`` that is not in
        flight (a lease that ran out, its holder dead, is not in flight) — ``delivery.max_pending_age_s``:
        a long pause must not flood a partner with a week of stale events when it resumes.
        Returns how many per partner."""
        with self._transaction(durable=False) as db:
            rows = db.execute(
                """UPDATE deliveries SET state = 'expired', leased_until = NULL, updated_at = :now
                   WHERE state = 'pending' AND (leased_until IS NULL OR leased_until <= :now)
                     AND COALESCE(queued_at, created_at) < :before
                   RETURNING partner_id""", {"before": queued_before, "now": now}).fetchall()
        expired: dict[str, int] = {}
        for row in rows:
            expired[row["partner_id"]] = expired.get(row["partner_id"], 0) + 1
        return expired

    # --- Inbound partner events --------------------------------------------------------

    def add_inbound(
        self, *, inbound_id: str, partner_id: str, event_type: str, dedupe_key: str, body: bytes,
        now: float,
    ) -> tuple[InboundEvent, bool]:
        """Store an inbound event once per (partner, dedupe key). Returns ``(event, created)``."""

        def work(db: Any) -> tuple[InboundEvent, bool]:
            created = db.execute(
                """INSERT INTO inbound_events (id, partner_id, type, dedupe_key, body, received_at)
                   VALUES (:id, :partner_id, :type, :key, :body, :now)
                   ON CONFLICT (partner_id, dedupe_key) DO NOTHING""",
                {"id": inbound_id, "partner_id": partner_id, "type": event_type, "key": dedupe_key,
                 "body": body, "now": now},
            ).rowcount > 0
            row = db.execute(
                "SELECT * FROM inbound_events WHERE partner_id = :p AND dedupe_key = :k",
                {"p": partner_id, "k": dedupe_key},
            ).fetchone()
            return _inbound_from_row(row), created

        return self._in_group_commit(work)

    def list_inbound(self, *, limit: int, cursor: str | None = None, partner_id: str | None = None,
                     event: str | None = None) -> Page:
        where, params = _where(INBOUND_FILTERS, {"cursor": cursor, "partner_id": partner_id, "event": event})
        with self._reader() as db:
            rows = db.execute(f"SELECT * FROM inbound_events {where} ORDER BY id DESC LIMIT :n",
                              {**params, "n": limit + 1}).fetchall()
        return _page([_inbound_from_row(r) for r in rows], limit)


# --- Moving to another database (webhookd migrate-store) ---------------------------------------

# What is copied, table by table, in an order the foreign keys accept. ``:since`` bounds the
# history: pending and failed deliveries always go (they are work), delivered ones and inbound
# events only if recent; every event a copied delivery needs goes with it.
_COPY = [
    ("partners", "SELECT * FROM partners"),
    ("subscriptions", "SELECT * FROM subscriptions"),
    ("partner_channels", "SELECT * FROM partner_channels"),
    ("events", """SELECT * FROM events e WHERE e.created_at >= :since OR EXISTS (
                      SELECT 1 FROM deliveries d WHERE d.event_id = e.id
                      AND (d.state != 'delivered' OR d.updated_at >= :since))"""),
    ("deliveries", """SELECT * FROM deliveries d WHERE d.state != 'delivered' OR d.updated_at >= :since
                      OR EXISTS (SELECT 1 FROM events e WHERE e.id = d.event_id AND e.created_at >= :since)"""),
    ("attempts", """SELECT a.* FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                    WHERE d.state != 'delivered' OR d.updated_at >= :since
                    OR EXISTS (SELECT 1 FROM events e WHERE e.id = d.event_id AND e.created_at >= :since)"""),
    ("inbound_events", "SELECT * FROM inbound_events WHERE received_at >= :since"),
    ("audit_log", "SELECT * FROM audit_log"),
]


def copy_store(source: Store, target: Store, *, since: float, now: float, batch: int = 1000) -> dict[str, int]:
    """Copy partners (secrets, API key hashes, subscriptions), all pending and failed deliveries
    and the history since ``since`` from ``source`` into the empty ``target``, in one transaction
    on the target. Leases are dropped: what was in flight when the source stopped is due at once.
    Returns the rows copied per table. Refuses a target that already holds partners or events."""
    with target._reader() as db:
        if db.execute("SELECT (SELECT COUNT(*) FROM partners) + (SELECT COUNT(*) FROM events)").fetchone()[0]:
            raise ValueError(f"the target database {target.engine.describe()} is not empty: "
                             "migrate-store only fills a new database")
    copied = {}
    with source._reader(snapshot=True) as src, target._transaction() as dst:
        for table, select in _COPY:
            rows = src.execute(select, {"since": since})
            copied[table] = 0
            while chunk := rows.fetchmany(batch):
                columns = list(chunk[0].keys())
                values = [dict(zip(columns, row)) for row in chunk]
                if table == "deliveries":
                    for row in values:
                        if row["leased_until"] is not None:  # in flight when the source stopped
                            row["leased_until"], row["next_attempt_at"] = None, now
                dst.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                                f"VALUES ({', '.join(':' + c for c in columns)})", values)
                copied[table] += len(chunk)
    target.reload_partners()
    return copied


# --- Shared SQL and helpers -----------------------------------------------------------

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
_PENDING_PARTNERS = """
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
    WHERE p.status = 'active'
"""


def _claimable_at(partner: Any) -> float:
    """When a partner found by ``_PENDING_PARTNERS`` may be claimed from: its earliest due row;
    a FIFO partner, its head, and not before its latest lease in force ends."""
    if partner["ordering"] != "fifo":
        return partner["due_at"]
    return max(partner["head_due_at"], partner["leased_until"] or partner["head_due_at"])


# The claim's search on SQLite: one partner's due rows, oldest first, through deliveries_partner_due.
_DUE_FOR_PARTNER = """
    SELECT id FROM deliveries
    WHERE partner_id = :partner_id AND state = 'pending' AND next_attempt_at <= :now
    ORDER BY next_attempt_at LIMIT :limit
"""

# Before it, in the same transaction, _LOCK_PARTNERS locks the active partners nobody paused
# for this claim (another process's claim skips them until this one ends; NO KEY UPDATE, so
# publishes, whose deliveries point at these rows, are not held up). It must be a statement of
# its own: a statement reads the database as it was when it began, so a count of leases made in
# the statement that waited for the lock would miss the leases of the claim that held it.
# In id order, byte by byte (COLLATE "C", Python's order): SKIP LOCKED skips a row locked by
# another, but still waits for the newest version of a row another transaction just updated,
# and the recorder updates partners' health in sorted(id) order (_write_partner_health). Locks
# taken in one order by both never deadlock; in the table's order they did.
_LOCK_PARTNERS = """
    SELECT id, ordering FROM partners
    WHERE status = 'active' AND (paused_until IS NULL OR paused_until <= :now)
    ORDER BY id COLLATE "C"
    FOR NO KEY UPDATE SKIP LOCKED
"""

# The claim on PostgreSQL, then one statement. Step by step:
#   partner  the partners locked above;
#   room     each one's free room: the caller's room for it (its breaker, its pace, what this
#            process sends it), and at most the cap less the rows leased by every process
#            (the small deliveries_leased index holds only those); a FIFO partner's cap is one,
#            so it gets nothing while any of its rows is leased (a retry by hand of an older
#            delivery becomes its head while a newer one is on the wire);
#   due      up to that many of its oldest due rows, locked, skipping rows another claim holds;
#            a FIFO partner: its head alone (its oldest pending row by seq), if due, locked and
#            waited for (a result being recorded on it must not let the row behind it jump
#            ahead; no other claim can hold it, the partner row is ours);
#   chosen   `limit` of them, each partner's first before anyone's second (fair shares), the
#            partners shuffled anew at each claim (md5 of a counter) so nobody always goes first;
#   leased   the lease written into next_attempt_at (due again if its holder dies);
# and what a sender needs, read in the same statement.
_CLAIM = """
    WITH partner AS (
        SELECT * FROM unnest(CAST(:partners AS TEXT[]), CAST(:fifo AS BOOLEAN[])) AS partner (id, fifo)
    ), room AS (
        SELECT partner.id, partner.fifo,
               LEAST(COALESCE(mine.n, :per_partner), CASE WHEN partner.fifo THEN 1 ELSE :per_partner END - (
                   SELECT COUNT(*) FROM deliveries d
                   WHERE d.partner_id = partner.id AND d.leased_until IS NOT NULL
                     AND d.leased_until > :now)) AS n
        FROM partner LEFT JOIN unnest(CAST(:room_ids AS TEXT[]), CAST(:room_n AS INTEGER[])) AS mine (id, n)
                            ON mine.id = partner.id
    ), due_concurrent AS (
        SELECT d.id, d.partner_id, row_number() OVER (PARTITION BY d.partner_id ORDER BY d.next_attempt_at) AS turn
        FROM room CROSS JOIN LATERAL (
            SELECT id, partner_id, next_attempt_at FROM deliveries
            WHERE partner_id = room.id AND NOT room.fifo AND state = 'pending' AND next_attempt_at <= :now
            ORDER BY next_attempt_at LIMIT LEAST(GREATEST(room.n, 0), :limit)
            FOR UPDATE SKIP LOCKED) d
    ), due_fifo AS (
        SELECT head.id, head.partner_id, 1 AS turn
        FROM room CROSS JOIN LATERAL (
            SELECT id, partner_id, next_attempt_at FROM deliveries
            WHERE partner_id = room.id AND room.fifo AND room.n > 0 AND state = 'pending'
            ORDER BY seq LIMIT 1
            FOR UPDATE) head
        WHERE head.next_attempt_at <= :now
    ), due AS (
        SELECT * FROM due_concurrent UNION ALL SELECT * FROM due_fifo
    ), chosen AS (
        SELECT id FROM due ORDER BY turn, md5(partner_id || :round) LIMIT :limit
    ), leased AS (
        UPDATE deliveries SET leased_until = :lease, next_attempt_at = :lease
        FROM chosen WHERE deliveries.id = chosen.id
        RETURNING deliveries.id, deliveries.event_id, deliveries.partner_id, deliveries.attempt_count,
                  deliveries.max_attempts, deliveries.created_at
    )
    SELECT leased.id, leased.event_id, e.type, leased.partner_id, p.webhook_url, p.secret,
           p.previous_secret, p.previous_secret_until, p.failing_since, e.body,
           leased.attempt_count, leased.max_attempts, leased.created_at
    FROM leased JOIN events e ON e.id = leased.event_id JOIN partners p ON p.id = leased.partner_id
"""

# Recording a batch of results on PostgreSQL (finish_attempts), one array per column (the same
# statement text every time, whatever the batch's size): a result counts only while its row still
# expects that attempt number; the attempts of those rows are logged in the same statement, and
# RETURNING says which were recorded.
_RECORD_RESULTS = """
    WITH r AS (
        SELECT * FROM unnest(CAST(:id AS TEXT[]), CAST(:state AS TEXT[]), CAST(:attempt AS INTEGER[]),
                             CAST(:next AS DOUBLE PRECISION[]), CAST(:started AS DOUBLE PRECISION[]),
                             CAST(:ms AS INTEGER[]), CAST(:status AS INTEGER[]), CAST(:error AS TEXT[]),
                             CAST(:snippet AS TEXT[]), CAST(:url AS TEXT[]), CAST(:detail AS TEXT[]),
                             CAST(:signatures AS TEXT[]), CAST(:decision AS TEXT[]))
                      AS r (id, state, attempt, next, started, ms, status, error, snippet, url, detail, signatures,
                            decision)
    ), done AS (
        UPDATE deliveries SET state = r.state, attempt_count = r.attempt, next_attempt_at = r.next,
                              leased_until = NULL, updated_at = :now
        FROM r WHERE deliveries.id = r.id AND deliveries.attempt_count = r.attempt - 1
                                          AND deliveries.state = 'pending'
        RETURNING deliveries.id
    ), logged AS (
        INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, status_code, error,
                              response_snippet, url, error_detail, signatures, decision)
        SELECT r.id, r.attempt, r.started, r.ms, r.status, r.error, r.snippet, r.url, r.detail, r.signatures,
               r.decision
        FROM r JOIN done ON done.id = r.id
    )
    SELECT id FROM done
"""

# A delivery with its event's type and, for a FIFO partner's pending delivery, the head of the
# partner's queue (its ``held_behind`` when that is another delivery). ``{order}`` is the
# insertion order: rowid on SQLite, the seq column on PostgreSQL.
_DELIVERY_SELECT = """
    SELECT d.*, e.type AS event,
           CASE WHEN d.state = 'pending' AND p.ordering = 'fifo' THEN (
               SELECT h.id FROM deliveries h WHERE h.partner_id = d.partner_id AND h.state = 'pending'
               ORDER BY h.{order} LIMIT 1) END AS head
    FROM deliveries d JOIN events e ON e.id = d.event_id JOIN partners p ON p.id = d.partner_id
"""


# Who gets an event: the partners subscribed to its type; if it names partners, only those; if it
# has channels, only partners listening on one of them; a partner with a payload filter only if
# the event passed it (``:passed``, judged in Python by ``Partner.accepts``). Lists are JSON
# arrays on SQLite and arrays on PostgreSQL, so the text is the same whatever their length.
_SUBSCRIBERS = """
    SELECT s.partner_id FROM subscriptions s JOIN partners p ON p.id = s.partner_id
    WHERE s.event_type = :type
      AND (CAST(:recipients AS TEXT) IS NULL OR s.partner_id IN (SELECT value FROM json_each(:recipients)))
      AND (CAST(:channels AS TEXT) IS NULL OR EXISTS (
           SELECT 1 FROM partner_channels c
           WHERE c.partner_id = s.partner_id AND c.channel IN (SELECT value FROM json_each(:channels))))
      AND (p.payload_filter IS NULL OR s.partner_id IN (SELECT value FROM json_each(:passed)))
    ORDER BY s.partner_id
"""
_SUBSCRIBERS_POSTGRES = """
    SELECT s.partner_id FROM subscriptions s {filters}
    WHERE s.event_type = :type
      AND (CAST(:recipients AS TEXT[]) IS NULL OR s.partner_id = ANY(CAST(:recipients AS TEXT[])))
      AND (CAST(:channels AS TEXT[]) IS NULL OR EXISTS (
           SELECT 1 FROM partner_channels c
           WHERE c.partner_id = s.partner_id AND c.channel = ANY(CAST(:channels AS TEXT[]))))
"""
# With a payload filter somewhere, a filtered partner only if the event passed its filter.
_FILTERS_POSTGRES = ("JOIN partners p ON p.id = s.partner_id "
                     "AND (p.payload_filter IS NULL OR s.partner_id = ANY(CAST(:passed AS TEXT[])))")


def _audience(event: NewEvent, passed: list[str], as_json: bool) -> dict[str, Any]:
    """The parameters of ``_SUBSCRIBERS``: JSON text for SQLite, lists for PostgreSQL."""
    audience = event.audience or {}
    shape = (lambda v: None if v is None else json.dumps(v)) if as_json else (lambda v: v)
    return {"type": event.type, "recipients": shape(audience.get("partners")),
            "channels": shape(audience.get("channels")), "passed": shape(passed),
            "audience": json.dumps(audience, sort_keys=True) if audience else None}


def _insert_event(db: Any, event: NewEvent, now: float, max_attempts: int,
                  new_delivery_id: Callable[[], str], passed: list[str] | None) -> tuple[Event, bool]:
    """One event and its fan-out (see ``Store.publish``), inside the caller's transaction."""
    if event.idempotency_key is not None:
        row = db.execute("SELECT * FROM events WHERE idempotency_key = :k", {"k": event.idempotency_key}).fetchone()
        if row:
            return _event_from_row(row), False
    params = _audience(event, passed or [], as_json=True)
    if event.only_partner is not None:
        partner_ids = [event.only_partner]
    else:
        partner_ids = [r["partner_id"] for r in db.execute(_SUBSCRIBERS, params)]
    stored = db.execute(
        """INSERT INTO events (id, type, body, idempotency_key, request_hash, fanout, audience, created_at)
           VALUES (:id, :type, :body, :key, :hash, :fanout, :audience, :now) ON CONFLICT DO NOTHING""",
        {"id": event.id, "type": event.type, "body": event.body, "key": event.idempotency_key,
         "hash": event.request_hash, "fanout": len(partner_ids), "audience": params["audience"], "now": now},
    ).rowcount
    if not stored:  # another process stored the same key since the check above (PostgreSQL)
        row = db.execute("SELECT * FROM events WHERE idempotency_key = :k", {"k": event.idempotency_key}).fetchone()
        return _event_from_row(row), False
    db.executemany(
        """INSERT INTO deliveries (id, event_id, event_type, partner_id, state, max_attempts,
                                   next_attempt_at, created_at, updated_at)
           VALUES (:id, :event_id, :type, :partner_id, 'pending', :max_attempts, :now, :now, :now)""",
        [{"id": new_delivery_id(), "event_id": event.id, "type": event.type, "partner_id": pid,
          "max_attempts": max_attempts, "now": now} for pid in partner_ids],
    )
    row = db.execute("SELECT * FROM events WHERE id = :id", {"id": event.id}).fetchone()
    return _event_from_row(row), True


# A publish on PostgreSQL in one statement (one round trip): the event, with its fan-out counted,
# and one delivery per subscriber. A delivery id is the id made in Python for this event (its time
# part keeps ids sorted by creation) with its 12 random characters drawn in the statement, one per row.
# Nothing is returned if the idempotency key (or id) is taken: the caller then reads the first event.
_PUBLISH_POSTGRES = """
    WITH subscriber AS ({subscribers}),
    event AS (
        INSERT INTO events (id, type, body, idempotency_key, request_hash, fanout, audience, created_at)
        SELECT :id, :type, :body, :key, :hash, COUNT(*), :audience, :now FROM subscriber
        ON CONFLICT DO NOTHING
        RETURNING *
    ), fanout AS (
        INSERT INTO deliveries (id, event_id, event_type, partner_id, state, max_attempts, next_attempt_at,
                                created_at, updated_at)
        SELECT :id_prefix || substr(md5(random()::text || subscriber.partner_id), 1, 12), event.id, event.type,
               subscriber.partner_id, 'pending', :max_attempts, :now, :now, :now
        FROM event CROSS JOIN subscriber
    )
    SELECT * FROM event
"""


_PUBLISH_TO_SUBSCRIBERS = _PUBLISH_POSTGRES.format(subscribers=_SUBSCRIBERS_POSTGRES.format(filters=""))
_PUBLISH_TO_FILTERED = _PUBLISH_POSTGRES.format(subscribers=_SUBSCRIBERS_POSTGRES.format(filters=_FILTERS_POSTGRES))
_PUBLISH_TO_ONE = _PUBLISH_POSTGRES.format(subscribers="SELECT CAST(:only AS TEXT) AS partner_id")


def _insert_event_postgres(db: Any, event: NewEvent, now: float, max_attempts: int,
                           new_delivery_id: Callable[[], str], passed: list[str] | None) -> tuple[Event, bool]:
    """``_insert_event`` as one statement (``_PUBLISH_POSTGRES``)."""
    if event.only_partner is not None:
        sql, params = _PUBLISH_TO_ONE, {"type": event.type, "only": event.only_partner, "audience": None}
    else:  # nobody filters (the usual case): no need to read the partners
        sql = _PUBLISH_TO_SUBSCRIBERS if passed is None else _PUBLISH_TO_FILTERED
        params = _audience(event, passed or [], as_json=False)
    row = db.execute(sql, {
        **params, "id": event.id, "body": event.body, "key": event.idempotency_key,
        "hash": event.request_hash, "now": now, "max_attempts": max_attempts,
        "id_prefix": new_delivery_id()[:-12]}).fetchone()
    if row is not None:
        return _event_from_row(row), True
    row = db.execute("SELECT * FROM events WHERE idempotency_key = :k", {"k": event.idempotency_key}).fetchone()
    return _event_from_row(row), False


def _write_partner_health(db: Any, outcomes: list[Outcome], now: float) -> None:
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


def _record_one_by_one(db: Any, outcomes: list[Outcome], now: float) -> set[str]:
    """SQLite: two statements per result (no round trips, and SQLite plans these best)."""
    recorded = set()
    for o in outcomes:
        a = o.attempt
        if db.execute(
                """UPDATE deliveries SET state = :state, attempt_count = :attempt, next_attempt_at = :next,
                                         leased_until = NULL, updated_at = :now
                   WHERE id = :id AND attempt_count = :attempt - 1 AND state = 'pending'""",
                {"id": o.delivery_id, "state": o.state, "attempt": a.attempt, "next": o.next_attempt_at,
                 "now": now}).rowcount:
            recorded.add(o.delivery_id)
            db.execute(
                """INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, status_code, error,
                                         response_snippet, url, error_detail, signatures, decision)
                   VALUES (:id, :attempt, :started, :ms, :status, :error, :snippet, :url, :detail, :signatures,
                           :decision)""",
                {"id": o.delivery_id, "attempt": a.attempt, "started": a.started_at, "ms": a.duration_ms,
                 "status": a.status_code, "error": a.error, "snippet": a.response_snippet,
                 "url": redacted_url(a.url) if a.url else None,
                 "detail": a.error_detail, "signatures": _json_or_none(a.signatures),
                 "decision": _json_or_none(a.decision)})
    return recorded


def _record_at_once(db: Any, outcomes: list[Outcome], now: float) -> set[str]:
    """PostgreSQL: the batch as one array per column, one statement for a hundred results (each
    statement is a round trip to the server). ``db`` is a transaction, or the engine itself
    (then the statement is a transaction of its own)."""
    columns = {"id": [o.delivery_id for o in outcomes], "state": [o.state for o in outcomes],
               "attempt": [o.attempt.attempt for o in outcomes], "next": [o.next_attempt_at for o in outcomes],
               "started": [o.attempt.started_at for o in outcomes], "ms": [o.attempt.duration_ms for o in outcomes],
               "status": [o.attempt.status_code for o in outcomes], "error": [o.attempt.error for o in outcomes],
               "snippet": [o.attempt.response_snippet for o in outcomes],
               "url": [redacted_url(o.attempt.url) if o.attempt.url else None for o in outcomes],
               "detail": [o.attempt.error_detail for o in outcomes],
               "signatures": [_json_or_none(o.attempt.signatures) for o in outcomes],
               "decision": [_json_or_none(o.attempt.decision) for o in outcomes]}
    run = db.statement if hasattr(db, "statement") else (lambda sql, p: db.execute(sql, p).fetchall())
    return {row["id"] for row in run(_RECORD_RESULTS, {"now": now, **columns})}


def _read_jobs(db: Any, ids: list[str], now: float) -> list[Job]:
    """The claimed deliveries with everything a sender needs, read in the claim's transaction."""
    if not ids:
        return []
    rows = db.execute(
        f"""SELECT d.id, d.event_id, e.type, d.partner_id, p.webhook_url, p.secret,
                   p.previous_secret, p.previous_secret_until, p.failing_since, e.body,
                   d.attempt_count, d.max_attempts, d.created_at
            FROM deliveries d JOIN events e ON e.id = d.event_id
                              JOIN partners p ON p.id = d.partner_id
            WHERE d.id IN ({_placeholders("id", ids)})""",
        _numbered("id", ids),
    ).fetchall()
    return [_job_from_row(row, now) for row in rows]


# The filters of GET /deliveries (and its cursor), each the condition it adds when it is given. Each
# is searched through an index: the partner, the state and the type through one ending in the id
# (deliveries_by_partner, _by_state, _by_type), so a page is read newest first and stops at its
# limit, however many rows there are. An event has only a handful of deliveries (one per partner,
# and replays): their ids come first from deliveries_by_event and the other filters look them up.
# (Written `d.event_id = :event_id`, SQLite, which keeps no statistics, would rather walk a
# partner's whole history in id order to find them.) A new filter needs an index too: the test of
# every filter's query plan (tests/test_store.py) reads them from the OpenAPI document.
DELIVERY_FILTERS = {
    "cursor": "d.id < :cursor",
    "partner_id": "d.partner_id = :partner_id",
    "state": "d.state = :state",
    "event": "d.event_type = :event",
    "event_id": "d.id IN (SELECT id FROM deliveries WHERE event_id = :event_id)",
}

# GET /audit's and GET /inbound's, built the same way (smaller tables: the partner's index only).
AUDIT_FILTERS = {"cursor": "id < :cursor", "partner_id": "partner_id = :partner_id", "action": "action = :action"}
INBOUND_FILTERS = {"cursor": "id < :cursor", "partner_id": "partner_id = :partner_id", "event": "type = :event"}

# A replay's window and filters, and the events it leaves out: those the partner never had a delivery
# of, those it has one pending of, and (unless asked) those whose latest delivery to it was cancelled.
REPLAY_FILTERS = {"since": "e.created_at >= :since", "until": "e.created_at < :until", "type": "e.type = :type",
                  "after": "e.id > :after"}
REPLAY_SKIPS = """
    AND EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.partner_id = :partner_id)
    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.partner_id = :partner_id
                                                AND d.state = 'pending')"""
REPLAY_SKIPS_CANCELLED = """
    AND (SELECT d.state FROM deliveries d WHERE d.event_id = e.id AND d.partner_id = :partner_id
         ORDER BY d.id DESC LIMIT 1) <> 'cancelled'"""


def _where(conditions: Mapping[str, str], given: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A ``WHERE`` of the ``conditions`` whose value is ``given`` (not None), and their parameters.

    Only the filters given are written: the one-statement-for-all form, ``(:x IS NULL OR col = :x)``,
    gives SQLite one plan for every combination, and that plan can use no index (a walk of the whole
    table at every page)."""
    params = {name: value for name, value in given.items() if value is not None}
    clause = " AND ".join(conditions[name] for name in params)
    return (f"WHERE {clause}" if clause else ""), params


def _placeholders(name: str, values: list[Any]) -> str:
    """``:name0, :name1, …`` for an ``IN (…)`` of ``values`` (one statement, not one per value)."""
    return ", ".join(f":{name}{n}" for n in range(len(values)))


def _numbered(name: str, values: list[Any]) -> dict[str, Any]:
    return {f"{name}{n}": value for n, value in enumerate(values)}


def _job_from_row(row: Any, now: float) -> Job:
    secrets = valid_secrets(row["secret"], row["previous_secret"], row["previous_secret_until"], now)
    return Job(
        delivery_id=row["id"], event_id=row["event_id"], event=row["type"],
        partner_id=row["partner_id"], url=row["webhook_url"], secrets=tuple(secrets),
        body=bytes(row["body"]), attempt=row["attempt_count"] + 1, max_attempts=row["max_attempts"],
        partner_failing_since=row["failing_since"], created_at=row["created_at"],
    )


def _read_partner(db: Any, partner_id: str) -> Partner | None:
    row = db.execute("SELECT * FROM partners WHERE id = :id AND status <> 'deleted'", {"id": partner_id}).fetchone()
    if row is None:
        return None
    events = tuple(r["event_type"] for r in db.execute(
        "SELECT event_type FROM subscriptions WHERE partner_id = :id ORDER BY event_type",
        {"id": partner_id}))
    channels = tuple(r["channel"] for r in db.execute(
        "SELECT channel FROM partner_channels WHERE partner_id = :id ORDER BY channel", {"id": partner_id}))
    return _partner_from_row(row, events, channels)


def _cancel(db: Any, partner_id: str, states: tuple[str, ...], now: float) -> int:
    """End the partner's deliveries in ``states`` as ``cancelled``; how many."""
    return db.execute(
        f"""UPDATE deliveries SET state = 'cancelled', leased_until = NULL, updated_at = :now
            WHERE partner_id = :id AND state IN ({_placeholders('state', list(states))})""",
        {"id": partner_id, "now": now, **_numbered("state", list(states))}).rowcount


def _write_audit(db: Any, entry: AuditEntry | None, **found: Any) -> None:
    """Record ``entry`` in the transaction of the change it describes, with what the store
    ``found`` (counts) added to its changes; a URL in them without its query (``redacted_url``)."""
    if entry is None:
        return
    changes = _urls_rewritten({**entry.changes, **found}, redacted_url)
    db.execute(
        """INSERT INTO audit_log (id, at, actor, address, action, partner_id, target, changes)
           VALUES (:id, :at, :actor, :address, :action, :partner_id, :target, :changes)""",
        {"id": entry.id, "at": entry.at, "actor": entry.actor, "address": entry.address, "action": entry.action,
         "partner_id": entry.partner_id, "target": entry.target,
         "changes": json.dumps(changes, sort_keys=True)})


def _urls_rewritten(value: Any, rewrite: Callable[[str], str]) -> Any:
    """``value`` (decoded JSON) with every http(s) URL in it passed through ``rewrite``."""
    if isinstance(value, str):
        return rewrite(value) if value[:8].lower().startswith(("http://", "https://")) else value
    if isinstance(value, dict):
        return {key: _urls_rewritten(v, rewrite) for key, v in value.items()}
    if isinstance(value, list):
        return [_urls_rewritten(v, rewrite) for v in value]
    return value


def _rewrite_audit_urls(db: Any, select: str, params: dict[str, Any], rewrite: Callable[[str], str]) -> None:
    """Pass every URL in the changes of the audit entries ``select`` finds (id, changes) through ``rewrite``."""
    for row in db.execute(select, params).fetchall():
        changes = json.dumps(_urls_rewritten(json.loads(row["changes"]), rewrite), sort_keys=True)
        if changes != row["changes"]:
            db.execute("UPDATE audit_log SET changes = :changes WHERE id = :id", {"id": row["id"], "changes": changes})


def _forget_partner_urls(db: Any, partner_id: str) -> None:
    """A deleted partner's URLs, cut down to their origin (``https://x/…``) wherever a record kept
    them — its attempts and its audit entries: besides the query, a path may hold a token too."""
    kept = db.execute("""SELECT DISTINCT a.url FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                         WHERE d.partner_id = :id AND a.url IS NOT NULL""", {"id": partner_id}).fetchall()
    for row in kept:
        db.execute("""UPDATE attempts SET url = :origin
                      WHERE url = :url AND delivery_id IN (SELECT id FROM deliveries WHERE partner_id = :id)""",
                   {"id": partner_id, "url": row["url"], "origin": url_origin(row["url"])})
    _rewrite_audit_urls(db, "SELECT id, changes FROM audit_log WHERE partner_id = :id", {"id": partner_id},
                        url_origin)


def _audit_from_row(row: Any) -> AuditEntry:
    return AuditEntry(id=row["id"], at=row["at"], actor=row["actor"], action=row["action"],
                      partner_id=row["partner_id"], changes=json.loads(row["changes"]), address=row["address"],
                      target=row["target"])


def _write_subscriptions(db: Any, partner_id: str, events: list[str]) -> None:
    db.execute("DELETE FROM subscriptions WHERE partner_id = :id", {"id": partner_id})
    db.executemany(
        "INSERT INTO subscriptions (partner_id, event_type) VALUES (:id, :type)",
        [{"id": partner_id, "type": t} for t in sorted(set(events))],
    )


def _write_channels(db: Any, partner_id: str, channels: list[str]) -> None:
    db.execute("DELETE FROM partner_channels WHERE partner_id = :id", {"id": partner_id})
    db.executemany("INSERT INTO partner_channels (partner_id, channel) VALUES (:id, :channel)",
                   [{"id": partner_id, "channel": c} for c in sorted(set(channels))])


def _filter_json(payload_filter: dict[str, list[Any]] | None) -> str | None:
    return json.dumps(payload_filter, sort_keys=True) if payload_filter else None


def _json_or_none(value: Any) -> str | None:
    return json.dumps(value) if value is not None else None


def _page(items: list[Any], limit: int) -> Page:
    """Cut one extra row off a LIMIT n+1 query; its presence means there is a next page."""
    if len(items) > limit:
        items = items[:limit]
        return Page(items=items, next_cursor=items[-1].id)
    return Page(items=items, next_cursor=None)

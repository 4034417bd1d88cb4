"""The store on SQLite: one file, one process, the default.

Read top to bottom, this file is everything SQLite does for webhookd:

1. **Connections.** One connection writes, behind ``WriterLock`` (publishes first), each
   transaction ``BEGIN IMMEDIATE``; readers get connections of their own (WAL lets them read
   while it writes). ``synchronous=FULL`` for every write we answer a 202 or a 200 for,
   ``NORMAL`` for the delivery loop's bookkeeping, whose loss is a harmless resend. A full disk
   is ``StorageUnavailable``, a file locked by another process past ``SQLITE_BUSY_S``
   ``DatabaseBusy``.
2. **The schema and its migrations**: the tables as the oldest supported database had them,
   then each named change since, in order (``store.Store._apply_schema`` applies them).
3. **One event's path**, in the order it meets it: the publish (``_insert_event``: who
   subscribes, then the event and its deliveries, in the group commit's transaction), the
   claim (``claim_due``: partners in turn, each its oldest due rows), and the results
   (``finish_attempts``: two statements per result, in one transaction).

Where PostgreSQL does it differently, ``store_postgres.py`` says how and why, method by method.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import store_schema as common
from models import Event, Job, NewEvent, Outcome
from store import (
    PENDING_PARTNERS,
    DatabaseBusy,
    StorageUnavailable,
    Store,
    audience_params,
    claimable_at,
    seconds_left,
    write_partner_health,
)
from store_history import DELIVERY_SELECT
from store_rows import event_from_row, job_from_row, json_or_none, numbered, placeholders
from targets import redacted_url

logger = logging.getLogger("webhookd.store")

BOOKKEEPING_PATIENCE_S = 0.05  # how long a claim or a result waits for the publishes queued before it
SQLITE_BUSY_S = 10.0           # SQLite: how long a write waits for another process's lock on the file

# --- Connections ----------------------------------------------------------------------------

# SQLite's result codes for "cannot write": full disk, I/O error, read-only file (sqlite3 error names).
_STORAGE_ERRORS = {"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN"}


def storage_fault(exc: BaseException) -> bool:
    """Whether a SQLite error means the storage itself refuses writes (not a bug, not bad input)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return isinstance(exc, sqlite3.Error) and any(name.startswith(code) for code in _STORAGE_ERRORS)



class WriterLock:
    """SQLite's one writer's lock, publishes first.

    A commit someone is waiting on — a publish, an inbound event, a partner change — goes
    before the delivery loop's bookkeeping (claims, attempt results, releases), which holds
    the writer most of the time while thousands of attempts a second finish. Bookkeeping
    waits for the urgent writes queued before it for at most ``BOOKKEEPING_PATIENCE_S``,
    so a stream of publishes slows deliveries down but never stops them. Measured in
    ``make bench`` (d): ``POST /events`` took 50 ms at the median without it, 12 ms with it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held = False
        self._urgent_waiting = 0

    @contextmanager
    def held(self, urgent: bool) -> Iterator[None]:
        with self._cond:
            if urgent:
                self._urgent_waiting += 1
                try:
                    self._wait_until_free()
                finally:
                    self._urgent_waiting -= 1
            else:
                give_way_until = time.monotonic() + BOOKKEEPING_PATIENCE_S
                while self._held or (self._urgent_waiting and time.monotonic() < give_way_until):
                    self._cond.wait(None if self._held else max(0.0, give_way_until - time.monotonic()))
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    def _wait_until_free(self) -> None:
        """Wait (under the condition) until nobody holds the writer, or until the call's deadline
        (``answer_by``: a route's write), then ``DatabaseBusy``."""
        while self._held:
            left = seconds_left(math.inf)
            if left <= 0:
                raise DatabaseBusy("the database file's one writer stayed busy past the deadline")
            self._cond.wait(None if left == math.inf else left)


def connect_sqlite(path: str) -> sqlite3.Connection:
    """Open the database the one way webhookd does.

    ``synchronous=FULL`` with WAL makes every commit reach the disk before it
    returns, so a 202 or a 200 we answer after a commit survives a power cut.
    """
    conn = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA busy_timeout = {round(SQLITE_BUSY_S * 1000)}")
    return conn


def _create_private_file(path: str) -> None:
    """Create the database file (and its folder) readable by its owner only: it holds secrets."""
    folder = Path(path).resolve().parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)


class SQLiteEngine:
    """One connection writes, behind ``WriterLock``, each transaction ``BEGIN IMMEDIATE``;
    readers get connections of their own from a small pool (WAL lets them read while it writes)."""

    def __init__(self, path: str):
        self.path = path
        _create_private_file(path)
        self._writer = connect_sqlite(path)
        self._sync_mode = "FULL"
        self._busy_ms = round(SQLITE_BUSY_S * 1000)  # the writer's busy_timeout now (connect_sqlite's)
        self._write_lock = WriterLock()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all_readers: list[sqlite3.Connection] = []
        self.write_fault: str | None = None  # why a write failed for lack of storage, until a durable one succeeds

    def describe(self) -> str:
        return self.path

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        with self._write_lock.held(urgent=durable):
            mode = "FULL" if durable else "NORMAL"
            if mode != self._sync_mode:
                self._writer.execute(f"PRAGMA synchronous = {mode}")
                self._sync_mode = mode
            try:
                self._begin_immediate()
                yield self._writer
                self._writer.execute("COMMIT")
            except BaseException as exc:
                # A failed COMMIT (a full disk) may leave the transaction open: close it, or every
                # later BEGIN would fail. A rollback that fails too must not hide the first error.
                if self._writer.in_transaction:
                    try:
                        self._writer.execute("ROLLBACK")
                    except sqlite3.Error:
                        logger.exception("rolling back after a failed write failed too")
                if storage_fault(exc):
                    self.write_fault = f"{exc.sqlite_errorname}: {exc}"
                    raise StorageUnavailable(f"the database file {self.path} cannot be written ({exc})") from exc
                if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY"):
                    raise DatabaseBusy(f"the database file {self.path} is locked by another process ({exc})") from exc
                raise
            if durable:  # bookkeeping updates rows in place; only a durable write (new rows) proves room
                self.write_fault = None

    def _begin_immediate(self) -> None:
        """``BEGIN IMMEDIATE``: the file's write lock, waited for (another process may hold it) at
        most ``SQLITE_BUSY_S``, or until the call's deadline (a route's write).

        The wait is the connection's ``busy_timeout``, set only when it must change: a deadline's
        is rounded down to a tenth of a second, so a stream of routes' writes (each with about
        ``web.DB_DEADLINE_S`` left) shares one setting instead of paying two statements each, each
        a hand-off of the GIL. Only ``BEGIN IMMEDIATE`` ever waits on the writer's connection (WAL:
        its commits wait for nobody), so the setting left behind matters to no other statement."""
        wait = seconds_left(SQLITE_BUSY_S)
        busy_ms = round(SQLITE_BUSY_S * 1000) if wait >= SQLITE_BUSY_S else max(1, int(wait * 10) * 100)
        if busy_ms != self._busy_ms:
            self._writer.execute(f"PRAGMA busy_timeout = {busy_ms}")
            self._busy_ms = busy_ms
        self._writer.execute("BEGIN IMMEDIATE")

    @contextmanager
    def reader(self, snapshot: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = connect_sqlite(self.path)
            self._all_readers.append(conn)
        try:
            if not snapshot:
                yield conn
                return
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")
        finally:
            self._readers.put(conn)

    def explain(self, sql: str, params: dict[str, Any]) -> str:
        with self.reader() as db:
            return "\n".join(row["detail"] for row in db.execute("EXPLAIN QUERY PLAN " + sql, params))

    def statement(self, sql: str, params: Any) -> list[Any]:
        with self.transaction(durable=False) as db:
            return db.execute(sql, params).fetchall()

    def notify(self, channel: str, payload: str = "") -> None:
        """One process owns a SQLite file: there is nobody else to tell."""

    def listen(self, on_notify: Callable[[str, str], None], channels: list[str]) -> Callable[[], None]:
        return lambda: None

    def close(self) -> None:
        with self._write_lock.held(urgent=True):
            self._writer.close()
        for conn in self._all_readers:
            conn.close()


# --- The schema and its migrations --------------------------------------------------------------

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

# Named schema changes, applied once each in order and recorded in schema_migrations.
MIGRATIONS: list[common.Migration] = [
    ("attempts.url", ["ALTER TABLE attempts ADD COLUMN url TEXT"]),  # where the attempt went
    ("partners.max_rate_per_s", ["ALTER TABLE partners ADD COLUMN max_rate_per_s REAL"]),  # a partner's pace
    ("events_by_age.id", ["DROP INDEX IF EXISTS events_by_age",                 # retention walks it in order
                          "CREATE INDEX events_by_age ON events (created_at, id)"]),
    ("partners.paused_until", ["ALTER TABLE partners ADD COLUMN paused_until REAL"]),  # a shared circuit pause
    ("roles", [common.ROLES_TABLE]),   # which process runs the sweeps
    ("processes", [common.PROCESSES_TABLE]),  # heartbeats
    ("attempts.error_detail", ["ALTER TABLE attempts ADD COLUMN error_detail TEXT"]),  # what happened, in words
    ("partners.suspended_reason", ["ALTER TABLE partners ADD COLUMN suspended_reason TEXT"]),  # the admin's why
    ("audit_log", [common.AUDIT_TABLE, common.AUDIT_INDEX]),
    # When a pending delivery was queued (published, or retried by hand; null: created_at): its age
    # for delivery.max_pending_age_s.
    ("deliveries.queued_at", ["ALTER TABLE deliveries ADD COLUMN queued_at REAL"]),
    ("partners.contact_email", ["ALTER TABLE partners ADD COLUMN contact_email TEXT"]),
    ("partner_channels", [common.CHANNELS_TABLE]),
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
                               common.DELIVERIES_EVENT_TYPE_BACKFILL, *common.DELIVERIES_READ_INDEXES]),
    # Attempts and audit entries keep a URL without its query (it may hold a partner's token).
    ("urls_redacted", [common.redact_stored_urls]),
    ("trace_context", common.TRACE_CONTEXT_COLUMNS),  # traceparent and tracestate, passed on
    ("partners.terms", common.TERMS_COLUMNS),  # a partner's own retry policy and extra headers
    # An event's content erased on request or by its type's retention (erasure.py).
    ("events.erased_at", common.EVENTS_ERASED),
    ("server_keys", [common.SERVER_KEYS_TABLE]),  # the portal links' signing key (portal_links.py)
    # Proof the endpoint is the partner's (verification.py): its state, challenge and requests.
    ("partners.verification", list(common.VERIFICATION_COLUMNS)),
    ("partners.client_cert", common.CLIENT_CERT_COLUMNS),  # its TLS client certificate and key (egress.py)
]


# --- One event's path: publish, claim, finish ---------------------------------------------------

# Who gets an event: the partners subscribed to its type; if it names partners, only those; if it
# has channels, only partners listening on one of them; a partner with a payload filter only if
# the event passed it (``:passed``, judged in Python by ``Partner.accepts``). Lists are JSON
# arrays on SQLite and arrays on PostgreSQL, so the text is the same whatever their length.
_SUBSCRIBERS = """
    SELECT s.partner_id, p.max_attempts FROM subscriptions s JOIN partners p ON p.id = s.partner_id
    WHERE s.event_type = :type
      AND (CAST(:recipients AS TEXT) IS NULL OR s.partner_id IN (SELECT value FROM json_each(:recipients)))
      AND (CAST(:channels AS TEXT) IS NULL OR EXISTS (
           SELECT 1 FROM partner_channels c
           WHERE c.partner_id = s.partner_id AND c.channel IN (SELECT value FROM json_each(:channels))))
      AND (p.payload_filter IS NULL OR s.partner_id IN (SELECT value FROM json_each(:passed)))
    ORDER BY s.partner_id
"""


def _as_json(params: dict[str, Any]) -> dict[str, Any]:
    """``_SUBSCRIBERS``' lists as JSON text: SQLite reads an array with ``json_each``, so the
    statement's text is the same whatever their length."""
    return {**params, **{k: None if params[k] is None else json.dumps(params[k]) for k in ("recipients", "channels",
                                                                                          "passed")}}


# The claim's search on SQLite: one partner's due rows, oldest first, through deliveries_partner_due.
_DUE_FOR_PARTNER = """
    SELECT id FROM deliveries
    WHERE partner_id = :partner_id AND state = 'pending' AND next_attempt_at <= :now
    ORDER BY next_attempt_at LIMIT :limit
"""


def _read_jobs(db: Any, ids: list[str]) -> list[Job]:
    """The claimed deliveries as jobs, read in the claim's transaction (see ``job_from_row``)."""
    if not ids:
        return []
    rows = db.execute(
        f"""SELECT d.id, d.event_id, e.type, d.partner_id, p.failing_since, e.body,
                   d.attempt_count, d.max_attempts, d.created_at, e.traceparent, e.tracestate
            FROM deliveries d JOIN events e ON e.id = d.event_id
                              JOIN partners p ON p.id = d.partner_id
            WHERE d.id IN ({placeholders("id", ids)})""",
        numbered("id", ids),
    ).fetchall()
    return [job_from_row(row) for row in rows]


def _record_one_by_one(db: Any, outcomes: list[Outcome], now: float) -> set[str]:
    """SQLite: an update per result (its row count says whether the row still expected it: no
    round trips, and SQLite plans these best), then the attempts of those it took in one
    ``executemany``."""
    recorded = set()
    attempts = []
    for o in outcomes:
        a = o.attempt
        if db.execute(
                """UPDATE deliveries SET state = :state, attempt_count = :attempt, next_attempt_at = :next,
                                         leased_until = NULL, updated_at = :now
                   WHERE id = :id AND attempt_count = :attempt - 1 AND state = 'pending'""",
                {"id": o.delivery_id, "state": o.state, "attempt": a.attempt, "next": o.next_attempt_at,
                 "now": now}).rowcount:
            recorded.add(o.delivery_id)
            attempts.append((o.delivery_id, a.attempt, a.started_at, a.duration_ms, a.status_code, a.error,
                             a.response_snippet, redacted_url(a.url) if a.url else None, a.error_detail,
                             json_or_none(a.signatures), json_or_none(o.decision)))
    db.executemany(
        """INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, status_code, error,
                                 response_snippet, url, error_detail, signatures, decision)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""", attempts)
    return recorded


class SQLiteStore(Store):
    """The store on one SQLite file (see the module docstring)."""

    shared = False  # one process owns the file
    SCHEMA = SCHEMA
    MIGRATIONS = MIGRATIONS
    # Publish order is insertion order: the rowid.
    _delivery_select = DELIVERY_SELECT.format(order="rowid")
    # Without statistics SQLite's planner would take deliveries_due and sort every pending row at
    # each step of the walk: it is told which index to take.
    _pending_partners = PENDING_PARTNERS.format(order="rowid", indexed="INDEXED BY deliveries_pending_order")
    _UPDATED_MINUTE = "CAST(updated_at / 60 AS INTEGER)"
    _UPDATED_HOUR = "CAST(updated_at / 3600 AS INTEGER)"

    def _open_engine(self, target: str, *, lock_timeout_s: float, statement_timeout_s: float) -> SQLiteEngine:
        """The file at ``target``; the time bounds are PostgreSQL's (one writer has no row locks to wait for)."""
        return SQLiteEngine(target)

    # --- Publish --------------------------------------------------------------------------

    def _insert_event(self, db: Any, event: NewEvent, now: float, max_attempts: int,
                      new_delivery_id: Callable[[], str], passed: list[str] | None) -> tuple[Event, bool]:
        """One event and its fan-out (see ``Store.publish``), inside the caller's transaction:
        the idempotency key looked up, the subscribers read (``_SUBSCRIBERS``), then the event and
        one delivery each."""
        if event.idempotency_key is not None:
            row = db.execute("SELECT * FROM events WHERE idempotency_key = :k", {"k": event.idempotency_key}).fetchone()
            if row:
                return event_from_row(row), False
        params = _as_json(audience_params(event, passed or []))
        # Each subscriber with its own number of attempts, if it has one (partner_terms.py).
        if event.only_partner is not None:
            own = db.execute("SELECT max_attempts FROM partners WHERE id = :id", {"id": event.only_partner}).fetchone()
            subscribers = [(event.only_partner, own[0] if own else None)]
        else:
            subscribers = [(r["partner_id"], r["max_attempts"]) for r in db.execute(_SUBSCRIBERS, params)]
        # The key's check above and this insert are one transaction of the file's one writer (even
        # across processes: BEGIN IMMEDIATE), so no other publish can store the same key between them.
        db.execute(
            """INSERT INTO events (id, type, body, idempotency_key, request_hash, fanout, audience, created_at,
                                   traceparent, tracestate)
               VALUES (:id, :type, :body, :key, :hash, :fanout, :audience, :now, :traceparent, :tracestate)""",
            {"id": event.id, "type": event.type, "body": event.body, "key": event.idempotency_key,
             "hash": event.request_hash, "fanout": len(subscribers), "audience": params["audience"], "now": now,
             "traceparent": event.traceparent, "tracestate": event.tracestate},
        )
        db.executemany(
            """INSERT INTO deliveries (id, event_id, event_type, partner_id, state, max_attempts,
                                       next_attempt_at, created_at, updated_at)
               VALUES (:id, :event_id, :type, :partner_id, 'pending', :max_attempts, :now, :now, :now)""",
            [{"id": new_delivery_id(), "event_id": event.id, "type": event.type, "partner_id": pid,
              "max_attempts": own or max_attempts, "now": now} for pid, own in subscribers],
        )
        # The event as stored, without reading it back: every column is one written just above.
        return Event(id=event.id, type=event.type, body=event.body, fanout=len(subscribers), created_at=now,
                     idempotency_key=event.idempotency_key, request_hash=event.request_hash,
                     audience=event.audience or None, traceparent=event.traceparent, tracestate=event.tracestate), True

    # --- Claim ----------------------------------------------------------------------------

    def claim_due(self, *, now: float, lease_s: float, limit: int, per_partner: int,
                  room: Mapping[str, int] | None = None) -> list[Job]:
        """See ``Store.claim_due``. One process claims, so a Python loop can share out fairly:
        partners are visited in turn, starting one further along at each call; a first pass gives
        each an equal share, a second fills what is left up to the cap."""
        room = dict(room or {})
        lease_until = now + lease_s
        self._claim_round += 1
        if limit <= 0:
            return []
        with self._transaction(durable=False) as db:
            # Only the partners with something due are visited: idle ones cost nothing.
            heads = {row["id"]: row["head_id"] for row in self._partners_with_pending(db, now)
                     if claimable_at(row) <= now}  # partner -> its FIFO head (None: not FIFO)
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
                                   f"WHERE id IN ({placeholders('id', batch)})",
                                   {"lease": lease_until, **numbered("id", batch)})
                    taken[partner_id] += len(batch)
                    ids += batch
            return _read_jobs(db, ids)

    # --- Finish ---------------------------------------------------------------------------

    def finish_attempts(self, outcomes: list[Outcome], now: float) -> list[str]:
        """See ``Store.finish_attempts``: two statements per result (no round trips, and SQLite plans
        these best), and the partners' health, in one transaction."""
        health = any(o.partner_failing_changed or o.disable_reason or o.paused_until for o in outcomes)
        with self._transaction(durable=False) as db:
            recorded = _record_one_by_one(db, outcomes, now)
            write_partner_health(db, [o for o in outcomes if o.delivery_id in recorded], now)
        lost = [o.delivery_id for o in outcomes if o.delivery_id not in recorded]
        if health:
            self._reload_partners_after_write()
        return lost

    # --- The rest of the contract ---------------------------------------------------------

    def _forget_old_versions(self) -> None:
        """After an erasure, leave no earlier version of the rows in the files: SQLite keeps them in
        its write-ahead log, and the database file its last checkpoint's pages, until a checkpoint
        copies the new pages over them; this one also empties the log."""
        try:
            with self._reader() as db:
                busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except Exception as exc:  # the erasure is committed: a failed checkpoint must not fail it
            busy = exc
        if busy:
            logger.warning("the write-ahead log could not be emptied after an erasure (%s); "
                           "the next checkpoint copies the new rows over the old ones", busy)

    def database_health(self) -> dict[str, float]:
        """Nothing: no other transaction can stall this one's writer, and no dead rows wait for a vacuum."""
        return {}

    def explain_claim(self) -> str:
        """The walk over the partners with pending rows, then one partner's due rows."""
        return "\n".join([self.engine.explain(self._pending_partners, {"now": 0.0}),
                          self.engine.explain(_DUE_FOR_PARTNER, {"partner_id": "", "now": 0.0, "limit": 1})])

    def explain_deliveries(self, **given: Any) -> str:
        sql, params = self._deliveries_query(limit=50, **given)
        return self.engine.explain(sql, params)

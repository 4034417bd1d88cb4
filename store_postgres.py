"""The store on PostgreSQL: one database that several webhookd processes share.

This file follows ``store_sqlite.py`` section by section, and says at each method how and why
PostgreSQL does it differently. What makes it differ, in three facts:

* **Several processes.** Each may claim, record and sweep at once, so the claim locks what it
  takes (``FOR UPDATE SKIP LOCKED``) and counts what *every* process has in flight; processes
  tell each other of new work and changed partners (``NOTIFY``), and share their rate limits'
  buckets (``rate_buckets``). The store says so: ``shared = True``.
* **Round trips.** Every statement crosses the network, so the publish, the claim and the
  recording of a batch of results are one statement each, lists passed as arrays.
* **No rowid.** Publish order is an identity column, ``seq``, numbered at insert.

Read top to bottom: the connections (a pool of psycopg connections with the ``sqlite3`` face
the store uses, PostgreSQL's errors in our words), the schema and its migrations, then one
event's path — publish, claim, finish — and the rest of the contract.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import store_schema as common
from models import Event, Job, NewEvent, Outcome
from store import (
    PENDING_PARTNERS,
    Conflict,
    DatabaseBusy,
    DatabaseUnavailable,
    StorageUnavailable,
    Store,
    audience_params,
    retry_on_conflict,
    seconds_left,
    write_partner_health,
)
from store_history import DELIVERY_SELECT
from store_rows import event_from_row, job_from_row, json_or_none
from targets import redacted_url

logger = logging.getLogger("webhookd.store")

BOOKKEEPING_CONNECTIONS = 4     # PostgreSQL: connections for claims, results and sweeps, per process
POOL_WAIT_S = 3.0               # PostgreSQL: how long a call waits for a connection before DatabaseUnavailable

# --- Connections ----------------------------------------------------------------------------

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def to_pyformat(sql: str) -> str:
    """``:name`` (the store's style, SQLite's) to ``%(name)s`` (psycopg's); ``::`` casts untouched."""
    return _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))


class _Row(tuple):
    """A row read by position or by column name, like ``sqlite3.Row``."""

    _index: dict[str, int]

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


def _row_factory(cursor: Any) -> Any:
    return _row_class(tuple(d.name for d in cursor.description or ()))


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> type[_Row]:
    """One row class per result shape (the store runs a few dozen statements), made once."""
    return type("Row", (_Row,), {"_index": {n: i for i, n in enumerate(names)}})


class _PgConnection:
    """A psycopg connection with the ``sqlite3`` face the store uses."""

    def __init__(self, conn: Any):
        self._conn = conn

    def execute(self, sql: str, params: Any = None) -> Any:
        return self._conn.execute(to_pyformat(sql), params)

    def executemany(self, sql: str, params: Any) -> Any:
        cursor = self._conn.cursor()
        cursor.executemany(to_pyformat(sql), list(params))
        return cursor


class PostgresEngine:
    """A pool of connections (psycopg 3); each transaction takes one for its duration.

    Several webhookd processes may share the database: every write is a transaction of its
    own, and nothing is held open across an HTTP call."""

    write_fault: str | None = None  # a full disk fails each write by itself (StorageUnavailable): nothing to remember

    def __init__(self, url: str, max_connections: int = 20, *, lock_timeout_s: float = 2.0,
                 statement_timeout_s: float = 10.0):
        try:
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise RuntimeError("storage.url is a PostgreSQL URL, but psycopg is not installed: "
                               "pip install 'webhookd[postgres]'") from None
        self.url = url
        self.lock_timeout_s = lock_timeout_s
        # Server-side binding: values travel apart from the SQL, and psycopg prepares a statement
        # a connection has run five times, so the claim, the publish and the results are planned
        # once per connection, not once per call. (A parameter the server cannot type, as in
        # ``:x IS NULL``, is written ``CAST(:x AS TEXT)`` in store.py.)
        # Time bounds on every connection: a statement that waits for a row lock longer than
        # lock_timeout (a transaction left open elsewhere, holding it) or runs longer than
        # statement_timeout is cancelled (DatabaseBusy: a 503), so one stuck statement cannot
        # hold the group commit, and every publish behind it, for ever.
        # timeout: how long a caller waits for a connection before DatabaseUnavailable (a 503).
        bounds = f"-c lock_timeout={round(lock_timeout_s * 1000)} -c statement_timeout={round(statement_timeout_s * 1000)}"
        kwargs = {"row_factory": _row_factory, "options": bounds}
        self._pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=True, timeout=POOL_WAIT_S,
                                    kwargs=kwargs, check=ConnectionPool.check_connection)
        # Bookkeeping (claims, results, leases) on connections of its own, where every commit is
        # ``synchronous_commit = off`` and a lone statement needs no BEGIN/COMMIT round trips.
        self._bookkeeping = ConnectionPool(
            url, min_size=1, max_size=BOOKKEEPING_CONNECTIONS, open=True, timeout=POOL_WAIT_S,
            kwargs={**kwargs, "autocommit": True, "options": f"-c synchronous_commit=off {bounds}"},
            check=ConnectionPool.check_connection)

    def describe(self) -> str:
        return re.sub(r"//[^@/]*@", "//…@", self.url)  # never the password

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[_PgConnection]:
        pool = self._pool if durable else self._bookkeeping
        with self._unavailable_as_such(), self._connection(pool) as conn, conn.transaction():
            self._wait_for_locks_until_the_deadline(conn)
            yield _PgConnection(conn)

    def _wait_for_locks_until_the_deadline(self, conn: Any) -> None:
        """A transaction begun late in its caller's time (a publish that queued behind a stuck
        group commit) waits for row locks no longer than that time: ``SET LOCAL lock_timeout``, a
        round trip paid only then, never by a transaction with its full time before it."""
        left = seconds_left(self.lock_timeout_s)
        if left < self.lock_timeout_s:
            conn.execute(f"SET LOCAL lock_timeout = {max(1, round(left * 1000))}")

    def statement(self, sql: str, params: Any) -> list[Any]:
        with self._unavailable_as_such(), self._connection(self._bookkeeping) as conn:
            cursor = conn.execute(to_pyformat(sql), params)
            return cursor.fetchall() if cursor.description else []

    @contextmanager
    def reader(self, snapshot: bool = False) -> Iterator[_PgConnection]:
        with self._unavailable_as_such(), self._connection(self._pool) as conn:
            if snapshot:
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield _PgConnection(conn)

    def _connection(self, pool: Any) -> Any:
        """A connection from ``pool``, waited for at most ``POOL_WAIT_S`` or until the call's deadline
        (an idle one is taken even when the deadline has just passed: that costs no wait)."""
        return pool.connection(timeout=max(0.01, seconds_left(POOL_WAIT_S)))

    @contextmanager
    def _unavailable_as_such(self) -> Iterator[None]:
        """PostgreSQL's errors in our words. A lost connection or a pool that found none in time is
        ``DatabaseUnavailable`` (the pool checks each connection before lending it, so the next call
        reconnects by itself); a lock or statement timeout is ``DatabaseBusy``; a deadlock or a
        serialization failure is a ``Conflict``, which ``retry_on_conflict`` runs again."""
        import psycopg
        from psycopg_pool import PoolTimeout

        errors = psycopg.errors
        try:
            yield
        except errors.InsufficientResources as exc:  # class 53: disk full, out of memory
            raise StorageUnavailable(f"PostgreSQL at {self.describe()} cannot write: {exc}") from exc
        except (errors.DeadlockDetected, errors.SerializationFailure) as exc:  # class 40: the server rolled it back
            raise Conflict(f"PostgreSQL at {self.describe()} rolled the transaction back: {exc}") from exc
        except (errors.LockNotAvailable, errors.QueryCanceled) as exc:  # lock_timeout, statement_timeout
            raise DatabaseBusy(f"PostgreSQL at {self.describe()} did not finish in time: {exc}") from exc
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise DatabaseUnavailable(f"PostgreSQL at {self.describe()} is not reachable: {exc}") from exc

    def explain(self, sql: str, params: dict[str, Any]) -> str:
        with self.reader() as db:
            return "\n".join(row[0] for row in db.execute("EXPLAIN " + sql, params))

    def notify(self, channel: str, payload: str = "") -> None:
        """``NOTIFY``, in a transaction of its own (never inside the write it announces: a
        notification sent with a publish's commit costs every publish a lock on a global queue)."""
        with self.transaction(durable=False) as db:
            db.execute("SELECT pg_notify(:channel, :payload)", {"channel": channel, "payload": payload})

    def listen(self, on_notify: Callable[[str, str], None], channels: list[str]) -> Callable[[], None]:
        """Call ``on_notify(channel, payload)`` for each notification on ``channels``, from a
        thread of its own with a connection of its own, reconnecting after any failure, until
        the returned function is called. A notification is only a hint: whoever acts on it
        also looks by itself now and then, so one lost while reconnecting costs a delay only."""
        import psycopg

        stop, listening = threading.Event(), threading.Event()

        def run() -> None:
            while not stop.is_set():
                try:
                    with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                        for channel in channels:
                            conn.execute(f"LISTEN {channel}")
                        listening.set()
                        while not stop.is_set():
                            for note in conn.notifies(timeout=1.0):
                                on_notify(note.channel, note.payload)
                except Exception as exc:  # the database went away: try again in a moment
                    if not stop.is_set():
                        logger.warning("listening for notifications failed (%s); reconnecting", exc)
                        stop.wait(1.0)

        thread = threading.Thread(target=run, name="webhookd-listen", daemon=True)
        thread.start()
        listening.wait(timeout=5)  # serve with the hints already coming in, when the database allows

        def stop_listening() -> None:
            stop.set()
            thread.join(timeout=5)

        return stop_listening

    def close(self) -> None:
        self._bookkeeping.close()
        self._pool.close()

# --- The schema and its migrations --------------------------------------------------------------

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

# PostgreSQL only: the token buckets of the rate limits that protect us (open registration,
# refused signatures, a partner's inbound events), shared by every process. UNLOGGED: a crash
# that empties them only hands everybody a full bucket.
RATE_BUCKETS_TABLE = """CREATE UNLOGGED TABLE IF NOT EXISTS rate_buckets (
    key    TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    at     DOUBLE PRECISION NOT NULL
)"""

# PostgreSQL's schema started at SQLite's third migration: the first ones are in its tables.
MIGRATIONS_POSTGRES: list[common.Migration] = [
    ("attempts.url", []),
    ("partners.max_rate_per_s", []),
    ("events_by_age.id", []),
    ("partners.paused_until", ["ALTER TABLE partners ADD COLUMN paused_until DOUBLE PRECISION"]),
    ("roles", [common.ROLES_TABLE]),
    # The claim searches pending rows only: delivered history grows, this index does not.
    ("deliveries_partner_pending", ["CREATE INDEX IF NOT EXISTS deliveries_partner_pending "
                                    "ON deliveries (partner_id, next_attempt_at) WHERE state = 'pending'"]),
    # What every process has in flight for a partner (the claim's global cap): leased rows only.
    ("deliveries_leased", ["CREATE INDEX IF NOT EXISTS deliveries_leased "
                           "ON deliveries (partner_id) WHERE leased_until IS NOT NULL"]),
    # The two partial indexes above do their work: the full ones only cost every write.
    ("deliveries_full_due_indexes_dropped", ["DROP INDEX IF EXISTS deliveries_due",
                                             "DROP INDEX IF EXISTS deliveries_partner_due"]),
    ("processes", [common.PROCESSES_TABLE]),
    ("rate_buckets", [RATE_BUCKETS_TABLE]),
    ("attempts.error_detail", ["ALTER TABLE attempts ADD COLUMN IF NOT EXISTS error_detail TEXT"]),
    ("partners.suspended_reason", ["ALTER TABLE partners ADD COLUMN IF NOT EXISTS suspended_reason TEXT"]),
    ("audit_log", [common.AUDIT_TABLE, common.AUDIT_INDEX]),
    ("deliveries.queued_at", ["ALTER TABLE deliveries ADD COLUMN IF NOT EXISTS queued_at DOUBLE PRECISION"]),
    ("partners.contact_email", ["ALTER TABLE partners ADD COLUMN IF NOT EXISTS contact_email TEXT"]),
    ("partner_channels", [common.CHANNELS_TABLE]),
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
                               common.DELIVERIES_EVENT_TYPE_BACKFILL, *common.DELIVERIES_READ_INDEXES]),
    ("urls_redacted", [common.redact_stored_urls]),
    ("trace_context", common.TRACE_CONTEXT_COLUMNS),  # traceparent and tracestate, passed on
    ("partners.terms", common.if_not_exists(common.TERMS_COLUMNS)),
    ("events.erased_at", common.EVENTS_ERASED),
    ("server_keys", [common.SERVER_KEYS_TABLE]),
    ("partners.verification", common.if_not_exists(common.VERIFICATION_COLUMNS)),  # proof the endpoint is theirs
    ("partners.client_cert", common.if_not_exists(common.CLIENT_CERT_COLUMNS)),
]


# --- One event's path: publish, claim, finish ---------------------------------------------------

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


# A publish on PostgreSQL in one statement (one round trip): the event, with its fan-out counted,
# and one delivery per subscriber. A delivery id is the id made in Python for this event (its time
# part keeps ids sorted by creation) with its 12 random characters drawn in the statement, one per row.
# Nothing is returned if the idempotency key (or id) is taken: the caller then reads the first event.
_PUBLISH_POSTGRES = """
    WITH subscriber AS ({subscribers}),
    event AS (
        INSERT INTO events (id, type, body, idempotency_key, request_hash, fanout, audience, created_at,
                            traceparent, tracestate)
        SELECT :id, :type, :body, :key, :hash, COUNT(*), :audience, :now, :traceparent, :tracestate FROM subscriber
        ON CONFLICT DO NOTHING
        RETURNING *
    ), fanout AS (
        INSERT INTO deliveries (id, event_id, event_type, partner_id, state, max_attempts, next_attempt_at,
                                created_at, updated_at)
        SELECT :id_prefix || substr(md5(random()::text || subscriber.partner_id), 1, 12), event.id, event.type,
               subscriber.partner_id, 'pending',
               COALESCE((SELECT p.max_attempts FROM partners p WHERE p.id = subscriber.partner_id), :max_attempts),
               :now, :now, :now
        FROM event CROSS JOIN subscriber
    )
    SELECT * FROM event
"""


_PUBLISH_TO_SUBSCRIBERS = _PUBLISH_POSTGRES.format(subscribers=_SUBSCRIBERS_POSTGRES.format(filters=""))
_PUBLISH_TO_FILTERED = _PUBLISH_POSTGRES.format(subscribers=_SUBSCRIBERS_POSTGRES.format(filters=_FILTERS_POSTGRES))
_PUBLISH_TO_ONE = _PUBLISH_POSTGRES.format(subscribers="SELECT CAST(:only AS TEXT) AS partner_id")


# Before it, in the same transaction, _LOCK_PARTNERS locks the active partners nobody paused
# for this claim (another process's claim skips them until this one ends; NO KEY UPDATE, so
# publishes, whose deliveries point at these rows, are not held up). It must be a statement of
# its own: a statement reads the database as it was when it began, so a count of leases made in
# the statement that waited for the lock would miss the leases of the claim that held it.
# In id order, byte by byte (COLLATE "C", Python's order): SKIP LOCKED skips a row locked by
# another, but still waits for the newest version of a row another transaction just updated,
# and the recorder updates partners' health in sorted(id) order (write_partner_health). Locks
# taken in one order by both never deadlock; in the table's order they did.
_LOCK_PARTNERS = """
    SELECT id, ordering FROM partners
    WHERE status = 'active' AND (paused_until IS NULL OR paused_until <= :now)
      AND webhook_url <> ''  -- a pull-only partner (no URL) takes its own (polling.py)
      AND (verification IS NULL OR verification <> 'unverified')
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
# and what an attempt needs from the rows, read in the same statement (not the partner's URL and
# secrets: an attempt takes them from the partner as it is when it starts).
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
    SELECT leased.id, leased.event_id, e.type, leased.partner_id, p.failing_since, e.body,
           leased.attempt_count, leased.max_attempts, leased.created_at, e.traceparent, e.tracestate
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


def _results_as_arrays(outcomes: list[Outcome], now: float) -> dict[str, Any]:
    """``_RECORD_RESULTS``' parameters: the batch as one array per column (one statement for a
    hundred results, and the same statement text whatever the batch's size)."""
    columns = {"id": [o.delivery_id for o in outcomes], "state": [o.state for o in outcomes],
               "attempt": [o.attempt.attempt for o in outcomes], "next": [o.next_attempt_at for o in outcomes],
               "started": [o.attempt.started_at for o in outcomes], "ms": [o.attempt.duration_ms for o in outcomes],
               "status": [o.attempt.status_code for o in outcomes], "error": [o.attempt.error for o in outcomes],
               "snippet": [o.attempt.response_snippet for o in outcomes],
               "url": [redacted_url(o.attempt.url) if o.attempt.url else None for o in outcomes],
               "detail": [o.attempt.error_detail for o in outcomes],
               "signatures": [json_or_none(o.attempt.signatures) for o in outcomes],
               "decision": [json_or_none(o.decision) for o in outcomes]}
    return {"now": now, **columns}


def _rows_recorded(rows: list[Any]) -> set[str]:
    return {row["id"] for row in rows}


class PostgresStore(Store):
    """The store on a PostgreSQL database that several processes may share (see the module docstring)."""

    shared = True  # several processes may serve from this database
    SCHEMA = SCHEMA_POSTGRES
    MIGRATIONS = MIGRATIONS_POSTGRES
    # Publish order is the seq column (there is no rowid).
    _delivery_select = DELIVERY_SELECT.format(order="seq")
    # PostgreSQL's planner picks the partial index of pending rows by itself: no index named.
    _pending_partners = PENDING_PARTNERS.format(order="seq", indexed="")
    _UPDATED_MINUTE = "FLOOR(updated_at / 60)"  # differs: a CAST to INTEGER rounds here, SQLite's truncates
    _UPDATED_HOUR = "FLOOR(updated_at / 3600)"

    def _open_engine(self, target: str, *, lock_timeout_s: float, statement_timeout_s: float) -> PostgresEngine:
        return PostgresEngine(target, lock_timeout_s=lock_timeout_s, statement_timeout_s=statement_timeout_s)

    def _begin_schema(self, db: Any) -> None:
        """Differs from SQLite (whose one writer applies the schema alone): processes starting
        together take turns on an advisory lock, and a migration may wait for the one before it,
        or build an index on a big table, for longer than any API statement may: no time bounds
        in this transaction."""
        db.execute("SET LOCAL lock_timeout = 0")
        db.execute("SET LOCAL statement_timeout = 0")
        db.execute("SELECT pg_advisory_xact_lock(72071)")

    # --- Publish --------------------------------------------------------------------------

    def _insert_event(self, db: Any, event: NewEvent, now: float, max_attempts: int,
                      new_delivery_id: Callable[[], str], passed: list[str] | None) -> tuple[Event, bool]:
        """Differs from SQLite's three steps: one statement (``_PUBLISH_POSTGRES``), one round trip."""
        if event.only_partner is not None:
            sql, params = _PUBLISH_TO_ONE, {"type": event.type, "only": event.only_partner, "audience": None}
        else:  # nobody filters (the usual case): no need to read the partners
            sql = _PUBLISH_TO_SUBSCRIBERS if passed is None else _PUBLISH_TO_FILTERED
            params = audience_params(event, passed or [])
        row = db.execute(sql, {
            **params, "id": event.id, "body": event.body, "key": event.idempotency_key,
            "hash": event.request_hash, "now": now, "max_attempts": max_attempts,
            "traceparent": event.traceparent, "tracestate": event.tracestate,
            "id_prefix": new_delivery_id()[:-12]}).fetchone()
        if row is not None:
            return event_from_row(row), True
        row = db.execute("SELECT * FROM events WHERE idempotency_key = :k", {"k": event.idempotency_key}).fetchone()
        return event_from_row(row), False

    # --- Claim ----------------------------------------------------------------------------

    @retry_on_conflict
    def claim_due(self, *, now: float, lease_s: float, limit: int, per_partner: int,
                  room: Mapping[str, int] | None = None) -> list[Job]:
        """Differs from SQLite's loop, because several processes claim at once: one transaction of
        two statements, the partners locked first (``_LOCK_PARTNERS``), then the claim itself
        (``_CLAIM``). Each partner's room is cut to its cap less what *every* process has in
        flight for it, so three processes never send a partner three times its cap; fair shares
        come from the order of the chosen rows (each partner's first before anyone's second)."""
        room = dict(room or {})
        self._claim_round += 1
        if limit <= 0:
            return []
        with self._transaction(durable=False) as db:
            locked = db.execute(_LOCK_PARTNERS, {"now": now}).fetchall()
            if not locked:
                return []
            rows = db.execute(_CLAIM, {
                "partners": [row["id"] for row in locked], "fifo": [row["ordering"] == "fifo" for row in locked],
                "now": now, "lease": now + lease_s, "limit": limit, "per_partner": per_partner,
                "round": str(self._claim_round), "room_ids": list(room), "room_n": list(room.values())}).fetchall()
        return [job_from_row(row) for row in rows]

    # --- Finish ---------------------------------------------------------------------------

    @retry_on_conflict
    def finish_attempts(self, outcomes: list[Outcome], now: float) -> list[str]:
        """Differs from SQLite's two statements per result: the batch is one statement
        (``_RECORD_RESULTS``); without partner health to write (the usual case) it is a
        transaction by itself, on a bookkeeping connection, one round trip."""
        health = any(o.partner_failing_changed or o.disable_reason or o.paused_until for o in outcomes)
        if not health:
            recorded = _rows_recorded(self.engine.statement(_RECORD_RESULTS, _results_as_arrays(outcomes, now)))
        else:
            with self._transaction(durable=False) as db:
                recorded = _rows_recorded(db.execute(_RECORD_RESULTS, _results_as_arrays(outcomes, now)).fetchall())
                write_partner_health(db, [o for o in outcomes if o.delivery_id in recorded], now)
        lost = [o.delivery_id for o in outcomes if o.delivery_id not in recorded]
        if health:
            self._reload_partners_after_write()
        return lost

    # --- The rest of the contract ---------------------------------------------------------

    def _take_turns_replaying(self, db: Any, partner_id: str) -> None:
        """Differs from SQLite (one writer: replays take turns already): the partner's row is locked."""
        db.execute("SELECT id FROM partners WHERE id = :id FOR NO KEY UPDATE", {"id": partner_id})

    def _forget_old_versions(self) -> None:
        """Differs from SQLite (a checkpoint to run): old row versions are invisible to every query
        and go at the next vacuum; nothing to do."""

    def database_health(self) -> dict[str, float]:
        """PostgreSQL's view, for /metrics: the oldest open transaction's age (a long one stalls
        every claim's SKIP LOCKED search and vacuum) and the dead rows of the hot table. Differs
        from SQLite, which has neither."""
        with self._reader() as db:
            oldest = db.execute(
                """SELECT COALESCE(MAX(EXTRACT(EPOCH FROM now() - xact_start)), 0) FROM pg_stat_activity
                   WHERE datname = current_database() AND xact_start IS NOT NULL
                     AND pid <> pg_backend_pid()""").fetchone()[0]
            dead = db.execute("SELECT COALESCE(SUM(n_dead_tup), 0) FROM pg_stat_user_tables "
                              "WHERE relname = 'deliveries'").fetchone()[0]
        return {"oldest_transaction_seconds": float(oldest), "deliveries_dead_rows": float(dead)}

    def take_token(self, key: str, *, rate: float, burst: float, now: float, only_if_left: bool,
                   cost: float = 1.0) -> float | None:
        """Only a shared store keeps buckets: spend ``cost`` tokens (one; -1 gives one back) of the shared bucket ``key``
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
        """The tokens in the shared bucket ``key`` now, without spending one."""
        with self._reader() as db:
            row = db.execute("SELECT LEAST(:burst, tokens + (:now - at) * :rate) FROM rate_buckets WHERE key = :key",
                             {"key": key, "rate": rate, "burst": burst, "now": now}).fetchone()
        return burst if row is None else row[0]

    def purge_rate_buckets(self, *, before: float) -> int:
        """Forget buckets untouched since ``before`` (full again long ago)."""
        with self._transaction(durable=False) as db:
            return db.execute("DELETE FROM rate_buckets WHERE at < :before", {"before": before}).rowcount

    def explain_claim(self) -> str:
        """Differs from SQLite (two searches): the claim is one statement."""
        return self.engine.explain(_CLAIM, {"partners": ["p"], "fifo": [False], "now": 0.0, "lease": 1.0, "limit": 1,
                                            "per_partner": 1, "round": "0", "room_ids": [], "room_n": []})

    def explain_deliveries(self, **given: Any) -> str:
        """Differs from SQLite: a test database is tiny, so the planner is asked whether an index
        *can* serve, not whether it pays."""
        sql, params = self._deliveries_query(limit=50, **given)
        with self.engine.reader() as db:
            db.execute("SET enable_seqscan = off", {})
            try:
                return "\n".join(row[0] for row in db.execute("EXPLAIN " + sql, params))
            finally:
                db.execute("RESET enable_seqscan", {})

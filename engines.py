"""How webhookd talks to its database: SQLite (the default, one file) or PostgreSQL (several processes).

``store.py`` holds every SQL statement, written once with ``:name`` parameters; an engine
gives it connections that run those statements. The store only ever asks for two things:

* ``engine.transaction(durable)`` — a write transaction: committed when the block ends,
  rolled back if it raises. ``durable=False`` is for bookkeeping whose loss is a harmless
  resend (claims, attempt results): SQLite commits it with ``synchronous=NORMAL``,
  PostgreSQL with ``synchronous_commit = off``. Everything we answer a 202 or a 200 for is
  durable.
* ``engine.statement(sql, params)`` — one bookkeeping statement that is a transaction by
  itself (``durable=False``), its rows returned: on PostgreSQL one round trip, no
  ``BEGIN``/``COMMIT`` around it. The claim and the recording of results are such statements.
* ``engine.reader()`` — a connection for reads, each statement on its own snapshot
  (``engine.reader(snapshot=True)`` for several reads that must agree).

Both hand out objects with the ``sqlite3`` connection's small face: ``execute(sql, params)``
returning a cursor (``fetchone``, ``fetchall``, ``rowcount``, iteration) whose rows are read
by column name or position, and ``executemany``.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import math
import os
import queue
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("webhookd.store")

BOOKKEEPING_PATIENCE_S = 0.05  # how long a claim or a result waits for the publishes queued before it
SQLITE_BUSY_S = 10.0           # SQLite: how long a write waits for another process's lock on the file
BOOKKEEPING_CONNECTIONS = 4     # PostgreSQL: connections for claims, results and sweeps, per process
POOL_WAIT_S = 3.0               # PostgreSQL: how long a call waits for a connection before DatabaseUnavailable
CONFLICT_RETRIES = 4            # a transaction PostgreSQL rolled back for a deadlock runs again this often, at most


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


# SQLite's result codes for "cannot write": full disk, I/O error, read-only file (sqlite3 error names).
_STORAGE_ERRORS = {"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN"}


def storage_fault(exc: BaseException) -> bool:
    """Whether a SQLite error means the storage itself refuses writes (not a bug, not bad input)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return isinstance(exc, sqlite3.Error) and any(name.startswith(code) for code in _STORAGE_ERRORS)


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


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


# --- SQLite ---------------------------------------------------------------------------------


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

    name = "sqlite"

    def __init__(self, path: str):
        self.path = path
        _create_private_file(path)
        self._writer = connect_sqlite(path)
        self._sync_mode = "FULL"
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
        most ``SQLITE_BUSY_S``, or until the call's deadline (a route's write)."""
        wait = seconds_left(SQLITE_BUSY_S)
        if wait >= SQLITE_BUSY_S:
            self._writer.execute("BEGIN IMMEDIATE")
            return
        self._writer.execute(f"PRAGMA busy_timeout = {max(1, round(wait * 1000))}")
        try:
            self._writer.execute("BEGIN IMMEDIATE")
        finally:
            self._writer.execute(f"PRAGMA busy_timeout = {round(SQLITE_BUSY_S * 1000)}")

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


# --- PostgreSQL -----------------------------------------------------------------------------

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

    name = "postgresql"

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

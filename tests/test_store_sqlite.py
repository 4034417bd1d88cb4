"""store_sqlite.py on a real file: its connections — readers read beside the one writer, a file
locked by another process is answered within the call's deadline — and its schema: a fresh file
gets exactly what the migrations make of every older one. (A transaction that commits whole or
not at all is tested on both engines in test_store.py.)"""

from __future__ import annotations

import hashlib
import sqlite3
import time

import pytest

from storage import open_store
from store import DatabaseBusy, answer_by
from store_sqlite import MIGRATIONS, SCHEMA, SQLITE_BUSY_S, SQLiteEngine

# SCHEMA is the oldest supported database's tables, as its release created them: every change
# since is a named migration. Editing SCHEMA in place would give a fresh file what no upgraded one
# has; this fingerprint says so before a user's database does.
OLDEST_SCHEMA_SHA256 = "94e06a8c82d90eb9ac91408c85c75b025a5621749e53658f4ccf09c249b58e36"


@pytest.fixture
def engine(tmp_path):
    engine = SQLiteEngine(str(tmp_path / "e.db"))
    with engine.transaction() as db:
        db.execute("CREATE TABLE t (x INTEGER)")
    yield engine
    engine.close()


def _xs(engine) -> list[int]:
    with engine.reader() as db:
        return [row["x"] for row in db.execute("SELECT x FROM t ORDER BY x")]


def test_readers_read_the_last_commit_while_the_writer_is_in_a_transaction(engine):
    with engine.transaction() as db:
        db.execute("INSERT INTO t (x) VALUES (1)")
        assert _xs(engine) == []  # WAL: a reader neither waits for the writer nor sees its open transaction
    assert _xs(engine) == [1]


def test_a_file_locked_by_another_process_is_database_busy_by_the_calls_deadline(engine):
    """Another process holds the file's write lock: a route's write (``answer_by``) gives up at its
    deadline with DatabaseBusy (a 503), not after SQLite's full busy wait, and a write without a
    deadline afterwards waits the full ``SQLITE_BUSY_S`` again."""
    other = sqlite3.connect(engine.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with answer_by(time.monotonic() + 0.3), pytest.raises(DatabaseBusy, match="locked by another process"):
            with engine.transaction() as db:
                db.execute("INSERT INTO t (x) VALUES (1)")
    finally:
        other.execute("ROLLBACK")
        other.close()
    with engine.transaction() as db:
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == round(SQLITE_BUSY_S * 1000)
        db.execute("INSERT INTO t (x) VALUES (2)")
    assert _xs(engine) == [2]


def _schema(path) -> dict[str, object]:
    """Every table with its columns (name, type, not null, default, key) and every index with its definition."""
    with sqlite3.connect(path) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {
            "tables": {t: db.execute(f"PRAGMA table_info({t})").fetchall() for t in tables},
            "indexes": db.execute("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' "
                                  "ORDER BY name").fetchall(),
        }


def _as_a_release_left_it(path, applied: int) -> None:
    """The oldest supported database (SCHEMA) with the first ``applied`` migrations, as the release
    that had only those left it: each applied and recorded (tests/test_upgrade.py builds one with data)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        for statement in SCHEMA:
            db.execute(statement)
        for name, steps in MIGRATIONS[:applied]:
            for step in steps:
                step(db) if callable(step) else db.execute(step)
            db.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, 1.0))
    finally:
        db.close()


def test_a_fresh_file_has_exactly_the_schema_the_migrations_make_of_every_older_one(tmp_path):
    open_store(str(tmp_path / "fresh.db")).close()
    fresh = _schema(tmp_path / "fresh.db")
    for applied in range(len(MIGRATIONS)):
        path = tmp_path / f"older{applied}.db"
        _as_a_release_left_it(path, applied)
        store = open_store(str(path))
        assert store.migrated == [name for name, _ in MIGRATIONS[applied:]]
        store.close()
        assert _schema(path) == fresh, f"upgraded from {applied} migrations"


def test_the_oldest_schema_is_changed_by_migrations_never_in_place():
    assert hashlib.sha256("\n".join(SCHEMA).encode()).hexdigest() == OLDEST_SCHEMA_SHA256, (
        "store_sqlite.SCHEMA changed: it is the oldest supported database's; add a migration instead")

"""store_postgres.py on a real PostgreSQL (tests/pg.py): its connections — a server that stopped is
DatabaseUnavailable and the pool reconnects by itself, a row lock held elsewhere or a statement
too long is DatabaseBusy, the store's ``:name`` parameters reach psycopg as its own — and its
schema: a fresh database gets exactly what the migrations make of every older one. (A
transaction that commits whole or not at all is tested on both engines in test_store.py.)"""

from __future__ import annotations

import hashlib

import psycopg
import pytest

from conftest import wait_for
from storage import open_store
from store import DatabaseBusy, DatabaseUnavailable
from store_postgres import MIGRATIONS_POSTGRES, SCHEMA_POSTGRES, PostgresEngine, to_pyformat

# SCHEMA_POSTGRES is the oldest supported database's tables, as its release created them: every
# change since is a named migration. Editing it in place would give a fresh database what no
# upgraded one has; this fingerprint says so before a user's database does.
OLDEST_SCHEMA_SHA256 = "899016ebc787906af4d1a7adb51bbdfd7cf017b46e6b8c28292b045648693aa2"


@pytest.fixture
def engine(postgres_server):
    url = postgres_server.new_database()
    engine = PostgresEngine(url, lock_timeout_s=0.3, statement_timeout_s=0.5)
    with engine.transaction() as db:
        db.execute("CREATE TABLE t (x INTEGER PRIMARY KEY)")
    yield engine
    engine.close()


def _xs(engine) -> list[int]:
    with engine.reader() as db:
        return [row["x"] for row in db.execute("SELECT x FROM t ORDER BY x")]


def test_named_parameters_become_psycopgs_and_casts_and_percent_signs_stay_as_written():
    assert to_pyformat("SELECT :a::text, CAST(:b AS TEXT[]), '100%' WHERE x = :a") == \
        "SELECT %(a)s::text, CAST(%(b)s AS TEXT[]), '100%%' WHERE x = %(a)s"


def test_a_row_lock_held_elsewhere_is_database_busy_after_the_lock_timeout(engine, postgres_server):
    with engine.transaction() as db:
        db.execute("INSERT INTO t (x) VALUES (1)")
    with psycopg.connect(engine.url) as other:  # a transaction left open elsewhere, holding the row
        other.execute("SELECT x FROM t WHERE x = 1 FOR UPDATE")
        with pytest.raises(DatabaseBusy, match="did not finish in time"), engine.transaction() as db:
            db.execute("UPDATE t SET x = 2 WHERE x = 1")
    with engine.transaction() as db:  # the lock is gone with the other transaction: the write goes through
        db.execute("UPDATE t SET x = 2 WHERE x = 1")
    assert _xs(engine) == [2]


def test_a_statement_past_the_statement_timeout_is_database_busy(engine):
    with pytest.raises(DatabaseBusy, match="did not finish in time"), engine.reader() as db:
        db.execute("SELECT pg_sleep(30)")


def test_a_stopped_server_is_database_unavailable_and_the_pool_reconnects_once_it_is_back(engine, postgres_server):
    assert _xs(engine) == []
    postgres_server.crash()
    try:
        with pytest.raises(DatabaseUnavailable, match="not reachable"):
            _xs(engine)
        with pytest.raises(DatabaseUnavailable), engine.transaction() as db:
            db.execute("INSERT INTO t (x) VALUES (1)")
    finally:
        postgres_server.start_again()

    def back() -> bool:
        try:
            return _xs(engine) == []
        except DatabaseUnavailable:
            return False

    wait_for(back, timeout=30)
    with engine.transaction() as db:
        db.execute("INSERT INTO t (x) VALUES (1)")
    assert _xs(engine) == [1]


def _schema(url: str) -> dict[str, object]:
    """Every table with its columns (name, type, nullable, default) and every index with its definition."""
    with psycopg.connect(url) as db:
        columns = db.execute(
            """SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity
               FROM information_schema.columns WHERE table_schema = 'public'
               ORDER BY table_name, column_name""").fetchall()
        indexes = db.execute("SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
                             "ORDER BY indexname").fetchall()
        unlogged = db.execute("SELECT relname FROM pg_class WHERE relpersistence = 'u' AND relkind = 'r' "
                              "ORDER BY relname").fetchall()
    return {"columns": columns, "indexes": indexes, "unlogged": unlogged}


def _as_a_release_left_it(url: str, applied: int) -> None:
    """The oldest supported database (SCHEMA_POSTGRES) with the first ``applied`` migrations, as the
    release that had only those left it: each applied and recorded."""
    engine = PostgresEngine(url)
    try:
        with engine.transaction() as db:
            for statement in SCHEMA_POSTGRES:
                db.execute(statement)
            for name, steps in MIGRATIONS_POSTGRES[:applied]:
                for step in steps:
                    step(db) if callable(step) else db.execute(step)
                db.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (:name, 1.0)", {"name": name})
    finally:
        engine.close()


def test_a_fresh_database_has_exactly_the_schema_the_migrations_make_of_every_older_one(postgres_server):
    fresh_url = postgres_server.new_database()
    open_store(fresh_url).close()
    fresh = _schema(fresh_url)
    for applied in range(len(MIGRATIONS_POSTGRES)):
        url = postgres_server.new_database()
        _as_a_release_left_it(url, applied)
        store = open_store(url)
        assert store.migrated == [name for name, _ in MIGRATIONS_POSTGRES[applied:]]
        store.close()
        assert _schema(url) == fresh, f"upgraded from {applied} migrations"


def test_the_oldest_schema_is_changed_by_migrations_never_in_place():
    assert hashlib.sha256("\n".join(SCHEMA_POSTGRES).encode()).hexdigest() == OLDEST_SCHEMA_SHA256, (
        "store_postgres.SCHEMA_POSTGRES changed: it is the oldest supported database's; add a migration instead")

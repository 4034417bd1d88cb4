"""Opening the store the configuration names: ``storage.url`` (PostgreSQL) or ``storage.path`` (SQLite).

This is the one place that asks which database it is. Everything above it holds a
``store.Store`` and asks what that store can do (``shared``), never which engine it is.
"""

from __future__ import annotations

from store import Store
from store_postgres import PostgresStore
from store_sqlite import SQLiteStore


def is_postgres_url(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://"))


def open_store(target: str, *, lock_timeout_s: float = 2.0, statement_timeout_s: float = 10.0) -> Store:
    """The store at ``target``: a ``postgresql://`` URL opens ``PostgresStore``, anything else is the
    path of a SQLite file (``SQLiteStore``), created if missing. ``lock_timeout_s`` and
    ``statement_timeout_s`` bound each PostgreSQL statement (see ``store_postgres.PostgresEngine``)."""
    if is_postgres_url(target):
        return PostgresStore(target, lock_timeout_s=lock_timeout_s, statement_timeout_s=statement_timeout_s)
    return SQLiteStore(target)

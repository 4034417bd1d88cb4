"""Opening the store the configuration names — ``storage.url`` (PostgreSQL) or ``storage.path``
(SQLite) — and copying one store into another (``webhookd migrate-store``).

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
    ("server_keys", "SELECT * FROM server_keys"),  # the portal links minted before keep working
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

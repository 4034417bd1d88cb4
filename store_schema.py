"""The SQL both engines write alike: tables, indexes and the steps of migrations they share.

Each engine's own schema — the tables as its oldest supported database had them, then its
migrations in order — is in its file (``store_sqlite.py``, ``store_postgres.py``); a migration
that both run the same way takes its statements from here. Times are ``DOUBLE PRECISION``
seconds, a type name SQLite reads as ``REAL``, so one text serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from store_rows import rewrite_audit_urls
from targets import redacted_url

# A migration is a list of steps, each a statement or a function of the transaction (``db``).
Migration = tuple[str, list[str | Callable[[Any], None]]]

# The channels a partner listens on: an event published to channels reaches only subscribers of one.
CHANNELS_TABLE = """CREATE TABLE IF NOT EXISTS partner_channels (
    partner_id TEXT NOT NULL REFERENCES partners(id),
    channel    TEXT NOT NULL,
    PRIMARY KEY (channel, partner_id)
)"""

AUDIT_INDEX = "CREATE INDEX IF NOT EXISTS audit_by_partner ON audit_log (partner_id, id)"

# The indexes of GET /deliveries' filters that the tables above lack (see the migration
# "deliveries.event_type"); the partner's and the event's are deliveries_by_partner and deliveries_by_event.
# W3C trace context kept with a published event and an inbound one (``trace_context.py``).
TRACE_CONTEXT_COLUMNS = ["ALTER TABLE events ADD COLUMN traceparent TEXT", "ALTER TABLE events ADD COLUMN tracestate TEXT",
                         "ALTER TABLE inbound_events ADD COLUMN traceparent TEXT",
                         "ALTER TABLE inbound_events ADD COLUMN tracestate TEXT"]
# A partner's own terms (partner_terms.py): its retry policy (JSON; max_attempts apart, for the
# publish's statement) and its extra headers (JSON; secrets, kept beside its secret).
TERMS_COLUMNS = ["ALTER TABLE partners ADD COLUMN retry_policy TEXT",
                 "ALTER TABLE partners ADD COLUMN max_attempts INTEGER",
                 "ALTER TABLE partners ADD COLUMN extra_headers TEXT"]
# A partner's TLS client certificate and its private key (PEM; the key a secret like the others).
CLIENT_CERT_COLUMNS = ["ALTER TABLE partners ADD COLUMN client_cert TEXT",
                       "ALTER TABLE partners ADD COLUMN client_key TEXT"]
DELIVERIES_READ_INDEXES = ["CREATE INDEX IF NOT EXISTS deliveries_by_state ON deliveries (state, id)",
                           "CREATE INDEX IF NOT EXISTS deliveries_by_type ON deliveries (event_type, id)"]
DELIVERIES_EVENT_TYPE_BACKFILL = ("UPDATE deliveries SET event_type = "
                                  "(SELECT e.type FROM events e WHERE e.id = deliveries.event_id)")


def redact_stored_urls(db: Any) -> None:
    """A migration in Python: the URLs the attempts and the audit trail kept whole before they were
    written redacted, redacted now (``targets.redacted_url``: a query may hold a partner's token)."""
    for row in db.execute("SELECT DISTINCT url FROM attempts WHERE url LIKE :query OR url LIKE :user OR url LIKE :rest",
                          {"query": "%?%", "user": "%@%", "rest": "%#%"}).fetchall():
        db.execute("UPDATE attempts SET url = :redacted WHERE url = :url",
                   {"url": row["url"], "redacted": redacted_url(row["url"])})
    rewrite_audit_urls(db, "SELECT id, changes FROM audit_log WHERE changes LIKE :url", {"url": "%://%"},
                        redacted_url)


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

# An event whose content was erased (``erasure.py``): when, its body emptied; the per-type
# retention finds a type's oldest events through the second index.
EVENTS_ERASED = ["ALTER TABLE events ADD COLUMN erased_at DOUBLE PRECISION",
                 "CREATE INDEX IF NOT EXISTS events_by_type_age ON events (type, created_at)"]

# Keys webhookd makes for itself and every process on the database shares (``portal_links.py``:
# the key that signs portal links), each made once, at first use.
SERVER_KEYS_TABLE = """CREATE TABLE IF NOT EXISTS server_keys (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
)"""

# Proof that a partner's endpoint is its own (verification.py): its state (null: never asked; else
# unverified or verified), the challenge the endpoint must echo, the requests sent for it, when the
# next goes, when the last went and why it failed, when it passed. The claim skips an unverified partner.
VERIFICATION_COLUMNS = [
    "ALTER TABLE partners ADD COLUMN verification TEXT",
    "ALTER TABLE partners ADD COLUMN verification_challenge TEXT",
    "ALTER TABLE partners ADD COLUMN verification_attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE partners ADD COLUMN verification_due_at DOUBLE PRECISION",
    "ALTER TABLE partners ADD COLUMN verification_tried_at DOUBLE PRECISION",
    "ALTER TABLE partners ADD COLUMN verification_error TEXT",
    "ALTER TABLE partners ADD COLUMN verified_at DOUBLE PRECISION",
]


def if_not_exists(statements: list[str]) -> list[str]:
    """PostgreSQL's migrations add a column only if it is missing (``ADD COLUMN IF NOT EXISTS``)."""
    return [s.replace("ADD COLUMN", "ADD COLUMN IF NOT EXISTS") for s in statements]

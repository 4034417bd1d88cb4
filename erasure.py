"""Erasing an event's content: on request (``DELETE /events/{id}/content``) and by its type's retention.

An event's content is what its publisher sent and what its partners answered about it. Four
columns hold it, and an erasure empties every one of them in one transaction:

* ``events.body``: the payload, exactly the bytes sent (left empty: the column cannot be null);
* ``attempts.signatures``: the signature headers sent, from which the trace rebuilds the strings
  they signed (the body, among them);
* ``attempts.response_snippet``: the first KiB of each partner's answer.

What stays is the metadata: the ids, the type, the times, the audience, the states, and each
attempt's status, error, duration and URL; ``events.erased_at`` says when the content went. The
event's ``request_hash`` stays too: a one-way digest, kept so that a resend of the same request
with its ``Idempotency-Key`` is still recognised and not published again.

A delivery still pending ends ``cancelled`` in the same transaction, so it is never sent; an
attempt on the wire at that moment finishes, but its result is not recorded (the delivery is no
longer pending), so it is not retried and its answer is not kept. A failed or expired delivery
keeps its state but is never queued again: a retry, a recovery and a replay all leave erased
events out (``store_history.py``). Erasing twice changes nothing the second time.

A type's retention (``retention_days`` in its catalog table, shorter than ``retention.max_age_s``)
runs in the retention sweep (``housekeeping.py``): its events older than that go as the global
retention takes events — deleted with their deliveries once every delivery has ended — and those
it would keep (a delivery pending, failed or expired) have their content erased instead.

The route itself is in ``webhookd.py`` (``erase_event``); this module is the store's side of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from models import AuditEntry
from store import Store
from store_rows import write_audit
from store_sqlite import SQLiteStore

logger = logging.getLogger("webhookd.erasure")

# The event's own row: its body emptied and the time, once.
_ERASE_EVENT = """UPDATE events SET body = :empty, erased_at = :now WHERE id = :id AND erased_at IS NULL"""
# Its pending deliveries end cancelled (an attempt in flight is then not recorded: the store
# records a result only for a delivery still pending).
_CANCEL_PENDING = """UPDATE deliveries SET state = 'cancelled', leased_until = NULL, updated_at = :now
                     WHERE event_id = :id AND state = 'pending'"""
# What its attempts kept of the content: the signature headers (the trace rebuilds the signed
# strings from them and the body) and the partners' answers.
_FORGET_ATTEMPTS = """UPDATE attempts SET signatures = NULL, response_snippet = NULL
                      WHERE delivery_id IN (SELECT id FROM deliveries WHERE event_id = :id)
                        AND (signatures IS NOT NULL OR response_snippet IS NOT NULL)"""
# A type's events past its retention whose content is still there, oldest first (events_by_type_age).
_UNERASED_OF_TYPE = """SELECT id FROM events WHERE type = :type AND created_at < :before AND erased_at IS NULL
                       ORDER BY created_at LIMIT :batch"""


@dataclass(frozen=True)
class Erased:
    """What an erasure did: when the content went (the first erasure's time), the deliveries it
    cancelled now, and whether this call erased it (False: it was erased already)."""

    event_id: str
    event_type: str
    erased_at: float
    cancelled: dict[str, int]  # partner id -> deliveries cancelled by this call
    first: bool


def erase_content(store: Store, event_id: str, *, now: float, audit: AuditEntry | None = None) -> Erased | None:
    """Erase one event's content (see the module docstring); None if there is no such event.
    The audit entry is written only by the erasure that changed something."""
    with store._transaction() as db, _overwriting_freed_bytes(store, db):
        erased = _erase_in(db, event_id, now)
        if erased is not None and (erased.first or erased.cancelled):
            write_audit(db, audit, cancelled_deliveries=sum(erased.cancelled.values()))
    store._forget_old_versions()  # SQLite: no earlier version of the rows left in its log
    return erased


@contextmanager
def _overwriting_freed_bytes(store: Store, db: Any) -> Iterator[None]:
    """SQLite, for this transaction only: the bytes its statements free are overwritten with zeros
    (``secure_delete``), so the old body is not left in the file's free space. Only here: for
    every write it would cost the delivery loop's bookkeeping extra I/O. PostgreSQL has no such
    setting; its old row versions go at the next vacuum."""
    if not isinstance(store, SQLiteStore):
        yield
        return
    db.execute("PRAGMA secure_delete = ON")
    try:
        yield
    finally:
        db.execute("PRAGMA secure_delete = OFF")


def _erase_in(db: Any, event_id: str, now: float) -> Erased | None:
    """The erasure's statements, inside the caller's transaction."""
    first = db.execute(_ERASE_EVENT, {"id": event_id, "now": now, "empty": b""}).rowcount == 1
    row = db.execute("SELECT type, erased_at FROM events WHERE id = :id", {"id": event_id}).fetchone()
    if row is None:
        return None
    cancelled: dict[str, int] = {}
    for d in db.execute(_CANCEL_PENDING + " RETURNING partner_id", {"id": event_id, "now": now}).fetchall():
        cancelled[d["partner_id"]] = cancelled.get(d["partner_id"], 0) + 1
    db.execute(_FORGET_ATTEMPTS, {"id": event_id})
    return Erased(event_id, row["type"], row["erased_at"], cancelled, first)


# --- Each type's retention --------------------------------------------------------------------------


def erase_past_retention(store: Store, event_type: str, *, before: float, now: float, batch: int) -> tuple[int, bool]:
    """Erase the content of up to ``batch`` events of ``event_type`` published before ``before``
    and not erased yet (those the purge kept: a delivery pending, failed or expired). Returns how
    many, and whether more may be left."""
    with store._transaction(durable=False) as db, _overwriting_freed_bytes(store, db):
        ids = [r["id"] for r in db.execute(_UNERASED_OF_TYPE, {"type": event_type, "before": before,
                                                                "batch": batch}).fetchall()]
        for event_id in ids:
            _erase_in(db, event_id, now)
    if ids:
        store._forget_old_versions()
    return len(ids), len(ids) == batch


def type_retention(catalog_retention: dict[str, float], default_s: float) -> dict[str, float]:
    """The types whose own retention is shorter than everyone's (``default_s``), and theirs in
    seconds: only these need a pass of their own."""
    return {t: s for t, s in sorted(catalog_retention.items()) if s < default_s}

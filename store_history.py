"""What happened: reading deliveries and their attempts, retrying and replaying them by hand,
the counts behind the metrics, retention, the audit trail, and the events partners send us.

These are the store's reads and its operators' writes. Both engines run every statement here
as written; the few words that differ come from the engine's class: ``_delivery_select``
(``DELIVERY_SELECT`` in the engine's insertion order: SQLite's rowid, PostgreSQL's seq column)
and ``_UPDATED_MINUTE`` (the minute a row last changed, in the engine's arithmetic). A replay
on a shared database also takes turns per partner (``_take_turns_replaying``).

Each list endpoint filters through an index and reads a page newest first, stopping at its
limit (``DELIVERY_FILTERS`` says how); each retention purge deletes in small batches, so it
never holds the writer for long.

``History`` is a part of ``store.Store`` (a mixin): it uses the store's ``_transaction``,
``_reader``, ``_in_group_commit`` (and ``_group_commit_soon``) and ``_announce_work``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models import Attempt, AuditEntry, Delivery, InboundEvent, Page
from store_rows import (
    attempt_from_row,
    audit_from_row,
    delivery_from_row,
    inbound_from_row,
    numbered,
    page_of,
    placeholders,
    where_clause,
    write_audit,
)

# A delivery with its event's type and, for a FIFO partner's pending delivery, the head of the
# partner's queue (its ``held_behind`` when that is another delivery). ``{order}`` is the
# insertion order: rowid on SQLite, the seq column on PostgreSQL.
DELIVERY_SELECT = """
    SELECT d.*, e.type AS event,
           CASE WHEN d.state = 'pending' AND p.ordering = 'fifo' THEN (
               SELECT h.id FROM deliveries h WHERE h.partner_id = d.partner_id AND h.state = 'pending'
               ORDER BY h.{order} LIMIT 1) END AS head
    FROM deliveries d JOIN events e ON e.id = d.event_id JOIN partners p ON p.id = d.partner_id
"""

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


class History:
    """The history half of the store (see the module docstring)."""

    _delivery_select: str  # DELIVERY_SELECT in the engine's insertion order
    _UPDATED_MINUTE: str   # SQL: the minute (in seconds since the epoch) a delivery last changed

    # --- Reading and retrying deliveries ---------------------------------------------

    def get_delivery(self, delivery_id: str) -> Delivery | None:
        with self._reader() as db:
            row = db.execute(self._delivery_select + " WHERE d.id = :id", {"id": delivery_id}).fetchone()
            if row is None:
                return None
            attempts = tuple(attempt_from_row(a) for a in db.execute(
                "SELECT * FROM attempts WHERE delivery_id = :id ORDER BY attempt", {"id": delivery_id}))
        return delivery_from_row(row, attempts)

    def event_deliveries(self, event_id: str, *, limit: int) -> list[Delivery]:
        """An event's deliveries, oldest first, each with its attempts (an event's trace)."""
        with self._reader(snapshot=True) as db:
            rows = db.execute(self._delivery_select + " WHERE d.event_id = :id ORDER BY d.id LIMIT :n",
                              {"id": event_id, "n": limit}).fetchall()
            attempts: dict[str, list[Attempt]] = {}
            for a in db.execute("""SELECT a.* FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                                   WHERE d.event_id = :id ORDER BY a.delivery_id, a.attempt""", {"id": event_id}):
                attempts.setdefault(a["delivery_id"], []).append(attempt_from_row(a))
        return [delivery_from_row(r, tuple(attempts.get(r["id"], ()))) for r in rows]

    def audit_for(self, targets: list[str]) -> list[AuditEntry]:
        """The audit entries about these targets (deliveries), oldest first."""
        if not targets:
            return []
        with self._reader() as db:
            rows = db.execute(f"SELECT * FROM audit_log WHERE target IN ({placeholders('t', targets)}) ORDER BY id",
                              numbered("t", targets)).fetchall()
        return [audit_from_row(r) for r in rows]

    def list_deliveries(
        self, *, limit: int, cursor: str | None = None, partner_id: str | None = None,
        state: str | None = None, event: str | None = None, event_id: str | None = None,
    ) -> Page:
        """Deliveries newest first; each filter applies only when given (``DELIVERY_FILTERS``)."""
        sql, params = self._deliveries_query(limit=limit, cursor=cursor, partner_id=partner_id, state=state,
                                             event=event, event_id=event_id)
        with self._reader() as db:
            rows = db.execute(sql, params).fetchall()
        return page_of([delivery_from_row(r) for r in rows], limit)

    def _deliveries_query(self, *, limit: int, **given: Any) -> tuple[str, dict[str, Any]]:
        """``list_deliveries``' statement for the filters ``given`` (None: not given), and its parameters."""
        where, params = where_clause(DELIVERY_FILTERS, given)
        return f"{self._delivery_select} {where} ORDER BY d.id DESC LIMIT :n", {**params, "n": limit + 1}

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
            write_audit(db, audit)
            # An operator's retry probes at once, in every process.
            db.execute("""UPDATE partners SET paused_until = NULL
                          WHERE id = (SELECT partner_id FROM deliveries WHERE id = :id)""", {"id": delivery_id})
            return delivery_from_row(db.execute(self._delivery_select + " WHERE d.id = :id", {"id": delivery_id}).fetchone())

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
            write_audit(db, audit, requeued=requeued)
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
        where, params = where_clause(REPLAY_FILTERS, {"since": since, "until": until, "type": event_type, "after": after})
        skips = REPLAY_SKIPS if include_cancelled else REPLAY_SKIPS + REPLAY_SKIPS_CANCELLED
        with self._transaction() as db:
            self._take_turns_replaying(db, partner_id)
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
            write_audit(db, audit, replayed=len(events))
        if events:
            self._announce_work()
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
                     AND partner_id NOT IN (SELECT id FROM partners WHERE webhook_url = '')  -- pulled, never sent
                   RETURNING partner_id""", {"before": queued_before, "now": now}).fetchall()
        expired: dict[str, int] = {}
        for row in rows:
            expired[row["partner_id"]] = expired.get(row["partner_id"], 0) + 1
        return expired

    def _take_turns_replaying(self, db: Any, partner_id: str) -> None:
        """Make two replays of one partner at once take turns. Nothing to do when the database has
        one writer (SQLite): its transactions take turns already; a shared one locks the partner."""

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
                f"""SELECT {self._UPDATED_MINUTE} * 60
                          AS minute, state, COUNT(*) AS n
                   FROM deliveries WHERE state IN ('delivered', 'failed') AND updated_at >= :since
                   GROUP BY minute, state ORDER BY minute""", {"since": since}).fetchall()
        return [(int(row["minute"]), row["state"], row["n"]) for row in rows]

    def oldest_pending(self, *, exclude: str) -> tuple[str, float] | None:
        """The partner and publish time of the oldest pending delivery of an active partner (but
        ``exclude``): what the backlog alert watches. A scan of the pending rows. A pull-only
        partner's (no URL) wait for it to read them, whenever it likes: no backlog of ours."""
        with self._reader() as db:
            row = db.execute("""SELECT d.partner_id, d.created_at FROM deliveries d JOIN partners p ON p.id = d.partner_id
                                WHERE d.state = 'pending' AND p.status = 'active' AND d.partner_id <> :exclude
                                  AND p.webhook_url <> ''
                                ORDER BY d.created_at LIMIT 1""", {"exclude": exclude}).fetchone()
        return (row["partner_id"], row["created_at"]) if row else None

    # --- Retention ---------------------------------------------------------------------

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
        return self._newest_first("audit_log", AUDIT_FILTERS, audit_from_row, limit,
                                  {"cursor": cursor, "partner_id": partner_id, "action": action})

    def _newest_first(self, table: str, filters: Any, from_row: Any, limit: int, given: dict[str, Any]) -> Page:
        """One page of ``table``, newest first, with only the filters given (so an index serves it)."""
        where, params = where_clause(filters, given)
        with self._reader() as db:
            rows = db.execute(f"SELECT * FROM {table} {where} ORDER BY id DESC LIMIT :n",
                              {**params, "n": limit + 1}).fetchall()
        return page_of([from_row(r) for r in rows], limit)

    # --- Inbound partner events --------------------------------------------------------

    def add_inbound(self, **fields: Any) -> tuple[InboundEvent, bool]:
        """Store an inbound event once per (partner, dedupe key): ``inbound_id``, ``partner_id``,
        ``event_type``, ``dedupe_key``, ``body``, ``now``. Returns ``(event, created)``."""
        return self._in_group_commit(self._inbound_write(**fields))

    def add_inbound_soon(self, *, deadline: float, on_done: Callable[[], None], **fields: Any) -> Any:
        """``add_inbound`` for a caller on an event loop: queued, not waited for (``web.group_written``)."""
        return self._group_commit_soon(self._inbound_write(**fields), None, deadline, on_done)

    @staticmethod
    def _inbound_write(*, inbound_id: str, partner_id: str, event_type: str, dedupe_key: str, body: bytes,
                       now: float) -> InboundWrite:
        """The group commit's work of one inbound event."""
        return InboundWrite(InboundEvent(id=inbound_id, partner_id=partner_id, type=event_type, dedupe_key=dedupe_key,
                                         body=body, received_at=now))

    def list_inbound(self, *, limit: int, cursor: str | None = None, partner_id: str | None = None,
                     event: str | None = None) -> Page:
        return self._newest_first("inbound_events", INBOUND_FILTERS, inbound_from_row, limit,
                                  {"cursor": cursor, "partner_id": partner_id, "event": event})


class InboundWrite:
    """The group commit's work that stores one inbound event once per (partner, dedupe key): ``(the
    event, True)`` when it is new, else (the one stored first, False): a resend.

    ``together`` writes every inbound event of a group commit in one ``INSERT`` (``store.work_together``
    calls it): one statement per batch, not one per event, so the writer thread takes the GIL back
    from a busy event loop once rather than once per event. Its row count says when every event
    was new (nearly always); when not, the ids found tell the new ones from the resends."""

    def __init__(self, event: InboundEvent):
        self.event = event

    def __call__(self, db: Any) -> tuple[InboundEvent, bool]:
        return self.together(db, [self])[0]

    @staticmethod
    def together(db: Any, writes: list[InboundWrite]) -> list[tuple[InboundEvent, bool]]:
        events = [write.event for write in writes]
        params: dict[str, Any] = {}
        for n, e in enumerate(events):
            params.update({f"id{n}": e.id, f"partner{n}": e.partner_id, f"type{n}": e.type, f"key{n}": e.dedupe_key,
                           f"body{n}": e.body, f"now{n}": e.received_at})
        rows = ", ".join(f"(:id{n}, :partner{n}, :type{n}, :key{n}, :body{n}, :now{n})" for n in range(len(events)))
        inserted = db.execute(
            f"""INSERT INTO inbound_events (id, partner_id, type, dedupe_key, body, received_at) VALUES {rows}
                ON CONFLICT (partner_id, dedupe_key) DO NOTHING""", params).rowcount
        if inserted == len(events):  # every one new: the rows are what was just written
            return [(e, True) for e in events]
        ids = [e.id for e in events]
        new = {row["id"] for row in db.execute(f"SELECT id FROM inbound_events WHERE id IN ({placeholders('id', ids)})",
                                               numbered("id", ids))}
        return [(e, True) if e.id in new else (_stored_first(db, e), False) for e in events]


def _stored_first(db: Any, event: InboundEvent) -> InboundEvent:
    """The inbound event stored first under ``event``'s (partner, dedupe key)."""
    row = db.execute("SELECT * FROM inbound_events WHERE partner_id = :p AND dedupe_key = :k",
                     {"p": event.partner_id, "k": event.dedupe_key}).fetchone()
    return inbound_from_row(row)

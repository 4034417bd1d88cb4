"""The partners: their rows, the writes that change them, and the copy every process keeps in memory.

A partner is read far more often than it changes: every publish asks who subscribes, every
delivery attempt asks for the partner's URL and secrets, every inbound event for the secrets
that may verify it. So each process keeps every partner in memory (``_reload_partners``) and
answers those questions without touching the database; the four memory-only methods
(``get_partner``, ``all_partners``, ``paces``, ``partners_accepting_inbound``) are the only
ones of the store that may run on the event loop.

The copy is read again, whole and in one snapshot, after each write that changes a partner
(``_partner_write``), in the thread that wrote, before the write returns: whoever wrote reads
its own write. Other processes on a shared database are told (``tell_partner_changed``) and
read it again at once; they also read it every few seconds by themselves, so a lost hint costs
a delay only. The API key is the exception: it is looked up in the database on every request
(``api_key_owner``), so a reissued key, a deletion or a suspension counts at once everywhere.

``Partners`` is a part of ``store.Store`` (a mixin): it uses the store's ``_transaction``,
``_reader``, ``announce`` (``store_processes.py``) and ``_forget_old_versions`` (each engine's).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from models import AuditEntry, NewEvent, Page, Partner, RetryTerms
from store_processes import PARTNERS_CHANNEL
from store_rows import (
    headers_column,
    numbered,
    page_of,
    partner_from_row,
    placeholders,
    rewrite_audit_urls,
    terms_columns,
    write_audit,
)
from targets import url_origin

logger = logging.getLogger("webhookd.store")

class Partners:
    """The partner half of the store (see the module docstring)."""

    def _start_partners_copy(self) -> None:
        """The empty in-memory copy, filled by ``_reload_partners``."""
        self._partners: dict[str, Partner] = {}  # see _reload_partners
        self._paces: dict[str, float] = {}       # partner -> max_rate_per_s, for the partners that set one
        self._filtered: list[Partner] = []       # the partners with a payload filter
        self._longest_own_timeout_s = 0.0        # the longest timeout_s a partner has of its own
        self.partners_stale = False              # a reload after a write failed (see below)
        self._partners_read_at = 0.0             # when the last reload began (time.monotonic)
        self._partners_lock = threading.Lock()

    # --- Memory only: these never touch the database, so they may run on the event loop ------

    def get_partner(self, partner_id: str) -> Partner | None:
        """One partner (memory only)."""
        return self._partners.get(partner_id)

    def all_partners(self) -> list[Partner]:
        """Every partner, newest first (memory only)."""
        return sorted(self._partners.values(), key=lambda p: p.id, reverse=True)

    def paces(self) -> dict[str, float]:
        """``max_rate_per_s`` of every partner that set one (memory only; the delivery loop asks
        before each claim, so it is kept ready rather than computed)."""
        return self._paces

    def longest_own_timeout_s(self) -> float:
        """The longest ``timeout_s`` of a partner's own retry policy, 0 if none has one (memory
        only: the delivery loop's leases must outlast it)."""
        return self._longest_own_timeout_s

    def partners_accepting_inbound(self) -> list[Partner]:
        """Partners whose secrets may verify an inbound event: all but the disabled and the suspended
        ones (memory only)."""
        return sorted((p for p in self._partners.values() if p.status not in ("disabled", "suspended")),
                      key=lambda p: p.id)

    def _filters_passed(self, event: NewEvent) -> list[str] | None:
        """The partners with a payload filter that this event passes (memory only: filters are
        judged here, in Python, and the publish keeps a filtered partner only if it is named);
        None when no partner has a filter (the statement then need not look)."""
        if not self._filtered:
            return None
        if event.only_partner is not None:
            return []
        payload = json.loads(event.body)
        return [p.id for p in self._filtered if p.accepts(payload)]

    # --- From here on every method reads or writes the database: call it from a thread --------

    def api_key_owner(self, api_key_hash: str) -> tuple[str, str, str | None] | None:
        """The partner whose API key this is: its id, its status and why it was suspended. Read
        from the database on every request, never from memory, so that a reissued key, a deletion
        or a suspension made by any process counts from the very next request."""
        with self._reader() as db:
            row = db.execute(
                "SELECT id, status, suspended_reason FROM partners WHERE api_key_hash = :h", {"h": api_key_hash}
            ).fetchone()
        return (row["id"], row["status"], row["suspended_reason"]) if row else None

    def list_partners(self, *, limit: int, cursor: str | None) -> Page:
        with self._reader() as db:
            rows = db.execute(
                """SELECT id FROM partners WHERE status <> 'deleted' AND (CAST(:cursor AS TEXT) IS NULL OR id < :cursor)
                   ORDER BY id DESC LIMIT :n""",
                {"cursor": cursor, "n": limit + 1},
            ).fetchall()
            partners = [_read_partner(db, r["id"]) for r in rows]
        return page_of(partners, limit)

    # --- Writing partners ---------------------------------------------------------------------

    def add_partner(
        self, *, partner_id: str, name: str, webhook_url: str, events: list[str], secret: str,
        api_key_hash: str, now: float, max_rate_per_s: float | None = None, contact_email: str | None = None,
        channels: list[str] | None = None, payload_filter: dict[str, list[Any]] | None = None,
        ordering: str = "concurrent", retry: RetryTerms | None = None,
        extra_headers: tuple[tuple[str, str], ...] = (), client_cert: str | None = None,
        client_key: str | None = None, audit: AuditEntry | None = None, verification_challenge: str | None = None,
    ) -> Partner:
        """A new partner, active; with ``verification_challenge``, unverified until its endpoint
        echoes it (``verification.py``), in this same transaction: no event can reach it before."""
        with self._partner_write(partner_id) as db:
            db.execute(
                """INSERT INTO partners (id, name, webhook_url, status, secret, api_key_hash,
                                         max_rate_per_s, contact_email, payload_filter, ordering, client_cert,
                                         client_key, created_at, updated_at, verification, verification_challenge,
                                         verification_due_at)
                   VALUES (:id, :name, :url, 'active', :secret, :api_key_hash, :rate, :email, :filter, :ordering,
                           :cert, :key, :now, :now, :verification, :challenge, :due)""",
                {"id": partner_id, "name": name, "url": webhook_url, "secret": secret,
                 "api_key_hash": api_key_hash, "rate": max_rate_per_s, "email": contact_email,
                 "filter": _filter_json(payload_filter), "ordering": ordering, "cert": client_cert,
                 "key": client_key, "now": now,
                 "verification": "unverified" if verification_challenge else None,
                 "challenge": verification_challenge, "due": now if verification_challenge else None},
            )
            _write_subscriptions(db, partner_id, events)
            _write_channels(db, partner_id, channels or [])
            _write_terms(db, partner_id, retry, extra_headers)
            write_audit(db, audit)
            return _read_partner(db, partner_id)  # type: ignore[return-value]

    def update_partner(self, partner_id: str, *, now: float, webhook_url: str | None = None,
                       events: list[str] | None = None, status: str | None = None,
                       max_rate_per_s: float | None = None, reason: str | None = None,
                       contact_email: str | None = None, channels: list[str] | None = None,
                       payload_filter: dict[str, list[Any]] | None = None, ordering: str | None = None,
                       retry: RetryTerms | None = None, extra_headers: tuple[tuple[str, str], ...] | None = None,
                       client_cert: str | None = None, client_key: str | None = None,
                       audit: AuditEntry | None = None,
                       verification_challenge: str | None = None) -> Partner | None:
        """Change what is given; None if there is no such partner. Made active again, a
        partner starts with a clean failure record. ``max_rate_per_s`` 0 removes the pace,
        ``contact_email`` "" the address, and ``payload_filter`` {} the filter.
        ``reason`` goes with ``status="suspended"`` (the admin's why, shown to the partner).
        ``retry`` and ``extra_headers`` replace the partner's own terms (``RetryTerms()`` and ``()``: none).
        ``verification_challenge`` (with a new URL): unverified from this commit on.
        ``client_cert`` and ``client_key`` go together; "" for both removes them."""
        with self._partner_write(partner_id, "reactivated" if status == "active" else "changed") as db:
            if _read_partner(db, partner_id) is None:
                return None
            if webhook_url is not None:
                db.execute("UPDATE partners SET webhook_url = :url WHERE id = :id", {"id": partner_id, "url": webhook_url})
            if verification_challenge is not None:
                restart_verification(db, partner_id, verification_challenge, now)
            if max_rate_per_s is not None:
                db.execute("UPDATE partners SET max_rate_per_s = :rate WHERE id = :id",
                           {"id": partner_id, "rate": max_rate_per_s or None})
            if events is not None:
                _write_subscriptions(db, partner_id, events)
            if contact_email is not None:
                db.execute("UPDATE partners SET contact_email = :email WHERE id = :id",
                           {"id": partner_id, "email": contact_email or None})
            if channels is not None:
                _write_channels(db, partner_id, channels)
            if payload_filter is not None:
                db.execute("UPDATE partners SET payload_filter = :filter WHERE id = :id",
                           {"id": partner_id, "filter": _filter_json(payload_filter)})
            if ordering is not None:
                db.execute("UPDATE partners SET ordering = :ordering WHERE id = :id",
                           {"id": partner_id, "ordering": ordering})
            _write_terms(db, partner_id, retry, extra_headers)
            if client_cert is not None:
                db.execute("UPDATE partners SET client_cert = :cert, client_key = :key WHERE id = :id",
                           {"id": partner_id, "cert": client_cert or None, "key": client_key or None})
            if status is not None:
                db.execute(
                    """UPDATE partners SET status = :status, failing_since = NULL, disabled_reason = NULL,
                                           paused_until = NULL, suspended_reason = :reason
                       WHERE id = :id""", {"id": partner_id, "status": status, "reason": reason})
            db.execute("UPDATE partners SET updated_at = :now WHERE id = :id", {"id": partner_id, "now": now})
            write_audit(db, audit)
            return _read_partner(db, partner_id)

    def rotate_secret(self, partner_id: str, *, new_secret: str, previous_until: float,
                      now: float, revoke_old: bool = False, audit: AuditEntry | None = None) -> Partner | None:
        """Make ``new_secret`` current; the current one stays valid until ``previous_until``
        (``revoke_old``: no old secret stays valid at all)."""
        with self._partner_write(partner_id) as db:
            changed = db.execute(
                """UPDATE partners SET previous_secret = CASE WHEN :revoke THEN NULL ELSE secret END,
                                       previous_secret_until = CASE WHEN :revoke THEN NULL ELSE :until END,
                                       secret = :secret, updated_at = :now
                   WHERE id = :id AND status <> 'deleted'""",
                {"id": partner_id, "secret": new_secret, "until": previous_until, "now": now, "revoke": revoke_old},
            ).rowcount
            if changed:
                write_audit(db, audit)
            return _read_partner(db, partner_id) if changed else None

    def reissue_api_key(self, partner_id: str, *, api_key_hash: str, now: float,
                        audit: AuditEntry | None = None) -> Partner | None:
        """Replace the partner's API key (its hash): the old key stops at once, in every process
        (keys are looked up in the database on every request)."""
        with self._partner_write(partner_id) as db:
            changed = db.execute("""UPDATE partners SET api_key_hash = :hash, updated_at = :now
                                    WHERE id = :id AND status <> 'deleted'""",
                                 {"id": partner_id, "hash": api_key_hash, "now": now}).rowcount
            if changed:
                write_audit(db, audit)
            return _read_partner(db, partner_id) if changed else None

    def delete_partner(self, partner_id: str, *, now: float, audit: AuditEntry | None = None) -> int | None:
        """Delete a partner; how many of its deliveries were cancelled, or None if there is no such
        partner (or it is deleted already).

        At once: its secrets, API key, URL and subscriptions are erased (its signatures stop
        verifying, its key stops working, nothing more is published to it), and its pending and
        expired deliveries end ``cancelled``, never sent. An attempt already on the wire finishes,
        but its result is not recorded. The row stays as a tombstone (``status = 'deleted'``, its
        name) so the history and the audit trail still say whose it was; the retention purge
        removes its history at ``retention.max_age_s`` like everyone's, then the tombstone. The URLs
        its attempts and audit entries kept are cut down to their origin (``https://x/…``)."""
        with self._partner_write(partner_id, "deleted") as db:
            if not db.execute(
                    """UPDATE partners SET status = 'deleted', secret = '', previous_secret = NULL,
                                           previous_secret_until = NULL, api_key_hash = :tombstone,
                                           webhook_url = '', contact_email = NULL, payload_filter = NULL,
                                           extra_headers = NULL,
                                           client_cert = NULL, client_key = NULL,
                                           failing_since = NULL, paused_until = NULL,
                                           updated_at = :now
                       WHERE id = :id AND status <> 'deleted'""",
                    {"id": partner_id, "tombstone": f"deleted:{partner_id}", "now": now}).rowcount:
                return None
            db.execute("DELETE FROM subscriptions WHERE partner_id = :id", {"id": partner_id})
            db.execute("DELETE FROM partner_channels WHERE partner_id = :id", {"id": partner_id})
            cancelled = _cancel(db, partner_id, ("pending", "expired"), now)
            _forget_partner_urls(db, partner_id)
            write_audit(db, audit, cancelled_deliveries=cancelled)
        self._forget_old_versions()
        return cancelled

    def cancel_pending(self, partner_id: str, *, now: float, audit: AuditEntry | None = None) -> int | None:
        """End every pending delivery of the partner ``cancelled`` (never sent; in flight: its result
        is not recorded). How many; None if there is no such partner."""
        with self._transaction() as db:
            if _read_partner(db, partner_id) is None:
                return None
            cancelled = _cancel(db, partner_id, ("pending",), now)
            write_audit(db, audit, cancelled_deliveries=cancelled)
            return cancelled

    def ensure_system_partner(self, partner_id: str, *, name: str, url: str, secret: str, now: float) -> None:
        """A partner of webhookd's own (the alerts' receiver), made to match the config: created,
        or its URL and secret set again, and active. It has no usable API key."""
        with self._partner_write(partner_id) as db:
            db.execute(
                """INSERT INTO partners (id, name, webhook_url, status, secret, api_key_hash, created_at, updated_at)
                   VALUES (:id, :name, :url, 'active', :secret, :key, :now, :now)
                   ON CONFLICT (id) DO UPDATE SET name = :name, webhook_url = :url, secret = :secret,
                                                  status = 'active', updated_at = :now""",
                {"id": partner_id, "name": name, "url": url, "secret": secret, "key": f"system:{partner_id}",
                 "now": now})

    @contextmanager
    def _partner_write(self, partner_id: str, action: str = "changed") -> Iterator[Any]:
        """A transaction that changes a partner; the in-memory copy is read again after its
        commit, and the other processes are told (``tell_partner_changed``)."""
        with self._transaction() as db:
            yield db
        self._reload_partners_after_write()
        self.tell_partner_changed(partner_id, action)

    def tell_partner_changed(self, partner_id: str, action: str = "changed") -> None:
        """Tell every process on the database (``PARTNERS_CHANNEL``) that a partner changed, so it
        reads the partners again at once rather than at its next poll; ``action`` "probe" or
        "reactivated" is an operator's reset that each process applies to its own breaker. (A
        store of one process has nobody to tell: its ``announce`` does nothing.)"""
        self.announce(PARTNERS_CHANNEL, json.dumps({"partner_id": partner_id, "action": action}))

    def _reload_partners_after_write(self) -> None:
        """Reload after a commit. The write is on disk whatever happens here, so a failed
        reload must not fail it: it is logged and ``partners_stale`` set, and the delivery loop
        (from a thread) calls ``reload_partners`` again."""
        try:
            self._reload_partners()
        except Exception:
            self.partners_stale = True
            logger.exception("reading partners into memory failed; the delivery loop will try again")

    def reload_partners(self, at_most_every_s: float = 0.0) -> None:
        """Read the partners again: after a reload that failed (``partners_stale``), or because
        on PostgreSQL another process changed them (a registration, a pause, a rotation, a
        circuit it opened). From a thread. ``at_most_every_s``: not if the last reload began
        less than that ago (a caller anyone can trigger, such as an unknown partner id)."""
        if time.monotonic() - self._partners_read_at >= at_most_every_s:
            self._reload_partners()

    def _reload_partners(self) -> None:
        """Read every partner into memory, in one read transaction.

        Runs in the thread that has just written (or in ``__init__``), never on the event
        loop, and before that write returns: whoever wrote reads its own write. Reloads
        take turns, so the last one to finish read after every commit before it. Readers
        keep the previous copy until the new one is complete. (Several processes on one
        database would need a time limit on this copy too.)
        """
        with self._partners_lock:
            self._partners_read_at = time.monotonic()
            with self._reader(snapshot=True) as db:
                rows = db.execute("SELECT * FROM partners WHERE status <> 'deleted'").fetchall()
                events: dict[str, list[str]] = {}
                for sub in db.execute("SELECT partner_id, event_type FROM subscriptions ORDER BY event_type"):
                    events.setdefault(sub["partner_id"], []).append(sub["event_type"])
                channels: dict[str, list[str]] = {}
                for c in db.execute("SELECT partner_id, channel FROM partner_channels ORDER BY channel"):
                    channels.setdefault(c["partner_id"], []).append(c["channel"])
            self._partners = {row["id"]: partner_from_row(row, tuple(events.get(row["id"], ())),
                                                           tuple(channels.get(row["id"], ()))) for row in rows}
            self._filtered = [p for p in self._partners.values() if p.payload_filter]
            self._paces = {p.id: p.max_rate_per_s for p in self._partners.values() if p.max_rate_per_s}
            self._longest_own_timeout_s = max((p.retry.timeout_s or 0.0 for p in self._partners.values()), default=0.0)
            self.partners_stale = False


def restart_verification(db: Any, partner_id: str, challenge: str, now: float) -> None:
    """Make the partner unverified with a new challenge, its first request due now (``verification.py``)."""
    db.execute("""UPDATE partners SET verification = 'unverified', verification_challenge = :challenge,
                                      verification_attempts = 0, verification_due_at = :now,
                                      verification_error = NULL, verified_at = NULL
                  WHERE id = :id""", {"id": partner_id, "challenge": challenge, "now": now})


def _read_partner(db: Any, partner_id: str) -> Partner | None:
    row = db.execute("SELECT * FROM partners WHERE id = :id AND status <> 'deleted'", {"id": partner_id}).fetchone()
    if row is None:
        return None
    events = tuple(r["event_type"] for r in db.execute(
        "SELECT event_type FROM subscriptions WHERE partner_id = :id ORDER BY event_type",
        {"id": partner_id}))
    channels = tuple(r["channel"] for r in db.execute(
        "SELECT channel FROM partner_channels WHERE partner_id = :id ORDER BY channel", {"id": partner_id}))
    return partner_from_row(row, events, channels)


def _cancel(db: Any, partner_id: str, states: tuple[str, ...], now: float) -> int:
    """End the partner's deliveries in ``states`` as ``cancelled``; how many."""
    return db.execute(
        f"""UPDATE deliveries SET state = 'cancelled', leased_until = NULL, updated_at = :now
            WHERE partner_id = :id AND state IN ({placeholders('state', list(states))})""",
        {"id": partner_id, "now": now, **numbered("state", list(states))}).rowcount


def _forget_partner_urls(db: Any, partner_id: str) -> None:
    """A deleted partner's URLs, cut down to their origin (``https://x/…``) wherever a record kept
    them — its attempts and its audit entries: besides the query, a path may hold a token too."""
    kept = db.execute("""SELECT DISTINCT a.url FROM attempts a JOIN deliveries d ON d.id = a.delivery_id
                         WHERE d.partner_id = :id AND a.url IS NOT NULL""", {"id": partner_id}).fetchall()
    for row in kept:
        db.execute("""UPDATE attempts SET url = :origin
                      WHERE url = :url AND delivery_id IN (SELECT id FROM deliveries WHERE partner_id = :id)""",
                   {"id": partner_id, "url": row["url"], "origin": url_origin(row["url"])})
    rewrite_audit_urls(db, "SELECT id, changes FROM audit_log WHERE partner_id = :id", {"id": partner_id},
                        url_origin)



def _write_subscriptions(db: Any, partner_id: str, events: list[str]) -> None:
    db.execute("DELETE FROM subscriptions WHERE partner_id = :id", {"id": partner_id})
    db.executemany(
        "INSERT INTO subscriptions (partner_id, event_type) VALUES (:id, :type)",
        [{"id": partner_id, "type": t} for t in sorted(set(events))],
    )


def _write_channels(db: Any, partner_id: str, channels: list[str]) -> None:
    db.execute("DELETE FROM partner_channels WHERE partner_id = :id", {"id": partner_id})
    db.executemany("INSERT INTO partner_channels (partner_id, channel) VALUES (:id, :channel)",
                   [{"id": partner_id, "channel": c} for c in sorted(set(channels))])


def _write_terms(db: Any, partner_id: str, retry: RetryTerms | None,
                 extra_headers: tuple[tuple[str, str], ...] | None) -> None:
    """A partner's own terms (``partner_terms.py``), each written if given."""
    if retry is not None:
        db.execute("UPDATE partners SET retry_policy = :retry_policy, max_attempts = :max_attempts WHERE id = :id",
                   {"id": partner_id, **terms_columns(retry)})
    if extra_headers is not None:
        db.execute("UPDATE partners SET extra_headers = :headers WHERE id = :id",
                   {"id": partner_id, "headers": headers_column(extra_headers)})


def _filter_json(payload_filter: dict[str, list[Any]] | None) -> str | None:
    return json.dumps(payload_filter, sort_keys=True) if payload_filter else None



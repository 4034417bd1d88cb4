"""Endpoint verification in the store: the rows behind ``verification.py``.

A partner's ``verification`` column is null (never asked for), ``unverified`` or ``verified``.
While it is ``unverified`` the claim's search (``store.PENDING_PARTNERS``) passes the partner by,
so its deliveries wait; the verifier sends the challenge kept in ``verification_challenge`` and
writes what came back here.

The verifier claims a partner's next request as the delivery loop claims a delivery: a conditional
update moves its due time to a lease's end, so on a shared database (PostgreSQL) one process sends
it, and a process that dies mid-request leaves it due again when the lease runs out. A result is
written only if the challenge it answered is still the current one: a new URL or a new request for
verification made meanwhile has a challenge of its own, and an answer to the old one proves nothing.

``Verifications`` is a part of ``store.Store`` (a mixin): it uses the store's ``_transaction``,
``_reader`` and ``_partner_write`` (``store_partners.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from models import AuditEntry, Partner, valid_secrets
from store_partners import _read_partner, restart_verification
from store_rows import write_audit


@dataclass(frozen=True)
class DueVerification:
    """One verification request claimed for sending: where it goes, what it carries, what signs it."""

    partner_id: str
    url: str
    challenge: str
    attempt: int              # the number of the request about to be sent for this challenge, from 1
    secrets: tuple[str, ...]  # the partner's valid secrets: it is signed like any delivery


class Verifications:
    """The verification half of the partners' rows (see the module docstring)."""

    def claim_verifications(self, *, now: float, lease_s: float, limit: int) -> list[DueVerification]:
        """Lease the due requests of active, unverified partners (at most ``limit``, oldest due first)."""
        claimed = []
        with self._transaction(durable=False) as db:
            rows = db.execute(
                """SELECT id, webhook_url, verification_challenge, verification_attempts, verification_due_at,
                          secret, previous_secret, previous_secret_until
                   FROM partners
                   WHERE verification = 'unverified' AND status = 'active' AND verification_due_at <= :now
                   ORDER BY verification_due_at LIMIT :limit""", {"now": now, "limit": limit}).fetchall()
            for row in rows:
                if db.execute("""UPDATE partners SET verification_due_at = :lease
                                 WHERE id = :id AND verification = 'unverified' AND verification_due_at = :due
                                   AND verification_challenge = :challenge""",
                              {"id": row["id"], "lease": now + lease_s, "due": row["verification_due_at"],
                               "challenge": row["verification_challenge"]}).rowcount:
                    secrets = valid_secrets(row["secret"], row["previous_secret"], row["previous_secret_until"], now)
                    claimed.append(DueVerification(row["id"], row["webhook_url"], row["verification_challenge"],
                                                   row["verification_attempts"] + 1, tuple(secrets)))
        return claimed

    def record_verification(self, partner_id: str, *, challenge: str, now: float, error: str | None,
                            due_at: float | None, audit: AuditEntry) -> bool:
        """Write one request's result: verified (``error`` None), or unverified with the reason and
        when the next request goes (``due_at`` None: no more; the partner or the admin asks again).
        False, and nothing written, if ``challenge`` is no longer the partner's current one."""
        passed = error is None
        with self._partner_write(partner_id) as db:
            changed = db.execute(
                """UPDATE partners SET verification = :state, verification_attempts = verification_attempts + 1,
                                       verification_tried_at = :now, verification_error = :error,
                                       verification_due_at = :due, verified_at = :verified_at,
                                       verification_challenge = :kept
                   WHERE id = :id AND verification = 'unverified' AND verification_challenge = :challenge""",
                {"id": partner_id, "state": "verified" if passed else "unverified", "now": now, "error": error,
                 "due": None if passed else due_at, "verified_at": now if passed else None,
                 "kept": None if passed else challenge, "challenge": challenge}).rowcount
            if changed:
                write_audit(db, audit)
        return bool(changed)

    def request_verification(self, partner_id: str, *, challenge: str, now: float,
                             audit: AuditEntry) -> Partner | None:
        """A new challenge for the partner, sent now; unverified until its endpoint echoes it.
        None if there is no such partner."""
        with self._partner_write(partner_id) as db:
            if _read_partner(db, partner_id) is None:
                return None
            restart_verification(db, partner_id, challenge, now)
            write_audit(db, audit)
            return _read_partner(db, partner_id)

    def next_verification_at(self) -> float | None:
        """When the next verification request is due (a lease's end for one being sent), or None."""
        with self._reader() as db:
            row = db.execute("""SELECT MIN(verification_due_at) AS due FROM partners
                                WHERE verification = 'unverified' AND status = 'active'""").fetchone()
        return row["due"]

    def lift_verification_gate(self, now: float, audit_for: Any) -> list[str]:
        """Verification turned off in the config: every unverified partner receives its events again
        (nothing would ever verify it). The ids lifted; ``audit_for(partner_id)`` is each one's entry."""
        with self._transaction() as db:
            ids = [r["id"] for r in db.execute(
                "SELECT id FROM partners WHERE verification = 'unverified' ORDER BY id").fetchall()]
            for partner_id in ids:
                db.execute("""UPDATE partners SET verification = NULL, verification_challenge = NULL,
                                                  verification_due_at = NULL, updated_at = :now
                              WHERE id = :id""", {"id": partner_id, "now": now})
                write_audit(db, audit_for(partner_id))
        if ids:
            self._reload_partners_after_write()
            for partner_id in ids:
                self.tell_partner_changed(partner_id)
        return ids

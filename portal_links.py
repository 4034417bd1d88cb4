"""Portal links: a short-lived, single-partner link to ``/portal`` that the operator hands out.

``POST /partners/{id}/portal-link`` (admin; ``webhookd partners portal-link ID``) answers a URL
like ``https://hooks.example.com/portal#token=ptl_…``. The token is in the URL's fragment, which a
browser never sends: no proxy, load balancer or access log ever sees it. The portal reads it,
takes it out of the address bar, and sends it as its bearer token, so a partner sees its
deliveries without ever handling its API key.

A token is ``ptl_<partner id>.<expiry>.<read-only 0|1>.<MAC>``. The MAC is HMAC-SHA256, with a
key only this server holds, of those three fields and the partner's current API-key hash. So:

* nobody can forge one or change its partner, expiry or read-only flag (the MAC stops matching);
* it stops at its expiry (``lifetime_s``: 60 s to 7 days, 1 hour unless asked);
* reissuing the partner's API key revokes every link minted before (the hash it was bound to is
  gone), as does deleting the partner; a suspension makes it read-only like the key itself;
* a read-only link reads everything the partner's key reads and writes nothing (403).

The key is 32 random bytes made at first use and kept in the database (table ``server_keys``),
so every process sharing the database checks the links every other one mints, and a restart
keeps them valid. It is as private as the partners' secrets beside it: a backup holds both.

This module knows tokens and the key, nothing of HTTP: ``web.authenticate`` asks it who a
token's bearer is, and ``webhookd.py`` serves the route that mints one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import weakref
from dataclasses import dataclass
from typing import Any

from models import AuditEntry
from store import Store
from store_rows import write_audit

PREFIX = "ptl_"
MIN_LIFETIME_S = 60
MAX_LIFETIME_S = 7 * 86400
DEFAULT_LIFETIME_S = 3600
KEY_NAME = "portal_links"


class Refused(Exception):
    """A token that opens nothing: ``code`` and a message for the person holding the link."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


EXPIRED = ("portal_link_expired", "This portal link has expired. Ask the operator for a new one.")
READ_ONLY = ("read_only_link", "This portal link is read-only: it shows everything and changes nothing. Ask "
                               "the operator for a link that may make changes.")
INVALID = ("portal_link_invalid", "This portal link is not valid: it was altered, or it was revoked when the "
                                  "partner's API key was reissued. Ask the operator for a new one.")


@dataclass(frozen=True)
class Link:
    """Who a valid token's bearer is: its partner, and whether it may only read."""

    partner_id: str
    read_only: bool
    suspended: str | None  # why, when the partner is suspended: then it may only read, like its key


def mint(store: Store, partner_id: str, *, expires_at: int, read_only: bool,
         audit: AuditEntry | None = None) -> str | None:
    """A token for ``partner_id`` valid until ``expires_at`` (unix seconds), bound to its API key's
    hash as it is now, and ``audit`` written; None if there is no such partner (or it was deleted)."""
    key = signing_key(store)
    with store._transaction() as db:
        partner = db.execute("SELECT api_key_hash, status FROM partners WHERE id = :id", {"id": partner_id}).fetchone()
        if partner is None or partner["status"] == "deleted":
            return None
        write_audit(db, audit)
    fields = f"{partner_id}.{expires_at}.{int(read_only)}"
    return f"{PREFIX}{fields}.{_mac(key, fields, partner['api_key_hash'])}"


def lifetime_and_access(fields: dict[str, Any]) -> tuple[int, bool]:
    """A mint request's ``lifetime_s`` and ``read_only``, or ``ValueError(field, what it must be)``."""
    lifetime = fields.get("lifetime_s", DEFAULT_LIFETIME_S)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or not MIN_LIFETIME_S <= lifetime <= MAX_LIFETIME_S:
        raise ValueError("lifetime_s", f"must be a whole number of seconds from {MIN_LIFETIME_S} to {MAX_LIFETIME_S} "
                                       f"(7 days); leave it out for {DEFAULT_LIFETIME_S} (1 hour).")
    read_only = fields.get("read_only", False)
    if not isinstance(read_only, bool):
        raise ValueError("read_only", "must be true or false (leave it out for false).")
    return lifetime, read_only


def check(store: Store, token: str, now: float) -> Link:
    """Who the bearer of ``token`` is, or ``Refused``: expired, or not valid (forged, altered, or
    revoked by a key reissue or the partner's deletion: a forgery cannot be told from those)."""
    parts = token[len(PREFIX):].split(".")
    if len(parts) != 4 or not parts[1].isdigit() or len(parts[1]) > 12 or parts[2] not in ("0", "1"):
        raise Refused(*INVALID)
    partner_id, expires_at, read_only, given = parts
    partner, key = _partner_key(store, partner_id), signing_key(store, create=False)
    if partner is None or key is None:  # no such partner, or no link was ever minted here
        raise Refused(*INVALID)
    expected = _mac(key, f"{partner_id}.{expires_at}.{read_only}", partner["api_key_hash"])
    if not hmac.compare_digest(given.encode("ascii", "replace"), expected.encode("ascii")):
        raise Refused(*INVALID)
    if now >= int(expires_at):
        raise Refused(*EXPIRED)
    suspended = (partner["suspended_reason"] or "no reason given") if partner["status"] == "suspended" else None
    return Link(partner_id, read_only == "1", suspended)


def _mac(key: bytes, fields: str, api_key_hash: str) -> str:
    digest = hmac.new(key, f"{fields}.{api_key_hash}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _partner_key(store: Store, partner_id: str) -> Any:
    """The partner's API-key hash and status, read from the database on every request (as an API
    key is), so a reissue or a deletion by any process counts at once."""
    with store._reader() as db:
        return db.execute("SELECT api_key_hash, status, suspended_reason FROM partners WHERE id = :id",
                          {"id": partner_id}).fetchone()


# --- The key ------------------------------------------------------------------------------------

_keys: weakref.WeakKeyDictionary[Store, bytes] = weakref.WeakKeyDictionary()  # each store's key, read once


def signing_key(store: Store, create: bool = True) -> bytes | None:
    """The key that signs portal links: made once (32 random bytes) and kept in ``server_keys``;
    whichever process makes it first, every process then reads the same. Checking a token never
    makes it (``create=False``: None until a link was minted)."""
    known = _keys.get(store)
    if known is None and not create:
        with store._reader() as db:
            row = db.execute("SELECT value FROM server_keys WHERE name = :name", {"name": KEY_NAME}).fetchone()
        if row is not None:
            known = _keys[store] = bytes.fromhex(row["value"])
    elif known is None:
        with store._transaction() as db:
            db.execute("""INSERT INTO server_keys (name, value, created_at) VALUES (:name, :value, :now)
                          ON CONFLICT (name) DO NOTHING""",
                       {"name": KEY_NAME, "value": secrets.token_hex(32), "now": time.time()})
            row = db.execute("SELECT value FROM server_keys WHERE name = :name", {"name": KEY_NAME}).fetchone()
        known = _keys[store] = bytes.fromhex(row["value"])
    return known

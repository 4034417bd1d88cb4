"""Pulling instead of receiving: ``GET /partners/{id}/events?cursor=&limit=``.

A partner that cannot open an inbound port reads its events instead of receiving them, and a
partner that does receive them checks that it missed nothing. Each item carries the headers
the push would have carried (``sender.build_headers``, signed now with the partner's valid
secrets) and the body bytes exactly as stored, so the partner guide's verification code
works unchanged on a pulled event.

Top to bottom:

1. **Who pulls.** A partner registered with ``"delivery": "pull"`` has no URL (kept internally
   as an empty string; the API shows ``"webhook_url": null``): the delivery loop never claims
   its deliveries (``store.PENDING_PARTNERS``), the expiry sweep and the backlog alert leave them
   alone (``store_history.py``). They stay ``pending`` until pulled. Given a URL, it is push.
2. **The cursor.** Opaque: base64 of the last delivery id read. Items come in delivery id
   order (ids sort by creation time). ``START`` is the cursor before every item. A cursor whose
   delivery is gone (purged by retention) answers 410 with ``START``: what came after it may
   be gone too.
3. **The read.** Without a cursor, a pull-only partner's own key *takes* its events: the oldest
   pending ones, which become ``delivered`` in the same transaction, so a second poll continues
   where the last one ended (the server keeps the place; a delivery committed late is still
   pending and comes in the next poll, never skipped); while the partner is not active, that is
   a 409. With a cursor, anyone reads on from it; the pull-only partner's key also marks the
   pending ones it reads delivered. Everyone else (the admin, a push partner) only reads: no
   state changes, and no cursor means from the start.
4. **The item.** Metadata, signed headers, the body as a string; an event whose content was
   erased shows its metadata with ``"body": null`` and no signature.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from models import Job, Partner
from sender import build_headers
from web import ApiError, caller_of, context, cursor_text, db, error_body, invalid, owned_partner, page_params

if TYPE_CHECKING:
    from store import Store

DELIVERY_MODES = ("push", "pull")
START = "dlv_" + "0" * 21  # before every delivery id: read from the oldest kept
_DELIVERY_ID = re.compile(r"dlv_[0-9a-z]{21}")


# --- 1. Who pulls --------------------------------------------------------------------------


def delivery_mode(partner: Partner) -> str:
    """``pull`` for a partner registered without a URL, else ``push``."""
    return "push" if partner.webhook_url else "pull"


def check_delivery(value: Any, webhook_url: Any) -> str:
    """Registration's ``delivery``: ``push`` (the default; ``webhook_url`` required, checked by
    ``partners.check_webhook_url``) or ``pull`` (no ``webhook_url``: the partner polls)."""
    if value not in DELIVERY_MODES:
        raise invalid("delivery", "must be 'push' (we POST to your webhook_url) or 'pull' "
                                  "(you read GET /partners/{id}/events; no webhook_url).")
    if value == "pull" and webhook_url is not None:
        raise invalid("webhook_url", "must be left out with \"delivery\": \"pull\": a pull-only partner "
                                     "reads its events and has no URL.")
    return value


# --- 2. The cursor ---------------------------------------------------------------------------


def read_cursor(request: Request) -> tuple[int, str | None]:
    """``?limit=`` (1-200, default 50) and ``?cursor=`` as a delivery id (None: not given)."""
    limit, cursor = page_params(request)
    if cursor is not None and not _DELIVERY_ID.fullmatch(cursor):
        raise invalid("cursor", "is not a cursor of this partner's events. Use next_cursor from the previous "
                                "answer, or leave it out.")
    return limit, cursor


def cursor_gone(start_cursor: str) -> JSONResponse:
    """The 410 for a cursor whose delivery was purged: say where reading may start again."""
    body = error_body("cursor_expired", "This cursor points at an event older than the server keeps (retention "
                                        "purged it), so events after it may be gone too. Read again from "
                                        "start_cursor, the oldest events kept.")
    body["error"]["start_cursor"] = start_cursor
    return JSONResponse(body, status_code=410)


# --- 3. The read -----------------------------------------------------------------------------

# A page of a partner's events: through deliveries_by_partner (partner_id, id), or, for a take, its
# pending rows alone through deliveries_pending_order (SQLite keeps no statistics and would rather walk
# every partner's pending rows through deliveries_by_state; PostgreSQL picks that index itself).
_ITEMS = """
    SELECT d.id, d.event_id, d.state, e.type, e.body, e.created_at AS published_at
    FROM deliveries d {indexed} JOIN events e ON e.id = d.event_id
    WHERE d.partner_id = :partner_id AND d.id > :after {only_pending}
    ORDER BY d.id LIMIT :n
"""


def items_query(store: Store, pending_only: bool) -> str:
    if not pending_only:
        return _ITEMS.format(indexed="", only_pending="")
    hint = "" if store.shared else "INDEXED BY deliveries_pending_order"
    return _ITEMS.format(indexed=hint, only_pending="AND d.state = 'pending'")


async def partner_events(request: Request) -> JSONResponse:
    """``GET /partners/{id}/events``: the partner's events in order, each as it would have been
    pushed; ``next_cursor`` reads on, ``has_more`` says whether more is waiting now."""
    limit, cursor = read_cursor(request)
    partner = await owned_partner(request)
    ctx = context(request)
    takes = hands_over(partner, caller_of(request), cursor)
    if cursor is not None and cursor != START and not await db(delivery_exists, ctx.store, partner.id, cursor):
        return cursor_gone(cursor_text(START))
    now = ctx.clock()
    rows, has_more = await db(read_events, ctx.store, partner.id, after=cursor or START, limit=limit,
                              pending_only=takes and cursor is None, mark_delivered=takes, now=now)
    taken = sum(1 for row in rows if row["taken"])
    if taken:
        ctx.metrics.deliveries.inc(taken, partner=partner.id, outcome="delivered")
    if rows:
        last = rows[-1]["id"]
    elif cursor is None and takes:  # nothing new: on from the newest delivery already handed over
        last = await db(newest_delivery, ctx.store, partner.id) or START
    else:
        last = cursor or START
    return JSONResponse({"items": [item_json(row, partner, now) for row in rows], "next_cursor": cursor_text(last),
                         "has_more": has_more})


def hands_over(partner: Partner, caller: Any, cursor: str | None) -> bool:
    """Whether this read hands the events over (they become delivered): a pull-only partner's own
    key, while the partner is active. Not active, its poll without a cursor is a 409; the admin's
    reads and a push partner's change nothing."""
    if delivery_mode(partner) != "pull" or caller.is_admin:
        return False
    if partner.status != "active" and cursor is None:
        raise ApiError(409, "partner_not_active", f"Partner {partner.id} is {partner.status}: no events are "
                                                  "handed out until it is active again. Read what was handed out "
                                                  "already with ?cursor=.")
    return partner.status == "active"


def delivery_exists(store: Store, partner_id: str, delivery_id: str) -> bool:
    with store._reader() as conn:
        return conn.execute("SELECT 1 FROM deliveries WHERE id = :id AND partner_id = :partner_id",
                            {"id": delivery_id, "partner_id": partner_id}).fetchone() is not None


def newest_delivery(store: Store, partner_id: str) -> str | None:
    with store._reader() as conn:
        row = conn.execute("SELECT MAX(id) FROM deliveries WHERE partner_id = :partner_id",
                           {"partner_id": partner_id}).fetchone()
    return row[0] if row else None


def read_events(store: Store, partner_id: str, *, after: str, limit: int, pending_only: bool, mark_delivered: bool,
                now: float) -> tuple[list[dict[str, Any]], bool]:
    """Up to ``limit`` of the partner's deliveries after ``after``, oldest first, and whether more
    follow. With ``mark_delivered``, the pending ones among them become ``delivered`` in the same
    transaction; with ``pending_only`` only those that did are returned (two polls at once never
    hand out the same delivery twice)."""
    sql = items_query(store, pending_only)
    params = {"partner_id": partner_id, "after": after, "n": limit + 1}
    if not mark_delivered:
        with store._reader() as conn:
            rows = [_row(r) for r in conn.execute(sql, params).fetchall()]
        return rows[:limit], len(rows) > limit
    with store._transaction() as conn:
        rows = [_row(r) for r in conn.execute(sql, params).fetchall()]
        for row in rows[:limit]:
            row["taken"] = row["state"] == "pending" and conn.execute(
                """UPDATE deliveries SET state = 'delivered', leased_until = NULL, updated_at = :now
                   WHERE id = :id AND state = 'pending' AND (leased_until IS NULL OR leased_until <= :now)""",
                {"id": row["id"], "now": now}).rowcount > 0
            if row["taken"]:
                row["state"] = "delivered"
    kept = [row for row in rows[:limit] if row["taken"] or not pending_only]
    return kept, len(rows) > limit


def _row(row: Any) -> dict[str, Any]:
    body = row["body"]
    return {"id": row["id"], "event_id": row["event_id"], "state": row["state"], "type": row["type"],
            "body": bytes(body) if body else None, "published_at": row["published_at"], "taken": False}


# --- 4. The item -----------------------------------------------------------------------------


def item_json(row: dict[str, Any], partner: Partner, now: float) -> dict[str, Any]:
    """One pulled event: its ids and state, the headers its push would carry, its body as text."""
    item = {"delivery_id": row["id"], "event_id": row["event_id"], "event": row["type"],
            "published_at": int(row["published_at"]), "delivery_state": row["state"]}
    if row["body"] is None:  # its content was erased: the metadata stays, nothing to sign
        return {**item, "headers": {"X-Webhook-Event": row["type"], "X-Webhook-Id": row["event_id"],
                                    "webhook-id": row["event_id"]}, "body": None, "content_erased": True}
    job = Job(delivery_id=row["id"], event_id=row["event_id"], event=row["type"], partner_id=partner.id,
              url="", secrets=tuple(partner.valid_secrets(now)), body=row["body"], attempt=0, max_attempts=0)
    return {**item, "headers": build_headers(job, int(now)), "body": row["body"].decode("utf-8")}

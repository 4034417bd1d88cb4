"""Rows in and out: how a row of the store becomes one of the small frozen objects of
``models.py``, and the few pieces every part of the store builds its statements with.

Each table has one ``..._from_row`` function, the only place that knows its columns' names
(a row is read by column name on both engines). Then the helpers of the list endpoints — a
``WHERE`` of the filters given, a page cut at its limit, numbered placeholders for an
``IN (…)`` — and the writing of an audit entry, which every change an admin or a partner makes
records in its own transaction, its URLs without their query (a query may hold a token).

This is the lowest of the store's files: it imports nothing of the others.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from models import Attempt, AuditEntry, Delivery, Event, InboundEvent, Job, Page, Partner, RetryTerms, Verification
from partner_terms import own_terms_json
from targets import redacted_url

# --- Rows to objects ------------------------------------------------------------------------

def partner_from_row(row: Any, events: tuple[str, ...], channels: tuple[str, ...] = ()) -> Partner:
    return Partner(
        id=row["id"], name=row["name"], webhook_url=row["webhook_url"], status=row["status"],
        events=events, secret=row["secret"], previous_secret=row["previous_secret"],
        previous_secret_until=row["previous_secret_until"],
        created_at=row["created_at"], updated_at=row["updated_at"],
        failing_since=row["failing_since"], disabled_reason=row["disabled_reason"],
        max_rate_per_s=row["max_rate_per_s"], paused_until=row["paused_until"],
        suspended_reason=row["suspended_reason"], contact_email=row["contact_email"], channels=channels,
        payload_filter=json.loads(row["payload_filter"]) if row["payload_filter"] else None, ordering=row["ordering"],
        retry=terms_from_column(row["retry_policy"]), extra_headers=headers_from_column(row["extra_headers"]),
        verification=verification_from_row(row),
        client_cert=row["client_cert"], client_key=row["client_key"],
    )


def terms_columns(terms: RetryTerms) -> dict[str, Any]:
    """The columns of a partner's own retry policy (``partner_terms.py``): ``retry_policy``, the JSON
    of its own settings, and ``max_attempts``, its own number of attempts (a publish's statement reads it)."""
    own = own_terms_json(terms)
    return {"retry_policy": json.dumps(own, sort_keys=True) if own else None, "max_attempts": terms.max_attempts}


def terms_from_column(text: str | None) -> RetryTerms:
    own = json.loads(text) if text else {}
    return RetryTerms(**{**own, "schedule": tuple(own["schedule"]) if own.get("schedule") else None})


def headers_column(headers: tuple[tuple[str, str], ...]) -> str | None:
    """A partner's extra headers as stored: a JSON object, in the partners table beside its secret."""
    return json.dumps(dict(headers)) if headers else None


def headers_from_column(text: str | None) -> tuple[tuple[str, str], ...]:
    return tuple(json.loads(text).items()) if text else ()


def verification_from_row(row: Any) -> Verification | None:
    """A partner's endpoint verification (None: never asked for), without its challenge."""
    if row["verification"] is None:
        return None
    return Verification(state=row["verification"], attempts=row["verification_attempts"],
                        due_at=row["verification_due_at"], tried_at=row["verification_tried_at"],
                        error=row["verification_error"], verified_at=row["verified_at"])


def event_from_row(row: Any) -> Event:
    return Event(
        id=row["id"], type=row["type"], body=bytes(row["body"]), fanout=row["fanout"],
        created_at=row["created_at"], idempotency_key=row["idempotency_key"],
        request_hash=row["request_hash"], audience=json.loads(row["audience"]) if row["audience"] else None,
        traceparent=row["traceparent"], tracestate=row["tracestate"],
        erased_at=row["erased_at"],
    )


def delivery_from_row(row: Any, attempts: tuple[Attempt, ...] = ()) -> Delivery:
    return Delivery(
        id=row["id"], event_id=row["event_id"], event=row["event"], partner_id=row["partner_id"],
        state=row["state"], attempt_count=row["attempt_count"], max_attempts=row["max_attempts"],
        next_attempt_at=row["next_attempt_at"], leased_until=row["leased_until"],
        created_at=row["created_at"], updated_at=row["updated_at"], attempts=attempts,
        held_behind=row["head"] if row["head"] != row["id"] else None, event_erased_at=row["event_erased_at"],
    )


def attempt_from_row(row: Any) -> Attempt:
    return Attempt(
        attempt=row["attempt"], started_at=row["started_at"], duration_ms=row["duration_ms"],
        status_code=row["status_code"], error=row["error"], error_detail=row["error_detail"],
        response_snippet=row["response_snippet"], url=row["url"],
        signatures=json.loads(row["signatures"]) if row["signatures"] else None,
        decision=json.loads(row["decision"]) if row["decision"] else None,
    )


def inbound_from_row(row: Any) -> InboundEvent:
    return InboundEvent(
        id=row["id"], partner_id=row["partner_id"], type=row["type"], dedupe_key=row["dedupe_key"],
        body=bytes(row["body"]), received_at=row["received_at"],
        traceparent=row["traceparent"], tracestate=row["tracestate"],
    )

def job_from_row(row: Any) -> Job:
    """A claimed delivery, without the partner's URL and secrets: the attempt takes them from the
    partner as it is when it starts (``delivery.DeliveryLoop._as_partner_is_now``), so a change
    made after the claim reaches it; the claim need not read them."""
    return Job(
        delivery_id=row["id"], event_id=row["event_id"], event=row["type"],
        partner_id=row["partner_id"], url="", secrets=(),
        body=bytes(row["body"]), attempt=row["attempt_count"] + 1, max_attempts=row["max_attempts"],
        partner_failing_since=row["failing_since"], created_at=row["created_at"],
        traceparent=row["traceparent"], tracestate=row["tracestate"],
    )



def audit_from_row(row: Any) -> AuditEntry:
    return AuditEntry(id=row["id"], at=row["at"], actor=row["actor"], action=row["action"],
                      partner_id=row["partner_id"], changes=json.loads(row["changes"]), address=row["address"],
                      target=row["target"])



# --- Building statements ----------------------------------------------------------------------

def where_clause(conditions: Mapping[str, str], given: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A ``WHERE`` of the ``conditions`` whose value is ``given`` (not None), and their parameters.

    Only the filters given are written: the one-statement-for-all form, ``(:x IS NULL OR col = :x)``,
    gives SQLite one plan for every combination, and that plan can use no index (a walk of the whole
    table at every page)."""
    params = {name: value for name, value in given.items() if value is not None}
    clause = " AND ".join(conditions[name] for name in params)
    return (f"WHERE {clause}" if clause else ""), params


def placeholders(name: str, values: list[Any]) -> str:
    """``:name0, :name1, …`` for an ``IN (…)`` of ``values`` (one statement, not one per value)."""
    return ", ".join(f":{name}{n}" for n in range(len(values)))


def numbered(name: str, values: list[Any]) -> dict[str, Any]:
    return {f"{name}{n}": value for n, value in enumerate(values)}


def page_of(items: list[Any], limit: int) -> Page:
    """Cut one extra row off a LIMIT n+1 query; its presence means there is a next page."""
    if len(items) > limit:
        items = items[:limit]
        return Page(items=items, next_cursor=items[-1].id)
    return Page(items=items, next_cursor=None)


def json_or_none(value: Any) -> str | None:
    """``json.dumps(value)``, or None; a flat object of strings and numbers (an attempt's signatures
    and decision, written per attempt) put together directly, in the same text, at a third of the cost."""
    if value is None:
        return None
    if isinstance(value, dict) and all(_plain(v) for v in value.values()):
        return "{" + ", ".join(f"{_quoted(k)}: {_quoted(v) if type(v) is str else repr(v)}"
                               for k, v in value.items()) + "}"
    return json.dumps(value)


_quoted = json.encoder.encode_basestring_ascii  # json.dumps' own quoting of a string, in C


def _plain(value: Any) -> bool:
    """A string, an int or a finite float: written the same by ``repr`` and JSON (not a bool)."""
    kind = type(value)
    return kind is str or kind is int or (kind is float and math.isfinite(value))


# --- The audit trail's rows -------------------------------------------------------------------

def write_audit(db: Any, entry: AuditEntry | None, **found: Any) -> None:
    """Record ``entry`` in the transaction of the change it describes, with what the store
    ``found`` (counts) added to its changes; a URL in them without its query (``redacted_url``)."""
    if entry is None:
        return
    changes = urls_rewritten({**entry.changes, **found}, redacted_url)
    db.execute(
        """INSERT INTO audit_log (id, at, actor, address, action, partner_id, target, changes)
           VALUES (:id, :at, :actor, :address, :action, :partner_id, :target, :changes)""",
        {"id": entry.id, "at": entry.at, "actor": entry.actor, "address": entry.address, "action": entry.action,
         "partner_id": entry.partner_id, "target": entry.target,
         "changes": json.dumps(changes, sort_keys=True)})


def urls_rewritten(value: Any, rewrite: Callable[[str], str]) -> Any:
    """``value`` (decoded JSON) with every http(s) URL in it passed through ``rewrite``."""
    if isinstance(value, str):
        return rewrite(value) if value[:8].lower().startswith(("http://", "https://")) else value
    if isinstance(value, dict):
        return {key: urls_rewritten(v, rewrite) for key, v in value.items()}
    if isinstance(value, list):
        return [urls_rewritten(v, rewrite) for v in value]
    return value


def rewrite_audit_urls(db: Any, select: str, params: dict[str, Any], rewrite: Callable[[str], str]) -> None:
    """Pass every URL in the changes of the audit entries ``select`` finds (id, changes) through ``rewrite``."""
    for row in db.execute(select, params).fetchall():
        changes = json.dumps(urls_rewritten(json.loads(row["changes"]), rewrite), sort_keys=True)
        if changes != row["changes"]:
            db.execute("UPDATE audit_log SET changes = :changes WHERE id = :id", {"id": row["id"], "changes": changes})



"""Publishing: ``POST /events`` and ``POST /events/batch``.

A payload is checked against the event catalog (every problem listed at once, in one 422);
``partners`` and ``channels`` are taken out of it, as they say whom the event is for and are not
sent; the event and one delivery per partner it reaches are stored in one transaction, and the
202 comes only after that commit. When the event reached no partner, the 202 says why.
A ``traceparent`` (and ``tracestate``) header is kept with the event and passed on to each
attempt (``trace_context.py``); an invalid one is ignored.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

import signing
import trace_context
from config import FIELD_TYPES
from models import Event, NewEvent
from partners import check_channels
from web import (
    ApiError,
    Context,
    context,
    db,
    error_body,
    invalid,
    known_partner,
    new_delivery_id,
    new_id,
    read_json_object,
)
from web_commit import group_written

logger = logging.getLogger("webhookd")


def check_payload(payload: dict[str, Any], catalog: dict[str, dict[str, str]]) -> str:
    """The event type of a publishable payload, after checking it against the catalog: a 422 that
    lists every problem at once (the first is its message), so a sender fixes them in one go."""
    event_type = payload.get("event")
    valid = ", ".join(sorted(catalog))
    if not isinstance(event_type, str) or event_type not in catalog:
        shown = repr(event_type)[:100] if event_type is not None else "missing"
        raise invalid("event", f"must be a known event type ({shown} is not). Valid types: {valid}.")
    problems = []

    def problem(name: str, message: str) -> None:
        problems.append({"field": name, "message": f"'{name}' {message}"})

    for name, kind in catalog[event_type].items():
        value = payload.get(name)
        if name not in payload:
            problem(name, f"is required for {event_type} ({kind}).")
        elif (isinstance(value, bool) and kind != "boolean") or not isinstance(value, FIELD_TYPES[kind]):
            problem(name, f"must be of type {kind} for {event_type}.")
    timestamp = payload.get("timestamp")
    if timestamp is not None and (isinstance(timestamp, bool) or not isinstance(timestamp, (int, float))):
        problem("timestamp", "must be unix seconds (a number), or be left out to be filled in.")
    if problems:
        raise ApiError(422, "invalid_field", problems[0]["message"], problems=problems)
    return event_type


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable() or not key.isascii():
        raise ApiError(400, "bad_idempotency_key", "Idempotency-Key must be 1-255 printable ASCII characters.")
    return key


async def take_audience(payload: dict[str, Any], ctx: Context) -> dict[str, list[str]] | None:
    """Take ``partners`` and ``channels`` out of a payload to publish: they say whom the event is
    for and are not sent (one partner has no business seeing the ids of the others). None: every
    subscriber of its type."""
    audience = {}
    if "partners" in payload:
        ids = payload.pop("partners")
        if not isinstance(ids, list) or not 1 <= len(ids) <= 100 or not all(isinstance(i, str) for i in ids):
            raise invalid("partners", "must be a list of 1 to 100 partner ids; leave it out to reach every "
                                      "subscriber of the type.")
        for partner_id in ids:
            if await known_partner(ctx.store, partner_id) is None:
                raise invalid("partners", f"names {partner_id[:100]!r}, which is not a partner.")
        audience["partners"] = sorted(set(ids))
    if "channels" in payload:
        audience["channels"] = check_channels(payload.pop("channels"), at_least=1, at_most=10)
    return audience or None


def new_event(payload: dict[str, Any], ctx: Context, key: str | None,
              audience: dict[str, list[str]] | None = None,
              trace: tuple[str | None, str | None] = (None, None)) -> NewEvent:
    """A checked payload (422 otherwise) as the event to store: ``timestamp`` filled in when
    absent, canonical bytes, and the hash that tells a reused ``Idempotency-Key`` apart (the
    audience is part of the request it hashes)."""
    event_type = check_payload(payload, ctx.config.events)
    request = {"payload": payload, "audience": audience} if audience else payload
    request_hash = hashlib.sha256(signing.canonical(request)).hexdigest()
    payload.setdefault("timestamp", int(ctx.clock()))
    return NewEvent(id=new_id("evt_"), type=event_type, body=signing.canonical(payload), idempotency_key=key,
                    request_hash=request_hash, audience=audience, traceparent=trace[0], tracestate=trace[1])


def key_reused(event: Event, created: bool, new: NewEvent) -> bool:
    """The same ``Idempotency-Key`` with a different body: the caller is confused (409)."""
    return not created and event.request_hash != new.request_hash


KEY_REUSED = "This Idempotency-Key was used with a different body. Use a new key for a new event."


async def publish_event(request: Request) -> JSONResponse:
    """``POST /events``: store the event and its deliveries in one transaction, then answer 202.

    The 202 comes only after the commit: an accepted event is on disk. The same
    ``Idempotency-Key`` again answers the first event's 202 and stores nothing; with
    a different body it is a 409 (Stripe does the same), since the caller is confused.
    """
    ctx = context(request)
    key = idempotency_key(request)
    payload = await read_json_object(request)
    new = new_event(payload, ctx, key, await take_audience(payload, ctx), trace_context.from_headers(request.headers))
    now, began = ctx.clock(), time.monotonic()
    event, created = await group_written(lambda deadline, on_done: ctx.store.publish_soon(
        new, now=now, max_attempts=ctx.config.delivery.max_attempts, new_delivery_id=new_delivery_id,
        deadline=deadline, on_done=on_done), ctx.loop.give_way)
    ctx.loop.publish_first.publish_waited(time.monotonic() - began)  # deliveries give way if this grows
    if key_reused(event, created, new):
        raise ApiError(409, "idempotency_key_reused", KEY_REUSED)
    if created:
        _published(ctx, [event])
    return JSONResponse(accepted_json(ctx, event), status_code=202)


def accepted_json(ctx: Context, event: Event) -> dict[str, Any]:
    """The 202's body: the event's id and how many deliveries it made; when none, a ``note`` saying
    why, so a publisher does not mistake an event that went nowhere for one on its way."""
    answer: dict[str, Any] = {"event_id": event.id, "deliveries": event.fanout}
    if event.fanout:
        return answer
    subscribers = [p for p in ctx.store.all_partners() if event.type in p.events]
    if not subscribers:
        answer["note"] = {"code": "no_subscriber", "message": (
            f"No partner subscribes to {event.type}: the event is stored, and sent to nobody. A partner "
            "subscribes at registration (events) or with PATCH /partners/{partner_id}.")}
    else:
        answer["note"] = {"code": "no_match", "message": (
            f"{_partners(len(subscribers))} subscribe to {event.type}, and none matched: the partners or "
            "channels the event named left them out, or their payload filters did. The event is stored, "
            "and sent to nobody.")}
    return answer


def _partners(n: int) -> str:
    return "1 partner" if n == 1 else f"{n} partners"


async def publish_batch(request: Request) -> JSONResponse:
    """``POST /events/batch``: ``{"events": [payload, ...]}``, each payload what ``POST /events``
    takes, up to ``security.max_batch_events``; all the accepted ones in one durable commit.

    The answer (202) has one result per event, in order: ``{"event_id", "deliveries"}`` or
    ``{"error": {...}, "status": 4xx}``; one bad event refuses only itself. With an
    ``Idempotency-Key`` header, event *i* gets a key of its own made of the header's and *i*
    (joined by a control character, which no header key can hold, so it never meets a key of
    ``POST /events``): the same batch sent again stores nothing twice and answers the same ids.
    Each event may nest as deep as it could alone (the wrapper's two levels do not count).
    """
    ctx = context(request)
    key = idempotency_key(request)
    items = (await read_json_object(request, allowed={"events"}, extra_depth=2)).get("events")
    most = ctx.config.security.max_batch_events
    if not isinstance(items, list) or not items or len(items) > most:
        raise invalid("events", f"must be a list of 1 to {most} events, each what POST /events takes.")
    results: list[dict[str, Any]] = [{} for _ in items]
    checked: list[tuple[int, NewEvent]] = []
    trace = trace_context.from_headers(request.headers)  # the batch's, for each of its events
    for i, payload in enumerate(items):
        try:
            if not isinstance(payload, dict):
                raise ApiError(400, "not_an_object", "The event must be a JSON object, like {\"event\": ...}.")
            audience = await take_audience(payload, ctx)
            checked.append((i, new_event(payload, ctx, f"{key}\x1f{i}" if key else None, audience, trace)))
        except ApiError as refused:
            results[i] = _refused(refused)
    stored = await db(ctx.store.publish_batch, [new for _, new in checked], now=ctx.clock(),
                      max_attempts=ctx.config.delivery.max_attempts, new_delivery_id=new_delivery_id) if checked else []
    for (i, new), (event, created) in zip(checked, stored):
        if key_reused(event, created, new):
            results[i] = _refused(ApiError(409, "idempotency_key_reused", KEY_REUSED))
        else:
            results[i] = accepted_json(ctx, event)
    _published(ctx, [event for event, created in stored if created])
    accepted = sum("event_id" in r for r in results)
    return JSONResponse({"accepted": accepted, "refused": len(items) - accepted, "results": results}, status_code=202)


def _refused(error: ApiError) -> dict[str, Any]:
    return {**error_body(error.code, error.message, error.problems), "status": error.status}


def _published(ctx: Context, events: list[Event]) -> None:
    """After the commit: wake the delivery loop (if there is something to deliver), count, log."""
    if not events:
        return
    if any(event.fanout for event in events):  # an event that went to nobody gives the loop no work
        ctx.loop.wake()
    each = logger.isEnabledFor(logging.DEBUG)  # a line per event only at DEBUG: the events list has them all
    for event in events:
        ctx.metrics.events_published.inc(event=event.type)
        if each:
            logger.debug("published %s %s to %s", event.id, event.type, _partners(event.fanout))

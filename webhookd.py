"""webhookd: a small, auditable webhook hub. Start reading here.

Partners register an endpoint and receive a shared secret. Our system publishes
events; webhookd stores each one, signs it with HMAC-SHA256 and delivers it to every
subscribed partner, durably and with retries. Partners post their own signed events
back to us, and a promoted offer reaches our users live over WebSocket.

This file is the outbound API and the application, top to bottom:

1. partners: register, read, change (who may change a status), rotate the secret, reissue the
   API key, delete, ping, recover failed deliveries, replay a time window;
2. publishing: ``POST /events`` checks the payload against the catalog, takes out whom it is
   for, and answers 202 only once the event and its deliveries are on disk; an event's trace;
3. deliveries: read them (a partner sees only its own), retry a failed one, the audit trail;
4. operations: health, metrics, the dashboard, the partners' portal, the OpenAPI document;
5. the route table, which says who may call each route, and ``create_app``, whose
   lifespan opens the store and starts the delivery loop.

Where the rest lives, in the order an event meets it:

====================  ===============================================================
``web.py``            what every route stands on: errors, credentials, access rules,
                      rate limits, reading bodies, paging
``partner_fields.py`` what a partner's fields may hold (the 422s of registration, PATCH)
``store.py``          both engines' schema and every SQL statement (publish, claim, record)
``delivery.py``       the delivery loop: claim → one task per attempt on the sender
                      thread → recorder; backoff, expiry, retention
``breakers.py``       a partner's circuit breaker, failing streak and pace
``sender.py``         one HTTP attempt in plain standard library; ``signing.py`` signs it
``targets.py``        where a webhook may go: the URL rule and the SSRF address rule
``timeline.py``       one event's story, from the rows the loop keeps
``alerts.py``         webhookd's own signed alerts to the operator
``inbound.py``        the other direction: verify → store once → 200 → offer on ``/ws``
``realtime.py``       ``/ws`` tokens and the bounded fan-out of offers
``config.py``         every config key and its default; ``cli.py`` the command line
====================  ===============================================================

``docs/architecture.md`` draws the whole path, with every thread and task.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import WebSocketRoute

import delivery
import metrics
import openapi
import realtime
import signing
import timeline
from alerts import Alerts
from config import FIELD_TYPES, VERSION, Config, admin_token
from inbound import list_inbound, live_notifications, mint_realtime_token, receive_partner_event, relay_offer
from models import AuditEntry, Delivery, Event, NewEvent, Partner
from partner_fields import (
    check_audience_setter,
    check_channels,
    check_contact_email,
    check_events,
    check_filter,
    check_max_rate,
    check_ordering,
    check_partner_name,
    check_status_change,
    check_webhook_url,
    log_stale_subscriptions,
    stale_subscriptions,
)
from storage import open_store
from store import Store
from store_processes import OFFERS_CHANNEL, PARTNERS_CHANNEL, WORK_CHANNEL
from web import (
    ACCESS_LOG_FILTER,
    ADMIN,
    CALLER,
    EXCEPTION_HANDLERS,
    METRICS,
    PUBLIC,
    REGISTRATION,
    SIGNED,
    AdminTokens,
    ApiError,
    Context,
    RateLimiter,
    RealClient,
    audit_entry,
    caller_of,
    client_address,
    context,
    cursor_text,
    db,
    error_body,
    error_response,
    hash_api_key,
    invalid,
    is_small_number,
    known_partner,
    new_api_key,
    new_id,
    new_shared_secret,
    owned_partner,
    owned_partner_id,
    page_json,
    page_params,
    partner_not_found,
    read_json_object,
    route,
    secret_json,
)

__version__ = VERSION

logger = logging.getLogger("webhookd")

TEST_EVENT = "webhook.test"


# =====================================================================================
# Resource shapes (never a secret)
# =====================================================================================


def partner_json(partner: Partner, ctx: Context) -> dict[str, Any]:
    """A partner as the API shows it, with its circuit as the delivery loop sees it now."""
    return {"partner_id": partner.id, "partner_name": partner.name, "webhook_url": partner.webhook_url,
            "status": partner.status, "events_subscribed": list(partner.events),
            "stale_subscriptions": stale_subscriptions(partner, ctx.config.events),
            "disabled_reason": partner.disabled_reason, "suspended_reason": partner.suspended_reason,
            "failing_since": int(partner.failing_since) if partner.failing_since else None,
            "channels": list(partner.channels), "filter": partner.payload_filter, "ordering": partner.ordering,
            "max_rate_per_s": partner.max_rate_per_s, "contact_email": partner.contact_email,
            "circuit": ctx.loop.circuit(partner, ctx.clock()),
            "created_at": int(partner.created_at), "updated_at": int(partner.updated_at)}


def delivery_json(d: Delivery, with_attempts: bool = False) -> dict[str, Any]:
    out = {"delivery_id": d.id, "event_id": d.event_id, "event": d.event, "partner_id": d.partner_id,
           "state": d.state, "attempt_count": d.attempt_count,
           "next_attempt_at": int(d.next_attempt_at) if d.state == "pending" else None,
           "held_behind": d.held_behind,
           "created_at": int(d.created_at), "updated_at": int(d.updated_at)}
    if with_attempts:
        out["attempts"] = [{"attempt": a.attempt, "started_at": int(a.started_at), "duration_ms": a.duration_ms,
                            "status_code": a.status_code, "error": a.error,
                            "error_detail": a.error_detail, "response_snippet": a.response_snippet, "url": a.url}
                           for a in d.attempts]
    return out


def audit_json(entry: AuditEntry) -> dict[str, Any]:
    return {"audit_id": entry.id, "at": int(entry.at), "actor": entry.actor, "address": entry.address,
            "action": entry.action, "partner_id": entry.partner_id, "target": entry.target,
            "changes": entry.changes}


def event_json(event: Event) -> dict[str, Any]:
    audience = event.audience or {}
    return {"event_id": event.id, "event": event.type, "payload": json.loads(event.body),
            "partners": audience.get("partners"), "channels": audience.get("channels"),
            "created_at": int(event.created_at)}


# =====================================================================================
# 1. Partners
# =====================================================================================


async def register_partner(request: Request) -> JSONResponse:
    """``POST /partners/register``: the only response that ever shows the secret and the API key."""
    ctx = context(request)
    caller = caller_of(request)
    if caller is None or not caller.is_admin:  # open registration: limit each client address
        await ctx.registration_limit.check(client_address(request), "registrations")
    body = await read_json_object(request, allowed={"partner_name", "webhook_url", "events", "max_rate_per_s",
                                                    "contact_email", "channels", "filter", "ordering"})
    check_audience_setter(body, caller)  # an open registration cannot pick its own audience
    name = check_partner_name(body.get("partner_name"))
    url = await check_webhook_url(body.get("webhook_url"), ctx.config.security)
    events = check_events(body.get("events"), ctx.config.events)
    rate = check_max_rate(body.get("max_rate_per_s"))
    email = check_contact_email(body.get("contact_email"))
    channels = check_channels(body.get("channels", []))
    payload_filter = check_filter(body.get("filter"))
    ordering = check_ordering(body.get("ordering", "concurrent"))
    shared_secret, api_key = new_shared_secret(), new_api_key()
    partner_id = new_id("partner_", unpredictable=True)
    audit = audit_entry(request, "partner.registered", partner_id,
                        {"partner_name": name, "webhook_url": url, "events": events, "max_rate_per_s": rate,
                         "contact_email": email, "channels": channels, "filter": payload_filter or None,
                         "ordering": ordering})
    partner = await db(ctx.store.add_partner, partner_id=partner_id, name=name, webhook_url=url, events=events,
                       secret=shared_secret, api_key_hash=hash_api_key(api_key), now=ctx.clock(),
                       max_rate_per_s=rate, contact_email=email, channels=channels, payload_filter=payload_filter,
                       ordering=ordering, audit=audit)
    logger.info("registered partner %s for %s", partner.id, ",".join(events))
    return JSONResponse({**partner_json(partner, ctx), **secret_json(shared_secret), "api_key": api_key},
                        status_code=201)


async def list_partners(request: Request) -> JSONResponse:
    limit, cursor = page_params(request)
    ctx = context(request)
    page = await db(ctx.store.list_partners, limit=limit, cursor=cursor)
    return JSONResponse(page_json(page, lambda partner: partner_json(partner, ctx)))


async def get_partner(request: Request) -> JSONResponse:
    return JSONResponse(partner_json(await owned_partner(request), context(request)))


async def update_partner(request: Request) -> JSONResponse:
    """``PATCH /partners/{id}``: any of ``PATCHABLE``, each checked as at registration; ``null``
    removes a pace, a filter or a contact email. ``channels`` and ``filter`` are the admin's
    (``check_audience_setter``).

    Setting ``active`` resumes a paused or disabled partner: its held deliveries go out. Who
    may make which change of ``status`` is ``check_status_change``'s rule.
    """
    partner_id = owned_partner_id(request)
    ctx = context(request)
    body = await read_json_object(request, allowed=PATCHABLE | {"reason"})
    if not body.keys() - {"reason"}:
        raise ApiError(422, "invalid_field", f"Send at least one of {', '.join(sorted(PATCHABLE))}.")
    before = await owned_partner(request)
    change = await check_change(body, before, ctx, caller_of(request))
    status = change["status"]
    action = STATUS_ACTIONS[status] if status not in (None, before.status) else "partner.updated"
    audit = audit_entry(request, action, partner_id, changed_fields(before, body, change))
    partner = await db(ctx.store.update_partner, partner_id, now=ctx.clock(), audit=audit, **change)
    if partner is None:
        raise partner_not_found(partner_id)
    if status == "active":
        ctx.loop.partner_reactivated(partner_id)  # the other processes were told by the store
        if before.status == "disabled":
            ctx.alerts.note("partner_enabled", partner_id, f"made active again by the {audit.actor}")
    logger.info("partner %s updated: %s", partner_id, ", ".join(sorted(body)))
    return JSONResponse(partner_json(partner, ctx))


PATCHABLE = {"webhook_url", "events", "channels", "filter", "ordering", "status", "max_rate_per_s", "contact_email"}
STATUS_ACTIONS = {"active": "partner.activated", "paused": "partner.paused", "suspended": "partner.suspended"}


async def check_change(body: dict[str, Any], before: Partner, ctx: Context, caller: Any) -> dict[str, Any]:
    """The fields a PATCH sent, checked, as ``Store.update_partner`` takes them: None for a field
    not sent; a removal as the store's "remove" value (a pace of 0, an empty filter, an empty
    address). A partner's own key that sends ``channels`` or ``filter`` gets a 403."""
    check_audience_setter(body, caller)
    sent = body.get
    return {
        "webhook_url": await check_webhook_url(sent("webhook_url"), ctx.config.security)
        if "webhook_url" in body else None,
        "events": check_events(sent("events"), ctx.config.events, kept=before.events) if "events" in body else None,
        "channels": check_channels(sent("channels")) if "channels" in body else None,
        "payload_filter": check_filter(sent("filter")) if "filter" in body else None,
        "ordering": check_ordering(sent("ordering")) if "ordering" in body else None,
        "status": sent("status"),
        "reason": check_status_change(before, body, caller),
        "max_rate_per_s": (check_max_rate(sent("max_rate_per_s")) or 0.0) if "max_rate_per_s" in body else None,
        "contact_email": (check_contact_email(sent("contact_email")) or "") if "contact_email" in body else None,
    }


def changed_fields(before: Partner, body: dict[str, Any], change: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a PATCH changes, ``{field: {"from": old, "to": new}}`` in the API's names, for the audit
    trail: the fields ``body`` sent that differ from ``before`` (a suspension's reason goes with it)."""
    old = {"webhook_url": before.webhook_url, "events": list(before.events), "channels": list(before.channels),
           "filter": before.payload_filter, "ordering": before.ordering, "status": before.status,
           "reason": before.suspended_reason, "max_rate_per_s": before.max_rate_per_s,
           "contact_email": before.contact_email}
    new = {**change, "filter": change["payload_filter"] or None, "max_rate_per_s": change["max_rate_per_s"] or None,
           "contact_email": change["contact_email"] or None}
    return {name: {"from": old[name], "to": new[name]} for name in old
            if (name in body or name == "reason" and "status" in body) and old[name] != new[name]}


async def rotate_secret(request: Request) -> JSONResponse:
    """``POST /partners/{id}/rotate-secret``: a new secret, shown this once.

    The old secret stays valid for ``secret_overlap_s``: outgoing webhooks carry a
    Standard Webhooks signature for both, and inbound events verify with either, so
    the partner can switch without losing a webhook. ``X-Webhook-Signature`` uses
    the new secret at once.
    """
    partner_id = owned_partner_id(request)
    ctx = context(request)
    revoke_old = request.query_params.get("revoke_old", "false")
    if revoke_old not in ("true", "false"):
        raise invalid("revoke_old", "must be true or false.")
    partner = await owned_partner(request)
    now = ctx.clock()
    if revoke_old == "false" and partner.previous_secret_until is not None and partner.previous_secret_until > now:
        # A second rotation would drop the secret the first one promised until then: refuse, and
        # say how to end it now on purpose (a leak).
        raise ApiError(409, "rotation_in_progress",
                       f"The previous secret stays valid until {int(partner.previous_secret_until)} (unix), as the "
                       "last rotation promised. Rotate again after that, or with ?revoke_old=true to revoke every "
                       "old secret at once (for a leaked secret).")
    new_secret = new_shared_secret()
    overlap_until = now if revoke_old == "true" else now + ctx.config.security.secret_overlap_s
    audit = audit_entry(request, "partner.secret_rotated", partner_id,
                        {"revoke_old": revoke_old == "true",
                         "previous_secret_expires_at": None if revoke_old == "true" else int(overlap_until)})
    partner = await db(ctx.store.rotate_secret, partner_id, new_secret=new_secret, previous_until=overlap_until,
                       now=now, revoke_old=revoke_old == "true", audit=audit)
    if partner is None:
        raise partner_not_found(partner_id)
    if revoke_old == "true":
        logger.warning("partner %s rotated its secret and revoked every old one at once", partner_id)
    else:
        logger.info("partner %s rotated its secret; the old one stays valid until %d", partner_id, int(overlap_until))
    return JSONResponse({**partner_json(partner, ctx), **secret_json(new_secret),
                         "previous_secret_expires_at": None if revoke_old == "true" else int(overlap_until)})


async def reissue_api_key(request: Request) -> JSONResponse:
    """``POST /partners/{id}/api-key``: a new API key, shown this once; the old one stops working
    at once (a leaked key). Logged without either key."""
    partner_id = owned_partner_id(request)
    ctx = context(request)
    api_key = new_api_key()
    partner = await db(ctx.store.reissue_api_key, partner_id, api_key_hash=hash_api_key(api_key), now=ctx.clock(),
                       audit=audit_entry(request, "partner.api_key_reissued", partner_id))
    if partner is None:
        raise partner_not_found(partner_id)
    logger.warning("partner %s: API key reissued by %s; the old one no longer works", partner_id,
                   "the admin" if caller_of(request).is_admin else "the partner")
    return JSONResponse({**partner_json(partner, ctx), "api_key": api_key})


async def delete_partner(request: Request) -> JSONResponse:
    """``DELETE /partners/{id}``: the admin's, or the partner's own if ``security.partner_self_delete``.

    At once: its secrets and API key are erased (its signatures and its key stop working on
    the next request), its subscriptions go, and its pending deliveries end ``cancelled``. What
    stays, and for how long, is ``store.delete_partner``'s rule (the README's "Deleting a partner").
    """
    ctx = context(request)
    partner = await owned_partner(request)
    if not caller_of(request).is_admin and not ctx.config.security.partner_self_delete:
        raise ApiError(403, "admin_only", "Only the admin can delete a partner on this server "
                                          "(security.partner_self_delete is false): ask the operator.")
    cancelled = await db(ctx.store.delete_partner, partner.id, now=ctx.clock(),
                         audit=audit_entry(request, "partner.deleted", partner.id, {"partner_name": partner.name}))
    if cancelled is None:
        raise partner_not_found(partner.id)
    count_cancelled(ctx, partner.id, cancelled)
    logger.warning("partner %s deleted by %s; %d deliveries cancelled", partner.id,
                   "the admin" if caller_of(request).is_admin else "itself", cancelled)
    return JSONResponse({"partner_id": partner.id, "deleted": True, "cancelled_deliveries": cancelled})


async def cancel_pending(request: Request) -> JSONResponse:
    """``POST /partners/{id}/cancel-pending`` (admin): every pending delivery of the partner ends
    ``cancelled`` and is never sent — a backlog nobody wants any more, in one call."""
    ctx = context(request)
    partner = await owned_partner(request)
    cancelled = await db(ctx.store.cancel_pending, partner.id, now=ctx.clock(),
                         audit=audit_entry(request, "partner.pending_cancelled", partner.id))
    if cancelled is None:
        raise partner_not_found(partner.id)
    count_cancelled(ctx, partner.id, cancelled)
    logger.warning("partner %s: %d pending deliveries cancelled by the admin", partner.id, cancelled)
    return JSONResponse({"partner_id": partner.id, "cancelled_deliveries": cancelled})


def count_cancelled(ctx: Context, partner_id: str, cancelled: int) -> None:
    if cancelled:
        ctx.metrics.deliveries.inc(cancelled, partner=partner_id, outcome="cancelled")


async def send_test_event(request: Request) -> JSONResponse:
    """``POST /partners/{id}/test``: a ``webhook.test`` event to this partner alone (GitHub's ping)."""
    partner_id = (await owned_partner(request)).id
    ctx = context(request)
    payload = {"event": TEST_EVENT, "timestamp": int(ctx.clock()), "partner_id": partner_id,
               "message": "This is a test webhook from webhookd."}
    ping = NewEvent(id=new_id("evt_"), type=TEST_EVENT, body=signing.canonical(payload), only_partner=partner_id)
    event, _ = await db(ctx.store.publish, ping, now=ctx.clock(), max_attempts=ctx.config.delivery.max_attempts,
                        new_delivery_id=new_delivery_id)
    ctx.loop.wake()
    return JSONResponse({"event_id": event.id, "deliveries": event.fanout}, status_code=202)


async def recover_failed(request: Request) -> JSONResponse:
    """``POST /partners/{id}/recover?since=``: every ``failed`` or ``expired`` delivery created since
    then gets a fresh round of attempts (Svix's recover). Answers how many were re-queued."""
    partner_id = owned_partner_id(request)
    ctx = context(request)
    since_text = request.query_params.get("since", "")
    if not is_small_number(since_text):
        raise invalid("since", "must be unix seconds, e.g. ?since=1704186000.")
    refuse_if_held(request, await owned_partner(request))  # an unknown partner: 404, after the 422 for 'since'
    count = await db(ctx.store.recover_failed, partner_id, since=int(since_text),
                     extra_attempts=ctx.config.delivery.max_attempts, now=ctx.clock(),
                     audit=audit_entry(request, "partner.recovered", partner_id, {"since": int(since_text)}))
    await probe_everywhere(ctx, partner_id)
    logger.info("partner %s: re-queued %d failed deliveries since %s", partner_id, count, since_text)
    return JSONResponse({"requeued": count})


async def replay_events(request: Request) -> JSONResponse:
    """``POST /partners/{id}/replay?since=&until=&event=``: every event the partner had a delivery
    of, published in ``[since, until)`` (until: now), delivered ones included, is sent again as a new
    delivery with the same event id — the partner restored a backup and lost a day. At most
    ``limit`` events a call (default 100, at most 1000), oldest first; ``next_cursor`` continues.

    An event already pending for the partner is not queued again, so calling twice sends once; one
    whose delivery the admin cancelled stays out unless the admin asks (``include_cancelled=true``).
    """
    partner_id = owned_partner_id(request)
    ctx = context(request)
    q = request.query_params
    since, until = q.get("since", ""), q.get("until", str(int(ctx.clock()) + 1))
    if not is_small_number(since):
        raise invalid("since", "must be unix seconds, e.g. ?since=1704186000.")
    if not is_small_number(until) or int(until) <= int(since):
        raise invalid("until", "must be unix seconds after since (leave it out for now).")
    event_type = q.get("event")
    if event_type is not None and not 1 <= len(event_type) <= 100:
        raise invalid("event", "must be an event type, like payment.success.")
    limit, cursor = page_params(request, most=1000, default=100)
    include_cancelled = check_include_cancelled(request)
    refuse_if_held(request, await owned_partner(request))
    audit = audit_entry(request, "partner.replayed", partner_id,
                        {"since": int(since), "until": int(until), "event": event_type,
                         "include_cancelled": include_cancelled})
    replayed, last = await db(ctx.store.replay, partner_id, since=int(since), until=int(until), event_type=event_type,
                              after=cursor, limit=limit, now=ctx.clock(), max_attempts=ctx.config.delivery.max_attempts,
                              new_delivery_id=new_delivery_id, include_cancelled=include_cancelled, audit=audit)
    ctx.loop.wake()
    logger.info("partner %s: replayed %d events from %s to %s", partner_id, replayed, since, until)
    return JSONResponse({"replayed": replayed, "next_cursor": cursor_text(last)}, status_code=202)


def check_include_cancelled(request: Request) -> bool:
    """A replay's ``include_cancelled``: the admin's to ask for, since the admin cancelled them (403
    for a partner's key)."""
    asked = request.query_params.get("include_cancelled", "false")
    if asked not in ("true", "false"):
        raise invalid("include_cancelled", "must be true or false.")
    if asked == "true" and not caller_of(request).is_admin:
        raise ApiError(403, "admin_only", "Only the admin can replay cancelled deliveries: the admin cancelled "
                                          "them. Leave out include_cancelled, or ask the operator.")
    return asked == "true"


# =====================================================================================
# 2. Publishing
# =====================================================================================


def check_payload(payload: dict[str, Any], catalog: dict[str, dict[str, str]]) -> str:
    """The event type of a publishable payload, after checking it against the catalog (422)."""
    event_type = payload.get("event")
    valid = ", ".join(sorted(catalog))
    if not isinstance(event_type, str) or event_type not in catalog:
        shown = repr(event_type)[:100] if event_type is not None else "missing"
        raise invalid("event", f"must be a known event type ({shown} is not). Valid types: {valid}.")
    for name, kind in catalog[event_type].items():
        if name not in payload:
            raise invalid(name, f"is required for {event_type} ({kind}).")
        value = payload[name]
        wrong_bool = isinstance(value, bool) and kind != "boolean"
        if wrong_bool or not isinstance(value, FIELD_TYPES[kind]):
            raise invalid(name, f"must be of type {kind} for {event_type}.")
    timestamp = payload.get("timestamp")
    if timestamp is not None and (isinstance(timestamp, bool) or not isinstance(timestamp, (int, float))):
        raise invalid("timestamp", "must be unix seconds (a number), or be left out to be filled in.")
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
              audience: dict[str, list[str]] | None = None) -> NewEvent:
    """A checked payload (422 otherwise) as the event to store: ``timestamp`` filled in when
    absent, canonical bytes, and the hash that tells a reused ``Idempotency-Key`` apart (the
    audience is part of the request it hashes)."""
    event_type = check_payload(payload, ctx.config.events)
    request = {"payload": payload, "audience": audience} if audience else payload
    request_hash = hashlib.sha256(signing.canonical(request)).hexdigest()
    payload.setdefault("timestamp", int(ctx.clock()))
    return NewEvent(id=new_id("evt_"), type=event_type, body=signing.canonical(payload), idempotency_key=key,
                    request_hash=request_hash, audience=audience)


def new_delivery_id() -> str:
    return new_id("dlv_")


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
    new = new_event(payload, ctx, key, await take_audience(payload, ctx))
    event, created = await db(ctx.store.publish, new, now=ctx.clock(), max_attempts=ctx.config.delivery.max_attempts,
                              new_delivery_id=new_delivery_id)
    if key_reused(event, created, new):
        raise ApiError(409, "idempotency_key_reused", KEY_REUSED)
    if created:
        _published(ctx, [event])
    return JSONResponse({"event_id": event.id, "deliveries": event.fanout}, status_code=202)


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
    for i, payload in enumerate(items):
        try:
            if not isinstance(payload, dict):
                raise ApiError(400, "not_an_object", "The event must be a JSON object, like {\"event\": ...}.")
            audience = await take_audience(payload, ctx)
            checked.append((i, new_event(payload, ctx, f"{key}\x1f{i}" if key else None, audience)))
        except ApiError as refused:
            results[i] = _refused(refused)
    stored = await db(ctx.store.publish_batch, [new for _, new in checked], now=ctx.clock(),
                      max_attempts=ctx.config.delivery.max_attempts, new_delivery_id=new_delivery_id) if checked else []
    for (i, new), (event, created) in zip(checked, stored):
        if key_reused(event, created, new):
            results[i] = _refused(ApiError(409, "idempotency_key_reused", KEY_REUSED))
        else:
            results[i] = {"event_id": event.id, "deliveries": event.fanout}
    _published(ctx, [event for event, created in stored if created])
    accepted = sum("event_id" in r for r in results)
    return JSONResponse({"accepted": accepted, "refused": len(items) - accepted, "results": results}, status_code=202)


def _refused(error: ApiError) -> dict[str, Any]:
    return {**error_body(error.code, error.message), "status": error.status}


def _published(ctx: Context, events: list[Event]) -> None:
    """After the commit: wake the delivery loop, count, log."""
    if not events:
        return
    ctx.loop.wake()
    for event in events:
        ctx.metrics.events_published.inc(event=event.type)
        logger.info("published %s %s to %d partners", event.id, event.type, event.fanout)


async def get_event(request: Request) -> JSONResponse:
    ctx = context(request)
    event_id = request.path_params["event_id"]
    event = await db(ctx.store.get_event, event_id)
    if event is None:
        raise ApiError(404, "event_not_found", f"No event with id {event_id!r}.")
    page = await db(ctx.store.list_deliveries, limit=200, event_id=event_id)
    return JSONResponse({**event_json(event), "fanout": event.fanout,
                         "deliveries": [delivery_json(d) for d in page.items],
                         "more_deliveries": page.next_cursor is not None})


async def trace_event(request: Request) -> JSONResponse:
    """``GET /events/{id}/trace``: the event's whole story, partner by partner (``timeline.py``):
    each attempt's request with its signatures and the strings they signed, the answer, and what
    came next and why. Its first 200 deliveries."""
    ctx = context(request)
    event_id = request.path_params["event_id"]
    event = await db(ctx.store.get_event, event_id)
    if event is None:
        raise ApiError(404, "event_not_found", f"No event with id {event_id!r}.")
    deliveries = await db(ctx.store.event_deliveries, event_id, limit=200)
    retries: dict[str, list[AuditEntry]] = {}
    for entry in await db(ctx.store.audit_for, [d.id for d in deliveries]):
        retries.setdefault(entry.target or "", []).append(entry)
    return JSONResponse(timeline.event_story(event, deliveries, retries, user_agent=f"webhookd/{__version__}"))


# =====================================================================================
# 3. Deliveries
# =====================================================================================


DELIVERY_STATES = ("pending", "delivered", "failed", "expired", "cancelled")


async def list_deliveries(request: Request) -> JSONResponse:
    """``GET /deliveries``: newest first. A partner sees only its own, whatever it asks for."""
    caller = caller_of(request)
    limit, cursor = page_params(request)
    q = request.query_params
    partner_id = q.get("partner_id")
    if not caller.is_admin:
        if partner_id not in (None, caller.partner_id):
            raise partner_not_found(partner_id)
        partner_id = caller.partner_id
    state = q.get("state") or q.get("status")
    if state is not None and state not in DELIVERY_STATES:
        raise invalid("state", f"must be one of {', '.join(DELIVERY_STATES)}.")
    page = await db(context(request).store.list_deliveries, limit=limit, cursor=cursor, partner_id=partner_id,
                    state=state, event=q.get("event"), event_id=q.get("event_id"))
    return JSONResponse(page_json(page, delivery_json))


async def _owned_delivery(request: Request) -> Delivery:
    """The delivery in the path, if the caller is the admin or its partner (404 otherwise)."""
    caller = caller_of(request)
    delivery_id = request.path_params["delivery_id"]
    found = await db(context(request).store.get_delivery, delivery_id)
    if found is None or not (caller.is_admin or caller.partner_id == found.partner_id):
        raise ApiError(404, "delivery_not_found", f"No delivery with id {delivery_id!r}.")
    return found


async def get_delivery(request: Request) -> JSONResponse:
    return JSONResponse(delivery_json(await _owned_delivery(request), with_attempts=True))


async def retry_delivery(request: Request) -> JSONResponse:
    """``POST /deliveries/{id}/retry``: one more attempt of a ``failed`` or ``expired`` delivery
    (409 otherwise)."""
    ctx = context(request)
    found = await _owned_delivery(request)
    partner = await known_partner(ctx.store, found.partner_id)
    if partner is None:
        raise ApiError(409, "partner_deleted", f"Delivery {found.id} was for partner {found.partner_id}, which "
                                               "was deleted: there is nobody to send it to.")
    refuse_if_held(request, partner)
    queued = await db(ctx.store.retry_delivery, found.id, ctx.clock(),
                      audit=audit_entry(request, "delivery.retried", found.partner_id,
                                        {"state": {"from": found.state, "to": "pending"}}, target=found.id))
    if queued is None:
        raise ApiError(409, "not_failed", f"Delivery {found.id} is {found.state}; only a failed or expired "
                                          "delivery can be retried.")
    await probe_everywhere(ctx, found.partner_id)
    return JSONResponse(delivery_json(queued), status_code=202)  # as queued: it may be sent by now


def refuse_if_held(request: Request, partner: Partner | None) -> None:
    """A retry or a recover for a partner that is not active sends nothing until it is: say so
    (409, naming why) unless the caller asks to queue it anyway (``?queue=true``)."""
    if partner is None or partner.status == "active":
        return
    queue = request.query_params.get("queue", "false")
    if queue not in ("true", "false"):
        raise invalid("queue", "must be true or false.")
    if queue == "true":
        return
    why = {"paused": "it is paused", "disabled": f"it was disabled ({partner.disabled_reason})",
           "suspended": f"the admin suspended it ({partner.suspended_reason})"}.get(partner.status, partner.status)
    raise ApiError(409, "partner_held", f"Nothing is sent to partner {partner.id} now: {why}. Make it active "
                                        "first, or add ?queue=true to queue this anyway (it goes out once active).")


async def list_audit(request: Request) -> JSONResponse:
    """``GET /audit`` (admin): every write an admin or a partner made, newest first, with who, when,
    from where and what changed (never a secret); ``?partner_id=`` and ``?action=`` narrow it."""
    limit, cursor = page_params(request)
    q = request.query_params
    page = await db(context(request).store.list_audit, limit=limit, cursor=cursor, partner_id=q.get("partner_id"),
                    action=q.get("action"))
    return JSONResponse(page_json(page, audit_json))


async def probe_everywhere(ctx: Context, partner_id: str) -> None:
    """An operator asked for another attempt: an open circuit probes now, in this process and
    (PostgreSQL) in every other one, whose own breaker may have opened too."""
    ctx.loop.probe_partner(partner_id)
    await db(ctx.store.tell_partner_changed, partner_id, "probe")


# =====================================================================================
# 4. Operations: metrics, the dashboard, the API's description, health
# =====================================================================================


async def prometheus_metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format."""
    text = await db(context(request).metrics.render)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# --- The dashboard ---------------------------------------------------------------------------

STATIC = Path(__file__).resolve().parent / "static"


def static_page(name: str) -> Response:
    """A page of ``static/``: its own policy is in its <meta>; these headers add what a <meta> cannot."""
    return FileResponse(STATIC / name, media_type="text/html", headers={
        "Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


async def dashboard(request: Request) -> Response:
    """``GET /dashboard``: one static page; it asks for the admin token and calls the API itself."""
    return static_page("dashboard.html")


async def portal(request: Request) -> Response:
    """``GET /portal``: the partners' own page (English or Spanish). It asks for a partner API key
    and calls the API with it, so it sees what that key may see: its partner, nothing else."""
    return static_page("portal.html")


async def who_am_i(request: Request) -> JSONResponse:
    """``GET /me``: the partner whose API key this is (the portal's first call). The admin token is
    not a partner: 403, pointing at the dashboard."""
    caller = caller_of(request)
    if caller.is_admin:
        raise ApiError(403, "not_a_partner", "This is the admin token: /me and the portal are for partner API keys. "
                                             "The admin's page is /dashboard.")
    partner = await known_partner(context(request).store, caller.partner_id or "")
    if partner is None:
        raise partner_not_found(caller.partner_id)
    return JSONResponse(partner_json(partner, context(request)))


async def stats(request: Request) -> JSONResponse:
    """``GET /stats``: what the dashboard draws — partners' success rates, totals, outcomes per
    minute — and the processes serving from this database (alive: a heartbeat in the last 6 s)."""
    ctx = context(request)
    partners = ctx.store.all_partners()
    counts = await db(ctx.store.partner_delivery_counts)
    now = ctx.clock()
    minutes = await db(ctx.store.outcomes_per_minute, now - 3600)
    rows = []
    for p in partners:
        c = counts.get(p.id, {})
        done = c.get("delivered", 0) + c.get("failed", 0)
        rows.append({"partner_id": p.id, "partner_name": p.name, "status": p.status,
                     "disabled_reason": p.disabled_reason,
                     "failing_since": int(p.failing_since) if p.failing_since else None,
                     "circuit": ctx.loop.circuit(p, now), "max_rate_per_s": p.max_rate_per_s,
                     "delivered": c.get("delivered", 0),
                     "failed": c.get("failed", 0), "pending": c.get("pending", 0),
                     "success_rate": round(c.get("delivered", 0) / done, 4) if done else None})
    per_minute: dict[int, dict[str, int]] = {}
    for minute, state, n in minutes:
        per_minute.setdefault(minute, {"minute": minute, "delivered": 0, "failed": 0})[state] = n
    totals = {state: sum(c.get(state, 0) for c in counts.values()) for state in ("pending", "delivered", "failed")}
    processes = [{"id": p["id"], "host": p["host"], "pid": p["pid"], "started_at": int(p["started_at"]),
                  "seen_at": int(p["seen_at"]), "this": p["id"] == ctx.loop.process_id} for p in ctx.loop.processes]
    return JSONResponse({"partners": rows, "totals": {**totals, "in_flight": ctx.loop.in_flight},
                         "per_minute": sorted(per_minute.values(), key=lambda m: m["minute"]),
                         "processes": processes, "now": int(now)})


async def websocket_required(request: Request) -> JSONResponse:
    """``GET /ws`` without a WebSocket handshake: say what to do instead of a bare 404."""
    return error_response(426, "websocket_required", "/ws is a WebSocket: connect with ws:// or wss://, offering "
                          "the subprotocols webhookd and token.<token from POST /realtime/tokens>.",
                          {"Upgrade": "websocket", "Connection": "Upgrade"})


async def openapi_document(request: Request) -> JSONResponse:
    """``GET /openapi.json``: the API described, with this server's event catalog."""
    return JSONResponse(openapi.document(context(request).config.events, __version__))


# --- Health ---------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    """``GET /health``: 200 when the database answers and its last write succeeded; 503 otherwise,
    naming the fault, so a load balancer and the operator see a full disk, not only a dead database."""
    store = context(request).store
    try:
        ok = await db(store.ping)
    except Exception:
        ok = False
    if not ok:
        return error_response(503, "database_unavailable", "The database does not answer.")
    fault = store.write_fault
    if fault is not None and not await db(store.storage_writable):
        return error_response(503, "storage_unavailable", f"The database cannot be written: {fault}. Free disk "
                                                          "space; writes resume by themselves.", {"Retry-After": "30"})
    return JSONResponse({"status": "ok"})


# =====================================================================================
# 5. The route table — who may call each route — and the application
# =====================================================================================

ROUTES = [
    route("GET", "/health", health, PUBLIC),
    route("POST", "/partners/register", register_partner, REGISTRATION),
    route("GET", "/partners", list_partners, ADMIN),
    route("GET", "/partners/{partner_id}", get_partner, CALLER),
    route("PATCH", "/partners/{partner_id}", update_partner, CALLER),
    route("POST", "/partners/{partner_id}/rotate-secret", rotate_secret, CALLER),
    route("POST", "/partners/{partner_id}/api-key", reissue_api_key, CALLER),
    route("DELETE", "/partners/{partner_id}", delete_partner, CALLER),
    route("POST", "/partners/{partner_id}/cancel-pending", cancel_pending, ADMIN),
    route("POST", "/partners/{partner_id}/test", send_test_event, CALLER),
    route("POST", "/partners/{partner_id}/recover", recover_failed, CALLER),
    route("POST", "/partners/{partner_id}/replay", replay_events, CALLER),
    route("POST", "/events", publish_event, ADMIN),
    route("POST", "/events/batch", publish_batch, ADMIN),
    route("GET", "/events/{event_id}", get_event, ADMIN),
    route("GET", "/events/{event_id}/trace", trace_event, ADMIN),
    route("GET", "/deliveries", list_deliveries, CALLER),
    route("GET", "/deliveries/{delivery_id}", get_delivery, CALLER),
    route("POST", "/deliveries/{delivery_id}/retry", retry_delivery, CALLER),
    route("POST", "/webhooks/partners", receive_partner_event, SIGNED),
    route("GET", "/inbound", list_inbound, ADMIN),
    route("POST", "/realtime/tokens", mint_realtime_token, ADMIN),
    route("GET", "/metrics", prometheus_metrics, METRICS),
    route("GET", "/stats", stats, ADMIN),
    route("GET", "/audit", list_audit, ADMIN),
    route("GET", "/dashboard", dashboard, PUBLIC),
    route("GET", "/portal", portal, PUBLIC),
    route("GET", "/me", who_am_i, CALLER),
    route("GET", "/openapi.json", openapi_document, PUBLIC),
    WebSocketRoute("/ws", live_notifications),
    route("GET", "/ws", websocket_required, PUBLIC),  # the same path asked for over plain HTTP
]


def create_app(config: Config, *, clock: Callable[[], float] = time.time,
               rng: Any = None) -> Starlette:
    """The Starlette app. The store opens and the delivery loop starts in its lifespan."""
    # However uvicorn is started (`webhookd serve`, or `uvicorn` by hand with its access log on),
    # no credential in a query string reaches a log line.
    for name in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(name).addFilter(ACCESS_LOG_FILTER)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        ctx = app.state.ctx = build_context(config, clock, rng)
        await asyncio.to_thread(ctx.alerts.install, clock())
        await ctx.loop.start()
        await ctx.alerts.start(wake=ctx.loop.wake)
        log_stale_subscriptions(ctx.store, config.events)
        stop_listening = _listen_to_other_processes(ctx)
        logger.info("webhookd %s ready; database %s", __version__, ctx.store.engine.describe())
        try:
            yield
        finally:
            await asyncio.to_thread(stop_listening)
            await ctx.alerts.stop()
            await ctx.loop.stop()
            ctx.store.close()

    proxies = [Middleware(RealClient, trusted=config.server.trusted_proxies)] if config.server.trusted_proxies else []
    return Starlette(routes=ROUTES, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS, middleware=proxies)


def _listen_to_other_processes(ctx: Context) -> Callable[[], None]:
    """On PostgreSQL, hints from the other processes on the database: deliveries were published
    (look for due work now rather than at the next poll), a /ws offer for our users."""
    loop = asyncio.get_running_loop()

    def partner_changed(payload: str) -> None:  # in the listening thread: reading partners may block
        try:
            note = json.loads(payload)
            ctx.store.reload_partners()
        except Exception:
            logger.exception("reading partners after another process changed one failed; the next poll will")
            return
        loop.call_soon_threadsafe(ctx.loop.partner_changed, note)

    return ctx.store.listen({
        WORK_CHANNEL: lambda payload: ctx.loop.wake(),
        OFFERS_CHANNEL: lambda payload: loop.call_soon_threadsafe(relay_offer, ctx, payload),
        PARTNERS_CHANNEL: partner_changed,
    })


def build_context(config: Config, clock: Callable[[], float], rng: Any) -> Context:
    """What the routes share: the store, the delivery loop, /ws tokens, rate limits, metrics."""
    store = open_store(config.storage.target, lock_timeout_s=config.storage.lock_timeout_s,
                       statement_timeout_s=config.storage.statement_timeout_s)
    counters = metrics.Metrics()
    settings = delivery.Settings.from_config(config, user_agent=f"webhookd/{__version__}")
    alerts = Alerts(config.alerts, store, clock, new_id, max_attempts=config.delivery.max_attempts)
    loop = delivery.DeliveryLoop(store, settings, rng=rng, clock=clock, metrics=counters, alerts=alerts)
    admin_token(config)  # created now if it is the generated file, before the first request reads it
    admin_tokens = AdminTokens(config, clock)
    tokens = realtime.Tokens(admin_tokens.realtime_keys, config.realtime.token_ttl_s)
    notifier = realtime.Notifier(queue_size=config.realtime.client_queue)
    _add_gauges(counters, store, loop, notifier, clock)
    sec = config.security
    shared = store if store.postgres else None  # several processes: one limit for all of them

    def limit(name: str, rate_per_s: float, burst: float) -> RateLimiter:
        return RateLimiter(rate_per_s, burst, clock, shared=shared, name=name)

    return Context(
        config=config, store=store, loop=loop, clock=clock, metrics=counters,
        notifier=notifier, tokens=tokens,
        inbound_limit=limit("inbound", sec.inbound_rate_per_s, 2 * sec.inbound_rate_per_s),
        inbound_failure_limit=limit("refused", sec.inbound_failures_per_s, 4 * sec.inbound_failures_per_s),
        registration_limit=limit("registration", sec.registration_rate_per_min / 60, sec.registration_rate_per_min),
        partner_write_limit=limit("partner_writes", sec.partner_writes_per_min / 60, sec.partner_writes_per_min),
        alerts=alerts, admin_tokens=admin_tokens)


def _add_gauges(counters: metrics.Metrics, store: Store, loop: delivery.DeliveryLoop,
                notifier: realtime.Notifier, clock: Callable[[], float]) -> None:
    """The /metrics gauges, each read when /metrics is asked for."""
    counters.gauge("webhookd_deliveries", "Deliveries stored, by state.",
                   lambda: {(("state", s),): float(n) for s, n in store.count_by_state().items()})
    counters.gauge("webhookd_deliveries_in_flight",
                   "Attempts claimed and not finished: being sent, or answered and not yet recorded.",
                   lambda: {(): float(loop.in_flight)})
    counters.gauge("webhookd_circuit_breakers_open", "Partners whose circuit is open or half-open.",
                   lambda: {(): float(loop.breakers.open_count(clock()))})
    counters.gauge("webhookd_partner_circuit_open", "1 while a partner's circuit is open or half-open, else 0.",
                   lambda: {(("partner_id", p.id),): float(loop.circuit(p, clock())["state"] != "closed")
                            for p in store.all_partners()})
    if store.postgres:
        counters.gauge("webhookd_db_oldest_transaction_seconds",
                       "Age of the oldest open transaction on the database (a long one stalls claims).",
                       lambda: {(): store.database_health()["oldest_transaction_seconds"]})
        counters.gauge("webhookd_db_deliveries_dead_rows", "Dead rows of the deliveries table, awaiting vacuum.",
                       lambda: {(): store.database_health()["deliveries_dead_rows"]})
    counters.gauge("webhookd_websocket_clients", "Connected /ws clients.",
                   lambda: {(): float(len(notifier.clients))})
    counters.gauge("webhookd_websocket_dropped_messages", "Messages dropped for /ws clients that did not read.",
                   lambda: {(): float(notifier.dropped)})


if __name__ == "__main__":  # `python webhookd.py serve` works as well as the `webhookd` command
    from cli import main

    sys.exit(main())

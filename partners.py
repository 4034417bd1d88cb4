"""Partner management: the ``/partners`` routes, and what a partner's fields may hold.

Top to bottom:

1. the routes: register, list, read, change (who may change a status), rotate the secret,
   reissue the API key, delete, cancel what is pending, ping, recover failed deliveries,
   replay a time window;
2. what they share with the deliveries' routes in ``webhookd.py``: a partner as the API shows
   it (never a secret), the 409 for a partner that is not active, an operator's probe;
3. the checks of a partner's fields. Each takes a value from a request body and returns what the
   store keeps, or raises the ``422 invalid_field`` that names the field and says what to send
   instead (a ``403`` for a change of status the caller may not make). Registration and ``PATCH``
   use the same checks, and publishing uses ``check_channels`` for an event's channels. Who may
   set a partner's audience (``check_audience_setter``) and its status (``check_status_change``)
   is decided here too.

Who may call each route is the route table's (``webhookd.ROUTES``); a route here reads the
partner through ``web.owned_partner``, so a partner's API key reaches its own partner only.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse

import egress
import partner_terms
import signing
import targets
import verification
from config import SecurityConfig
from models import NewEvent, Partner, RetryTerms
from polling import check_delivery, delivery_mode
from web import (
    ApiError,
    Context,
    audit_entry,
    caller_of,
    client_address,
    context,
    cursor_text,
    db,
    hash_api_key,
    invalid,
    is_small_number,
    new_api_key,
    new_delivery_id,
    new_id,
    new_shared_secret,
    owned_partner,
    owned_partner_id,
    page_json,
    page_params,
    partner_not_found,
    read_json_object,
    secret_json,
)

if TYPE_CHECKING:
    from store import Store

logger = logging.getLogger("webhookd")

TEST_EVENT = "webhook.test"


# =====================================================================================
# 1. The routes
# =====================================================================================


async def register_partner(request: Request) -> JSONResponse:
    """``POST /partners/register``: the only response that ever shows the secret and the API key."""
    ctx = context(request)
    caller = caller_of(request)
    if caller is None or not caller.is_admin:  # open registration: limit each client address
        await ctx.registration_limit.check(client_address(request), "registrations")
    body = await read_json_object(request, allowed={"partner_name", "webhook_url", "events", "max_rate_per_s",
                                                    "contact_email", "channels", "filter", "ordering", "delivery",
                                                    *partner_terms.ADMIN_ONLY, *CERT_FIELDS})
    check_audience_setter(body, caller)  # an open registration cannot pick its own audience
    terms = check_terms(body, caller, ctx)  # nor its own retry policy and headers
    name = check_partner_name(body.get("partner_name"))
    delivery = check_delivery(body.get("delivery", "push"), body.get("webhook_url"))
    url = "" if delivery == "pull" else await check_webhook_url(body.get("webhook_url"), ctx.config.security)
    events = check_events(body.get("events"), ctx.config.events)
    rate = check_max_rate(body.get("max_rate_per_s"))
    email = check_contact_email(body.get("contact_email"))
    channels = check_channels(body.get("channels", []))
    payload_filter = check_filter(body.get("filter"))
    ordering = check_ordering(body.get("ordering", "concurrent"))
    retry, extra_headers = terms["retry"] or RetryTerms(), terms["extra_headers"] or ()
    identity = check_client_certificate(body, None, caller, ctx.clock())
    shared_secret, api_key = new_shared_secret(), new_api_key()
    partner_id = new_id("partner_", unpredictable=True)
    audit = audit_entry(request, "partner.registered", partner_id,
                        {"partner_name": name, "webhook_url": url or None, "delivery": delivery, "events": events,
                         "max_rate_per_s": rate, "contact_email": email, "channels": channels,
                         "filter": payload_filter or None, "ordering": ordering,
                         "retry": partner_terms.own_terms_json(retry),
                         "extra_headers": [name for name, _ in extra_headers],
                         "client_certificate": fingerprint(identity.get("client_cert"))})
    partner = await db(ctx.store.add_partner, partner_id=partner_id, name=name, webhook_url=url, events=events,
                       secret=shared_secret, api_key_hash=hash_api_key(api_key), now=ctx.clock(),
                       max_rate_per_s=rate, contact_email=email, channels=channels, payload_filter=payload_filter,
                       ordering=ordering, retry=retry, extra_headers=extra_headers, audit=audit, **identity,
                       verification_challenge=verification.challenge_for(url, ctx.config))  # None: not asked
    verification.wake(request)
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
    if change["webhook_url"] not in (None, before.webhook_url):  # a new endpoint proves itself again
        change["verification_challenge"] = verification.challenge_for(change["webhook_url"], ctx.config)
    status = change["status"]
    action = STATUS_ACTIONS[status] if status not in (None, before.status) else "partner.updated"
    audit = audit_entry(request, action, partner_id, changed_fields(before, body, change))
    partner = await db(ctx.store.update_partner, partner_id, now=ctx.clock(), audit=audit, **change)
    if partner is None:
        raise partner_not_found(partner_id)
    if delivery_mode(before) == "pull" and change["webhook_url"]:
        ctx.loop.wake()  # given a URL, its deliveries waiting to be pulled are the loop's to send now
    verification.wake(request)
    if status == "active":
        ctx.loop.partner_reactivated(partner_id)  # the other processes were told by the store
        if before.status == "disabled":
            ctx.alerts.note("partner_enabled", partner_id, f"made active again by the {audit.actor}")
    logger.info("partner %s updated: %s", partner_id, ", ".join(sorted(body)))
    return JSONResponse(partner_json(partner, ctx))


PATCHABLE = {"webhook_url", "events", "channels", "filter", "ordering", "status", "max_rate_per_s", "contact_email",
             *partner_terms.ADMIN_ONLY, "client_certificate", "client_key"}
STATUS_ACTIONS = {"active": "partner.activated", "paused": "partner.paused", "suspended": "partner.suspended"}


async def check_change(body: dict[str, Any], before: Partner, ctx: Context, caller: Any) -> dict[str, Any]:
    """The fields a PATCH sent, checked, as ``Store.update_partner`` takes them: None for a field
    not sent; a removal as the store's "remove" value (a pace of 0, an empty filter, an empty
    address). A partner's own key that sends ``channels``, ``filter``, ``retry`` or
    ``extra_headers`` gets a 403."""
    check_audience_setter(body, caller)
    terms = check_terms(body, caller, ctx, before)
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
        **terms,
        **check_client_certificate(body, before, caller, ctx.clock()),
    }


def changed_fields(before: Partner, body: dict[str, Any], change: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What a PATCH changes, ``{field: {"from": old, "to": new}}`` in the API's names, for the audit
    trail: the fields ``body`` sent that differ from ``before`` (a suspension's reason goes with it)."""
    old = {"webhook_url": before.webhook_url or None, "events": list(before.events), "channels": list(before.channels),
           "filter": before.payload_filter, "ordering": before.ordering, "status": before.status,
           "reason": before.suspended_reason, "max_rate_per_s": before.max_rate_per_s,
           "contact_email": before.contact_email, "retry": partner_terms.own_terms_json(before.retry)}
    new = {**change, "filter": change["payload_filter"] or None, "max_rate_per_s": change["max_rate_per_s"] or None,
           "contact_email": change["contact_email"] or None,
           "retry": partner_terms.own_terms_json(change["retry"]) if change["retry"] is not None else None}
    changed = {name: {"from": old[name], "to": new[name]} for name in old
               if (name in body or name == "reason" and "status" in body) and old[name] != new[name]}
    if change["extra_headers"] is not None:  # names only: a value is a secret
        changed["extra_headers"] = partner_terms.headers_audit(before.extra_headers, change["extra_headers"])
    if "client_cert" in change:  # the certificates' fingerprints; the key is never written anywhere but its column
        changed["client_certificate"] = {"from": fingerprint(before.client_cert),
                                         "to": fingerprint(change["client_cert"]), "key_replaced": "client_key" in body}
    return changed


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
    stays, and for how long, is ``store.delete_partner``'s rule (``docs/api.md``, "A partner's whole life").
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
                        new_delivery_id=new_delivery_id)  # a partner's own max_attempts: the statement's
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
    partner = await owned_partner(request)  # an unknown partner: 404, after the 422 for 'since'
    refuse_if_held(request, partner)
    count = await db(ctx.store.recover_failed, partner_id, since=int(since_text),
                     extra_attempts=partner_terms.max_attempts(partner, ctx.config.delivery), now=ctx.clock(),
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
    partner = await owned_partner(request)
    refuse_if_held(request, partner)
    audit = audit_entry(request, "partner.replayed", partner_id,
                        {"since": int(since), "until": int(until), "event": event_type,
                         "include_cancelled": include_cancelled})
    replayed, last = await db(ctx.store.replay, partner_id, since=int(since), until=int(until), event_type=event_type,
                              after=cursor, limit=limit, now=ctx.clock(),
                              max_attempts=partner_terms.max_attempts(partner, ctx.config.delivery),
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
# 2. Shared with the deliveries' routes
# =====================================================================================


def partner_json(partner: Partner, ctx: Context) -> dict[str, Any]:
    """A partner as the API shows it, with its circuit as the delivery loop sees it now."""
    return {"partner_id": partner.id, "partner_name": partner.name, "webhook_url": partner.webhook_url or None,
            "delivery": delivery_mode(partner),
            "status": partner.status, "events_subscribed": list(partner.events),
            "stale_subscriptions": stale_subscriptions(partner, ctx.config.events),
            "disabled_reason": partner.disabled_reason, "suspended_reason": partner.suspended_reason,
            "failing_since": int(partner.failing_since) if partner.failing_since else None,
            "channels": list(partner.channels), "filter": partner.payload_filter, "ordering": partner.ordering,
            "max_rate_per_s": partner.max_rate_per_s, "contact_email": partner.contact_email,
            "retry": partner_terms.retry_json(partner.retry, ctx.config.delivery),
            "extra_headers": partner_terms.headers_json(partner.extra_headers),
            "client_certificate": egress.describe(partner.client_cert, bool(partner.client_key), ctx.clock()),
            "circuit": ctx.loop.circuit(partner, ctx.clock()),
            "verification": verification.verification_json(partner),
            "created_at": int(partner.created_at), "updated_at": int(partner.updated_at)}


def refuse_if_held(request: Request, partner: Partner | None) -> None:
    """A retry or a recover for a partner that is not active sends nothing until it is: say so
    (409, naming why) unless the caller asks to queue it anyway (``?queue=true``)."""
    if partner is None or partner.status == "active" and not partner.unverified:
        return
    queue = request.query_params.get("queue", "false")
    if queue not in ("true", "false"):
        raise invalid("queue", "must be true or false.")
    if queue == "true":
        return
    why = {"paused": "it is paused", "disabled": f"it was disabled ({partner.disabled_reason})",
           "suspended": f"the admin suspended it ({partner.suspended_reason})"}.get(partner.status, partner.status)
    first, then = "Make it active first", "once active"
    if partner.status == "active":  # active, but its endpoint is not proved yet
        why = "its endpoint has not answered its verification challenge yet (see 'verification' on the partner)"
        first, then = f"Answer the challenge first (POST /partners/{partner.id}/verify sends a new one)", "once verified"
    raise ApiError(409, "partner_held", f"Nothing is sent to partner {partner.id} now: {why}. {first}, or add "
                                        f"?queue=true to queue this anyway (it goes out {then}).")


async def probe_everywhere(ctx: Context, partner_id: str) -> None:
    """An operator asked for another attempt: an open circuit probes now, in this process and
    (PostgreSQL) in every other one, whose own breaker may have opened too."""
    ctx.loop.probe_partner(partner_id)
    await db(ctx.store.tell_partner_changed, partner_id, "probe")


# =====================================================================================
# 3. What a partner's fields may hold
# =====================================================================================


async def check_webhook_url(url: Any, security: SecurityConfig) -> str:
    """A partner's URL: at most 2048 characters, no spaces, and ``targets.parse_target``'s rule
    (http(s), a host, no user:password@, an allowed port); unless private targets are allowed,
    a host that resolves only to public addresses. The sender checks the same before sending."""
    if not isinstance(url, str) or not url:
        raise invalid("webhook_url", "must be a non-empty string like 'https://example.com/webhooks'.")
    if len(url) > 2048:
        raise invalid("webhook_url", "must be at most 2048 characters long.")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise invalid("webhook_url", "must not contain spaces or control characters.")
    try:
        target = targets.parse_target(url, security.allowed_ports)
    except (targets.BadURL, targets.TargetRefused) as exc:
        raise invalid("webhook_url", str(exc)) from None
    if not security.allow_private_targets:
        try:
            await targets.resolve_target_async(target.host, target.port, False)
        except targets.TargetRefused as exc:
            raise invalid("webhook_url", f"must point at a public address: {exc}.") from None
        except TimeoutError:
            raise invalid("webhook_url", f"has a host whose DNS did not answer in time: {target.host!r}.") from None
        except OSError:
            raise invalid("webhook_url", f"has a host that does not resolve: {target.host!r}.") from None
    return url


def check_events(events: Any, catalog: dict[str, dict[str, str]], kept: tuple[str, ...] = ()) -> list[str]:
    """Event types to subscribe to: each in the catalog, or among ``kept`` — the partner's
    subscriptions now, which may name a type since removed from the catalog (a stale one; a PATCH
    that leaves it in place is not an error)."""
    valid = ", ".join(sorted(catalog))
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise invalid("events", f"must be a non-empty list of event types. Valid types: {valid}.")
    for event_type in events:
        if event_type not in catalog and event_type not in kept:
            raise invalid("events", f"has the unknown event type {event_type[:100]!r}. Valid types: {valid}.")
    return sorted(set(events))


def stale_subscriptions(partner: Partner, catalog: dict[str, dict[str, str]]) -> list[str]:
    """The partner's subscriptions to event types no longer in the catalog: nothing is published
    to them any more. Shown in ``GET /partners/{id}`` and logged at start-up."""
    return [e for e in partner.events if e not in catalog]


def log_stale_subscriptions(store: Store, catalog: dict[str, dict[str, str]]) -> None:
    for partner in store.all_partners():
        if stale := stale_subscriptions(partner, catalog):
            logger.warning("partner %s is subscribed to %s, no longer in the event catalog ([events] in the "
                           "config): nothing is published to them. Add them back, or PATCH the partner's events.",
                           partner.id, ", ".join(stale))


def check_max_rate(rate: Any) -> float | None:
    """A partner's pace: attempts started per second (at most 10,000), or null for none."""
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.01 <= rate <= 10_000:
        raise invalid("max_rate_per_s", "must be a number of requests per second from 0.01 to 10000, or null.")
    return float(rate)


EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")


def check_contact_email(email: Any) -> str | None:
    """Whom the operator writes to: an address like name@example.com (at most 254 characters), or
    null for none. Only its shape is checked; nothing is sent to it."""
    if email is None:
        return None
    if not isinstance(email, str) or len(email) > 254 or not EMAIL.fullmatch(email) \
            or any(ord(c) < 32 or ord(c) == 127 for c in email):
        raise invalid("contact_email", "must be an email address like ops@example.com (at most 254 characters), "
                                       "or null.")
    return email


CHANNEL = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def check_channels(channels: Any, field: str = "channels", at_least: int = 0, at_most: int = 50) -> list[str]:
    """Channel names, like ``tour_123`` or ``operator:acme``: letters, digits and ``_.:-``, 1-100
    characters each."""
    if not isinstance(channels, list) or not at_least <= len(channels) <= at_most \
            or not all(isinstance(c, str) and CHANNEL.fullmatch(c) for c in channels):
        raise invalid(field, f"must be a list of {at_least} to {at_most} channel names, each 1-100 letters, digits "
                             "or _ . : - (like \"tour_123\").")
    return sorted(set(channels))


def check_filter(payload_filter: Any) -> dict[str, list[Any]]:
    """A partner's payload filter: ``{"field": value or [values]}`` on top-level payload fields, at
    most 20 fields and 100 values each; values are strings, numbers or booleans. An event reaches the
    partner only if each field is one of its values (``Partner.accepts``). ``{}`` or null: none."""
    if payload_filter is None:
        return {}
    if not isinstance(payload_filter, dict) or len(payload_filter) > 20:
        raise invalid("filter", "must be an object of at most 20 payload fields, like {\"currency\": [\"EUR\"]}, "
                                "or null.")
    normal = {}
    for name, values in payload_filter.items():
        values = values if isinstance(values, list) else [values]
        if not name or len(name) > 100 or not name.isprintable():
            raise invalid("filter", f"has a field name that is not 1-100 printable characters: {name[:100]!r}.")
        if not 1 <= len(values) <= 100 or not all(isinstance(v, (str, int, float)) for v in values) \
                or any(isinstance(v, str) and len(v) > 500 for v in values):
            raise invalid("filter", f"field {name[:100]!r} must be a string, number or boolean, or a list of 1 to "
                                    "100 of them (strings up to 500 characters).")
        normal[name] = values
    return normal


# Who sets a partner's audience. Beyond its event types, ``channels`` and ``filter`` decide which
# events reach a partner: one more channel is one more audience (operator B's bookings), a filter
# removed lets in everything it kept out. That is the admin's decision alone, at registration and
# with PATCH. A partner's own key (and an anonymous open registration) reads them and never sets
# them, not even to narrow them: one rule, with no comparison of old and new values to get wrong.
# A partner that wants fewer events asks the operator, or ignores what it does not need.
AUDIENCE_FIELDS = ("channels", "filter")


def check_terms(body: dict[str, Any], caller: Any, ctx: Context, before: Partner | None = None) -> dict[str, Any]:
    """A partner's own terms as a request sent them (``partner_terms.py``: the admin's alone),
    checked, as ``Store.update_partner`` takes them: ``retry`` and ``extra_headers``, None when not
    sent. ``before``: the partner a PATCH changes (its headers are changed, not replaced)."""
    refuse_unless_admin(body, caller, partner_terms.ADMIN_ONLY, "terms_admin_only",
                        "a partner's retry policy and extra headers are the operator's to decide.")
    try:
        retry = partner_terms.check_retry(body["retry"], ctx.config.delivery) if "retry" in body else None
        headers = partner_terms.check_extra_headers(body["extra_headers"], before.extra_headers if before else (),
                                                    patching=before is not None) if "extra_headers" in body else None
    except partner_terms.Refused as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    return {"retry": retry, "extra_headers": headers}


def refuse_unless_admin(body: dict[str, Any], caller: Any, fields: tuple[str, ...], code: str, why: str) -> None:
    """The 403 ``code`` for any of ``fields`` sent by anyone but the admin (``caller`` None: an
    anonymous open registration): who gets which events, how often and with what credentials
    webhookd knocks, are the operator's decisions, never the partner's."""
    if caller is not None and caller.is_admin:
        return
    for field in fields:
        if field in body:
            raise ApiError(403, code, f"'{field}' is set by the admin only: {why} Leave it out of the request, "
                                      "and ask the operator.")


def check_audience_setter(body: dict[str, Any], caller: Any) -> None:
    refuse_unless_admin(body, caller, AUDIENCE_FIELDS, "audience_admin_only",
                        "a partner's channels and filter decide which events reach it, and that is the "
                        "operator's decision.")


CERT_FIELDS = ("client_certificate", "client_key")


def check_client_certificate(body: dict[str, Any], before: Partner | None, caller: Any, now: float) -> dict[str, str]:
    """``client_certificate`` and ``client_key`` (PEM) as the store takes them: ``{}`` if neither was
    sent, ``""`` for both to remove them (``client_certificate: null``). The admin's alone (403). A new
    certificate may come alone when the partner's key is the one it was made for (a renewal); either
    way the pair must load together and the certificate be valid now (``egress.check_pair``)."""
    if not body.keys() & set(CERT_FIELDS):
        return {}
    refuse_unless_admin(body, caller, CERT_FIELDS, "admin_only", "send the certificate and its key to the "
                        "operator, who sets them (PATCH /partners/{id}); the key is never shown again.")
    if "client_certificate" in body and body["client_certificate"] is None:
        if body.get("client_key") is not None:
            raise invalid("client_key", "goes with a client_certificate: null removes both.")
        return {"client_cert": "", "client_key": ""}
    cert = body.get("client_certificate", before.client_cert if before else None)
    key = body.get("client_key", before.client_key if before else None)
    try:
        egress.check_pair(cert, key, now)
    except egress.CertificateProblem as exc:
        raise invalid(exc.field, str(exc)) from None
    return {"client_cert": cert, "client_key": key}


def fingerprint(cert_pem: str | None) -> str | None:
    """How the audit trail names a client certificate: its SHA-256 fingerprint (never the key)."""
    try:
        return egress.inspect(cert_pem).fingerprint if cert_pem else None
    except egress.CertificateProblem:
        return "unreadable"


def check_ordering(ordering: Any) -> str:
    if ordering not in ("concurrent", "fifo"):
        raise invalid("ordering", "must be 'concurrent' (the default: many attempts at once) or 'fifo' (one at a "
                                  "time, in publish order; a failing delivery holds the ones behind it).")
    return ordering


def check_partner_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise invalid("partner_name", "must be a non-empty string.")
    if len(name) > 200:
        raise invalid("partner_name", "must be at most 200 characters long.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise invalid("partner_name", "must not contain control characters.")
    return name.strip()


# Who may change a partner's status. The admin: anything among active, paused, suspended (with a
# reason). The partner itself: pause and resume, and re-enable what the delivery loop disabled (its
# endpoint, its fix); never out of or into "suspended", which is the admin's to decide.
PARTNER_MAY = {("active", "paused"), ("paused", "active"), ("disabled", "active"), ("active", "active"),
               ("paused", "paused")}


def check_status_change(partner: Partner, body: dict[str, Any], caller: Any) -> str | None:
    """The suspension reason to store (None unless suspending), or the 4xx that says why not:
    a ``status`` (``null`` included) that is not one of the three, a ``reason`` without
    ``"suspended"``, a change the caller may not make."""
    status, reason = body.get("status"), body.get("reason")
    if "reason" in body and status != "suspended":
        raise invalid("reason", "goes with \"status\": \"suspended\" only.")
    if "status" not in body:
        return None
    if status not in ("active", "paused", "suspended"):
        raise invalid("status", "must be 'active', 'paused' or (admin only) 'suspended'.")
    if not caller.is_admin and (partner.status, status) not in PARTNER_MAY:
        if partner.status == "suspended":  # the access layer refuses a suspended key's writes first; same answer
            raise ApiError(403, "partner_suspended", f"This partner was suspended by the admin "
                                                     f"({partner.suspended_reason}); only the admin can lift it.")
        raise ApiError(403, "admin_only", f"Only the admin can change a partner from {partner.status!r} to {status!r}.")
    if status != "suspended":
        return None
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise invalid("reason", "must say why, in 1 to 500 characters, when suspending a partner.")
    return reason.strip()

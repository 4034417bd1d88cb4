"""webhookd: a small, auditable webhook hub. Start reading here.

Partners register an endpoint and receive a shared secret. Our system publishes
events; webhookd stores each one, signs it with HMAC-SHA256 and delivers it to every
subscribed partner, durably and with retries. Partners post their own signed events
back to us, and a promoted offer reaches our users live over WebSocket.

This file is the application and the event routes, top to bottom:

1. an event and its trace (publishing itself, ``POST /events``, is ``publishing.py``: it checks
   the payload against the catalog, takes out whom it is for, and answers 202 only once the
   event and its deliveries are on disk);
2. deliveries: read them (a partner sees only its own), retry a failed one, the audit trail;
3. operations: health, metrics, the dashboard, the partners' portal, the OpenAPI document;
4. the route table, which says who may call each route, and ``create_app``, whose lifespan
   opens the store and starts the delivery loop and the housekeeping.

Where the rest lives: first in the order a published event meets it, then the other jobs.

=======================  ============================================================
``web.py``               what every route stands on: errors, credentials, access
                         rules, rate limits, reading bodies, paging, ``db()``;
                         ``web_commit.py`` a group-commit write awaited on the loop
``publishing.py``        ``POST /events``: check, store with its deliveries, answer 202
``storage.py``           opens the store the config names: ``store_sqlite.py`` (the
                         default) or ``store_postgres.py``, each its schema,
                         migrations and publish → claim → finish
``store.py``             what both engines share: errors, the group commit, ``Store``;
                         its parts ``store_partners.py``, ``store_history.py``,
                         ``store_processes.py``; rows to objects in ``store_rows.py``;
                         the SQL both write alike in ``store_schema.py``
``delivery.py``          the delivery loop: claim → one task per attempt on the sender
                         thread → recorder; backoff; ``attempt_log.py`` its log lines;
                         ``governor.py`` its in-flight bound (publishes first)
``breakers.py``          a partner's circuit breaker, failing streak and pace
``partner_terms.py``     a partner's own retry policy and extra headers (the admin's)
``sender.py``            one HTTP attempt; ``sender_http.py`` reads the answer;
                         ``signing.py`` signs it, ``targets.py`` says where it may go,
                         ``egress.py`` how it leaves (proxy, client certificates)
``housekeeping.py``      heartbeats, and the sweeper's expiry and retention passes
``partners.py``          the ``/partners`` routes and what a partner's fields may hold
``inbound.py``           the other direction: verify → store once → 200 → offer on
                         ``/ws``; ``realtime.py`` the ``/ws`` tokens and fan-out
``timeline.py``          one event's story, from the rows the loop keeps;
                         ``trace_context.py`` the W3C ``traceparent`` passed on
``windows.py``           ``since`` and ``until`` on the lists, as ranges of ids
``erasure.py``           an event's content erased (``DELETE /events/{id}/content``), and
                         each event type's own retention
``alerts.py``            webhookd's own signed alerts to the operator
``catalog.py``           the event catalog as partners read it: ``/event-types``
``portal_links.py``      the portal links the admin mints for a partner: signed tokens
                         in a URL fragment (``POST /partners/{id}/portal-link``)
``doctor.py``            the receiver doctor: ``POST /partners/{id}/check`` probes an endpoint
``polling.py``           pulling instead of receiving: ``GET /partners/{id}/events``
``verification.py``      proof the endpoint is the partner's: a challenge it must echo before
                         anything else is sent; its rows in ``store_verification.py``
``config.py``            every config key and its default (``config_template.py``: the
                         file ``webhookd init`` writes); ``cli.py`` the command line,
                         ``cli_parser.py`` its grammar, ``serving.py`` ``webhookd
                         serve``, ``backup.py`` backup, restore and migrate-store
``models.py``            the nouns; ``metrics.py`` the Prometheus text; ``openapi.py``
                         the API's description, served at ``/openapi.json``
``garbage.py``           the garbage collector kept short: the start-up heap set aside,
                         every pause counted
=======================  ============================================================

``docs/architecture.md`` draws the whole path, with every thread and task.
"""

from __future__ import annotations

import asyncio
import json
import logging
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
import erasure
import garbage
import housekeeping
import metrics
import openapi
import portal_links
import realtime
import timeline
import verification
from alerts import Alerts
from catalog import list_event_types
from config import VERSION, Config, DeliverySettings, admin_token
from doctor import check_endpoint
from inbound import list_inbound, live_notifications, mint_realtime_token, receive_partner_event, relay_offer
from models import AuditEntry, Delivery, Event
from partners import (
    cancel_pending,
    delete_partner,
    get_partner,
    list_partners,
    log_stale_subscriptions,
    partner_json,
    probe_everywhere,
    recover_failed,
    refuse_if_held,
    register_partner,
    reissue_api_key,
    replay_events,
    rotate_secret,
    send_test_event,
    update_partner,
)
from polling import partner_events
from publishing import publish_batch, publish_event
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
    context,
    db,
    error_response,
    invalid,
    known_partner,
    new_id,
    owned_partner,
    page_json,
    page_params,
    partner_not_found,
    read_json_object,
    route,
)
from windows import window_of

__version__ = VERSION

logger = logging.getLogger("webhookd")

# =====================================================================================
# Resource shapes (never a secret)
# =====================================================================================


def delivery_json(d: Delivery, with_attempts: bool = False) -> dict[str, Any]:
    out = {"delivery_id": d.id, "event_id": d.event_id, "event": d.event, "partner_id": d.partner_id,
           "state": d.state, "attempt_count": d.attempt_count,
           "next_attempt_at": int(d.next_attempt_at) if d.state == "pending" else None,
           "held_behind": d.held_behind,
           "created_at": int(d.created_at), "updated_at": int(d.updated_at),
           "event_erased_at": int(d.event_erased_at) if d.event_erased_at is not None else None}
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
    erased = event.erased_at is not None  # its content erased: no payload left to show
    return {"event_id": event.id, "event": event.type, "payload": None if erased else json.loads(event.body),
            "partners": audience.get("partners"), "channels": audience.get("channels"),
            "created_at": int(event.created_at), "erased_at": int(event.erased_at) if erased else None}


# =====================================================================================
# 1. Publishing (``POST /events`` and ``/events/batch``: publishing.py), an event's story
# =====================================================================================


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


async def erase_event(request: Request) -> JSONResponse:
    """``DELETE /events/{id}/content`` (admin): the event's payload, the signatures sent and the
    partners' answers go; its metadata stays, its pending deliveries end ``cancelled``
    (``erasure.py``). Erasing again answers the same, and changes nothing."""
    ctx = context(request)
    event_id = request.path_params["event_id"]
    erased = await db(erasure.erase_content, ctx.store, event_id, now=ctx.clock(),
                      audit=audit_entry(request, "event.erased", None, target=event_id))
    if erased is None:
        raise ApiError(404, "event_not_found", f"No event with id {event_id!r}.")
    for partner_id, cancelled in erased.cancelled.items():
        ctx.metrics.deliveries.inc(cancelled, partner=partner_id, outcome="cancelled")
    if erased.first:
        logger.warning("event %s (%s): content erased by the admin; %d pending deliveries cancelled",
                       event_id, erased.event_type, sum(erased.cancelled.values()))
    return JSONResponse({"event_id": event_id, "event": erased.event_type, "erased_at": int(erased.erased_at),
                         "cancelled_deliveries": sum(erased.cancelled.values())})


def refuse_if_erased(d: Delivery) -> None:
    """409 for a delivery of an erased event: nothing is left to send."""
    if d.event_erased_at is not None:
        raise ApiError(409, "event_erased", f"The content of event {d.event_id} was erased: nothing is left to "
                                            "send. Publish a new event if it is still needed.")


# =====================================================================================
# 2. Deliveries
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
                    state=state, event=q.get("event"), event_id=q.get("event_id"), window=window_of(request))
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
    refuse_if_erased(found)
    partner = await known_partner(ctx.store, found.partner_id)
    if partner is None:
        raise ApiError(409, "partner_deleted", f"Delivery {found.id} was for partner {found.partner_id}, which "
                                               "was deleted: there is nobody to send it to.")
    refuse_if_held(request, partner)
    queued = await db(ctx.store.retry_delivery, found.id, ctx.clock(),
                      audit=audit_entry(request, "delivery.retried", found.partner_id,
                                        {"state": {"from": found.state, "to": "pending"}}, target=found.id))
    if queued is None:
        refuse_if_erased(await _owned_delivery(request))  # erased meanwhile
        raise ApiError(409, "not_failed", f"Delivery {found.id} is {found.state}; only a failed or expired "
                                          "delivery can be retried.")
    await probe_everywhere(ctx, found.partner_id)
    return JSONResponse(delivery_json(queued), status_code=202)  # as queued: it may be sent by now


async def list_audit(request: Request) -> JSONResponse:
    """``GET /audit`` (admin): every write an admin or a partner made, newest first, with who, when,
    from where and what changed (never a secret); ``?partner_id=`` and ``?action=`` narrow it."""
    limit, cursor = page_params(request)
    q = request.query_params
    page = await db(context(request).store.list_audit, limit=limit, cursor=cursor, partner_id=q.get("partner_id"),
                    action=q.get("action"), window=window_of(request))
    return JSONResponse(page_json(page, audit_json))


# =====================================================================================
# 3. Operations: metrics, the dashboard, the API's description, health
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


async def create_portal_link(request: Request) -> JSONResponse:
    """``POST /partners/{id}/portal-link`` (admin): a link to ``/portal`` as this partner alone, for
    ``lifetime_s`` (60 s to 7 days; 1 hour), read-only if asked (``portal_links.py``). The token is
    in the link's fragment, never sent to a server; it is audited and logged without it."""
    ctx = context(request)
    partner = await owned_partner(request)
    fields = await read_json_object(request, allowed={"lifetime_s", "read_only"}) if await request.body() else {}
    try:
        lifetime, read_only = portal_links.lifetime_and_access(fields)
    except ValueError as problem:
        raise invalid(*problem.args) from None
    expires_at = int(ctx.clock()) + lifetime
    token = await db(portal_links.mint, ctx.store, partner.id, expires_at=expires_at, read_only=read_only,
                     audit=audit_entry(request, "partner.portal_link_created", partner.id,
                                       {"lifetime_s": lifetime, "read_only": read_only, "expires_at": expires_at}))
    if token is None:
        raise partner_not_found(partner.id)
    logger.info("partner %s: a %sportal link valid %d s was minted", partner.id, "read-only " if read_only else "",
                lifetime)
    return JSONResponse({"partner_id": partner.id, "url": f"{str(request.base_url).rstrip('/')}/portal#token={token}",
                         "expires_at": expires_at, "read_only": read_only}, status_code=201)


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
    hours = await db(ctx.store.outcomes_per_partner_hour, now - now % 3600 - 23 * 3600)
    rows = []
    for p in partners:
        c = counts.get(p.id, {})
        done = c.get("delivered", 0) + c.get("failed", 0)
        rows.append({"partner_id": p.id, "partner_name": p.name, "status": p.status,
                     "disabled_reason": p.disabled_reason,
                     "failing_since": int(p.failing_since) if p.failing_since else None,
                     "circuit": ctx.loop.circuit(p, now), "max_rate_per_s": p.max_rate_per_s,
                     "verification": verification.verification_json(p),
                     "concurrency": ctx.loop.partner_limits.limit(p.id),
                     "delivered": c.get("delivered", 0),
                     "failed": c.get("failed", 0), "pending": c.get("pending", 0),
                     "success_rate": round(c.get("delivered", 0) / done, 4) if done else None})
    per_minute: dict[int, dict[str, int]] = {}
    for minute, state, n in minutes:
        per_minute.setdefault(minute, {"minute": minute, "delivered": 0, "failed": 0})[state] = n
    totals = {state: sum(c.get(state, 0) for c in counts.values()) for state in ("pending", "delivered", "failed")}
    processes = [{"id": p["id"], "host": p["host"], "pid": p["pid"], "started_at": int(p["started_at"]),
                  "seen_at": int(p["seen_at"]), "this": p["id"] == ctx.housekeeping.process_id}
                 for p in ctx.housekeeping.processes]
    return JSONResponse({"partners": rows, "totals": {**totals, "in_flight": ctx.loop.in_flight},
                         "delivery": {**ctx.loop.publish_first.describe(), **ctx.loop.give_way.describe()},
                         "per_minute": sorted(per_minute.values(), key=lambda m: m["minute"]),
                         "per_partner_hour": per_partner_hour(hours),
                         "processes": processes, "now": int(now)})


def per_partner_hour(hours: list[tuple[str, int, str, int]]) -> list[dict[str, Any]]:
    """``/stats``' ``per_partner_hour``: for each partner, its delivered and failed deliveries by
    the hour they ended, over the last 24 hours (this one included); hours with none are left out."""
    partners: dict[str, dict[int, dict[str, int]]] = {}
    for partner_id, hour, state, n in hours:
        partners.setdefault(partner_id, {}).setdefault(hour, {"hour": hour, "delivered": 0, "failed": 0})[state] = n
    return [{"partner_id": p, "hours": list(by_hour.values())} for p, by_hour in partners.items()]


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
# 4. The route table — who may call each route — and the application
# =====================================================================================

# Starlette tries the routes in this order, a regular expression each, so the ones called most, with fixed
# paths, come first: a publish, a health check, an inbound event.
ROUTES = [
    route("POST", "/events", publish_event, ADMIN),
    route("GET", "/health", health, PUBLIC),
    route("POST", "/webhooks/partners", receive_partner_event, SIGNED),
    route("POST", "/events/batch", publish_batch, ADMIN),
    route("POST", "/partners/register", register_partner, REGISTRATION),
    route("GET", "/partners", list_partners, ADMIN),
    route("GET", "/partners/{partner_id}", get_partner, CALLER),
    route("PATCH", "/partners/{partner_id}", update_partner, CALLER),
    route("POST", "/partners/{partner_id}/rotate-secret", rotate_secret, CALLER),
    route("POST", "/partners/{partner_id}/api-key", reissue_api_key, CALLER),
    route("DELETE", "/partners/{partner_id}", delete_partner, CALLER),
    route("POST", "/partners/{partner_id}/cancel-pending", cancel_pending, ADMIN),
    route("POST", "/partners/{partner_id}/test", send_test_event, CALLER),
    route("POST", "/partners/{partner_id}/check", check_endpoint, CALLER),
    route("POST", "/partners/{partner_id}/verify", verification.request_verification, CALLER),
    route("POST", "/partners/{partner_id}/recover", recover_failed, CALLER),
    route("POST", "/partners/{partner_id}/replay", replay_events, CALLER),
    route("GET", "/partners/{partner_id}/events", partner_events, CALLER),
    route("GET", "/event-types", list_event_types, CALLER),
    route("GET", "/events/{event_id}", get_event, ADMIN),
    route("GET", "/events/{event_id}/trace", trace_event, ADMIN),
    route("DELETE", "/events/{event_id}/content", erase_event, ADMIN),
    route("GET", "/deliveries", list_deliveries, CALLER),
    route("GET", "/deliveries/{delivery_id}", get_delivery, CALLER),
    route("POST", "/deliveries/{delivery_id}/retry", retry_delivery, CALLER),
    route("GET", "/inbound", list_inbound, ADMIN),
    route("POST", "/realtime/tokens", mint_realtime_token, ADMIN),
    route("GET", "/metrics", prometheus_metrics, METRICS),
    route("GET", "/stats", stats, ADMIN),
    route("GET", "/audit", list_audit, ADMIN),
    route("GET", "/dashboard", dashboard, PUBLIC),
    route("GET", "/portal", portal, PUBLIC),
    route("POST", "/partners/{partner_id}/portal-link", create_portal_link, ADMIN),
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
    if config.server.log_level == "debug":  # webhookd's own DEBUG lines too: one per successful attempt
        logging.getLogger("webhookd").setLevel(logging.DEBUG)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        ctx = app.state.ctx = build_context(config, clock, rng)
        await asyncio.to_thread(ctx.alerts.install, clock())
        await ctx.housekeeping.start()
        await ctx.loop.start()
        await ctx.alerts.start(wake=ctx.loop.wake)
        app.state.verifier = verification.Verifier(ctx.store, ctx.loop.sender, ctx.loop.settings, ctx.loop.wake, clock)
        await app.state.verifier.start(config)
        log_stale_subscriptions(ctx.store, config.events)
        stop_listening = _listen_to_other_processes(ctx)
        logger.info("webhookd %s ready; database %s", __version__, ctx.store.engine.describe())
        try:
            yield
        finally:
            await asyncio.to_thread(stop_listening)
            await ctx.alerts.stop()
            await app.state.verifier.stop()
            await ctx.loop.stop()
            await ctx.housekeeping.stop()
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
    settings = DeliverySettings.from_config(config, user_agent=f"webhookd/{__version__}")
    alerts = Alerts(config.alerts, store, clock, new_id, max_attempts=config.delivery.max_attempts)
    keeper = housekeeping.Housekeeping(store, settings, clock=clock, metrics=counters)
    loop = delivery.DeliveryLoop(store, settings, rng=rng, clock=clock, metrics=counters, alerts=alerts,
                                 live_processes=keeper.live_processes)
    admin_token(config)  # created now if it is the generated file, before the first request reads it
    admin_tokens = AdminTokens(config, clock)
    tokens = realtime.Tokens(admin_tokens.realtime_keys, config.realtime.token_ttl_s)
    notifier = realtime.Notifier(queue_size=config.realtime.client_queue)
    _add_gauges(counters, store, loop, notifier, clock)
    sec = config.security
    shared = store if store.shared else None  # several processes: one limit for all of them

    def limit(name: str, rate_per_s: float, burst: float) -> RateLimiter:
        return RateLimiter(rate_per_s, burst, clock, shared=shared, name=name)

    return Context(
        config=config, store=store, loop=loop, housekeeping=keeper, clock=clock, metrics=counters,
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
    loop.publish_first.add_gauges(counters)  # the in-flight bound, and how long publishes wait
    loop.give_way.add_gauges(counters)       # how long deliveries stepped aside for them
    garbage.PAUSES.install()
    garbage.PAUSES.add_gauges(counters)  # the garbage collector's pauses
    counters.gauge("webhookd_circuit_breakers_open", "Partners whose circuit is open or half-open.",
                   lambda: {(): float(loop.breakers.open_count(clock()))})
    counters.gauge("webhookd_partner_circuit_open", "1 while a partner's circuit is open or half-open, else 0.",
                   lambda: {(("partner_id", p.id),): float(loop.circuit(p, clock())["state"] != "closed")
                            for p in store.all_partners()})
    if store.shared:  # the health of a database server several processes share (store.database_health)
        counters.gauge("webhookd_db_oldest_transaction_seconds",
                       "Age of the oldest open transaction on the database (a long one stalls claims).",
                       lambda: {(): store.database_health()["oldest_transaction_seconds"]})
        counters.gauge("webhookd_db_deliveries_dead_rows", "Dead rows of the deliveries table, awaiting vacuum.",
                       lambda: {(): store.database_health()["deliveries_dead_rows"]})
    counters.gauge("webhookd_websocket_clients", "Connected /ws clients.",
                   lambda: {(): float(len(notifier.clients))})
    counters.gauge("webhookd_websocket_dropped_messages", "Messages dropped for /ws clients that did not read.",
                   lambda: {(): float(notifier.dropped)})

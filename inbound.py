"""The other direction: a partner's signed event comes in, and an offer goes out live.

Read top to bottom, one inbound event:

1. **Verify.** ``POST /webhooks/partners`` checks, in the contract's order (``/openapi.json``): the headers (400),
   the size (413), without ``X-Partner-Id`` a search small enough to run (400), a JSON
   object whose own ``event`` names its type (400), a signature that some partner's
   secret makes — the guide's hex ``X-Webhook-Signature``, or Standard
   Webhooks' ``webhook-signature`` over id, time and body (401; refused signatures are
   rate-limited per claimed partner and client address) — then whether that partner is
   suspended (403, said only once its own signature verified), the partner's own rate
   (429), and a fresh timestamp (401).
2. **Store once.** The canonical body is stored once per (partner, ``webhook-id``,
   ``X-Webhook-Id`` or body hash), through the store's group commit, awaited on the event
   loop itself (``web.group_written``): no worker thread sits waiting for the disk.
3. **200.** ``{"status": "received"}`` goes out only after the commit.
4. **Offer on /ws.** After the 200, a ``tour.promoted`` is pushed to the users connected
   on ``/ws`` (``realtime.py``): the user the payload names, or everyone. A user's page
   gets its ``/ws`` token from ``POST /realtime/tokens``.

Finding the partner needs no database read: the store keeps partners in memory
(``store.partners_accepting_inbound``), so the verification runs on the event loop, and
only many HMACs over a large body move to threads of their own (``_SIGNATURE_THREADS``).

What an unsigned stranger can make us compute is bounded. A request that names its partner
(``X-Partner-Id``) is checked against that partner's secrets only. One that does not is
checked against every partner's, so it is refused with ``400 partner_id_required`` when
that search would be large (a body over ``UNNAMED_MAX_BODY_BYTES`` or more than
``UNNAMED_MAX_PARTNERS`` partners), and otherwise takes one of its address's
refused-signature tokens *before* the search, given back when the signature verifies: an
address whose unnamed signatures fail runs at most a burst of searches and then a few a
second, however many it sends at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

import realtime
import signing
import trace_context
from config import EVENT_TYPE
from models import InboundEvent, Partner
from store_processes import OFFERS_CHANNEL
from web import (
    ApiError,
    Context,
    check_content_type,
    client_address,
    context,
    db,
    invalid,
    new_id,
    page_json,
    page_params,
    parse_object,
    read_body,
    read_json_object,
)
from web_commit import group_written
from windows import window_of

logger = logging.getLogger("webhookd")

PARTNER_MISS_RELOAD_S = 0.2  # PostgreSQL: an unknown X-Partner-Id reads the partners again, at most this often
REFUSED = "refused signatures from this address"  # what the refused-signature limit's 429 names
HMAC_ON_LOOP_BYTES = 65536  # more HMAC input than this per request moves to _SIGNATURE_THREADS

# Without X-Partner-Id a larger body, or more partners to try, is refused (400 partner_id_required).
# The worst unnamed search is then 50 partners x 16 KiB x two bodies (raw and canonical) x two
# secrets (during a rotation): 3.2 MiB of HMAC input, about 2 ms of CPU.
UNNAMED_MAX_BODY_BYTES = 16384
UNNAMED_MAX_PARTNERS = 50

# Many HMACs over a large body run here, never in the default executor: every route's store
# calls wait there (GET /health among them), and a burst of signature searches must not make
# them queue. Two threads: the searches of one moment never hold more than two cores.
_SIGNATURE_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="webhookd-signatures")


async def receive_partner_event(request: Request) -> JSONResponse:
    """``POST /webhooks/partners``: a partner's signed event, stored once, then acknowledged."""
    try:
        return await _receive(request)
    except ApiError as refused:
        context(request).metrics.inbound.inc(result="refused", reason=refused.code)
        logger.info("inbound refused: %s %s", refused.status, refused.code)
        raise


async def _receive(request: Request) -> JSONResponse:
    ctx = context(request)
    signed = _signed_headers(request)
    check_content_type(request)
    unnamed = "x-partner-id" not in request.headers
    if unnamed:  # before the body is read, on its declared length
        _refuse_a_large_unnamed_search(ctx, _declared_length(request))
    raw = await read_body(request, ctx.config.security.max_body_bytes)
    if unnamed:  # and on the body read, before it is parsed
        _refuse_a_large_unnamed_search(ctx, len(raw))
    payload = parse_object(raw, ctx.config.security.max_json_depth)
    event_type = _signed_type(payload, signed)
    now = ctx.clock()
    canonical_body = signing.canonical(payload)
    tolerance_s = ctx.config.security.inbound_tolerance_s
    if signed.standard:  # the time is signed: a stale one is refused before any secret is tried
        if not re.fullmatch(r"[0-9]{1,12}", signed.timestamp):
            raise ApiError(401, "bad_timestamp", "webhook-timestamp must be unix seconds.")
        _check_timestamp(int(signed.timestamp), now, tolerance_s)
    partner = await _verified_sender(request, ctx, raw, payload, canonical_body, signed, now)
    await ctx.inbound_limit.check(partner.id, "events from this partner")
    if not signed.standard:  # the guide's events may carry their time in the body
        _check_timestamp(payload.get("timestamp"), now, tolerance_s)
    dedupe_key = f"id:{signed.msg_id}" if signed.standard else _dedupe_key(request, canonical_body)
    traceparent, tracestate = trace_context.from_headers(request.headers)  # an invalid one is ignored

    stored, created = await group_written(lambda deadline, on_done: ctx.store.add_inbound_soon(
        deadline=deadline, on_done=on_done, inbound_id=new_id("inb_"), partner_id=partner.id, event_type=event_type,
        dedupe_key=dedupe_key, body=canonical_body, now=now, traceparent=traceparent, tracestate=tracestate),
        ctx.loop.give_way)
    ctx.metrics.inbound.inc(result="accepted" if created else "duplicate")
    logger.debug("inbound %s %s from %s%s", stored.id, event_type, partner.id, "" if created else " (duplicate)",
                extra={"inbound_id": stored.id, "event": event_type, "partner_id": partner.id,
                       "duplicate": not created})
    after = None
    if created and event_type in INBOUND_ACTIONS:
        after = BackgroundTask(INBOUND_ACTIONS[event_type], ctx, partner.id, payload, traceparent)
    return JSONResponse({"status": "received", "timestamp": int(stored.received_at)}, background=after)


@dataclass(frozen=True)
class Signed:
    """How a request says it is signed: the guide's hex ``X-Webhook-Signature`` over the body, or
    Standard Webhooks (``webhook-signature`` over id, time and body: a replay with a new id or a
    late time does not verify)."""

    standard: bool
    signature: str
    header_type: str | None          # X-Webhook-Event, if sent
    msg_id: str = ""                 # webhook-id (Standard Webhooks)
    timestamp: str = ""              # webhook-timestamp (Standard Webhooks)


def _signed_headers(request: Request) -> Signed:
    """The signature headers of either scheme, well formed, or a 400. Standard Webhooks when
    ``webhook-signature`` is sent (then all three of its headers are needed; X-Webhook-Event is
    optional), else the guide's X-Webhook-Signature and X-Webhook-Event."""
    headers = request.headers
    event_type = headers.get("x-webhook-event")
    if event_type is not None and not EVENT_TYPE.match(event_type):
        raise ApiError(400, "bad_event_header", "X-Webhook-Event must look like 'tour.promoted' (word.word).")
    if headers.get("webhook-signature"):
        msg_id, timestamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
        if not msg_id or not timestamp:
            raise ApiError(400, "missing_headers", "Standard Webhooks needs webhook-id, webhook-timestamp and "
                                                   "webhook-signature together.")
        if len(msg_id) > 256 or any(ord(c) < 33 or ord(c) > 126 for c in msg_id):
            raise ApiError(400, "bad_webhook_id", "webhook-id must be at most 256 printable ASCII characters.")
        return Signed(True, headers["webhook-signature"], event_type, msg_id, timestamp)
    signature = headers.get("x-webhook-signature")
    if not signature or not event_type:
        raise ApiError(400, "missing_headers", "Send both X-Webhook-Signature and X-Webhook-Event headers "
                                               "(or Standard Webhooks' webhook-id, webhook-timestamp and "
                                               "webhook-signature).")
    return Signed(False, signature, event_type)


def _signed_type(payload: dict[str, Any], signed: Signed) -> str:
    """The event's type, from the signed body: its ``event`` field (or, with Standard Webhooks, its
    ``type``, that scheme's name for it). Never from a header alone: the signature does not cover
    headers, so the same signed bytes could be replayed under another type."""
    event_type = payload.get("event", payload.get("type") if signed.standard else None)
    if event_type is None:
        raise ApiError(400, "missing_event", "The body must name its type in an 'event' field (the signature "
                                             "covers the body, not X-Webhook-Event), e.g. \"event\": \"tour.purchased\".")
    if not isinstance(event_type, str) or not EVENT_TYPE.match(event_type):
        raise ApiError(400, "bad_event", "The body's 'event' must look like 'tour.promoted' (word.word).")
    if signed.header_type is not None and signed.header_type != event_type:
        raise ApiError(400, "event_mismatch", "X-Webhook-Event must equal the payload's 'event' field.")
    return event_type


async def _verified_sender(request: Request, ctx: Context, raw: bytes, payload: dict, canonical_body: bytes,
                           signed: Signed, now: float) -> Partner:
    """The partner whose secret made the signature: the one ``X-Partner-Id`` names, else any
    partner that is not disabled or suspended.

    Refused signatures are limited per (claimed partner, client address), so that behind a
    reverse proxy, where every client has the proxy's address, a forger limits only itself:
    with ``X-Partner-Id`` one partner's secrets are tried and a valid signature always passes,
    whatever a forger did; without it every partner's secrets are tried, a cost bounded by
    ``_search_unnamed``."""
    partner_id = request.headers.get("x-partner-id")
    failures = f"{partner_id or '*'}@{client_address(request)}"
    search = functools.partial(_search, ctx, raw=raw, payload=payload, canonical_body=canonical_body, signed=signed,
                               now=now)
    if partner_id is None:
        return await _search_unnamed(ctx, failures, search)
    named = await _named_partner(ctx, partner_id)
    partner = await search([named] if named is not None and named.status != "disabled" else [])
    if partner is None:
        await ctx.inbound_failure_limit.check(failures, REFUSED)  # a 429 once the bucket is empty
        raise _invalid_signature()
    if partner.status == "suspended":  # said only to the partner itself: the signature verified
        raise ApiError(403, "partner_suspended", f"Partner {partner.id} is suspended by the admin "
                                                 f"({partner.suspended_reason}); its events are refused until "
                                                 "the admin lifts it.")
    return partner


async def _named_partner(ctx: Context, partner_id: str) -> Partner | None:
    """The partner ``X-Partner-Id`` names, from memory (like ``partners_accepting_inbound``: no
    thread hop); on a shared database an unknown id reads the partners again (registered through
    another process just now?), at most every ``PARTNER_MISS_RELOAD_S``."""
    named = ctx.store.get_partner(partner_id)
    if named is None and ctx.store.shared:
        await db(ctx.store.reload_partners, at_most_every_s=PARTNER_MISS_RELOAD_S)
        named = ctx.store.get_partner(partner_id)
    return named


def _refuse_a_large_unnamed_search(ctx: Context, body_bytes: int) -> None:
    """Without ``X-Partner-Id`` every partner's secrets are tried: a body over
    ``UNNAMED_MAX_BODY_BYTES`` (but within ``max_body_bytes``: a larger one is a 413), or more
    than ``UNNAMED_MAX_PARTNERS`` partners to try, is a 400 that asks the partner to name itself."""
    too_large = UNNAMED_MAX_BODY_BYTES < body_bytes <= ctx.config.security.max_body_bytes
    if too_large or len(ctx.store.partners_accepting_inbound()) > UNNAMED_MAX_PARTNERS:
        raise ApiError(400, "partner_id_required",
                       "Send X-Partner-Id with your partner_id. Without it your signature is checked against "
                       "every partner's secret, which is done only for bodies of at most "
                       f"{UNNAMED_MAX_BODY_BYTES} bytes and when there are few partners.")


def _declared_length(request: Request) -> int:
    """The request's Content-Length, or 0 when it sends none (or one ``read_body`` will refuse)."""
    declared = request.headers.get("content-length", "")
    return int(declared) if re.fullmatch(r"[0-9]{1,18}", declared) else 0


async def _search_unnamed(ctx: Context, failures: str,
                          search: Callable[[list[Partner]], Awaitable[Partner | None]]) -> Partner:
    """The partner of a request without ``X-Partner-Id``, found by trying every partner's
    secrets, at a bounded cost: a large search was refused already (``_refuse_a_large_unnamed_search``,
    in this same turn of the event loop), and each search takes one of the address's
    refused-signature tokens before it starts (429 when none is left), so that concurrent
    requests cannot all pass the limit before any of them fails; a signature that verifies
    gives its token back."""
    candidates = ctx.store.partners_accepting_inbound()
    await ctx.inbound_failure_limit.check(failures, REFUSED)
    partner = await search(candidates)
    if partner is None:
        raise _invalid_signature()
    await ctx.inbound_failure_limit.give_back(failures)
    return partner


def _invalid_signature() -> ApiError:
    return ApiError(401, "invalid_signature",
                    "The signature does not verify for any partner. Sign the body with your shared secret "
                    "(hex HMAC-SHA256) and send it as X-Webhook-Signature, or sign it the Standard Webhooks "
                    "way with your whsec_ secret.")


async def _search(ctx: Context, candidates: list[Partner], *, raw: bytes, payload: dict, canonical_body: bytes,
                  signed: Signed, now: float) -> Partner | None:
    """``_find_sender`` on the event loop when it is small, else on ``_SIGNATURE_THREADS``; the
    partners it tried are counted (``webhookd_inbound_partners_tried_total``: the CPU that
    inbound signatures cost)."""
    find = functools.partial(_find_sender, candidates, raw, payload, canonical_body, signed, now)
    if len(candidates) * len(raw) <= HMAC_ON_LOOP_BYTES:
        partner = find()
    else:
        partner = await asyncio.get_running_loop().run_in_executor(_SIGNATURE_THREADS, find)
    tried = len(candidates) if partner is None else candidates.index(partner) + 1
    ctx.metrics.inbound_partners_tried.inc(tried)
    return partner


def _find_sender(partners: list[Partner], raw: bytes, payload: dict, canonical_body: bytes, signed: Signed,
                 now: float) -> Partner | None:
    """The partner whose (current or overlapping previous) secret verifies the request."""
    def verifies(secret: str) -> bool:
        if signed.standard:  # over the raw bytes only, as the scheme says; the time was checked already
            return signing.standard_signature_matches(secret, signed.msg_id, signed.timestamp, raw, signed.signature,
                                                      now, tolerance_s=math.inf)
        return signing.verify(secret, raw, payload, signed.signature, canonical_body)

    for partner in partners:
        if any(verifies(s) for s in partner.valid_secrets(now)):
            return partner
    return None


def _check_timestamp(timestamp: Any, now: float, tolerance_s: float) -> None:
    """A ``timestamp`` in the payload must be unix seconds within the tolerance (replays get 401)."""
    if timestamp is None:
        return
    if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not _finite(timestamp):
        raise ApiError(401, "bad_timestamp", "'timestamp' must be unix seconds (a number).")
    if abs(now - timestamp) > tolerance_s:
        raise ApiError(401, "stale_timestamp",
                       f"'timestamp' is more than {tolerance_s} s away from our clock; send a fresh event.")


def _finite(number: int | float) -> bool:
    """True if ``number`` converts to a finite float (a 400-digit integer does not)."""
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False


def _dedupe_key(request: Request, canonical_body: bytes) -> str:
    """What makes a resend the same event: its ``X-Webhook-Id``, else the body's hash."""
    webhook_id = request.headers.get("x-webhook-id")
    return f"id:{webhook_id}" if webhook_id else "sha256:" + hashlib.sha256(canonical_body).hexdigest()


# --- What a stored event sets off ---------------------------------------------------------


async def push_offer(ctx: Context, partner_id: str, payload: dict[str, Any], traceparent: str | None = None) -> None:
    """A promoted tour reaches our users live (after the partner's 200 went out): those connected
    to this process at once, those connected to the others on the same PostgreSQL through a
    ``NOTIFY`` (``relay_offer`` there). The partner's ``traceparent``, if any, goes with it."""
    offer = realtime.offer_from(partner_id, payload, traceparent)
    if offer is None:
        logger.warning("offer from %s names no valid user_id; sent to nobody", partner_id)
        return
    message, user_id = offer
    reached = ctx.notifier.notify(message, user_id)
    logger.info("offer from %s sent to %d live connections (%s)", partner_id, reached, user_id or "everyone")
    if ctx.store.shared:  # the other processes' /ws clients hear of it too
        note = json.dumps({"origin": ctx.housekeeping.process_id, "message": message, "user_id": user_id}, ensure_ascii=False)
        if len(note.encode()) < OFFER_NOTE_MAX:
            await db(ctx.store.announce, OFFERS_CHANNEL, note)
        else:
            logger.warning("offer from %s is too large to pass to other processes; only this one's users got it",
                           partner_id)


OFFER_NOTE_MAX = 7900  # PostgreSQL's NOTIFY payload limit is 8000 bytes


def relay_offer(ctx: Context, note: str) -> None:
    """An offer another process received, for the users connected here (on the event loop)."""
    try:
        relayed = json.loads(note)
        if relayed["origin"] == ctx.housekeeping.process_id:
            return  # ours: our users had it already
        reached = ctx.notifier.notify(relayed["message"], relayed["user_id"])
    except (ValueError, KeyError, TypeError):
        logger.warning("ignored a malformed offer notification")
        return
    logger.info("offer relayed from another process to %d live connections", reached)


# What an inbound event sets off once it is stored, by type. Other types are only stored.
INBOUND_ACTIONS: dict[str, Callable[[Context, str, dict[str, Any], str | None], Awaitable[None]]] = {
    "tour.promoted": push_offer}


# --- Live offers over WebSocket ---------------------------------------------------------------


async def mint_realtime_token(request: Request) -> JSONResponse:
    """``POST /realtime/tokens``: a short-lived token with which one user opens ``/ws``."""
    ctx = context(request)
    body = await read_json_object(request, allowed={"user_id"})
    user_id = body.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip() or len(user_id) > 200:
        raise invalid("user_id", "must be a non-empty string of at most 200 characters.")
    token, expires_at = ctx.tokens.mint(user_id, ctx.clock())
    return JSONResponse({"token": token, "expires_at": expires_at}, status_code=201)


async def live_notifications(websocket: WebSocket) -> None:
    """``GET /ws``: offers pushed live, to the user a token names. A bad or expired token is
    closed with 1008; so is an open connection, before its next offer, once the admin token whose
    key signed its token is revoked.

    The token travels in the handshake's ``Sec-WebSocket-Protocol`` header, never in a URL that
    proxies and access logs keep: a browser writes ``new WebSocket(url, ["webhookd",
    "token." + token])``, and we answer with the ``webhookd`` protocol only (the token is not
    echoed). ``/ws?token=`` still works, for clients that cannot set the header; the access log
    redacts it."""
    ctx: Context = websocket.app.state.ctx
    offered = [p.strip() for p in websocket.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    in_header = next((p.removeprefix(realtime.TOKEN_PROTOCOL_PREFIX) for p in offered
                      if p.startswith(realtime.TOKEN_PROTOCOL_PREFIX)), None)
    subprotocol = realtime.PROTOCOL if realtime.PROTOCOL in offered else None
    token = in_header or websocket.query_params.get("token", "")
    try:
        user_id = ctx.tokens.user_for(token, ctx.clock())
    except realtime.TokenError as exc:
        await websocket.accept(subprotocol=subprotocol)
        await websocket.close(code=realtime.POLICY_VIOLATION, reason=str(exc))
        return
    await websocket.accept(subprotocol=subprotocol)
    await ctx.notifier.serve(websocket, user_id, still_signed=lambda: ctx.tokens.is_signed(token))


# --- Reading what came in ------------------------------------------------------------------------


def inbound_json(item: InboundEvent) -> dict[str, Any]:
    return {"inbound_id": item.id, "partner_id": item.partner_id, "event": item.type,
            "payload": json.loads(item.body), "received_at": int(item.received_at),
            "traceparent": item.traceparent, "tracestate": item.tracestate}


async def list_inbound(request: Request) -> JSONResponse:
    """``GET /inbound``: stored partner events, newest first."""
    limit, cursor = page_params(request)
    q = request.query_params
    page = await db(context(request).store.list_inbound, limit=limit, cursor=cursor,
                    partner_id=q.get("partner_id"), event=q.get("event"), window=window_of(request))
    return JSONResponse(page_json(page, inbound_json))

"""What every route stands on: errors, credentials, access rules, reading requests, paging.

A route in ``webhookd.py``, ``partners.py`` or ``inbound.py`` is short because the common work is here:

1. **Errors.** A route raises ``ApiError``; every error, ours or Starlette's, leaves as
   ``{"error": {"code", "message"}}`` with its status. A 500 means a bug, and is logged.
2. **Ids and credentials.** ``new_id`` for events, deliveries and partners; shared secrets
   and API keys minted in one place; API keys stored as SHA-256 only.
3. **Who is calling.** Every route is declared with ``route(method, path, handler, who)``,
   and ``who`` (``PUBLIC``, ``ADMIN``, ``CALLER``, …) is checked before the handler runs,
   so a route cannot be added without deciding who may call it.
4. **Rate limits.** Token buckets per key (client address, partner).
5. **Reading requests.** Size-limited bodies, strict JSON objects, ``?limit=&cursor=`` pages.

``Context`` is what the routes share, built once in ``create_app``'s lifespan. The store
is blocking: a route calls it through ``db()``, which runs it on the routes' own threads
within a deadline (see ``store.Store`` for the few memory-only reads that may run on the
event loop).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hashlib
import hmac
import ipaddress
import logging
import math
import random
import re
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import portal_links
import realtime
import signing
from config import admin_tokens
from models import AuditEntry
from store import DatabaseBusy, DatabaseUnavailable, StorageUnavailable, answer_by

if TYPE_CHECKING:
    import metrics
    from alerts import Alerts
    from config import Config
    from delivery import DeliveryLoop
    from housekeeping import Housekeeping
    from models import Partner
    from store import Store

logger = logging.getLogger("webhookd")


# --- 1. Errors: one exception, one JSON shape ---------------------------------------------


class ApiError(Exception):
    """Raised by a route to answer ``{"error": {"code", "message"}}`` with ``status``; a payload
    refused for its fields adds ``problems``, every one found (``message`` is the first)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                 problems: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers
        self.problems = problems


def error_body(code: str, message: str, problems: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The one shape of every error: ``{"error": {"code", "message"}}`` (and ``problems``)."""
    return {"error": {"code": code, "message": message, **({"problems": problems} if problems else {})}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def invalid(field_name: str, message: str) -> ApiError:
    """The 422 for one field: the message starts with the field's name."""
    return ApiError(422, "invalid_field", f"'{field_name}' {message}")


def partner_not_found(partner_id: str | None) -> ApiError:
    """The 404 for an unknown partner id — also what another partner's id gets."""
    return ApiError(404, "partner_not_found", f"No partner with id {partner_id!r}.")


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.message, exc.problems), status_code=exc.status, headers=exc.headers)


async def _on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    codes = {404: ("not_found", "No such route. See GET /openapi.json for the routes."),
             405: ("method_not_allowed", f"{request.method} is not allowed on {request.url.path}.")}
    code, message = codes.get(exc.status_code, ("http_error", str(exc.detail)))
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


async def _on_database_unavailable(request: Request, exc: DatabaseUnavailable) -> JSONResponse:
    logger.error("%s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "database_unavailable",
                          "The database does not answer right now; nothing was stored. Try again shortly.",
                          {"Retry-After": "5"})


async def _on_database_busy(request: Request, exc: DatabaseBusy) -> JSONResponse:
    logger.warning("%s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "database_busy",
                          "The database did not answer in time (a lock held elsewhere, or too much waiting "
                          "already); nothing was stored. Try again shortly.", {"Retry-After": "1"})


async def _on_storage_unavailable(request: Request, exc: StorageUnavailable) -> JSONResponse:
    logger.error("%s %s: %s", request.method, request.url.path, exc)
    context(request).metrics.storage_refusals.inc()
    return error_response(503, "storage_unavailable",
                          "The server cannot write to its database right now (its disk is full); nothing was "
                          "stored. Try again shortly.", {"Retry-After": "30"})


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """True bugs only: bad input is refused with a 4xx long before it gets here."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "Something went wrong on our side; the error was logged.")


EXCEPTION_HANDLERS = {ApiError: _on_api_error, HTTPException: _on_http_exception,
                      StorageUnavailable: _on_storage_unavailable, DatabaseBusy: _on_database_busy,
                      DatabaseUnavailable: _on_database_unavailable,
                      Exception: _on_unexpected}


# --- 2. Identifiers and credentials ---------------------------------------------------------

_BASE36 = string.digits + string.ascii_lowercase  # in sorting order


_BASE36_PAIRS = [a + b for a in _BASE36 for b in _BASE36]  # two digits a step: ids are made per delivery


def _base36(number: int, width: int) -> str:
    digits = []
    for _ in range(width // 2):
        number, pair = divmod(number, 36 * 36)
        digits.append(_BASE36_PAIRS[pair])
    if width % 2:
        digits.append(_BASE36[number % 36])
    return "".join(reversed(digits))


# Event, delivery and inbound ids are not secrets and are made on the hot path: a generator
# seeded once from the OS saves a system call per id. Partner ids, which partners see and
# which must not hint at each other, come from the OS every time.
_FAST_BITS = random.Random(secrets.randbits(256))
_this_ms = (-1, "")


def new_id(prefix: str, unpredictable: bool = False) -> str:
    """``prefix`` + 9 base-36 digits of the time in ms + 12 random ones (62 bits): unique,
    and sortable by creation time."""
    global _this_ms
    bits = secrets.randbits(62) if unpredictable else _FAST_BITS.getrandbits(62)
    ms = int(time.time() * 1000)
    if _this_ms[0] != ms:  # the time's digits, once per millisecond (one tuple: threads read it whole)
        _this_ms = (ms, _base36(ms, 9))
    return prefix + _this_ms[1] + _base36(bits, 12)


def new_delivery_id() -> str:
    return new_id("dlv_")


def new_shared_secret() -> str:
    """A partner's HMAC key: 256 bits from the OS, shown to the partner once."""
    return "sk_live_" + secrets.token_urlsafe(32)


def new_api_key() -> str:
    """A partner's API key, shown once; only its ``hash_api_key`` is stored."""
    return "pak_" + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    """API keys are stored as SHA-256 only: a copy of the database does not reveal them."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def secret_json(shared_secret: str) -> dict[str, str]:
    """A newly minted secret as the partner receives it: as is, and in Standard Webhooks form."""
    return {"shared_secret": shared_secret,
            "standard_webhooks_secret": signing.standard_webhooks_secret(shared_secret)}


# Query parameters that carry a credential (ours: /ws?token=; the others, in case a client sends
# one): never written to a log. The access log shows them as [redacted].
CREDENTIAL_PARAMS = frozenset({"token", "access_token", "api_key", "apikey", "key", "secret", "signature",
                               "password"})
_CREDENTIAL_IN_QUERY = re.compile(rf"([?&](?:{'|'.join(sorted(CREDENTIAL_PARAMS))})=)[^&#\s]*", re.IGNORECASE)


def redact_query(path: str) -> str:
    """``/ws?token=eyJ…&x=1`` -> ``/ws?token=[redacted]&x=1``."""
    return _CREDENTIAL_IN_QUERY.sub(r"\1[redacted]", path)


class RedactCredentials(logging.Filter):
    """On uvicorn's loggers (its access log, and its WebSocket handshake lines, which it writes to
    ``uvicorn.error``): every text argument of a record passes through ``redact_query``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str) and not record.args:
            record.msg = redact_query(record.msg)
        return True


ACCESS_LOG_FILTER = RedactCredentials()


# --- What the routes share -------------------------------------------------------------------


@dataclass
class Context:
    """What the routes share, built in the lifespan."""

    config: Config
    store: Store
    loop: DeliveryLoop
    housekeeping: Housekeeping
    clock: Callable[[], float]
    notifier: realtime.Notifier
    tokens: realtime.Tokens
    inbound_limit: RateLimiter
    inbound_failure_limit: RateLimiter
    registration_limit: RateLimiter
    partner_write_limit: RateLimiter
    metrics: metrics.Metrics
    alerts: Alerts
    admin_tokens: AdminTokens


def context(request: Request) -> Context:
    return request.app.state.ctx


DB_DEADLINE_S = 2.5  # a route's store call gives up this long after it is made: its 503 leaves within 3 s
STORE_THREADS = 16   # threads for the routes' store calls, apart from asyncio's default ones

_store_threads = concurrent.futures.ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="webhookd-store")


async def db(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a (blocking) store call on the routes' own threads, off the event loop, and answer
    within ``DB_DEADLINE_S`` however long it queued for a thread.

    The routes' threads are theirs alone (the delivery loop uses asyncio's default ones), so a
    stuck store call ties up one thread, never every route. A call still queued at its deadline
    is dropped unrun, with ``DatabaseBusy`` (a 503); one that started waits for a connection or the
    group commit only until that deadline (``store.answer_by``), and PostgreSQL's lock and
    statement timeouts bound the rest. A call that started is never abandoned: it may be writing."""
    deadline = time.monotonic() + DB_DEADLINE_S
    call = _store_threads.submit(_call_by, deadline, fn, args, kwargs)
    answer = asyncio.wrap_future(call)
    await asyncio.wait([answer], timeout=DB_DEADLINE_S)
    if not answer.done() and call.cancel():
        raise DatabaseBusy(f"every thread for store calls was busy for {DB_DEADLINE_S:g} s")
    return await answer


def _call_by(deadline: float, fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)`` on a store thread, its waits bounded by ``deadline``."""
    if time.monotonic() >= deadline:  # it queued past its deadline: its caller has given up
        raise DatabaseBusy(f"every thread for store calls was busy for {DB_DEADLINE_S:g} s")
    with answer_by(deadline):
        return fn(*args, **kwargs)


def client_address(request: Request) -> str:
    """The client's address: the peer's, or behind a trusted proxy the one it forwarded (``RealClient``)."""
    return request.client.host if request.client else "unknown"


class RealClient:
    """ASGI middleware for a reverse proxy in front (``server.trusted_proxies``): then every request
    comes from the proxy's address, and per-address limits would put every client in one bucket.

    Only when the peer is a trusted proxy, the client is read from ``X-Forwarded-For`` (else
    ``Forwarded: for=``): walking from the right — the entry the nearest proxy wrote — past the
    trusted proxies, the first other address is the client's. From anyone else the headers are
    ignored, so a client cannot choose its own bucket. An entry that is not an address leaves the
    proxy's. The scope's client is rewritten in place, so rate limits, the audit trail, the
    dashboard and uvicorn's access log all see the same address."""

    FOR = re.compile(r'for="?\[?([0-9A-Za-z.:_-]+?)\]?(?::\d+)?"?(?:[;,]|$)', re.I)

    def __init__(self, app: Any, trusted: tuple[str, ...]):
        self.app = app
        self.trusted = [ipaddress.ip_network(t, strict=False) for t in trusted]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        client = scope.get("client")
        if scope["type"] in ("http", "websocket") and client and self._is_trusted(client[0]):
            forwarded = self._forwarded_client(scope["headers"])
            if forwarded is not None:
                scope["client"] = (forwarded, 0)
        await self.app(scope, receive, send)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def _forwarded_client(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        xff = ",".join(v.decode("latin-1") for k, v in headers if k == b"x-forwarded-for")
        if xff:
            hops = [hop.strip() for hop in xff.split(",")]
        else:
            forwarded = ",".join(v.decode("latin-1") for k, v in headers if k == b"forwarded")
            hops = self.FOR.findall(forwarded)
        for hop in reversed(hops):
            try:
                ip = ipaddress.ip_address(hop.rsplit(":", 1)[0] if hop.count(":") == 1 else hop)
            except ValueError:
                return None  # not an address: keep the proxy's (every such client shares one bucket)
            if not any(ip in network for network in self.trusted):
                return str(ip)
        return None


# --- 3. Who is calling ----------------------------------------------------------------------------


class AdminTokens:
    """The admin tokens valid now: the current one, and the previous one while a rotation's overlap
    runs (``config.admin_tokens``). Read again from their files at most once a second, so that
    `webhookd token --rotate` (and ``--revoke-old``) reaches a running server at once; every one
    is compared in constant time, whichever matches.

    The keys that sign ``/ws`` tokens are derived from these same tokens, on the same reading
    (``realtime.key_for``): a /ws token stays valid while the admin token whose key signed it does,
    and a revoked admin token can no longer mint one, nor forge one offline."""

    REREAD_S = 1.0

    def __init__(self, config: Config, clock: Callable[[], float]):
        self.config = config
        self.clock = clock
        self._tokens: list[bytes] = []
        self._realtime_keys: list[bytes] = []
        self._read_at = float("-inf")

    def match(self, token: str) -> bool:
        given = token.encode("utf-8", "replace")
        matched = False
        for known in self._current():
            matched |= hmac.compare_digest(given, known)
        return matched

    def realtime_keys(self) -> list[bytes]:
        """The /ws signing keys valid now, the current admin token's first (it signs new tokens)."""
        self._current()
        return self._realtime_keys

    def _current(self) -> list[bytes]:
        if time.monotonic() - self._read_at >= self.REREAD_S:
            self._read_at = time.monotonic()
            tokens = admin_tokens(self.config, self.clock())
            self._tokens = [t.encode("utf-8") for t in tokens]
            self._realtime_keys = [realtime.key_for(t) for t in tokens]
        return self._tokens


@dataclass(frozen=True)
class Caller:
    is_admin: bool
    partner_id: str | None = None
    suspended_reason: str | None = None  # set for a suspended partner's key: it may read, never write
    read_only: bool = False              # a read-only portal link (portal_links.py): it may read, never write


async def authenticate(request: Request) -> Caller:
    """Who sent ``Authorization: Bearer …``: the admin, a partner, or nobody we know (401)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing_credentials",
                       "Send 'Authorization: Bearer <token>' with the admin token or your partner API key.")
    token = token.strip()
    ctx = context(request)
    if ctx.admin_tokens.match(token):
        return Caller(is_admin=True)
    if token.startswith("pak_"):
        owner = await db(ctx.store.api_key_owner, hash_api_key(token))
        if owner is not None:
            partner_id, status, reason = owner
            suspended = (reason or "no reason given") if status == "suspended" else None
            return Caller(is_admin=False, partner_id=partner_id, suspended_reason=suspended)
    if token.startswith(portal_links.PREFIX):  # a portal link's token: its partner, perhaps read-only
        try:
            link = await db(portal_links.check, ctx.store, token, ctx.clock())
        except portal_links.Refused as refused:  # expired, or not valid (altered, revoked by a key reissue)
            raise ApiError(401, refused.code, refused.message) from None
        return Caller(is_admin=False, partner_id=link.partner_id, suspended_reason=link.suspended, read_only=link.read_only)
    raise ApiError(401, "invalid_credentials", "The bearer token is not valid. Check the admin token or API key.")


# Who may call a route. Every route declares one (see ``route()``), and the check runs
# before the handler, so a route cannot be added without deciding who may call it.
PUBLIC = "public"              # anyone
ADMIN = "admin"                # the admin token only (a partner key gets 403)
CALLER = "admin_or_partner"    # the admin token or a partner API key; the handler checks ownership
SIGNED = "signed"              # a partner, proven by the body's signature (checked by the handler)
METRICS = "metrics"            # the admin token, or anyone when metrics_public = true
REGISTRATION = "registration"  # the admin token, or anyone when open_registration = true

READS = ("GET", "HEAD")  # every other method writes: a partner's key pays for it, and a suspended one may not


async def check_access(request: Request, who: str) -> Caller | None:
    """Apply a route's access rule; the caller it found, or None where no credentials are asked.

    A partner's writes are checked here once for every route, rather than in each handler: a
    suspended partner's key is read-only (403), and the others' writes spend their budget."""
    if who in (PUBLIC, SIGNED) or (who == METRICS and context(request).config.security.metrics_public):
        return None
    if who == REGISTRATION and context(request).config.security.open_registration:
        if "authorization" not in request.headers:
            return None  # anyone may register; rate-limited per client address
        who = CALLER   # credentials sent: check them, so the admin is recognised
    caller = await authenticate(request)
    if who in (ADMIN, REGISTRATION, METRICS) and not caller.is_admin:
        raise ApiError(403, "admin_only", "This route needs the admin token; a partner API key is not enough.")
    if not caller.is_admin and request.method not in READS:
        refuse_if_suspended(caller)
        if caller.read_only:
            raise ApiError(403, *portal_links.READ_ONLY)
        await context(request).partner_write_limit.check(caller.partner_id or "", "writes with this API key")
    return caller


def refuse_if_suspended(caller: Caller) -> None:
    """A suspended partner reads its record and its deliveries, to see why; any write it tries is
    this 403. Otherwise its URL, subscriptions, secrets, key, and tests, retries and replays queued
    "for later", would all be waiting for the moment the admin lifts the suspension."""
    if caller.suspended_reason is not None:
        raise ApiError(403, "partner_suspended",
                       f"This partner was suspended by the admin ({caller.suspended_reason}): its API key can "
                       "read but not change anything until the admin lifts the suspension. Contact the operator.")


def route(method: str, path: str, endpoint: Callable, who: str) -> Route:
    """A Starlette route whose access rule ``who`` is checked before ``endpoint`` runs."""

    async def guarded(request: Request) -> JSONResponse:
        request.state.caller = await check_access(request, who)
        return await endpoint(request)

    declared = Route(path, guarded, methods=[method], name=endpoint.__name__)
    declared.who = who  # read by the test that walks the route table
    return declared


def caller_of(request: Request) -> Caller:
    return request.state.caller


def audit_entry(request: Request, action: str, partner_id: str | None, changes: dict[str, Any] | None = None,
                target: str | None = None) -> AuditEntry:
    """The audit trail's record of this request's write: who (the admin, the partner itself, or
    anonymous on open registration), from where, and ``changes`` — never a secret or a key."""
    caller = getattr(request.state, "caller", None)
    actor = "anonymous" if caller is None else "admin" if caller.is_admin else "partner"
    return AuditEntry(id=new_id("aud_"), at=context(request).clock(), actor=actor, action=action,
                      partner_id=partner_id, changes=changes or {}, address=client_address(request), target=target)


def owned_partner_id(request: Request) -> str:
    """The ``{partner_id}`` in the path, if the caller is the admin or that partner itself.
    Another partner gets the same 404 as an unknown id, so ids do not leak."""
    partner_id = request.path_params["partner_id"]
    caller = caller_of(request)
    if not caller.is_admin and caller.partner_id != partner_id:
        raise partner_not_found(partner_id)
    return partner_id


async def owned_partner(request: Request) -> Partner:
    """The partner in the path, under the same rule, read from the store's in-memory
    partners (no thread hop); an unknown id is a 404. On PostgreSQL a partner registered
    through another process a moment ago may not be in memory yet: a miss reads the
    partners again before it is a 404 (only the admin can ask for another's id)."""
    partner_id = owned_partner_id(request)
    partner = await known_partner(context(request).store, partner_id)
    if partner is None:
        raise partner_not_found(partner_id)
    return partner


async def known_partner(store: Store, partner_id: str) -> Partner | None:
    """A partner from the in-memory copy; on a shared database a miss reads the partners again first."""
    partner = store.get_partner(partner_id)
    if partner is None and store.shared:
        await db(store.reload_partners)
        partner = store.get_partner(partner_id)
    return partner


# --- 4. Rate limits -----------------------------------------------------------------------------------


class RateLimiter:
    """Token buckets, one per key: ``rate_per_s`` tokens a second, at most ``burst`` saved up.

    In memory, per process; with ``shared`` (a PostgreSQL store) the buckets live in the
    database (``rate_buckets``, keyed by ``name``), so several processes behind one address
    share one limit rather than each giving a client its own. Shared buckets run on the
    wall clock (every process reads the same one); ``clock`` (the app's, which tests can drive)
    is for the in-memory ones."""

    MAX_KEYS = 10_000  # beyond this, buckets that are full again are forgotten

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float],
                 shared: Any = None, name: str = ""):
        self.rate, self.burst, self.clock = rate_per_s, burst, clock
        self.shared, self.name = shared, name
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    async def check(self, key: str, what: str) -> None:
        """Take one token for ``key``, or raise a 429 that says when to come back."""
        if self.shared is None:
            self.refuse_if_empty_now(key, what)
            self._take(key)
            return
        shared_key, now = f"{self.name}:{key}", time.time()
        left = await db(self.shared.take_token, shared_key, rate=self.rate, burst=self.burst, now=now,
                        only_if_left=True)
        if left is None:
            self._refuse(await db(self.shared.tokens_left, shared_key, rate=self.rate, burst=self.burst, now=now), what)

    async def give_back(self, key: str) -> None:
        """Return the token ``check`` took for ``key`` (work paid for up front that turned out
        legitimate); a bucket never holds more than ``burst``."""
        if self.shared is None:
            self._take(key, cost=-1.0)
            return
        await db(self.shared.take_token, f"{self.name}:{key}", rate=self.rate, burst=self.burst, now=time.time(),
                 only_if_left=False, cost=-1.0)

    def refuse_if_empty_now(self, key: str, what: str) -> None:
        self._refuse(self._tokens(key, self.clock()), what)

    def _refuse(self, tokens: float, what: str) -> None:
        if tokens < 1:
            wait = math.ceil((1 - tokens) / self.rate)
            raise ApiError(429, "rate_limited", f"Too many {what}; try again in {wait} s.",
                           headers={"Retry-After": str(wait)})

    def _take(self, key: str, cost: float = 1.0) -> None:
        now = self.clock()
        self._buckets[key] = (min(self.burst, max(0.0, self._tokens(key, now) - cost)), now)
        if len(self._buckets) > self.MAX_KEYS:
            self._buckets = {k: v for k, v in self._buckets.items()
                             if v[0] + (now - v[1]) * self.rate < self.burst}

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)  # a clock set back adds nothing


# --- 5. Reading requests ---------------------------------------------------------------------------------


def check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return
    media = content_type.split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {media!r} is not accepted. Send 'Content-Type: application/json'.")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refused with 413 as soon as it is larger than ``max_bytes``."""
    too_large = ApiError(413, "body_too_large", f"The body is larger than {max_bytes} bytes. Send a smaller one.")
    declared = request.headers.get("content-length", "")
    if re.fullmatch(r"[0-9]+", declared) and int(declared) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(raw: bytes, max_depth: int) -> dict[str, Any]:
    try:
        value = signing.parse_json(raw, max_depth)
    except signing.BadJSON as exc:
        raise ApiError(400, "malformed_json", str(exc)) from None
    if not isinstance(value, dict):
        raise ApiError(400, "not_an_object", "The body must be a JSON object, like {\"key\": \"value\"}.")
    return value


async def read_json_object(request: Request, allowed: set[str] | None = None, extra_depth: int = 0) -> dict[str, Any]:
    """The body as a JSON object; with ``allowed``, a field outside it is a 422 naming it.
    ``extra_depth``: levels of a wrapper around what ``max_json_depth`` limits (a batch's)."""
    check_content_type(request)
    security = context(request).config.security
    body = parse_object(await read_body(request, security.max_body_bytes), security.max_json_depth + extra_depth)
    for name in body if allowed is not None else ():
        if name not in allowed:
            raise invalid(name, f"is not a known field. Known fields: {', '.join(sorted(allowed))}.")
    return body


def is_small_number(text: str) -> bool:
    """ASCII digits only, at most 12 of them (``str.isdigit`` also says yes to '²')."""
    return re.fullmatch(r"[0-9]{1,12}", text) is not None


def page_params(request: Request, most: int = 200, default: int = 50) -> tuple[int, str | None]:
    """``?limit=`` (1-200, default 50) and ``?cursor=`` (opaque: base64 of the last id seen)."""
    limit_text = request.query_params.get("limit", str(default))
    if not is_small_number(limit_text) or not 1 <= int(limit_text) <= most:
        raise invalid("limit", f"must be a whole number from 1 to {most}, not {limit_text!r}.")
    cursor = request.query_params.get("cursor")
    if cursor is None:
        return int(limit_text), None
    try:
        decoded = base64.urlsafe_b64decode(cursor.encode("ascii") + b"==").decode("ascii")
    except (binascii.Error, UnicodeError, ValueError):
        decoded = ""
    if not re.fullmatch(r"[a-z]+_[a-z0-9]+", decoded):
        raise invalid("cursor", "is not a cursor this server gave out. Use next_cursor from the previous page.")
    return int(limit_text), decoded


def page_json(page, render: Callable[[Any], dict]) -> dict[str, Any]:
    return {"items": [render(item) for item in page.items], "next_cursor": cursor_text(page.next_cursor)}


def cursor_text(last_id: str | None) -> str | None:
    """The opaque ``next_cursor`` for the last id of a page (``page_params`` reads it back)."""
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=") if last_id else None

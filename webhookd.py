"""webhookd: a small, auditable webhook hub.

Partners register an endpoint and receive a shared secret. Our system publishes
events; webhookd stores each one, signs it with HMAC-SHA256 and delivers it to every
subscribed partner, durably and with retries. Partners post their own signed events
back to us.

This module is the outside of the service, read top to bottom:

1. configuration (``webhookd.toml`` plus ``WEBHOOKD_<SECTION>_<KEY>`` variables),
2. errors and the JSON shape every one of them takes,
3. who is calling (admin token or partner API key),
4. the routes — register, publish, read deliveries, receive partner events, live
   offers, metrics, the dashboard — and the table that says who may call each,
5. the application and its lifespan (the delivery loop starts and stops there),
6. the command line (``webhookd serve``, ``token``, ``partners``, ``publish``, …).

SQL lives in ``store.py``, signatures in ``signing.py``, sending in ``delivery.py``,
WebSocket fan-out in ``realtime.py``, counters in ``metrics.py``, the API's
description in ``openapi.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import string
import sys
import time
import tomllib
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

import delivery
import metrics
import openapi
import realtime
import signing
from store import Delivery, Event, InboundEvent, Partner, Store

__version__ = "0.1.0"

logger = logging.getLogger("webhookd")

# =====================================================================================
# 1. Configuration
# =====================================================================================

EVENT_TYPE = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")
FIELD_TYPES = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}
TEST_EVENT = "webhook.test"

# The outbound catalog when the config has no [events] tables: the partner guide's four events
# and the fields the SPEC names for each.
GUIDE_CATALOG = {
    "payment.success": {"transaction_id": "string", "amount": "number", "currency": "string", "user_id": "string"},
    "payment.failed": {"transaction_id": "string", "reason": "string", "user_id": "string", "amount": "number"},
    "booking.confirmed": {"booking_id": "string", "tour_id": "string", "user_id": "string",
                          "start_date": "string", "end_date": "string"},
    "booking.cancelled": {"booking_id": "string", "user_id": "string"},
}


class ConfigError(Exception):
    """Raised when the configuration cannot be used; the message names the key and the value."""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "info"
    log_format: str = "text"   # text | json


@dataclass(frozen=True)
class StorageConfig:
    path: str = "data/webhookd.db"


@dataclass(frozen=True)
class SecurityConfig:
    admin_token: str = ""
    open_registration: bool = False
    allow_private_targets: bool = False
    max_body_bytes: int = 262144
    max_json_depth: int = 32
    inbound_tolerance_s: int = 300
    secret_overlap_s: int = 86400
    allowed_ports: tuple[int, ...] = ()   # empty: any port
    inbound_rate_per_s: float = 50.0      # per partner
    inbound_failures_per_s: float = 5.0   # refused signatures per client address
    registration_rate_per_min: float = 10.0  # per client address, when registration is open
    metrics_public: bool = False             # true: GET /metrics without the admin token


DeliveryConfig = delivery.Limits  # [delivery]: defined beside the loop that uses it


@dataclass(frozen=True)
class RetentionConfig:
    max_age_s: float = 2592000.0
    batch_size: int = 500
    interval_s: float = 300.0


@dataclass(frozen=True)
class RealtimeConfig:
    token_ttl_s: int = 900
    client_queue: int = 100


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    events: dict[str, dict[str, str]] = field(default_factory=lambda: dict(GUIDE_CATALOG))  # type -> field -> JSON type

    def delivery_settings(self) -> delivery.Settings:
        return delivery.Settings(
            **dataclasses.asdict(self.delivery),
            retention_s=self.retention.max_age_s,
            purge_batch=self.retention.batch_size,
            purge_interval_s=self.retention.interval_s,
            allow_private_targets=self.security.allow_private_targets,
            allowed_ports=self.security.allowed_ports,
            user_agent=f"webhookd/{__version__}",
        )


# Dataclass fields carry their type as a string (``from __future__ import annotations``).
_KINDS = {"str": str, "int": int, "float": float, "bool": bool, "tuple[int, ...]": tuple}

SECTIONS = {"server": ServerConfig, "storage": StorageConfig, "security": SecurityConfig,
            "delivery": DeliveryConfig, "retention": RetentionConfig, "realtime": RealtimeConfig}

# Keys that must be positive numbers; the message says what the number means.
POSITIVE = {
    "server.port": "a TCP port (1-65535)",
    "security.max_body_bytes": "a size in bytes",
    "security.max_json_depth": "a number of nesting levels",
    "security.inbound_tolerance_s": "a number of seconds",
    "security.secret_overlap_s": "a number of seconds",
    "security.inbound_rate_per_s": "a number of requests per second",
    "security.inbound_failures_per_s": "a number of refused requests per second",
    "security.registration_rate_per_min": "a number of registrations per minute",
    "delivery.timeout_s": "a number of seconds",
    "delivery.max_attempts": "a number of attempts",
    "delivery.backoff_base_s": "a number of seconds",
    "delivery.backoff_max_s": "a number of seconds",
    "delivery.concurrency": "a number of worker threads",
    "delivery.per_partner_concurrency": "a number of requests",
    "delivery.breaker_threshold": "a number of failed attempts",
    "delivery.breaker_cooldown_s": "a number of seconds",
    "delivery.breaker_cooldown_max_s": "a number of seconds",
    "delivery.disable_after_s": "a number of seconds",
    "delivery.retry_after_max_s": "a number of seconds",
    "delivery.idle_connection_s": "a number of seconds",
    "retention.max_age_s": "a number of seconds",
    "retention.batch_size": "a number of events",
    "retention.interval_s": "a number of seconds",
    "realtime.token_ttl_s": "a number of seconds",
    "realtime.client_queue": "a number of messages",
}


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _coerce_ports(key: str, value: Any, from_env: bool) -> tuple[int, ...]:
    """A list of TCP ports: a TOML array, or comma-separated in the environment."""
    items = [v.strip() for v in value.split(",") if v.strip()] if from_env else value
    try:
        ports = tuple(int(p) for p in items if not isinstance(p, bool))
        if isinstance(items, (str, dict)) or len(ports) != len(items) or not all(0 < p < 65536 for p in ports):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"Config '{key}' has value {value!r}. Expected a list of TCP ports like [443, 8443].") from None
    return ports


def _coerce(key: str, value: Any, kind: type, from_env: bool) -> Any:
    """Turn a TOML or environment value into ``kind``, or raise a ConfigError naming the key."""
    if kind is tuple:
        return _coerce_ports(key, value, from_env)
    expected = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[kind]
    if from_env and kind is not str:
        text = value.strip().lower()
        if kind is bool and text in _TRUE + _FALSE:
            return text in _TRUE
        if kind is not bool:
            try:
                return kind(text)
            except ValueError:
                pass
    elif from_env or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"Config '{key}' has value {value!r}. Expected {expected}.")


def _check_catalog(raw: Any) -> dict[str, dict[str, str]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"Config 'events' has value {raw!r}. Expected tables like [events.\"payment.success\"].")
    catalog: dict[str, dict[str, str]] = {}
    for event_type, fields in raw.items():
        if not EVENT_TYPE.match(event_type):
            raise ConfigError(f"Config 'events' has the event type {event_type!r}. Expected the form word.word.")
        if not isinstance(fields, dict):
            raise ConfigError(f"Config 'events.{event_type}' has value {fields!r}. Expected a table of field = type.")
        for name, kind in fields.items():
            if kind not in FIELD_TYPES:
                raise ConfigError(
                    f"Config 'events.{event_type}.{name}' has value {kind!r}. "
                    f"Expected one of: {', '.join(FIELD_TYPES)}.")
        catalog[event_type] = dict(fields)
    return catalog


def load_config(path: str | os.PathLike | None, environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply ``WEBHOOKD_<SECTION>_<KEY>`` overrides, validate.

    A relative ``storage.path`` is taken relative to the config file's folder, so the
    service finds the same database whatever directory it is started from.
    """
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"Config file {str(path)!r} does not exist. Pass --config PATH to a webhookd.toml.") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {str(path)!r} is not valid TOML: {exc}.") from None
        base_dir = Path(path).resolve().parent
    unknown = set(raw) - set(SECTIONS) - {"events"}
    if unknown:
        raise ConfigError(f"Config has the unknown section {sorted(unknown)[0]!r}. "
                          f"Expected: {', '.join([*SECTIONS, 'events'])}.")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"Config '{name}' has value {table!r}. Expected a table [{name}].")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in table:
            if key not in known:
                raise ConfigError(f"Config '{name}.{key}' is not a known key. Known keys: {', '.join(known)}.")
        values = {}
        for key, fld in known.items():
            env_name = f"WEBHOOKD_{name.upper()}_{key.upper()}"
            if env_name in environ:
                values[key] = _coerce(f"{name}.{key}", environ[env_name], _KINDS[fld.type], from_env=True)
            elif key in table:
                values[key] = _coerce(f"{name}.{key}", table[key], _KINDS[fld.type], from_env=False)
        sections[name] = cls(**values)
    if "WEBHOOKD_ADMIN_TOKEN" in environ and "WEBHOOKD_SECURITY_ADMIN_TOKEN" not in environ:
        sections["security"] = dataclasses.replace(sections["security"], admin_token=environ["WEBHOOKD_ADMIN_TOKEN"])
    for key, meaning in POSITIVE.items():
        section, name = key.split(".")
        value = getattr(sections[section], name)
        if not math.isfinite(value) or value <= 0 or (key == "server.port" and value > 65535):
            raise ConfigError(f"Config '{key}' has value {value!r}. Expected {meaning}, greater than zero.")
    if sections["server"].log_format not in ("text", "json"):
        raise ConfigError(f"Config 'server.log_format' has value {sections['server'].log_format!r}. "
                          "Expected 'text' or 'json'.")
    storage_path = sections["storage"].path
    if storage_path == ":memory:" or storage_path.startswith("file:"):
        raise ConfigError(f"Config 'storage.path' has value {storage_path!r}. Expected a file path: "
                          "webhookd's threads each open the file, so it must be on disk.")
    if not Path(storage_path).is_absolute():
        sections["storage"] = StorageConfig(path=str(base_dir / storage_path))
    return Config(**sections, events=_check_catalog(raw.get("events", GUIDE_CATALOG)))


def admin_token(config: Config) -> str:
    """The admin token: from the config, else from (or newly into) a 0600 file beside the database."""
    if config.security.admin_token:
        return config.security.admin_token
    token_file = Path(config.storage.path).resolve().parent / "admin_token"
    if token_file.exists():
        return token_file.read_text(encoding="utf-8").strip()
    token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = "adm_" + secrets.token_urlsafe(32)
    fd = os.open(token_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


# =====================================================================================
# 2. Errors: one exception, one JSON shape
# =====================================================================================


class ApiError(Exception):
    """Raised by a route to answer ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _on_http_exception(request: Request, exc: HTTPException) -> JSONResponse:
    codes = {404: ("not_found", "No such route. See GET /openapi.json for the routes."),
             405: ("method_not_allowed", f"{request.method} is not allowed on {request.url.path}.")}
    code, message = codes.get(exc.status_code, ("http_error", str(exc.detail)))
    return error_response(exc.status_code, code, message, dict(exc.headers or {}))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """True bugs only: bad input is refused with a 4xx long before it gets here."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "Something went wrong on our side; the error was logged.")


# =====================================================================================
# 3. Identifiers, credentials and who is calling
# =====================================================================================

_BASE36 = string.digits + string.ascii_lowercase  # in sorting order


def _base36(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 36)
        digits.append(_BASE36[digit])
    return "".join(reversed(digits))


# Event, delivery and inbound ids are not secrets and are made on the hot path: a generator
# seeded once from the OS saves a system call per id. Partner ids, which partners see and
# which must not hint at each other, come from the OS every time.
_FAST_BITS = random.Random(secrets.randbits(256))


def new_id(prefix: str, unpredictable: bool = False) -> str:
    """``prefix`` + 9 base-36 digits of the time in ms + 12 random ones (62 bits): unique,
    and sortable by creation time."""
    bits = secrets.randbits(62) if unpredictable else _FAST_BITS.getrandbits(62)
    return prefix + _base36(int(time.time() * 1000), 9) + _base36(bits, 12)


def hash_api_key(api_key: str) -> str:
    """API keys are stored as SHA-256 only: a copy of the database does not reveal them."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Caller:
    is_admin: bool
    partner_id: str | None = None


async def authenticate(request: Request) -> Caller:
    """Who sent ``Authorization: Bearer …``: the admin, a partner, or nobody we know (401)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing_credentials",
                       "Send 'Authorization: Bearer <token>' with the admin token or your partner API key.")
    token = token.strip()
    ctx = context(request)
    if hmac.compare_digest(token.encode("utf-8", "replace"), ctx.admin_token.encode("utf-8")):
        return Caller(is_admin=True)
    if token.startswith("pak_"):
        partner_id = await db(ctx.store.partner_id_for_api_key, hash_api_key(token))
        if partner_id is not None:
            return Caller(is_admin=False, partner_id=partner_id)
    raise ApiError(401, "invalid_credentials", "The bearer token is not valid. Check the admin token or API key.")


class RateLimiter:
    """Token buckets, one per key: ``rate_per_s`` tokens a second, at most ``burst`` saved up."""

    MAX_KEYS = 10_000  # beyond this, buckets that are full again are forgotten

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float]):
        self.rate, self.burst, self.clock = rate_per_s, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def check(self, key: str, what: str) -> None:
        """Take one token for ``key``, or raise a 429 that says when to come back."""
        self.refuse_if_empty(key, what)
        self.take(key)

    def refuse_if_empty(self, key: str, what: str) -> None:
        """Raise a 429 if ``key`` has no token left, without taking one."""
        tokens = self._tokens(key, self.clock())
        if tokens < 1:
            wait = math.ceil((1 - tokens) / self.rate)
            raise ApiError(429, "rate_limited", f"Too many {what}; try again in {wait} s.",
                           headers={"Retry-After": str(wait)})

    def take(self, key: str) -> None:
        """Spend one token of ``key`` (down to zero)."""
        now = self.clock()
        self._buckets[key] = (max(0.0, self._tokens(key, now) - 1), now)
        if len(self._buckets) > self.MAX_KEYS:
            self._buckets = {k: v for k, v in self._buckets.items()
                             if v[0] + (now - v[1]) * self.rate < self.burst}

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)


# Who may call a route. Every route declares one (see ``route()``), and the check runs
# before the handler, so a route cannot be added without deciding who may call it.
PUBLIC = "public"              # anyone
ADMIN = "admin"                # the admin token only (a partner key gets 403)
CALLER = "admin_or_partner"    # the admin token or a partner API key; the handler checks ownership
SIGNED = "signed"              # a partner, proven by the body's signature (checked by the handler)
METRICS = "metrics"            # the admin token, or anyone when metrics_public = true
REGISTRATION = "registration"  # the admin token, or anyone when open_registration = true


async def check_access(request: Request, who: str) -> Caller | None:
    """Apply a route's access rule; the caller it found, or None where no credentials are asked."""
    if who in (PUBLIC, SIGNED) or (who == METRICS and context(request).config.security.metrics_public):
        return None
    if who == REGISTRATION and context(request).config.security.open_registration:
        if "authorization" not in request.headers:
            return None  # anyone may register; rate-limited per client address
        who = CALLER   # credentials sent: check them, so the admin is recognised
    caller = await authenticate(request)
    if who in (ADMIN, REGISTRATION, METRICS) and not caller.is_admin:
        raise ApiError(403, "admin_only", "This route needs the admin token; a partner API key is not enough.")
    return caller


def caller_of(request: Request) -> Caller:
    return request.state.caller


def partner_not_found(partner_id: str | None) -> ApiError:
    """The 404 for an unknown partner id — also what another partner's id gets."""
    return ApiError(404, "partner_not_found", f"No partner with id {partner_id!r}.")


def check_owner(request: Request, partner_id: str) -> None:
    """The admin, or the partner ``partner_id`` itself. Another partner gets 404, so ids do not leak."""
    caller = caller_of(request)
    if not caller.is_admin and caller.partner_id != partner_id:
        raise partner_not_found(partner_id)


def route(method: str, path: str, endpoint: Callable, who: str) -> Route:
    """A Starlette route whose access rule ``who`` is checked before ``endpoint`` runs."""

    async def guarded(request: Request) -> JSONResponse:
        request.state.caller = await check_access(request, who)
        return await endpoint(request)

    declared = Route(path, guarded, methods=[method], name=endpoint.__name__)
    declared.who = who  # read by the test that walks the route table
    return declared


# =====================================================================================
# 4. Routes
# =====================================================================================


@dataclass
class Context:
    """What the routes share, built in the lifespan."""

    config: Config
    store: Store
    loop: delivery.DeliveryLoop
    admin_token: str
    clock: Callable[[], float]
    notifier: realtime.Notifier
    tokens: realtime.Tokens
    inbound_limit: RateLimiter
    inbound_failure_limit: RateLimiter
    registration_limit: RateLimiter
    metrics: metrics.Metrics


def context(request: Request) -> Context:
    return request.app.state.ctx


async def db(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a (blocking) store call in a worker thread, off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


# --- Reading request bodies -----------------------------------------------------------


def _check_content_type(request: Request) -> None:
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


async def read_json_object(request: Request) -> dict[str, Any]:
    _check_content_type(request)
    raw = await read_body(request, context(request).config.security.max_body_bytes)
    return parse_object(raw, context(request).config.security.max_json_depth)


def invalid(field_name: str, message: str) -> ApiError:
    return ApiError(422, "invalid_field", f"'{field_name}' {message}")


def _reject_unknown_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for name in body:
        if name not in allowed:
            raise invalid(name, f"is not a known field. Known fields: {', '.join(sorted(allowed))}.")


# --- Query parameters and pagination ----------------------------------------------------


def is_small_number(text: str) -> bool:
    """ASCII digits only, at most 12 of them (``str.isdigit`` also says yes to '²')."""
    return re.fullmatch(r"[0-9]{1,12}", text) is not None


def page_params(request: Request) -> tuple[int, str | None]:
    """``?limit=`` (1-200, default 50) and ``?cursor=`` (opaque: base64 of the last id seen)."""
    limit_text = request.query_params.get("limit", "50")
    if not is_small_number(limit_text) or not 1 <= int(limit_text) <= 200:
        raise invalid("limit", f"must be a whole number from 1 to 200, not {limit_text!r}.")
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
    cursor = page.next_cursor
    return {"items": [render(item) for item in page.items],
            "next_cursor": base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("=") if cursor else None}


# --- Resource shapes (never a secret) ---------------------------------------------------


def partner_json(partner: Partner) -> dict[str, Any]:
    return {"partner_id": partner.id, "partner_name": partner.name, "webhook_url": partner.webhook_url,
            "status": partner.status, "events_subscribed": list(partner.events),
            "disabled_reason": partner.disabled_reason,
            "failing_since": int(partner.failing_since) if partner.failing_since else None,
            "created_at": int(partner.created_at), "updated_at": int(partner.updated_at)}


def delivery_json(d: Delivery, with_attempts: bool = False) -> dict[str, Any]:
    out = {"delivery_id": d.id, "event_id": d.event_id, "event": d.event, "partner_id": d.partner_id,
           "state": d.state, "attempt_count": d.attempt_count,
           "next_attempt_at": int(d.next_attempt_at) if d.state == "pending" else None,
           "created_at": int(d.created_at), "updated_at": int(d.updated_at)}
    if with_attempts:
        out["attempts"] = [{"attempt": a.attempt, "started_at": int(a.started_at), "duration_ms": a.duration_ms,
                            "status_code": a.status_code, "error": a.error,
                            "response_snippet": a.response_snippet} for a in d.attempts]
    return out


def event_json(event: Event) -> dict[str, Any]:
    return {"event_id": event.id, "event": event.type, "payload": json.loads(event.body),
            "created_at": int(event.created_at)}


def inbound_json(item: InboundEvent) -> dict[str, Any]:
    return {"inbound_id": item.id, "partner_id": item.partner_id, "event": item.type,
            "payload": json.loads(item.body), "received_at": int(item.received_at)}


# --- Partners ------------------------------------------------------------------------------


async def check_webhook_url(url: Any, allow_private: bool, allowed_ports: tuple[int, ...] = ()) -> str:
    """A partner's URL: http(s), a host, no user:password@, at most 2048 characters, and —
    unless private targets are allowed — a host that resolves only to public addresses."""
    if not isinstance(url, str) or not url:
        raise invalid("webhook_url", "must be a non-empty string like 'https://example.com/webhooks'.")
    if len(url) > 2048:
        raise invalid("webhook_url", "must be at most 2048 characters long.")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise invalid("webhook_url", "must not contain spaces or control characters.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise invalid("webhook_url", "is not a valid URL.") from None
    if parts.scheme not in ("http", "https"):
        raise invalid("webhook_url", "must start with http:// or https://.")
    if not parts.hostname:
        raise invalid("webhook_url", "must name a host, like https://example.com/webhooks.")
    if parts.username is not None or parts.password is not None:
        raise invalid("webhook_url", "must not contain user:password@; authenticate with the signature instead.")
    effective_port = port or (443 if parts.scheme == "https" else 80)
    if allowed_ports and effective_port not in allowed_ports:
        raise invalid("webhook_url", f"must use one of the ports {', '.join(map(str, allowed_ports))}.")
    if not allow_private:
        try:
            await delivery.resolve_target_async(parts.hostname, effective_port, False)
        except delivery.TargetRefused as exc:
            raise invalid("webhook_url", f"must point at a public address: {exc}.") from None
        except TimeoutError:
            raise invalid("webhook_url", f"has a host whose DNS did not answer in time: {parts.hostname!r}.") from None
        except OSError:
            raise invalid("webhook_url", f"has a host that does not resolve: {parts.hostname!r}.") from None
    return url


def check_events(events: Any, catalog: dict[str, dict[str, str]]) -> list[str]:
    valid = ", ".join(sorted(catalog))
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise invalid("events", f"must be a non-empty list of event types. Valid types: {valid}.")
    for event_type in events:
        if event_type not in catalog:
            raise invalid("events", f"has the unknown event type {event_type[:100]!r}. Valid types: {valid}.")
    return sorted(set(events))


def check_partner_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise invalid("partner_name", "must be a non-empty string.")
    if len(name) > 200:
        raise invalid("partner_name", "must be at most 200 characters long.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise invalid("partner_name", "must not contain control characters.")
    return name.strip()


async def register_partner(request: Request) -> JSONResponse:
    """``POST /partners/register``: the only response that ever shows the secret and the API key."""
    ctx = context(request)
    caller = caller_of(request)
    if caller is None or not caller.is_admin:  # open registration: limit each client address
        ctx.registration_limit.check(request.client.host if request.client else "unknown", "registrations")
    body = await read_json_object(request)
    _reject_unknown_fields(body, {"partner_name", "webhook_url", "events"})
    name = check_partner_name(body.get("partner_name"))
    url = await check_webhook_url(body.get("webhook_url"), ctx.config.security.allow_private_targets,
                                  ctx.config.security.allowed_ports)
    events = check_events(body.get("events"), ctx.config.events)
    shared_secret = "sk_live_" + secrets.token_urlsafe(32)
    api_key = "pak_" + secrets.token_urlsafe(32)
    partner = await db(ctx.store.add_partner, partner_id=new_id("partner_", unpredictable=True), name=name, webhook_url=url,
                       events=events, secret=shared_secret, api_key_hash=hash_api_key(api_key), now=ctx.clock())
    logger.info("registered partner %s for %s", partner.id, ",".join(events))
    return JSONResponse({
        **partner_json(partner),
        "shared_secret": shared_secret,
        "standard_webhooks_secret": signing.standard_webhooks_secret(shared_secret),
        "api_key": api_key,
    }, status_code=201)


async def list_partners(request: Request) -> JSONResponse:
    limit, cursor = page_params(request)
    page = await db(context(request).store.list_partners, limit=limit, cursor=cursor)
    return JSONResponse(page_json(page, partner_json))


async def get_partner(request: Request) -> JSONResponse:
    partner_id = request.path_params["partner_id"]
    check_owner(request, partner_id)
    partner = await db(context(request).store.get_partner, partner_id)
    if partner is None:
        raise partner_not_found(partner_id)
    return JSONResponse(partner_json(partner))


async def update_partner(request: Request) -> JSONResponse:
    """``PATCH /partners/{id}``: ``webhook_url``, ``events`` and ``status`` (``active``/``paused``).

    Setting ``active`` resumes a paused or disabled partner: its held deliveries go out.
    """
    partner_id = request.path_params["partner_id"]
    check_owner(request, partner_id)
    ctx = context(request)
    body = await read_json_object(request)
    _reject_unknown_fields(body, {"webhook_url", "events", "status"})
    if not body:
        raise ApiError(422, "invalid_field", "Send at least one of 'webhook_url', 'events', 'status'.")
    url = None
    if "webhook_url" in body:
        url = await check_webhook_url(body["webhook_url"], ctx.config.security.allow_private_targets,
                                      ctx.config.security.allowed_ports)
    events = check_events(body["events"], ctx.config.events) if "events" in body else None
    status = body.get("status")
    if "status" in body and status not in ("active", "paused"):
        raise invalid("status", "must be 'active' or 'paused'.")
    partner = await db(ctx.store.update_partner, partner_id, now=ctx.clock(), webhook_url=url, events=events,
                       status=status)
    if partner is None:
        raise partner_not_found(partner_id)
    if status == "active":
        ctx.loop.partner_reactivated(partner_id)
    logger.info("partner %s updated: %s", partner_id, ", ".join(sorted(body)))
    return JSONResponse(partner_json(partner))


async def rotate_secret(request: Request) -> JSONResponse:
    """``POST /partners/{id}/rotate-secret``: a new secret, shown this once.

    The old secret stays valid for ``secret_overlap_s``: outgoing webhooks carry a
    Standard Webhooks signature for both, and inbound events verify with either, so
    the partner can switch without losing a webhook. ``X-Webhook-Signature`` uses
    the new secret at once.
    """
    partner_id = request.path_params["partner_id"]
    check_owner(request, partner_id)
    ctx = context(request)
    new_secret = "sk_live_" + secrets.token_urlsafe(32)
    overlap_until = ctx.clock() + ctx.config.security.secret_overlap_s
    partner = await db(ctx.store.rotate_secret, partner_id, new_secret=new_secret, previous_until=overlap_until,
                       now=ctx.clock())
    if partner is None:
        raise partner_not_found(partner_id)
    logger.info("partner %s rotated its secret; the old one stays valid until %d", partner_id, int(overlap_until))
    return JSONResponse({
        **partner_json(partner),
        "shared_secret": new_secret,
        "standard_webhooks_secret": signing.standard_webhooks_secret(new_secret),
        "previous_secret_expires_at": int(overlap_until),
    })


async def send_test_event(request: Request) -> JSONResponse:
    """``POST /partners/{id}/test``: a ``webhook.test`` event to this partner alone (GitHub's ping)."""
    partner_id = request.path_params["partner_id"]
    check_owner(request, partner_id)
    ctx = context(request)
    if await db(ctx.store.get_partner, partner_id) is None:
        raise partner_not_found(partner_id)
    payload = {"event": TEST_EVENT, "timestamp": int(ctx.clock()), "partner_id": partner_id,
               "message": "This is a test webhook from webhookd."}
    event, _ = await db(ctx.store.publish, event_id=new_id("evt_"), event_type=TEST_EVENT,
                        body=signing.canonical(payload), now=ctx.clock(),
                        max_attempts=ctx.config.delivery.max_attempts, new_delivery_id=lambda: new_id("dlv_"),
                        only_partner=partner_id)
    ctx.loop.wake()
    return JSONResponse({"event_id": event.id, "deliveries": event.fanout}, status_code=202)


async def recover_failed(request: Request) -> JSONResponse:
    """``POST /partners/{id}/recover?since=``: every ``failed`` delivery created since then gets a
    fresh round of attempts (Svix's recover). Answers how many were re-queued."""
    partner_id = request.path_params["partner_id"]
    check_owner(request, partner_id)
    ctx = context(request)
    since_text = request.query_params.get("since", "")
    if not is_small_number(since_text):
        raise invalid("since", "must be unix seconds, e.g. ?since=1704186000.")
    if await db(ctx.store.get_partner, partner_id) is None:
        raise partner_not_found(partner_id)
    count = await db(ctx.store.recover_failed, partner_id, since=int(since_text),
                     extra_attempts=ctx.config.delivery.max_attempts, now=ctx.clock())
    ctx.loop.wake()
    logger.info("partner %s: re-queued %d failed deliveries since %s", partner_id, count, since_text)
    return JSONResponse({"requeued": count})


# --- Publishing -------------------------------------------------------------------------------


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


async def publish_event(request: Request) -> JSONResponse:
    """``POST /events``: store the event and its deliveries in one transaction, then answer 202.

    The 202 comes only after the commit: an accepted event is on disk. The same
    ``Idempotency-Key`` again answers the first event's 202 and stores nothing; with
    a different body it is a 409 (Stripe does the same), since the caller is confused.
    """
    ctx = context(request)
    key = idempotency_key(request)
    payload = await read_json_object(request)
    event_type = check_payload(payload, ctx.config.events)
    request_hash = hashlib.sha256(signing.canonical(payload)).hexdigest()
    payload.setdefault("timestamp", int(ctx.clock()))
    event, created = await db(
        ctx.store.publish, event_id=new_id("evt_"), event_type=event_type, body=signing.canonical(payload),
        now=ctx.clock(), max_attempts=ctx.config.delivery.max_attempts, new_delivery_id=lambda: new_id("dlv_"),
        idempotency_key=key, request_hash=request_hash)
    if not created and event.request_hash != request_hash:
        raise ApiError(409, "idempotency_key_reused",
                       "This Idempotency-Key was used with a different body. Use a new key for a new event.")
    if created:
        ctx.loop.wake()
        ctx.metrics.events_published.inc(event=event.type)
        logger.info("published %s %s to %d partners", event.id, event.type, event.fanout)
    return JSONResponse({"event_id": event.id, "deliveries": event.fanout}, status_code=202)


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


# --- Deliveries ----------------------------------------------------------------------------------


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
    if state is not None and state not in ("pending", "delivered", "failed"):
        raise invalid("state", "must be one of pending, delivered, failed.")
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
    """``POST /deliveries/{id}/retry``: one more attempt of a ``failed`` delivery (409 otherwise)."""
    ctx = context(request)
    found = await _owned_delivery(request)
    if not await db(ctx.store.retry_delivery, found.id, ctx.clock()):
        raise ApiError(409, "not_failed", f"Delivery {found.id} is {found.state}; only a failed delivery can be retried.")
    ctx.loop.wake()
    return JSONResponse(delivery_json(await db(ctx.store.get_delivery, found.id)), status_code=202)


# --- Inbound partner events -----------------------------------------------------------------


def _finite(number: int | float) -> bool:
    """True if ``number`` converts to a finite float (a 400-digit integer does not)."""
    try:
        return math.isfinite(float(number))
    except OverflowError:
        return False


def _find_sender(partners: list[Partner], raw: bytes, payload: dict, canonical_body: bytes, signature: str,
                 now: float) -> Partner | None:
    """The partner whose (current or overlapping previous) secret verifies the request."""
    for partner in partners:
        if any(signing.verify(s, raw, payload, signature, canonical_body) for s in partner.valid_secrets(now)):
            return partner
    return None


async def receive_partner_event(request: Request) -> JSONResponse:
    """``POST /webhooks/partners``: a partner's signed event, stored once, then acknowledged.

    Checks run in the SPEC's order: headers (400), size (413), JSON object (400),
    signature and partner (401), timestamp (401). The 200 comes after the commit.
    """
    try:
        return await _receive_partner_event(request)
    except ApiError as refused:
        context(request).metrics.inbound.inc(result="refused", reason=refused.code)
        logger.info("inbound refused: %s %s", refused.status, refused.code)
        raise


async def _receive_partner_event(request: Request) -> JSONResponse:
    ctx = context(request)
    signature = request.headers.get("x-webhook-signature")
    event_type = request.headers.get("x-webhook-event")
    if not signature or not event_type:
        raise ApiError(400, "missing_headers", "Send both X-Webhook-Signature and X-Webhook-Event headers.")
    if not EVENT_TYPE.match(event_type):
        raise ApiError(400, "bad_event_header", "X-Webhook-Event must look like 'tour.promoted' (word.word).")
    _check_content_type(request)
    raw = await read_body(request, ctx.config.security.max_body_bytes)
    payload = parse_object(raw, ctx.config.security.max_json_depth)
    if "event" in payload and payload["event"] != event_type:
        # The signature covers the body, not the headers: the type we act on must be the signed one.
        raise ApiError(400, "event_mismatch", "X-Webhook-Event must equal the payload's 'event' field.")

    now = ctx.clock()
    client = request.client.host if request.client else "unknown"
    ctx.inbound_failure_limit.refuse_if_empty(client, "refused signatures from this address")
    canonical_body = signing.canonical(payload)
    partner_id = request.headers.get("x-partner-id")
    if partner_id is not None:  # partners are kept in memory by the store: no thread hop needed
        named = ctx.store.get_partner(partner_id)
        candidates = [named] if named is not None and named.status != "disabled" else []
    else:
        candidates = ctx.store.partners_accepting_inbound()
    args = (candidates, raw, payload, canonical_body, signature, now)
    if len(candidates) * len(raw) > 65536:  # many HMACs over a large body: keep them off the event loop
        partner = await asyncio.to_thread(_find_sender, *args)
    else:
        partner = _find_sender(*args)
    if partner is None:
        ctx.inbound_failure_limit.take(client)
        raise ApiError(401, "invalid_signature",
                       "The signature does not verify for any partner. Sign the body with your shared secret "
                       "(hex HMAC-SHA256) and send it as X-Webhook-Signature.")

    ctx.inbound_limit.check(partner.id, "events from this partner")

    timestamp = payload.get("timestamp")
    if timestamp is not None:
        if isinstance(timestamp, bool) or not isinstance(timestamp, (int, float)) or not _finite(timestamp):
            raise ApiError(401, "bad_timestamp", "'timestamp' must be unix seconds (a number).")
        tolerance = ctx.config.security.inbound_tolerance_s
        if abs(now - timestamp) > tolerance:
            raise ApiError(401, "stale_timestamp",
                           f"'timestamp' is more than {tolerance} s away from our clock; send a fresh event.")

    webhook_id = request.headers.get("x-webhook-id")
    dedupe_key = f"id:{webhook_id}" if webhook_id else "sha256:" + hashlib.sha256(canonical_body).hexdigest()
    stored, created = await db(ctx.store.add_inbound, inbound_id=new_id("inb_"), partner_id=partner.id,
                               event_type=event_type, dedupe_key=dedupe_key, body=canonical_body, now=now)
    ctx.metrics.inbound.inc(result="accepted" if created else "duplicate")
    logger.info("inbound %s %s from %s%s", stored.id, event_type, partner.id, "" if created else " (duplicate)",
                extra={"inbound_id": stored.id, "event": event_type, "partner_id": partner.id,
                       "duplicate": not created})
    after = None
    if created and event_type in INBOUND_ACTIONS:
        after = BackgroundTask(INBOUND_ACTIONS[event_type], ctx, partner.id, payload)
    return JSONResponse({"status": "received", "timestamp": int(stored.received_at)}, background=after)


def push_offer(ctx: Context, partner_id: str, payload: dict[str, Any]) -> None:
    """A promoted tour reaches our users live (after the partner's 200 went out)."""
    offer = realtime.offer_from(partner_id, payload)
    if offer is None:
        logger.warning("offer from %s names no valid user_id; sent to nobody", partner_id)
        return
    message, user_id = offer
    reached = ctx.notifier.notify(message, user_id)
    logger.info("offer from %s sent to %d live connections (%s)", partner_id, reached, user_id or "everyone")


# What an inbound event sets off once it is stored, by type. Other types are only stored.
INBOUND_ACTIONS: dict[str, Callable[[Context, str, dict[str, Any]], None]] = {"tour.promoted": push_offer}


async def list_inbound(request: Request) -> JSONResponse:
    limit, cursor = page_params(request)
    q = request.query_params
    page = await db(context(request).store.list_inbound, limit=limit, cursor=cursor,
                    partner_id=q.get("partner_id"), event=q.get("event"))
    return JSONResponse(page_json(page, inbound_json))


# --- Live notifications -----------------------------------------------------------------------


async def mint_realtime_token(request: Request) -> JSONResponse:
    """``POST /realtime/tokens``: a short-lived token with which one user opens ``/ws``."""
    ctx = context(request)
    body = await read_json_object(request)
    _reject_unknown_fields(body, {"user_id"})
    user_id = body.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip() or len(user_id) > 200:
        raise invalid("user_id", "must be a non-empty string of at most 200 characters.")
    token, expires_at = ctx.tokens.mint(user_id, ctx.clock())
    return JSONResponse({"token": token, "expires_at": expires_at}, status_code=201)


async def live_notifications(websocket: WebSocket) -> None:
    """``GET /ws?token=``: offers pushed live. A bad or expired token is closed with 1008."""
    ctx: Context = websocket.app.state.ctx
    try:
        user_id = ctx.tokens.user_for(websocket.query_params.get("token", ""), ctx.clock())
    except realtime.TokenError as exc:
        await websocket.accept()
        await websocket.close(code=realtime.POLICY_VIOLATION, reason=str(exc))
        return
    await websocket.accept()
    await ctx.notifier.serve(websocket, user_id)


# --- Metrics ----------------------------------------------------------------------------------


async def prometheus_metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format."""
    text = await db(context(request).metrics.render)
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


# --- The dashboard ---------------------------------------------------------------------------

STATIC = Path(__file__).resolve().parent / "static"


async def dashboard(request: Request) -> Response:
    """``GET /dashboard``: one static page; it asks for the admin token and calls the API itself."""
    return FileResponse(STATIC / "dashboard.html", media_type="text/html", headers={
        "Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


async def stats(request: Request) -> JSONResponse:
    """``GET /stats``: what the dashboard draws — partners' success rates, totals, outcomes per minute."""
    ctx = context(request)
    partners = await db(ctx.store.all_partners)
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
                     "delivered": c.get("delivered", 0),
                     "failed": c.get("failed", 0), "pending": c.get("pending", 0),
                     "success_rate": round(c.get("delivered", 0) / done, 4) if done else None})
    per_minute: dict[int, dict[str, int]] = {}
    for minute, state, n in minutes:
        per_minute.setdefault(minute, {"minute": minute, "delivered": 0, "failed": 0})[state] = n
    totals = {state: sum(c.get(state, 0) for c in counts.values()) for state in ("pending", "delivered", "failed")}
    return JSONResponse({"partners": rows, "totals": {**totals, "in_flight": ctx.loop.in_flight},
                         "per_minute": sorted(per_minute.values(), key=lambda m: m["minute"]),
                         "now": int(now)})


async def openapi_document(request: Request) -> JSONResponse:
    """``GET /openapi.json``: the API described, with this server's event catalog."""
    return JSONResponse(openapi.document(context(request).config.events, __version__))


# --- Health ---------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    try:
        ok = await db(context(request).store.ping)
    except Exception:
        ok = False
    if not ok:
        return error_response(503, "database_unavailable", "The database does not answer.")
    return JSONResponse({"status": "ok"})


ROUTES = [
    route("GET", "/health", health, PUBLIC),
    route("POST", "/partners/register", register_partner, REGISTRATION),
    route("GET", "/partners", list_partners, ADMIN),
    route("GET", "/partners/{partner_id}", get_partner, CALLER),
    route("PATCH", "/partners/{partner_id}", update_partner, CALLER),
    route("POST", "/partners/{partner_id}/rotate-secret", rotate_secret, CALLER),
    route("POST", "/partners/{partner_id}/test", send_test_event, CALLER),
    route("POST", "/partners/{partner_id}/recover", recover_failed, CALLER),
    route("POST", "/events", publish_event, ADMIN),
    route("GET", "/events/{event_id}", get_event, ADMIN),
    route("GET", "/deliveries", list_deliveries, CALLER),
    route("GET", "/deliveries/{delivery_id}", get_delivery, CALLER),
    route("POST", "/deliveries/{delivery_id}/retry", retry_delivery, CALLER),
    route("POST", "/webhooks/partners", receive_partner_event, SIGNED),
    route("GET", "/inbound", list_inbound, ADMIN),
    route("POST", "/realtime/tokens", mint_realtime_token, ADMIN),
    route("GET", "/metrics", prometheus_metrics, METRICS),
    route("GET", "/stats", stats, ADMIN),
    route("GET", "/dashboard", dashboard, PUBLIC),
    route("GET", "/openapi.json", openapi_document, PUBLIC),
    WebSocketRoute("/ws", live_notifications),
]


# =====================================================================================
# 5. The application
# =====================================================================================


def create_app(config: Config, *, clock: Callable[[], float] = time.time,
               rng: Any = None) -> Starlette:
    """The Starlette app. The store opens and the delivery loop starts in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette):
        store = Store(config.storage.path)
        counters = metrics.Metrics()
        loop = delivery.DeliveryLoop(store, config.delivery_settings(), rng=rng, clock=clock, metrics=counters)
        token = admin_token(config)
        tokens = realtime.Tokens(hmac.new(token.encode(), b"webhookd realtime tokens", hashlib.sha256).digest(),
                                 config.realtime.token_ttl_s)
        sec = config.security
        notifier = realtime.Notifier(queue_size=config.realtime.client_queue)
        counters.gauge("webhookd_deliveries", "Deliveries stored, by state.",
                       lambda: {(("state", s),): float(n) for s, n in store.count_by_state().items()})
        counters.gauge("webhookd_deliveries_in_flight", "Attempts being sent right now.",
                       lambda: {(): float(loop.in_flight)})
        counters.gauge("webhookd_circuit_breakers_open", "Partners whose circuit is open or half-open.",
                       lambda: {(): float(loop.breakers.open_count(clock()))})
        counters.gauge("webhookd_websocket_clients", "Connected /ws clients.",
                       lambda: {(): float(len(notifier.clients))})
        counters.gauge("webhookd_websocket_dropped_messages", "Messages dropped for /ws clients that did not read.",
                       lambda: {(): float(notifier.dropped)})
        app.state.ctx = Context(
            config=config, store=store, loop=loop, admin_token=token, clock=clock, metrics=counters,
            notifier=notifier, tokens=tokens,
            inbound_limit=RateLimiter(sec.inbound_rate_per_s, 2 * sec.inbound_rate_per_s, time.monotonic),
            inbound_failure_limit=RateLimiter(sec.inbound_failures_per_s, 4 * sec.inbound_failures_per_s,
                                              time.monotonic),
            registration_limit=RateLimiter(sec.registration_rate_per_min / 60, sec.registration_rate_per_min,
                                           time.monotonic))
        await loop.start()
        logger.info("webhookd %s ready; database %s", __version__, config.storage.path)
        try:
            yield
        finally:
            await loop.stop()
            store.close()

    return Starlette(
        routes=ROUTES,
        lifespan=lifespan,
        exception_handlers={ApiError: _on_api_error, HTTPException: _on_http_exception, Exception: _on_unexpected},
    )


# =====================================================================================
# 6. The command line
# =====================================================================================


def _cmd_serve(args: argparse.Namespace, config: Config) -> int:
    import uvicorn

    host = args.host or config.server.host
    port = args.port or config.server.port
    admin_token(config)  # created now, so `webhookd token` works at once
    if not _is_loopback(host) and config.security.allow_private_targets:
        logger.warning("listening on %s with allow_private_targets = true: partners could reach your "
                       "internal network. Set [security] allow_private_targets = false.", host)
    uvicorn.run(create_app(config), host=host, port=port, log_level=config.server.log_level, log_config=None,
                access_log=False, timeout_graceful_shutdown=int(config.delivery.timeout_s) + 2)
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _cmd_token(args: argparse.Namespace, config: Config) -> int:
    print(admin_token(config))
    return 0


def _cmd_sign(args: argparse.Namespace, config: Config) -> int:
    payload = _read_json_argument(args.json)
    print(signing.sign_hex(args.secret, signing.canonical(payload)))
    return 0


def _listen_verdicts(secrets_held: list[str], headers: Any, body: bytes, now: float) -> dict[str, bool]:
    """How a receiver holding these secrets judges one webhook, each way a partner might check it."""
    verdicts = [_verdicts_for(s, headers, body, now) for s in secrets_held]
    return {check: any(v[check] for v in verdicts) for check in ("raw", "canonical", "standard")}


def _verdicts_for(secret: str, headers: Any, body: bytes, now: float) -> dict[str, bool]:
    signature = headers.get("X-Webhook-Signature") or ""
    try:
        canonical_ok = signing.signature_matches(secret, signing.canonical(signing.parse_json(body)), signature)
    except signing.BadJSON:
        canonical_ok = False
    msg_id, stamp = headers.get("webhook-id") or "", headers.get("webhook-timestamp") or ""
    standard_ok = False
    if is_small_number(stamp) and abs(now - int(stamp)) <= 300:
        expected = signing.standard_signature(secret, msg_id, int(stamp), body)
        given = (headers.get("webhook-signature") or "").split()
        standard_ok = any(hmac.compare_digest(expected.encode(), g.encode("utf-8", "replace")) for g in given)
    return {"raw": signing.signature_matches(secret, body, signature), "canonical": canonical_ok,
            "standard": standard_ok}


def _cmd_listen(args: argparse.Namespace, config: Config) -> int:
    """A local receiver that verifies every webhook and prints what it got."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    held = [s.strip() for s in args.secret.split(",") if s.strip()]  # new,old during a rotation

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, 1 << 20))
            verdicts = _listen_verdicts(held, self.headers, body, time.time())
            ok = verdicts["raw"] or verdicts["canonical"]
            print(f"{self.headers.get('X-Webhook-Event', '?'):<20} {self.headers.get('X-Webhook-Id', '?')}  "
                  + "  ".join(f"{k}={'ok' if v else 'BAD'}" for k, v in verdicts.items()), flush=True)
            if args.verbose:
                print("  " + body.decode("utf-8", "replace"), flush=True)
            answer = {"status": "received"} if ok else {"error": {"code": "invalid_signature",
                                                                  "message": "The signature does not verify."}}
            data = json.dumps(answer).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *log_args: Any) -> None:
            pass  # one line per webhook is printed above

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"listening on http://{args.host}:{args.port}/ — register this URL; Ctrl+C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# --- Talking to the running server (every operator command) ----------------------------


class CliError(Exception):
    """Raised by a command to stop with one clear line and exit status 1."""


def _api(config: Config, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> Any:
    """Call the running server's API with the admin token; its JSON answer, or CliError."""
    import urllib.error
    import urllib.parse
    import urllib.request

    host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
    base = f"http://{host}:{config.server.port}"
    params = {k: v for k, v in (query or {}).items() if v is not None}
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {admin_token(config)}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            raise CliError(f"{error['message']} ({exc.code} {error['code']})") from None
        except (ValueError, KeyError, TypeError):
            raise CliError(f"the server answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach webhookd at {base} ({exc.reason}); start it with 'webhookd serve' "
                       f"or pass the --config it runs with") from None


def _cell(column: str, value: Any) -> str:
    """One value as a person reads it: times as dates, lists joined, nothing as '-'."""
    if (column.endswith("_at") or column.endswith("_since")) and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return ",".join(map(str, value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "-" if value is None else str(value)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as an aligned plain-text table; times as ISO dates."""
    cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if not rows:
        print("(none)")


def _show(args: argparse.Namespace, answer: Any, columns: list[str] | None = None) -> int:
    """Print ``answer`` as JSON (--json), as a table (lists), or as key: value lines."""
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    elif isinstance(answer, dict) and "items" in answer:
        _print_table(answer["items"], columns or [])
    elif isinstance(answer, dict):
        width = max(map(len, answer), default=0)
        for key, value in answer.items():
            print(f"{key.ljust(width)}  {_cell(key, value)}")
    else:
        print(answer)
    return 0


def _read_json_argument(text: str) -> Any:
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    try:
        return signing.parse_json(text.encode("utf-8"))
    except signing.BadJSON as exc:
        raise CliError(f"the JSON given is not valid: {exc}") from None


PARTNER_COLUMNS = ["partner_id", "partner_name", "status", "events_subscribed", "webhook_url"]
DELIVERY_COLUMNS = ["delivery_id", "event", "partner_id", "state", "attempt_count", "updated_at"]


def _cmd_partners(args: argparse.Namespace, config: Config) -> int:
    action = args.action
    if action == "list":
        return _show(args, _api(config, "GET", "/partners", query={"limit": args.limit}), PARTNER_COLUMNS)
    if action == "add":
        events = [e.strip() for e in args.events.split(",") if e.strip()]
        answer = _api(config, "POST", "/partners/register",
                      {"partner_name": args.name, "webhook_url": args.url, "events": events})
        if not args.json:
            print("Save shared_secret and api_key now: they are not shown again.", file=sys.stderr)
        return _show(args, answer)
    if not args.partner_id:
        raise CliError(f"'partners {action}' needs a PARTNER_ID")
    path = f"/partners/{args.partner_id}"
    if action == "show":
        return _show(args, _api(config, "GET", path))
    if action in ("pause", "resume"):
        status = "paused" if action == "pause" else "active"
        return _show(args, _api(config, "PATCH", path, {"status": status}))
    if action == "rotate":
        return _show(args, _api(config, "POST", path + "/rotate-secret"))
    raise CliError(f"unknown action {action!r}")


def _cmd_publish(args: argparse.Namespace, config: Config) -> int:
    payload = _read_json_argument(args.data)
    if not isinstance(payload, dict):
        raise CliError("--data must be a JSON object of the event's fields")
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    return _show(args, _api(config, "POST", "/events", {**payload, "event": args.type}, headers=headers))


def _cmd_deliveries(args: argparse.Namespace, config: Config) -> int:
    query = {"state": args.status, "partner_id": args.partner, "event": args.event, "limit": args.limit}
    return _show(args, _api(config, "GET", "/deliveries", query=query), DELIVERY_COLUMNS)


def _cmd_retry(args: argparse.Namespace, config: Config) -> int:
    return _show(args, _api(config, "POST", f"/deliveries/{args.delivery_id}/retry"))


def _cmd_recover(args: argparse.Namespace, config: Config) -> int:
    return _show(args, _api(config, "POST", f"/partners/{args.partner_id}/recover", query={"since": args.since}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="webhookd", description="A small, auditable webhook hub.")
    config_help = "path to webhookd.toml (default: ./webhookd.toml, or $WEBHOOKD_CONFIG)"
    parser.add_argument("--config", default=os.environ.get("WEBHOOKD_CONFIG", "webhookd.toml"), help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `webhookd serve --config X` works as well as `webhookd --config X serve`.
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")

    serve = commands.add_parser("serve", parents=[with_config], help="run the HTTP API and the delivery loop")
    serve.add_argument("--host", help="listen address (default: [server] host)")
    serve.add_argument("--port", type=int, help="listen port (default: [server] port)")
    serve.set_defaults(handler=_cmd_serve)

    token = commands.add_parser("token", parents=[with_config], help="print the admin token (creating it on first use)")
    token.set_defaults(handler=_cmd_token)

    partners = commands.add_parser("partners", parents=[with_config, as_json], help="list, show, add, pause, resume, rotate")
    partners.add_argument("action", choices=["list", "show", "add", "pause", "resume", "rotate"])
    partners.add_argument("partner_id", nargs="?", help="the partner (show, pause, resume, rotate)")
    partners.add_argument("--name", help="partner name (add)")
    partners.add_argument("--url", help="webhook URL (add)")
    partners.add_argument("--events", default="", help="comma-separated event types (add)")
    partners.add_argument("--limit", type=int, default=50, help="how many to list (default 50)")
    partners.set_defaults(handler=_cmd_partners)

    publish = commands.add_parser("publish", parents=[with_config, as_json], help="publish an event to its subscribers")
    publish.add_argument("type", help="the event type, e.g. payment.success (fills 'event')")
    publish.add_argument("--data", default="{}", help="the payload fields as JSON, or @file")
    publish.add_argument("--idempotency-key", help="publishing twice with the same key fans out once")
    publish.set_defaults(handler=_cmd_publish)

    deliveries = commands.add_parser("deliveries", parents=[with_config, as_json], help="list deliveries, newest first")
    deliveries.add_argument("--status", choices=["pending", "delivered", "failed"], help="only this state")
    deliveries.add_argument("--partner", help="only this partner id")
    deliveries.add_argument("--event", help="only this event type")
    deliveries.add_argument("--limit", type=int, default=50, help="how many (default 50, at most 200)")
    deliveries.set_defaults(handler=_cmd_deliveries)

    retry = commands.add_parser("retry", parents=[with_config, as_json], help="one more attempt of a failed delivery")
    retry.add_argument("delivery_id")
    retry.set_defaults(handler=_cmd_retry)

    recover = commands.add_parser("recover", parents=[with_config, as_json], help="re-queue a partner's failed deliveries")
    recover.add_argument("partner_id")
    recover.add_argument("--since", type=int, required=True, help="unix seconds: failed deliveries created since")
    recover.set_defaults(handler=_cmd_recover)

    sign = commands.add_parser("sign", parents=[with_config], help="print the X-Webhook-Signature of a JSON payload")
    sign.add_argument("--secret", required=True, help="the partner's shared secret")
    sign.add_argument("json", nargs="?", default="{}", help="the payload, or @file to read it from a file")
    sign.set_defaults(handler=_cmd_sign, needs_config=False)

    listen = commands.add_parser("listen", parents=[with_config], help="run a local receiver that verifies and prints webhooks")
    listen.add_argument("--secret", required=True,
                        help="the shared secret registration gave you (during a rotation: NEW,OLD)")
    listen.add_argument("--port", type=int, default=9000, help="port to listen on (default: 9000)")
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    listen.add_argument("--verbose", "-v", action="store_true", help="print each body too")
    listen.set_defaults(handler=_cmd_listen, needs_config=False)
    return parser


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's structured fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        line.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = Config()
    if getattr(args, "needs_config", True):
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"webhookd: {exc}", file=sys.stderr)
            return 2
    configure_logging(config.server.log_format)
    try:
        return args.handler(args, config)
    except (CliError, signing.BadJSON, OSError) as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

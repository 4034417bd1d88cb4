"""One HTTP attempt of one delivery, in plain standard library (``asyncio`` streams).

The sender runs its own event loop in one thread, ``webhookd-sender``. Every claimed job
becomes a task there, so a thousand attempts waiting on partners 100 ms away cost a
thousand small tasks, not a thousand threads; and the server's event loop, which
answers the API, never runs a send. ``Sender.attempt(job)`` (a coroutine on that loop)
always returns a ``Sent`` (it never raises for I/O), which says what happened in words
the store keeps: the status code, or an error class like ``timeout`` or
``connection_refused``.

One attempt, step by step, all of it within ``timeout_s`` (lookup, connect, answer):

1. ``targets.parse_target`` checks the URL and the allowed ports again (once per URL and
   process: ``Sender._route``);
2. ``build_headers`` signs the stored bytes (``X-Webhook-Signature`` and the Standard
   Webhooks headers), and ``request_bytes`` writes the whole request in one buffer, behind
   the request line and fixed headers its ``Route`` holds (built once per URL);
3. a kept-alive connection to that origin is reused if it is fresh and the partner has
   not closed it, else a new one is opened to the address ``targets.resolve_target_async``
   checked (pinned: TLS still checks the URL's host name) — through the egress proxy's tunnel to
   that address if ``delivery.proxy_url`` is set, and with the partner's client certificate if it
   has one (``egress.py``; kept connections are kept per certificate); a request is written again
   on a new connection only if the kept one broke before the whole request went out —
   once written, the partner may have acted on it;
4. ``sender_http.py`` reads the answer: the status, the first 1 KiB of the body, and a
   429/503 ``Retry-After`` for the loop's next wait; redirects are never followed. What a
   hostile endpoint can make it hold is bounded (see there).

With ``delivery.native_speedups`` on (the default) and ``uvicorn[standard]`` installed, the
sender's loop is uvloop's (libuv: the loop uvicorn already runs the API on) and llhttp parses the
answers (``httptools``); without them, the standard library's loop and webhookd's own reader do
the same work, a little slower. ``docs/performance.md`` says what each bought.

Why not threads with ``http.client``: measured with partners 100 ms away (``docs/performance.md``,
"Where the time goes"), 16 threads delivered 158/s; 256 threads reached 1,900/s but each
``POST /events`` then took 112 ms at p99, as hundreds of threads fought for the GIL.
One loop thread holds a thousand attempts and leaves the API its speed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import http.client
import logging
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import egress
import signing
import trace_context
from config import DeliverySettings
from models import Attempt, Job
from partner_terms import header_lines, timeout_s
from sender_http import MAX_LINE, Answer, BadResponse, answer_reader
from targets import Target, TargetRefused, parse_target, resolve_target_async

try:  # uvicorn[standard] installs it; without it, the sender runs on the standard library's loop
    import uvloop
except ImportError:  # pragma: no cover - depends on the installation
    uvloop = None

logger = logging.getLogger("webhookd.delivery")

ROUTES_KEPT = 10_000     # URLs whose Route is kept (a partner's URL changes rarely)


@dataclass(frozen=True)
class Sent:
    """What one attempt produced: the attempt row, and the partner's Retry-After if any."""

    attempt: Attempt
    retry_after_s: float | None = None


# --- The request --------------------------------------------------------------------------


SIGNATURE_HEADERS = ("X-Webhook-Signature", "webhook-signature")  # kept with each attempt, for its trace


def build_headers(job: Job, timestamp: int) -> dict[str, str]:
    """The headers of an outgoing webhook that change from one request to the next, as the partner
    guide lists them (the fixed ones, ``Content-Type`` and ``User-Agent``, are in its ``Route``); with
    the event's trace context, a ``traceparent`` of a new span per attempt and its ``tracestate``."""
    headers = {
        "X-Webhook-Event": job.event,
        "X-Webhook-Signature": signing.sign_hex(job.secrets[0], job.body),
        "X-Webhook-Id": job.event_id,
        "X-Webhook-Timestamp": str(timestamp),
        "webhook-id": job.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signing.standard_signature_header(job.secrets, job.event_id, timestamp, job.body),
    }
    if job.traceparent:  # nothing to do (and nothing spent) for an event without one
        headers["traceparent"] = trace_context.new_span(job.traceparent)
        if job.tracestate:
            headers["tracestate"] = job.tracestate
    return headers


@dataclass(frozen=True)
class Route:
    """What every request to one URL shares, worked out once per URL (``Sender._route``): where it
    goes (the URL checked by ``targets.parse_target``), and the request line and the fixed headers
    as bytes — a partner's extra headers among them (``partner_terms.py``). Built per request they
    cost more than the signature."""

    target: Target
    head: bytes


def plan_route(url: str, allowed_ports: tuple[int, ...], user_agent: str,
               extra_headers: tuple[tuple[str, str], ...] = ()) -> Route:
    """The ``Route`` of ``url`` with a partner's ``extra_headers``, or ``TargetRefused``/``ValueError``
    saying why no request goes there."""
    target = parse_target(url, allowed_ports)
    if any(ord(c) < 33 or ord(c) == 127 for c in target.path):
        raise ValueError("the URL's path holds spaces or control characters")
    path = quote(target.path, safe="/%?=&:@!$'()*+,;~-._")  # non-ASCII as UTF-8 %XX, the rest as it was
    host = f"[{target.host}]" if ":" in target.host else target.host
    default_port = 443 if target.scheme == "https" else 80
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}" + ("" if target.port == default_port else f":{target.port}"),
             "Content-Type: application/json", f"User-Agent: {user_agent}", *header_lines(extra_headers), ""]
    return Route(target, "\r\n".join(lines).encode("latin-1"))


def request_bytes(route: Route, headers: dict[str, str], body: bytes) -> bytes:
    """The whole HTTP/1.1 request, head and body, to be written in one ``sendall``.

    One buffer, one write: a head and a body in two writes would wait on Nagle's
    algorithm or cost the partner two reads.
    """
    varying = "".join([f"Content-Length: {len(body)}\r\n", *(f"{name}: {value}\r\n" for name, value in headers.items()),
                       "\r\n"])
    return route.head + varying.encode("latin-1") + body


# --- What an answer means ---------------------------------------------------------------------


def classify_error(exc: BaseException) -> str:
    """A short, stable class for an attempt that got no HTTP response."""
    if isinstance(exc, TargetRefused):
        return "ssrf_blocked"
    if isinstance(exc, egress.ConfigurationError):
        return "configuration_error"   # fails at once: a retry would fail the same way (delivery.decide)
    if isinstance(exc, egress.ProxyError):
        return "proxy_error"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection_refused"
    if isinstance(exc, (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError)):
        return "connection_reset"
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    if isinstance(exc, http.client.HTTPException):
        return "protocol_error"
    if isinstance(exc, ValueError):
        return "invalid_url"
    return "connection_error"


DETAIL_MAX = 200  # characters of error_detail, at most


def describe_error(exc: BaseException, timeout_s: float) -> str:
    """What went wrong, in a few words a partner can act on ("certificate verify failed: Hostname
    mismatch…", "connection refused", "no answer within 5 s"). Built from the exception only:
    never the URL's path or query (which may hold a partner's token), never a header."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = f"certificate verify failed: {exc.verify_message or exc.reason}"
    elif isinstance(exc, ssl.SSLError):
        detail = f"TLS handshake failed: {exc.reason or exc.__class__.__name__}"
    elif isinstance(exc, TimeoutError):
        detail = str(exc) or f"no answer within {timeout_s:g} s"
    elif isinstance(exc, ConnectionRefusedError):
        detail = "connection refused"
    elif isinstance(exc, http.client.RemoteDisconnected):
        detail = "the partner closed the connection without an answer"
    elif isinstance(exc, ConnectionResetError):
        detail = "the partner reset the connection"
    elif isinstance(exc, BrokenPipeError):
        detail = "the connection broke while the request was being sent"
    elif isinstance(exc, (TargetRefused, BadResponse, http.client.HTTPException, ValueError)) and str(exc):
        detail = str(exc)
    elif isinstance(exc, OSError) and exc.strerror:
        detail = exc.strerror
    else:
        detail = str(exc) or exc.__class__.__name__
    return detail[:DETAIL_MAX]


def describe_status(status: int, cut_short: bool) -> str | None:
    """The detail of an answer: None for a plain 2xx."""
    if 200 <= status < 300:
        return "the body was cut short after the status; the status counts" if cut_short else None
    if 300 <= status < 400:
        return f"the partner answered {status}; redirects are not followed: register the final URL"
    return f"the partner answered {status}"


def status_error(status: int) -> str | None:
    """The error class of an HTTP status: None for 2xx; a redirect is never followed."""
    if 200 <= status < 300:
        return None
    return "redirect" if 300 <= status < 400 else "http_error"


def parse_retry_after(value: str | None, now: float, max_s: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), clamped to [0, max_s]."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit() and len(value) <= 10:
        seconds = float(value)
    else:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return min(max(seconds, 0.0), max_s)


# --- Kept-alive connections, pinned to the checked address ---------------------------------------


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last_used: float = field(default_factory=time.monotonic)

    def dropped(self) -> bool:
        """True if this idle connection must not carry the next request: the partner closed
        it, or sent bytes nobody asked for (the loop has already read them into the stream's
        buffer, which asyncio does not expose: hence the private name)."""
        return self.writer.is_closing() or self.reader.at_eof() or bool(self.reader._buffer)  # noqa: SLF001

    def close(self) -> None:
        self.writer.close()


_BROKEN_WRITE = (ConnectionResetError, BrokenPipeError)


# --- The sender -----------------------------------------------------------------------------------


class Sender:
    """Sends attempts from its own event loop thread, over keep-alive connections kept per origin.

    A connection is reused only while healthy: it is closed after any error, when the
    partner says ``Connection: close``, when a response is too large to drain, and
    when it has been idle longer than ``idle_connection_s`` (servers drop idle ones). At most
    ``concurrency`` are kept idle, all origins together, so the sockets open never pass twice
    ``concurrency`` (what ``serving.fit_open_files`` budgets for) however the work moves
    between partners.
    """

    def __init__(self, settings: DeliverySettings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock
        self._idle: dict[tuple, list[_Connection]] = {}   # per origin, the most recent last
        self._idle_count = 0                                  # all origins together
        self._routes: dict[Any, Route] = {}   # per URL (and extra headers): the target and the fixed head
        self._read_answer = answer_reader(settings.native_speedups)   # llhttp's, or webhookd's own
        self._last_sweep = time.monotonic()
        # Built once (it costs milliseconds): the system's CAs, or delivery.ca_file for a private CA.
        self._tls = ssl.create_default_context(cafile=settings.ca_file or None)
        self._client_certs = egress.ClientCertificates(settings.ca_file)   # partners' own, built on first use
        self._proxy = egress.Proxy.from_url(settings.proxy_url) if settings.proxy_url else None
        if self._proxy is not None:  # named without its credentials
            logger.info("deliveries leave through the egress proxy at %s: partners allow-list its address",
                        self._proxy.where)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # The loop thread -----------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The sender's event loop, started in its thread on first use."""
        with self._start_lock:
            if self._loop is None:
                native = self.settings.native_speedups and uvloop is not None
                self._loop = uvloop.new_event_loop() if native else asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="webhookd-sender", daemon=True)
                self._thread.start()
        return self._loop

    def submit(self, coroutine: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        """Run ``coroutine`` on the sender's loop, from any other thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def send(self, job: Job) -> Sent:
        """One attempt, waited for from a thread that is not the sender's (a test, a command)."""
        return self.submit(self.attempt(job)).result()

    def close(self) -> None:
        """Close the kept connections and stop the loop thread (tasks still running are dropped)."""
        if self._loop is None or self._thread is None:
            return
        self.submit(self._close_idle()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    # One attempt ---------------------------------------------------------------------

    async def attempt(self, job: Job) -> Sent:
        """Make one HTTP attempt of ``job`` and describe what happened. Never raises for I/O."""
        started = self.clock()
        answer = Answer()
        retry_after: float | None = None
        signatures = None
        try:
            route = self._route(job.url, job.extra_headers)
            tls = self._tls if job.client_cert is None else \
                await self._client_certs.context(job.client_cert, job.client_key or "", started)
            headers = build_headers(job, int(started))
            signatures = {name: headers[name] for name in SIGNATURE_HEADERS}
            if job.traceparent:  # kept beside them: the trace view shows each attempt's span
                signatures["traceparent"] = headers["traceparent"]
            async with asyncio.timeout(timeout_s(job.retry, self.settings)):
                await self._post(route.target, tls, request_bytes(route, headers, job.body), answer)
            error, detail = status_error(answer.status), describe_status(answer.status, cut_short=False)
        except Exception as exc:  # one bad endpoint must never take the sender down
            # Once the status has arrived it is the partner's answer: a body cut short by the
            # deadline or a closed connection costs only the connection. A malformed body is
            # still a protocol error.
            cut_short = answer.status is not None and not isinstance(exc, BadResponse)
            if cut_short:
                error, detail = status_error(answer.status), describe_status(answer.status, cut_short=True)
            else:
                error, detail = classify_error(exc), describe_error(exc, timeout_s(job.retry, self.settings))
        if answer.status in (429, 503):
            retry_after = parse_retry_after(answer.retry_after, self.clock(), self.settings.retry_after_max_s)
        attempt = Attempt(attempt=job.attempt, started_at=started, duration_ms=int((self.clock() - started) * 1000),
                          status_code=answer.status, error=error, response_snippet=answer.snippet, url=job.url,
                          error_detail=detail, signatures=signatures)
        return Sent(attempt, retry_after)

    def _route(self, url: str, extra_headers: tuple[tuple[str, str], ...] = ()) -> Route:
        """The ``Route`` of the URL and a partner's extra headers, from the ones already worked out
        (a URL refused is checked again each time: it raises). At most ``ROUTES_KEPT`` are kept;
        past that they are worked out anew. New headers make a new ``Route``: the old one is
        forgotten with the others."""
        key = (url, extra_headers) if extra_headers else url
        route = self._routes.get(key)
        if route is None:
            route = plan_route(url, self.settings.allowed_ports, self.settings.user_agent, extra_headers)
            if len(self._routes) >= ROUTES_KEPT:
                self._routes.clear()
            self._routes[key] = route
        return route

    async def _post(self, target: Target, tls: ssl.SSLContext, request: bytes, answer: Answer) -> None:
        """Write ``request`` to ``target`` (over ``tls`` for https) and read the answer into ``answer``."""
        origin = _origin(target, tls)
        conn, reused = await self._checkout(target, tls, origin)
        try:
            try:
                await _write(conn, request)
            except _BROKEN_WRITE:
                if not reused:
                    raise
                # The kept connection broke before the whole request went out, so the partner
                # cannot have read it: one fresh connection is safe. Once the request is written,
                # a connection that closes without an answer fails the attempt instead (the
                # partner may have acted on it); the next attempt comes after a backoff.
                conn.close()
                conn, reused = await self._checkout(target, tls, origin, fresh=True)
                await _write(conn, request)
            reusable = await self._read_answer(conn.reader, answer)
        except BaseException:  # an error, the deadline (a cancellation) or a stop
            conn.close()
            raise
        if reusable:
            self._keep(origin, conn)
        else:
            conn.close()

    async def _checkout(self, target: Target, tls: ssl.SSLContext, origin: tuple,
                        fresh: bool = False) -> tuple[_Connection, bool]:
        """A connection to the origin: the most recent idle one if fresh, else a new one
        (resolved, checked and pinned to that address; through the egress proxy if there is one)."""
        idle = [] if fresh else self._idle.get(origin, [])
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            if time.monotonic() - conn.last_used < self.settings.idle_connection_s and not conn.dropped():
                return conn, True
            conn.close()
        ip = await resolve_target_async(target.host, target.port, self.settings.allow_private_targets,
                                        self.settings.timeout_s)
        reader, writer = await egress.open_connection(
            ip, target.port, tls=tls if target.scheme == "https" else None, server_hostname=target.host,
            proxy=self._proxy, limit=MAX_LINE)
        return _Connection(reader, writer), False

    def _keep(self, origin: tuple, conn: _Connection) -> None:
        if self._idle_count >= self.settings.concurrency:
            conn.close()
            return
        conn.last_used = time.monotonic()
        self._idle.setdefault(origin, []).append(conn)
        self._idle_count += 1
        if conn.last_used - self._last_sweep > self.settings.idle_connection_s:
            self._sweep_idle(conn.last_used)

    def _sweep_idle(self, now: float) -> None:
        """Close connections idle too long, so origins that stopped getting work hold none."""
        self._last_sweep = now
        for origin, conns in list(self._idle.items()):
            fresh = []
            for conn in conns:
                if now - conn.last_used < self.settings.idle_connection_s:
                    fresh.append(conn)
                else:
                    conn.close()
            if fresh:
                self._idle[origin] = fresh
            else:
                del self._idle[origin]
        self._idle_count = sum(map(len, self._idle.values()))

    async def _close_idle(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._idle_count = 0


def _origin(target: Target, tls: ssl.SSLContext) -> tuple[str, str, int, ssl.SSLContext | None]:
    """What a kept connection may be reused for: the URL's origin and, for https, the TLS context it
    was made with (a partner's client certificate is its own: never lent to another's requests)."""
    return target.scheme, target.host, target.port, tls if target.scheme == "https" else None


async def _write(conn: _Connection, request: bytes) -> None:
    conn.writer.write(request)
    await conn.writer.drain()

"""The delivery loop and the HTTP sender.

How one delivery travels::

    POST /events ──► store.publish() ──► wake() ──► DeliveryLoop.run()
                                                      │ store.claim_due()   (lease the row)
                                                      ▼
                                             worker thread: send()      (one HTTP POST)
                                                      │ store.finish_attempt()
                                                      ▼
                         delivered │ pending again after a backoff │ failed after the last attempt

The loop runs in the server's event loop; the blocking work — SQLite and
``http.client`` — runs in worker threads, at most ``concurrency`` at a time. The
loop only claims as many rows as it has free workers, so a claimed row starts at
once and its lease only has to cover one attempt.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import http.client
import ipaddress
import logging
import random
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlsplit

import signing
from store import Attempt, Job, Store

logger = logging.getLogger("webhookd.delivery")

SNIPPET_BYTES = 1024
IDLE_RECHECK_S = 30.0  # even with nothing due, look again now and then (e.g. a partner resumed)


@dataclass(frozen=True)
class Settings:
    timeout_s: float = 5.0
    max_attempts: int = 3
    backoff_base_s: float = 2.0
    backoff_max_s: float = 3600.0
    concurrency: int = 16
    per_partner_concurrency: int = 4
    allow_private_targets: bool = False
    user_agent: str = "webhookd"

    @property
    def lease_s(self) -> float:
        """How long a claim holds a row. Far longer than one attempt can take, so a slow
        attempt is never taken over (and sent twice) while it is still running."""
        return max(30.0, 3 * self.timeout_s + 10)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (from 1).

    Exponential (base, 2·base, 4·base, …, capped at ``max_s``) with "equal jitter":
    a random point in the upper half, so retries of many deliveries that failed
    together spread out, yet none comes back at once.
    """
    delay = min(max_s, base_s * 2 ** (attempt - 1))
    return delay / 2 + rng.uniform(0, delay / 2)


# --- Where a request may go (SSRF) -------------------------------------------------


class TargetRefused(Exception):
    """Raised when a webhook URL points at an address we must not connect to."""


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for globally routable unicast addresses, seen through IPv6 wrappings of IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64: the IPv4 address is the last 32 bits
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return ip.is_global and not ip.is_multicast


def resolve_target(host: str, port: int, allow_private: bool) -> str:
    """Resolve ``host`` once and return the address to connect to.

    The caller connects to exactly this address, so a DNS answer that changes
    between the check and the connect (rebinding) cannot slip a private address in.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {host!r}") from exc
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            if not is_public_address(ipaddress.ip_address(address.split("%")[0])):
                raise TargetRefused(f"{host} resolves to the non-public address {address}")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a given IP address, keeping the URL's host for the Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """The same for HTTPS: TLS is checked against the URL's host name (SNI and certificate)."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


# --- Sending one attempt -------------------------------------------------------------


def build_headers(job: Job, timestamp: int, user_agent: str) -> dict[str, str]:
    """Every header of an outgoing webhook, as the SPEC lists them."""
    current_secret = job.secrets[0]
    return {
        "Content-Type": "application/json",
        "User-Agent": user_agent,
        "X-Webhook-Event": job.event,
        "X-Webhook-Signature": signing.sign_hex(current_secret, job.body),
        "X-Webhook-Id": job.event_id,
        "X-Webhook-Timestamp": str(timestamp),
        "webhook-id": job.event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signing.standard_signature_header(job.secrets, job.event_id, timestamp, job.body),
    }


def classify_error(exc: BaseException) -> str:
    """A short, stable class for an attempt that got no HTTP response."""
    if isinstance(exc, TargetRefused):
        return "ssrf_blocked"
    if isinstance(exc, (socket.timeout, TimeoutError)):
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


def send(job: Job, settings: Settings, clock: Callable[[], float] = time.time) -> Attempt:
    """Make one HTTP attempt of ``job`` and describe what happened. Never raises for I/O."""
    started = clock()
    status: int | None = None
    error: str | None = None
    snippet: str | None = None
    conn: http.client.HTTPConnection | None = None
    try:
        url = urlsplit(job.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("not an http(s) URL")
        port = url.port or (443 if url.scheme == "https" else 80)
        ip = resolve_target(url.hostname, port, settings.allow_private_targets)
        connection_class = _PinnedHTTPSConnection if url.scheme == "https" else _PinnedHTTPConnection
        conn = connection_class(url.hostname, port, ip, settings.timeout_s)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        conn.request("POST", path, body=job.body, headers=build_headers(job, int(started), settings.user_agent))
        response = conn.getresponse()
        status = response.status
        snippet = response.read(SNIPPET_BYTES).decode("utf-8", "replace")
        if 300 <= status < 400:
            error = "redirect"  # redirects are never followed: the partner must fix its URL
        elif not 200 <= status < 300:
            error = "http_error"
    except Exception as exc:  # one bad endpoint must never take the worker down
        error = classify_error(exc)
    finally:
        if conn is not None:
            conn.close()
    duration_ms = int((clock() - started) * 1000)
    return Attempt(attempt=job.attempt, started_at=started, duration_ms=duration_ms,
                   status_code=status, error=error, response_snippet=snippet)


# --- The loop -------------------------------------------------------------------------


class DeliveryLoop:
    """Claims due deliveries, sends them from a thread pool and records every attempt."""

    def __init__(self, store: Store, settings: Settings, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.settings = settings
        self.rng = rng or random.Random()
        self.clock = clock
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.concurrency, thread_name_prefix="webhookd-send")
        self._in_flight: dict[asyncio.Future, Job] = {}
        self._busy: collections.Counter[str] = collections.Counter()  # in flight per partner
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    # Starting, waking and stopping ---------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        requeued = await asyncio.to_thread(self.store.requeue_expired_leases, self.clock())
        if requeued:
            logger.warning("re-queued %d deliveries whose lease ran out (an earlier run stopped mid-send)", requeued)
        self._task = asyncio.create_task(self.run(), name="webhookd-delivery-loop")

    def wake(self) -> None:
        """Tell the loop there may be work now. Safe to call from any thread."""
        if self._loop is None or self._wakeup is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wakeup.set()
        else:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming, wait (bounded) for attempts in flight, and hand back the rest.

        An attempt still running after the grace period keeps its lease; the next
        run takes it again once the lease runs out. Nothing is lost either way.
        """
        self._stopping = True
        self.wake()
        if self._task is not None:
            await self._task
        never_started = [self._in_flight[f].delivery_id for f in list(self._in_flight) if f.cancel()]
        if never_started:
            await asyncio.to_thread(self.store.release, never_started, self.clock())
        running = [f for f in self._in_flight if not f.done()]
        if running:
            grace = self.settings.timeout_s + 1 if grace_s is None else grace_s
            await asyncio.wait(running, timeout=grace)
        self._pool.shutdown(wait=False, cancel_futures=True)
        unfinished = sum(1 for f in running if not f.done())
        logger.info("delivery loop stopped; %d attempts left unfinished (their leases will run out "
                    "and they will be sent again)", unfinished)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # The loop itself ---------------------------------------------------------------------

    async def run(self) -> None:
        assert self._wakeup is not None
        while not self._stopping:
            self._wakeup.clear()
            try:
                started = await self._claim_and_start()
            except Exception:
                logger.exception("claiming deliveries failed; trying again shortly")
                await self._sleep(1.0)
                continue
            if started:
                continue  # there may be more due right now
            await self._sleep(await self._seconds_until_next_due())

    async def _claim_and_start(self) -> int:
        free = self.settings.concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        jobs = await asyncio.to_thread(
            self.store.claim_due, now=self.clock(), lease_s=self.settings.lease_s, limit=free,
            per_partner=self.settings.per_partner_concurrency, busy=dict(self._busy))
        for job in jobs:
            future = self._loop.run_in_executor(self._pool, self._attempt, job)
            self._in_flight[future] = job
            self._busy[job.partner_id] += 1
            future.add_done_callback(self._attempt_done)
        return len(jobs)

    def _attempt_done(self, future: asyncio.Future) -> None:
        job = self._in_flight.pop(future, None)
        if job is not None:
            self._busy[job.partner_id] -= 1
            if not self._busy[job.partner_id]:
                del self._busy[job.partner_id]
        if not future.cancelled() and future.exception() is not None:
            logger.error("delivery attempt crashed", exc_info=future.exception())
        self._wakeup.set()  # a worker is free again

    async def _seconds_until_next_due(self) -> float:
        next_due = await asyncio.to_thread(self.store.next_due_at)
        if next_due is None:
            return IDLE_RECHECK_S
        return min(IDLE_RECHECK_S, max(0.0, next_due - self.clock()))

    async def _sleep(self, seconds: float) -> None:
        """Sleep until ``seconds`` pass or someone calls ``wake()``."""
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)
        except asyncio.TimeoutError:
            pass

    # One attempt, in a worker thread -------------------------------------------------------

    def _attempt(self, job: Job) -> None:
        attempt = send(job, self.settings, self.clock)
        now = self.clock()
        if attempt.error is None:
            state, next_at = "delivered", now
        elif job.attempt < job.max_attempts:
            delay = backoff_delay(job.attempt, self.settings.backoff_base_s, self.settings.backoff_max_s, self.rng)
            state, next_at = "pending", now + delay
        else:
            state, next_at = "failed", now
        recorded = self.store.finish_attempt(
            delivery_id=job.delivery_id, attempt=attempt, state=state, next_attempt_at=next_at, now=now)
        logger.info(
            "delivery %s event=%s partner=%s attempt=%d status=%s error=%s duration_ms=%d -> %s%s",
            job.delivery_id, job.event_id, job.partner_id, job.attempt, attempt.status_code,
            attempt.error, attempt.duration_ms, state, "" if recorded else " (not recorded: lease lost)")

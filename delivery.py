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
import email.utils
import functools
import heapq
import http.client
import ipaddress
import logging
import queue
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, quote, urlsplit

import signing
from metrics import Metrics
from store import Attempt, Job, Outcome, Store, take_batch

logger = logging.getLogger("webhookd.delivery")

SNIPPET_BYTES = 1024
DRAIN_BYTES = 64 * 1024  # read at most this much of a response to reuse its connection
IDLE_RECHECK_S = 30.0    # even with nothing due, look again now and then
RECORD_BATCH = 500       # results written per group commit, at most


@dataclass(frozen=True)
class Limits:
    """The ``[delivery]`` section of webhookd.toml (webhookd.py reads it into this class)."""

    timeout_s: float = 5.0
    max_attempts: int = 3
    backoff_base_s: float = 30.0
    backoff_max_s: float = 3600.0
    concurrency: int = 16
    per_partner_concurrency: int = 4
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    breaker_cooldown_max_s: float = 600.0
    disable_after_s: float = 259200.0
    retry_after_max_s: float = 3600.0
    idle_connection_s: float = 30.0


@dataclass(frozen=True)
class Settings(Limits):
    """Everything the loop needs: the ``[delivery]`` limits plus a few keys of other sections."""

    retention_s: float = 2592000.0
    purge_batch: int = 500
    purge_interval_s: float = 300.0
    allow_private_targets: bool = False
    allowed_ports: tuple[int, ...] = ()
    user_agent: str = "webhookd"

    @property
    def claim_ahead(self) -> int:
        """How many claimed deliveries the loop holds: one per worker, plus one more round
        waiting in the pool's queue, so a worker that finishes starts its next attempt at
        once instead of waiting for the loop's next claim."""
        return 2 * self.concurrency

    @property
    def lease_s(self) -> float:
        """How long a claim holds a row. An attempt lasts at most ``timeout_s`` to connect plus
        ``timeout_s`` once connected (the watchdog cuts it off), and a claimed row waits at
        most one attempt before a worker takes it: four timeouts and a margin for DNS and for
        recording the result mean a slow attempt is never taken over — and sent twice —
        while it is still running."""
        return 4 * self.timeout_s + 10


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


# Name lookups run here, never in the threads that serve requests or send: a resolver
# that never answers can then hold these few threads, and nothing else.
_RESOLVERS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhookd-dns")


def resolve_target(host: str, port: int, allow_private: bool, timeout: float = 5.0) -> str:
    """Resolve ``host`` once, within ``timeout`` seconds, and return the address to connect to.

    The caller connects to exactly this address, so a DNS answer that changes
    between the check and the connect (rebinding) cannot slip a private address in.
    """
    lookup = _RESOLVERS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=max(timeout, 0.001))
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"resolving {host!r} took longer than {timeout:.1f} s") from None
    except (socket.gaierror, UnicodeError, ValueError) as exc:  # IDNA refuses empty or long labels
        raise OSError(f"cannot resolve {host!r}") from exc
    return _checked_address(host, infos, allow_private)


async def resolve_target_async(host: str, port: int, allow_private: bool, timeout: float = 5.0) -> str:
    """``resolve_target`` for the event loop (registration): waits without holding a thread."""
    lookup = asyncio.get_running_loop().run_in_executor(
        _RESOLVERS, functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM))
    try:
        infos = await asyncio.wait_for(lookup, timeout)
    except TimeoutError:
        raise TimeoutError(f"resolving {host!r} took longer than {timeout:.1f} s") from None
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise OSError(f"cannot resolve {host!r}") from exc
    return _checked_address(host, infos, allow_private)


def _checked_address(host: str, infos: list, allow_private: bool) -> str:
    """The first address of a lookup, after refusing the lot if any one is not public."""
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            if not is_public_address(ipaddress.ip_address(address.split("%")[0])):
                raise TargetRefused(f"{host} resolves to the non-public address {address}")
    return addresses[0]


def _connect_no_delay(ip: str, port: int, timeout: float) -> socket.socket:
    """Connect with Nagle off, as ``http.client`` does: it sends headers and body in two
    writes, and with Nagle on a kept-alive connection waits ~40 ms for a delayed ACK."""
    sock = socket.create_connection((ip, port), timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a given IP address, keeping the URL's host for the Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = _connect_no_delay(self._ip, self.port, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """The same for HTTPS: TLS is checked against the URL's host name (SNI and certificate)."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = _connect_no_delay(self._ip, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


# --- Sending one attempt ---------------------------------------------------------------


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


@dataclass(frozen=True)
class Sent:
    """What one attempt produced: the attempt row, and the partner's Retry-After if any."""

    attempt: Attempt
    retry_after_s: float | None = None


_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


def _request_bytes(url: SplitResult, port: int, headers: dict[str, str], body: bytes) -> bytes:
    """The whole HTTP/1.1 request, head and body, to be written in one ``sendall``.

    ``http.client``'s ``request()`` builds the same head one ``putheader`` at a time and
    writes head and body separately; on the hot path that bookkeeping costs more than
    the write itself. Its response parser reads the answer (``_exchange``).
    """
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    if any(ord(c) < 33 or ord(c) == 127 for c in path):
        raise ValueError("the URL's path holds spaces or control characters")
    path = quote(path, safe="/%?=&:@!$'()*+,;~-._")  # non-ASCII as UTF-8 %XX, the rest as it was
    host = f"[{url.hostname}]" if ":" in (url.hostname or "") else url.hostname
    default_port = 443 if url.scheme == "https" else 80
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}" + ("" if port == default_port else f":{port}"),
             f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def _exchange(conn: http.client.HTTPConnection, request: bytes) -> http.client.HTTPResponse:
    """Write ``request`` on the (pinned) connection and read the response head."""
    if conn.sock is None:
        conn.connect()
    conn.sock.sendall(request)
    response = http.client.HTTPResponse(conn.sock, method="POST")
    response.begin()
    return response


class _Deadlines:
    """Cuts off requests that run past their deadline.

    ``http.client``'s timeout bounds each socket operation, not the request: a
    partner that drips one header byte every few seconds could hold a worker for
    minutes. One watchdog thread shuts down the socket of any request past its
    deadline, so an attempt lasts at most ``timeout_s`` once connected.
    """

    def __init__(self) -> None:
        self._heap: list[list] = []  # [deadline, seq, connection, still watched]
        self._seq = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, conn: http.client.HTTPConnection) -> list:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="webhookd-deadlines", daemon=True)
                self._thread.start()
            self._seq += 1
            entry = [deadline, self._seq, conn, True]
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:
                self._cond.notify()
            return entry

    @staticmethod
    def release(entry: list) -> bool:
        """Stop watching; True if the deadline had already cut the request off."""
        entry[3] = False
        return entry[2] is None

    def _run(self) -> None:
        with self._cond:
            while True:
                try:
                    self._cut_off_expired()
                except Exception:  # this thread must outlive anything one request does
                    logger.exception("the deadline watchdog failed on one request; it goes on")

    def _cut_off_expired(self) -> None:
        while self._heap and not self._heap[0][3]:
            heapq.heappop(self._heap)
        if not self._heap:
            self._cond.wait()
            return
        wait = self._heap[0][0] - time.monotonic()
        if wait > 0:
            self._cond.wait(wait)
            return
        entry = heapq.heappop(self._heap)
        conn, entry[2] = entry[2], None
        sock = conn.sock  # read once: the sender may close the connection at this very moment
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_deadlines = _Deadlines()


class Sender:
    """Sends attempts over keep-alive connections: one pool per worker thread, keyed by origin.

    A connection is reused only while healthy: it is closed after any error, when the
    partner says ``Connection: close``, when a response is too large to drain, and
    when it has been idle longer than ``idle_connection_s`` (servers drop idle ones).
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.clock = clock
        self._local = threading.local()

    def _connections(self) -> dict[tuple, tuple[http.client.HTTPConnection, float]]:
        if not hasattr(self._local, "connections"):
            self._local.connections = {}
        return self._local.connections

    def _checkout(self, scheme: str, host: str, port: int, deadline: float) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to the origin: the thread's idle one if fresh, else a new one (checked,
        pinned), whose lookup and connect must both finish before ``deadline``."""
        key = (scheme, host, port)
        kept = self._connections().pop(key, None)
        if kept is not None:
            conn, last_used = kept
            if time.monotonic() - last_used < self.settings.idle_connection_s:
                return conn, True
            conn.close()
        ip = resolve_target(host, port, self.settings.allow_private_targets, deadline - time.monotonic())
        connection_class = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
        return connection_class(host, port, ip, max(deadline - time.monotonic(), 0.001)), False

    def _keep(self, scheme: str, host: str, port: int, conn: http.client.HTTPConnection) -> None:
        self._connections()[(scheme, host, port)] = (conn, time.monotonic())

    def close_all(self) -> None:
        """Close this thread's connections."""
        for conn, _ in self._connections().values():
            conn.close()
        self._connections().clear()

    def send(self, job: Job) -> Sent:
        """Make one HTTP attempt of ``job`` and describe what happened. Never raises for I/O."""
        started = self.clock()
        status: int | None = None
        error: str | None = None
        snippet: str | None = None
        retry_after: float | None = None
        try:
            url = urlsplit(job.url)
            if url.scheme not in ("http", "https") or not url.hostname:
                raise ValueError("not an http(s) URL")
            port = url.port or (443 if url.scheme == "https" else 80)
            if self.settings.allowed_ports and port not in self.settings.allowed_ports:
                raise TargetRefused(f"port {port} is not in the allowed ports")
            request = _request_bytes(url, port, build_headers(job, int(started), self.settings.user_agent),
                                     job.body)
            deadline = time.monotonic() + self.settings.timeout_s  # lookup, connect and answer together
            conn, reused = self._checkout(url.scheme, url.hostname, port, deadline)
            watch = _deadlines.watch(deadline, conn)
            try:
                try:
                    response = _exchange(conn, request)
                except _STALE_CONNECTION:
                    if not reused or watch[2] is None:
                        raise
                    # The partner closed our idle connection as we reused it: nothing was
                    # processed, so one fresh connection is safe (as urllib3 does).
                    conn.close()
                    _deadlines.release(watch)
                    conn, reused = self._checkout(url.scheme, url.hostname, port, deadline)
                    watch = _deadlines.watch(deadline, conn)
                    response = _exchange(conn, request)
                status = response.status
                snippet = response.read(SNIPPET_BYTES).decode("utf-8", "replace")
                response.read(DRAIN_BYTES)
                cut_off = _deadlines.release(watch)
                if response.isclosed() and not response.will_close and not cut_off:
                    self._keep(url.scheme, url.hostname, port, conn)
                else:
                    conn.close()
            except BaseException as exc:
                conn.close()
                if _deadlines.release(watch):
                    raise TimeoutError("the attempt ran past its deadline") from exc
                raise
            if 300 <= status < 400:
                error = "redirect"  # never followed: the partner must fix its URL
            elif not 200 <= status < 300:
                error = "http_error"
                if status in (429, 503):
                    retry_after = parse_retry_after(response.getheader("Retry-After"), self.clock(),
                                                    self.settings.retry_after_max_s)
        except Exception as exc:  # one bad endpoint must never take the worker down
            error = classify_error(exc)
        duration_ms = int((self.clock() - started) * 1000)
        attempt = Attempt(attempt=job.attempt, started_at=started, duration_ms=duration_ms,
                          status_code=status, error=error, response_snippet=snippet)
        return Sent(attempt, retry_after)


def decide(job: Job, sent: Sent, settings: Settings, rng: random.Random, now: float) -> tuple[str, float]:
    """The delivery's next state and due time after one attempt."""
    if sent.attempt.error is None:
        return "delivered", now
    if job.attempt >= job.max_attempts:
        return "failed", now
    delay = backoff_delay(job.attempt, settings.backoff_base_s, settings.backoff_max_s, rng)
    return "pending", now + max(delay, sent.retry_after_s or 0.0)


# --- Keeping bad partners in their lane ----------------------------------------------------


@dataclass
class Health:
    """What the loop knows of one partner's endpoint."""

    failures: int = 0                  # failed attempts in a row
    failing_since: float | None = None  # start of the current failing streak (kept in the store)
    open_until: float = 0.0            # claim nothing for this partner before this time


class Breakers:
    """Per-partner circuit breakers, ``Retry-After`` pauses and the auto-disable rule.

    Closed (fewer than ``breaker_threshold`` failures in a row): up to the per-partner
    cap in flight. Open: nothing until ``open_until``. Half-open (open, and the
    cool-down is over): one probe at a time; a success closes the circuit, a failure
    opens it again for twice as long (up to ``breaker_cooldown_max_s``).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._health: dict[str, Health] = {}
        self._last_success: dict[str, float] = {}
        self._lock = threading.Lock()

    def room(self, partner_id: str, busy: int, now: float) -> int:
        """How many more of this partner's deliveries may be claimed now."""
        with self._lock:
            health = self._health.get(partner_id)
        cap = self.settings.per_partner_concurrency - busy
        if health is None:
            return cap
        if now < health.open_until:
            return 0
        if health.failures >= self.settings.breaker_threshold:
            return 1 if busy == 0 else 0  # half-open: one probe
        return cap

    def open_count(self, now: float) -> int:
        """Partners whose circuit is open or half-open now."""
        with self._lock:
            return sum(1 for h in self._health.values()
                       if h.failures >= self.settings.breaker_threshold or h.open_until > now)

    def constrained(self) -> list[str]:
        with self._lock:
            return list(self._health)

    def reopens_at(self, now: float) -> float | None:
        """The earliest future time a paused partner may be claimed again. (A pause that has
        ended is no reason to wake: the partner's due rows are.)"""
        with self._lock:
            times = [h.open_until for h in self._health.values() if h.open_until > now]
        return min(times) if times else None

    def forget(self, partner_id: str) -> None:
        """Start afresh (the partner was re-activated by hand)."""
        with self._lock:
            self._health.pop(partner_id, None)

    def record(self, job: Job, sent: Sent, now: float) -> tuple[float | None, bool, str | None]:
        """Count one attempt. Returns (failing_since, whether it changed, reason to disable or None)."""
        ok = sent.attempt.error is None
        with self._lock:
            health = self._health.get(job.partner_id)
            if ok:
                self._health.pop(job.partner_id, None)
                self._last_success[job.partner_id] = now
                return None, job.partner_failing_since is not None or health is not None, None
            changed = False
            if health is None:
                # A streak read with the job may predate a success recorded since its claim.
                since = job.partner_failing_since
                if since is not None and since < self._last_success.get(job.partner_id, 0.0):
                    since = None
                health = self._health[job.partner_id] = Health(failing_since=since)
                changed = since != job.partner_failing_since
            if health.failing_since is None:
                health.failing_since, changed = now, True
            health.failures += 1
            over = health.failures - self.settings.breaker_threshold
            if over >= 0:
                cooldown = min(self.settings.breaker_cooldown_max_s, self.settings.breaker_cooldown_s * 2 ** min(over, 30))
                health.open_until = max(health.open_until, now + cooldown)
            if sent.retry_after_s:
                health.open_until = max(health.open_until, now + sent.retry_after_s)
            reason = None
            if sent.attempt.status_code == 410:
                reason = "the endpoint answered 410 Gone"
            elif now - health.failing_since >= self.settings.disable_after_s:
                reason = f"every attempt failed for {int(now - health.failing_since)} s"
            if reason:
                self._health.pop(job.partner_id, None)
            return health.failing_since, changed, reason


# --- The loop -------------------------------------------------------------------------


class DeliveryLoop:
    """Claims due deliveries, hands them to sender threads and records every attempt.

    The loop (a task in the server's event loop) claims rows and puts them on a queue;
    ``concurrency`` sender threads take them one at a time. Completions are counted under
    a lock, and a sender wakes the loop only when the claimed work runs low, so under load
    the loop claims in batches instead of once per delivery.
    """

    def __init__(self, store: Store, settings: Settings, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None):
        self.store = store
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.rng = rng or random.Random()
        self.clock = clock
        self.sender = Sender(settings, clock)
        self.breakers = Breakers(settings)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._senders = [threading.Thread(target=self._send_jobs, name=f"webhookd-send-{n}", daemon=True)
                         for n in range(settings.concurrency)]
        self._results: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._recorder = threading.Thread(target=self._record_results, name="webhookd-recorder", daemon=True)
        self._lock = threading.Lock()       # guards the two counts below
        self._claimed = 0                   # claimed and not finished (queued or being sent)
        self._busy: collections.Counter[str] = collections.Counter()  # the same, per partner
        self._all_done = threading.Event()  # set whenever nothing is claimed
        self._all_done.set()
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run_task: asyncio.Task | None = None
        self._purge_task: asyncio.Task | None = None
        self._stopping = False

    # Starting, waking and stopping ---------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        requeued = await asyncio.to_thread(self.store.requeue_expired_leases, self.clock())
        if requeued:
            logger.warning("re-queued %d deliveries whose lease ran out (an earlier run stopped mid-send)", requeued)
        self._recorder.start()
        for thread in self._senders:
            thread.start()
        self._run_task = asyncio.create_task(self.run(), name="webhookd-delivery-loop")
        self._purge_task = asyncio.create_task(self._purge_old(), name="webhookd-retention")

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

    def partner_reactivated(self, partner_id: str) -> None:
        """A partner was made active again by hand: forget its failures and look for work."""
        self.breakers.forget(partner_id)
        self.wake()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop claiming, wait (bounded) for the claimed attempts, and record their results.

        An attempt still running after the grace period keeps its lease; the next
        run takes it again once the lease runs out. Nothing is lost either way.
        """
        self._stopping = True
        self.wake()
        if self._purge_task is not None:
            self._purge_task.cancel()
        await asyncio.gather(*(t for t in (self._run_task, self._purge_task) if t), return_exceptions=True)
        grace = self.settings.timeout_s + 1 if grace_s is None else grace_s
        await asyncio.to_thread(self._all_done.wait, grace)
        unfinished = self.in_flight
        for _ in self._senders:
            self._jobs.put(None)  # each sender stops after the jobs already queued
        self._results.put(None)   # the recorder writes what is queued, then stops
        await asyncio.to_thread(self._recorder.join, 10)
        logger.info("delivery loop stopped; %d attempts left unfinished (their leases will run out "
                    "and they will be sent again)", unfinished)

    @property
    def in_flight(self) -> int:
        return self._claimed

    # The loop itself ---------------------------------------------------------------------

    async def run(self) -> None:
        assert self._wakeup is not None
        while not self._stopping:
            self._wakeup.clear()
            try:
                started = await self._claim_and_start()
                if started:
                    continue  # there may be more due right now
                pause = await self._seconds_until_next_due()
            except Exception:
                logger.exception("claiming deliveries failed; trying again shortly")
                pause = 1.0
            await self._sleep(pause)

    def _room(self, now: float) -> dict[str, int]:
        """Room of every partner that is not simply idle and healthy (those get the full cap)."""
        with self._lock:
            busy = dict(self._busy)
        partners = set(busy) | set(self.breakers.constrained())
        return {p: self.breakers.room(p, busy.get(p, 0), now) for p in partners}

    async def _claim_and_start(self) -> int:
        free = self.settings.claim_ahead - self._claimed
        if free <= 0:
            return 0
        now = self.clock()
        jobs = await asyncio.to_thread(
            self.store.claim_due, now=now, lease_s=self.settings.lease_s, limit=free,
            per_partner=self.settings.per_partner_concurrency, room=self._room(now))
        with self._lock:
            self._claimed += len(jobs)
            for job in jobs:
                self._busy[job.partner_id] += 1
            if jobs:
                self._all_done.clear()
        for job in jobs:
            self._jobs.put(job)
        return len(jobs)

    def _finished(self, job: Job) -> None:
        """A sender is done with ``job``: count it, and wake the loop when work runs low."""
        with self._lock:
            self._claimed -= 1
            self._busy[job.partner_id] -= 1
            if not self._busy[job.partner_id]:
                del self._busy[job.partner_id]
            if not self._claimed:
                self._all_done.set()
            running_low = self._claimed <= self.settings.concurrency
        if running_low:
            self.wake()

    async def _seconds_until_next_due(self) -> float:
        """Sleep until the next due row of a partner with room, or until a paused partner reopens.
        With the claimed work at its limit, sleep until a sender finishes (it wakes the loop)."""
        if self._claimed >= self.settings.claim_ahead:
            return IDLE_RECHECK_S
        now = self.clock()
        full = [p for p, room in self._room(now).items() if room <= 0]
        candidates = [await asyncio.to_thread(self.store.next_due_at, skip=full), self.breakers.reopens_at(now)]
        times = [t for t in candidates if t is not None]
        if not times:
            return IDLE_RECHECK_S
        return min(IDLE_RECHECK_S, max(0.0, min(times) - now))

    async def _sleep(self, seconds: float) -> None:
        """Sleep until ``seconds`` pass or someone calls ``wake()``."""
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)
        except TimeoutError:
            pass

    def _send_jobs(self) -> None:
        """A sender thread: one claimed job after another, until the stop sentinel."""
        while (job := self._jobs.get()) is not None:
            try:
                self._attempt(job)
            except Exception:  # never die on one delivery: its lease brings it back
                logger.exception("delivery %s: the attempt crashed; it will be retried", job.delivery_id)
            finally:
                self._finished(job)

    # One attempt, in a worker thread -------------------------------------------------------

    def _attempt(self, job: Job) -> None:
        sent = self.sender.send(job)
        now = self.clock()
        state, next_at = decide(job, sent, self.settings, self.rng, now)
        failing_since, failing_changed, disable_reason = self.breakers.record(job, sent, now)
        self._results.put(Outcome(
            delivery_id=job.delivery_id, partner_id=job.partner_id, attempt=sent.attempt, state=state,
            next_attempt_at=next_at, partner_failing_since=failing_since,
            partner_failing_changed=failing_changed, disable_reason=disable_reason,
            event_id=job.event_id, created_at=job.created_at))

    def _report(self, o: Outcome, now: float) -> None:
        """One log line and the metrics of one attempt (in the recorder: one thread, no lock fights)."""
        a = o.attempt
        logger.info("delivery %s event=%s partner=%s attempt=%d status=%s error=%s duration_ms=%d -> %s",
                    o.delivery_id, o.event_id, o.partner_id, a.attempt, a.status_code, a.error, a.duration_ms,
                    o.state, extra={"delivery_id": o.delivery_id, "event_id": o.event_id, "partner_id": o.partner_id,
                                    "attempt": a.attempt, "status_code": a.status_code, "error": a.error,
                                    "duration_ms": a.duration_ms, "state": o.state})
        if o.disable_reason:
            logger.warning("partner %s disabled: %s; its deliveries wait until it is made active again",
                           o.partner_id, o.disable_reason)
        m = self.metrics
        m.attempts.inc(result=a.error or "success")
        m.attempt_seconds.observe(a.duration_ms / 1000)
        if o.state != "pending":
            m.deliveries.inc(partner=o.partner_id, outcome=o.state)
        if o.state == "delivered":
            m.delivered_seconds.observe(max(0.0, now - o.created_at))

    # The recorder: many results, one commit -------------------------------------------------

    def _record_results(self) -> None:
        """Write queued attempt results in batches (group commit) until the stop sentinel."""
        stopping = False
        while not stopping:
            batch, stopping = take_batch(self._results, RECORD_BATCH)
            if not batch:
                continue
            now = self.clock()
            for outcome in batch:
                self._report(outcome, now)
            try:
                lost = self.store.finish_attempts(batch, now=now)
            except Exception:
                logger.exception("recording %d attempts failed; their leases will run out and they "
                                 "will be sent again", len(batch))
                continue
            for delivery_id in lost:
                logger.warning("delivery %s: result not recorded, its lease had been taken over", delivery_id)
            if any(o.state == "pending" for o in batch):
                self.wake()  # a retry may now be due earlier than the loop thought

    # Retention ----------------------------------------------------------------------------

    async def _purge_old(self) -> None:
        """Every ``purge_interval_s``, delete delivered events older than ``retention_s``, in small batches."""
        while not self._stopping:
            try:
                cutoff = self.clock() - self.settings.retention_s
                total = 0
                while True:
                    purged = await asyncio.to_thread(self.store.purge_delivered, before=cutoff,
                                                     batch=self.settings.purge_batch)
                    total += purged
                    if purged < self.settings.purge_batch:
                        break
                    await asyncio.sleep(0.05)  # let other writers in between batches
                if total:
                    logger.info("retention: purged %d delivered events older than %d s", total,
                                int(self.settings.retention_s))
            except Exception:
                logger.exception("retention purge failed; will try again")
            await asyncio.sleep(self.settings.purge_interval_s)

"""One HTTP attempt of one delivery, in plain standard library.

A sender thread of the delivery loop calls ``Sender.send(job)``; it always returns a
``Sent`` (never raises for I/O), which says what happened in words the store keeps:
the status code, or an error class like ``timeout`` or ``connection_refused``.

One attempt, step by step:

1. ``targets.parse_target`` checks the URL and the allowed ports again;
2. ``build_headers`` signs the stored bytes (``X-Webhook-Signature`` and the Standard
   Webhooks headers), and ``_request_bytes`` writes the whole request in one buffer;
3. the thread's kept-alive connection to that origin is reused if it is fresh and the
   partner has not closed it, else a new one is opened to the address
   ``targets.resolve_target`` checked (pinned: TLS still checks the URL's host name);
   a request is written again on a new connection only if the kept one broke before the
   whole request went out — once written, the partner may have acted on it;
4. the watchdog ``_Deadlines`` cuts the request off ``timeout_s`` after it began,
   however slowly the partner drips its answer;
5. the first 1 KiB of the answer is kept, redirects are never followed, and a 429/503
   ``Retry-After`` is read for the loop's next wait.
"""

from __future__ import annotations

import email.utils
import heapq
import http.client
import logging
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import signing
from models import Attempt, Job
from targets import Target, TargetRefused, parse_target, resolve_target

if TYPE_CHECKING:
    from delivery import Settings

logger = logging.getLogger("webhookd.delivery")

SNIPPET_BYTES = 1024
DRAIN_BYTES = 64 * 1024  # read at most this much of a response to reuse its connection


@dataclass(frozen=True)
class Sent:
    """What one attempt produced: the attempt row, and the partner's Retry-After if any."""

    attempt: Attempt
    retry_after_s: float | None = None


@dataclass
class _Answer:
    """The part of a partner's HTTP response that webhookd keeps, filled in as it arrives:
    a status that came before the deadline cut the body off is still recorded."""

    status: int | None = None
    snippet: str | None = None
    retry_after: str | None = None


# --- The request --------------------------------------------------------------------------


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


def _request_bytes(target: Target, headers: dict[str, str], body: bytes) -> bytes:
    """The whole HTTP/1.1 request, head and body, to be written in one ``sendall``.

    ``http.client``'s ``request()`` builds the same head one ``putheader`` at a time and
    writes head and body separately; on the hot path that bookkeeping costs more than
    the write itself. ``_read_answer`` reads the answer.
    """
    if any(ord(c) < 33 or ord(c) == 127 for c in target.path):
        raise ValueError("the URL's path holds spaces or control characters")
    path = quote(target.path, safe="/%?=&:@!$'()*+,;~-._")  # non-ASCII as UTF-8 %XX, the rest as it was
    host = f"[{target.host}]" if ":" in target.host else target.host
    default_port = 443 if target.scheme == "https" else 80
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}" + ("" if target.port == default_port else f":{target.port}"),
             f"Content-Length: {len(body)}", *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


# --- What an answer means ---------------------------------------------------------------------


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


# --- Connections pinned to the checked address --------------------------------------------------


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


def _write(conn: http.client.HTTPConnection, request: bytes) -> None:
    """Connect if need be, and write ``request`` whole."""
    if conn.sock is None:
        conn.connect()
    conn.sock.sendall(request)


class BadResponse(http.client.HTTPException):
    """The partner's answer is not HTTP/1.x (an attempt error ``protocol_error``)."""


MAX_LINE = 65536        # bytes in a status or header line
MAX_HEADERS = 100


def _read_answer(sock: socket.socket, answer: _Answer) -> bool:
    """Read one HTTP/1.x response into ``answer``: its status, its ``Retry-After``, the first
    ``SNIPPET_BYTES`` of its body. Returns whether the connection may carry the next request.

    A small reader of our own: ``http.client`` parses headers with the ``email`` package,
    which cost a third of each attempt's time. The body is read only as far as the framing
    needs, at most ``DRAIN_BYTES``; a larger one costs its connection instead. Once the
    status has arrived it is the partner's answer: a body cut short only costs the connection.
    """
    with sock.makefile("rb") as rfile:
        status, version, headers = _read_head(rfile)
        while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints): the real one follows
            status, version, headers = _read_head(rfile)
        answer.status, answer.retry_after = status, headers.get("retry-after")
        connection = {token.strip() for token in headers.get("connection", "").lower().split(",")}
        keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        transfer_encoding = headers.get("transfer-encoding", "").lower()
        if status in (204, 304):
            body, whole = b"", True
        elif transfer_encoding.endswith("chunked"):
            body, whole = _read_chunked(rfile)
        elif transfer_encoding or "content-length" not in headers:  # the body ends when the partner closes
            body, whole = rfile.read(SNIPPET_BYTES), False
        else:
            length = _content_length(headers["content-length"])
            body = rfile.read(min(length, DRAIN_BYTES))
            whole = len(body) == length
        answer.snippet = body[:SNIPPET_BYTES].decode("utf-8", "replace")
        return keep and whole


HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


def _content_length(value: str) -> int:
    """One length (repeated copies must agree: ``5, 5``), ASCII digits only."""
    lengths = {v.strip() for v in value.split(",")}
    if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,18}", next(iter(lengths))):
        raise BadResponse(f"Content-Length {value[:40]!r} is not one number")
    return int(next(iter(lengths)))


def _read_head(rfile: Any) -> tuple[int, str, dict[str, str]]:
    """The status line and the headers (names in lower case) of one response."""
    line = rfile.readline(MAX_LINE + 1)
    if not line:
        raise http.client.RemoteDisconnected("the partner closed the connection without an answer")
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not re.fullmatch(r"[1-5][0-9][0-9]", parts[1]):
        raise BadResponse(f"not an HTTP/1.x status line: {line[:40]!r}")
    return int(parts[1]), parts[0], _read_headers(rfile)


def _read_headers(rfile: Any) -> dict[str, str]:
    """Header lines up to the empty one; a repeated header's values are joined with commas."""
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise BadResponse("a header line is longer than 64 KiB")
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise BadResponse(f"not a header line: {line[:40]!r}")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    raise BadResponse(f"more than {MAX_HEADERS} header lines")


def _read_chunked(rfile: Any) -> tuple[bytes, bool]:
    """A chunked body: its first ``SNIPPET_BYTES``, and whether it was read whole (within
    ``DRAIN_BYTES``) so the connection can be kept."""
    kept, total = bytearray(), 0
    while True:
        size_line = rfile.readline(MAX_LINE + 1)
        if not size_line:  # the partner closed mid-body: its status stands, the connection goes
            return bytes(kept), False
        size_text = size_line.split(b";")[0].strip()
        if not HEX.fullmatch(size_text):
            raise BadResponse(f"not a chunk size: {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            _read_headers(rfile)  # the trailers
            return bytes(kept), True
        total += size
        if total > DRAIN_BYTES:
            return bytes(kept), False
        data = rfile.read(size)
        kept += data[:max(0, SNIPPET_BYTES - len(kept))]
        if len(data) < size:
            return bytes(kept), False
        rfile.readline(MAX_LINE + 1)  # the CRLF after the chunk


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """True if an idle kept-alive connection is readable: the partner closed it (or sent bytes
    nobody asked for). Either way it must not carry the next request."""
    if conn.sock is None:
        return True
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return bool(poller.poll(0))


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
_BROKEN_WRITE = (ConnectionResetError, BrokenPipeError)


# --- The sender -----------------------------------------------------------------------------------


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

    def send(self, job: Job) -> Sent:
        """Make one HTTP attempt of ``job`` and describe what happened. Never raises for I/O."""
        started = self.clock()
        answer = _Answer()
        retry_after: float | None = None
        try:
            target = parse_target(job.url, self.settings.allowed_ports)
            headers = build_headers(job, int(started), self.settings.user_agent)
            self._post(target, _request_bytes(target, headers, job.body), answer)
            error = status_error(answer.status)
            if answer.status in (429, 503):
                retry_after = parse_retry_after(answer.retry_after, self.clock(), self.settings.retry_after_max_s)
        except Exception as exc:  # one bad endpoint must never take the worker down
            error = classify_error(exc)
        attempt = Attempt(attempt=job.attempt, started_at=started, duration_ms=int((self.clock() - started) * 1000),
                          status_code=answer.status, error=error, response_snippet=answer.snippet, url=job.url)
        return Sent(attempt, retry_after)

    def _post(self, target: Target, request: bytes, answer: _Answer) -> None:
        """Write ``request`` to ``target`` and read the answer into ``answer``, all within
        ``timeout_s`` (lookup, connect and answer together)."""
        deadline = time.monotonic() + self.settings.timeout_s
        conn, reused = self._checkout(target, deadline)
        watch = _deadlines.watch(deadline, conn)
        try:
            try:
                _write(conn, request)
            except _BROKEN_WRITE:
                if not reused or watch[2] is None:
                    raise
                # The kept connection broke before the whole request went out, so the partner
                # cannot have read it: one fresh connection is safe. Once the request is written,
                # a connection that closes without an answer fails the attempt instead (the
                # partner may have acted on it); the next attempt comes after a backoff.
                conn.close()
                _deadlines.release(watch)
                conn, reused = self._checkout(target, deadline)
                watch = _deadlines.watch(deadline, conn)
                _write(conn, request)
            reusable = _read_answer(conn.sock, answer)
            cut_off = _deadlines.release(watch)
            if reusable and not cut_off:
                self._keep(target, conn)
            else:
                conn.close()
        except BaseException as exc:
            conn.close()
            if _deadlines.release(watch):
                raise TimeoutError("the attempt ran past its deadline") from exc
            raise

    def _connections(self) -> dict[tuple, tuple[http.client.HTTPConnection, float]]:
        if not hasattr(self._local, "connections"):
            self._local.connections = {}
        return self._local.connections

    def _checkout(self, target: Target, deadline: float) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to the origin: the thread's idle one if fresh, else a new one (checked,
        pinned), whose lookup and connect must both finish before ``deadline``."""
        kept = self._connections().pop((target.scheme, target.host, target.port), None)
        if kept is not None:
            conn, last_used = kept
            if time.monotonic() - last_used < self.settings.idle_connection_s and not _dropped(conn):
                return conn, True
            conn.close()
        ip = resolve_target(target.host, target.port, self.settings.allow_private_targets,
                            deadline - time.monotonic())
        connection_class = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
        return connection_class(target.host, target.port, ip, max(deadline - time.monotonic(), 0.001)), False

    def _keep(self, target: Target, conn: http.client.HTTPConnection) -> None:
        self._connections()[(target.scheme, target.host, target.port)] = (conn, time.monotonic())

    def close_all(self) -> None:
        """Close this thread's connections."""
        for conn, _ in self._connections().values():
            conn.close()
        self._connections().clear()

"""Reading a partner's HTTP/1.x answer: the status, a ``Retry-After``, the first 1 KiB of the body,
and whether the connection can carry the next request.

Two readers, one verdict. ``read_answer_python`` is webhookd's own, in plain standard library
(``asyncio`` streams, a line at a time). ``read_answer_llhttp`` hands the bytes to llhttp, the
parser Node.js uses, through ``httptools`` (installed with ``uvicorn[standard]``): about 2 µs per
answer against 12 µs, as it parses in C what the other reads line by line. It is used when
``httptools`` can be imported and ``delivery.native_speedups`` is on (``answer_reader()`` chooses).
llhttp is stricter than HTTP asks: it refuses a ``Content-Length`` repeated with the same value,
which RFC 9112 lets a recipient accept. So whenever llhttp refuses an answer, the bytes it
read are given back to the stream and the Python reader reads the answer again and decides:
either reader gives the same answer, or the same protocol error, for every answer.

What a hostile endpoint can make either hold is bounded alike: at most ``MAX_INTERIM`` interim
(1xx) answers and ``MAX_HEAD_BYTES`` of status line and headers per head; past either the
attempt fails (``protocol_error``), so that partner's circuit opens like any failing one's.
A body is read only as far as the framing needs, at most ``DRAIN_BYTES``; a larger one costs its
connection instead. Once the status has arrived it is the partner's answer: a body cut short
only costs the connection.
"""

from __future__ import annotations

import asyncio
import http.client
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

try:  # uvicorn[standard] installs it; without it, the Python reader reads every answer
    import httptools
except ImportError:  # pragma: no cover - depends on the installation
    httptools = None

SNIPPET_BYTES = 1024
DRAIN_BYTES = 64 * 1024  # read at most this much of a response to reuse its connection
READ_BYTES = 64 * 1024   # what llhttp's reader asks the stream for at a time


@dataclass
class Answer:
    """The part of a partner's HTTP response that webhookd keeps, filled in as it arrives:
    a status that came before the deadline cut the body off is still recorded."""

    status: int | None = None
    snippet: str | None = None
    retry_after: str | None = None


Reader = Callable[[asyncio.StreamReader, Answer], Awaitable[bool]]


def answer_reader(native: bool) -> Reader:
    """The reader to use: llhttp's when asked for (``native``) and installed, else the Python one."""
    return read_answer_llhttp if native and httptools is not None else read_answer_python


class BadResponse(http.client.HTTPException):
    """The partner's answer is not HTTP/1.x, or more than we read (an attempt error ``protocol_error``)."""


MAX_LINE = 65536        # bytes in one line the stream buffers (a status, header or chunk-size line)
MAX_HEAD_BYTES = 16384  # status line and headers of one response head, together (as Node's default)
MAX_HEADERS = 100       # header lines in one head
MAX_INTERIM = 5         # interim answers (100 Continue, 103 Early Hints) before the real one
HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
# What llhttp's reader reads of one answer, at most: every head it may hold, and a drained body.
READ_AT_MOST = (MAX_INTERIM + 1) * MAX_HEAD_BYTES + DRAIN_BYTES


async def read_answer_python(reader: asyncio.StreamReader, answer: Answer) -> bool:
    """Read one HTTP/1.x response into ``answer``: its status, its ``Retry-After``, the first
    ``SNIPPET_BYTES`` of its body. Returns whether the connection may carry the next request.

    A small reader of our own (the standard library has no asyncio HTTP client, and
    ``http.client`` parses headers with the ``email`` package, a third of an attempt's
    time): the fallback when ``httptools`` is not installed, and the judge of every answer llhttp
    refuses (``read_answer_llhttp``). The body is read only as far as the framing needs, at most ``DRAIN_BYTES``; a
    larger one costs its connection instead. Once the status has arrived it is the
    partner's answer: a body cut short only costs the connection.
    """
    status, version, headers = await _read_head(reader)
    interim = 0
    while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints): the real one follows
        interim += 1
        if interim > MAX_INTERIM:  # a partner holding the attempt (and our CPU) until the deadline
            raise BadResponse(f"too many interim responses: more than {MAX_INTERIM} 1xx answers before the final one")
        status, version, headers = await _read_head(reader)
    answer.status, answer.retry_after = status, _header(headers, "retry-after") or None
    connection = {token.strip() for token in _header(headers, "connection").lower().split(",")}
    keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    transfer_encoding = _header(headers, "transfer-encoding").lower()
    if status in (204, 304):
        body, whole = b"", True
    elif transfer_encoding.endswith("chunked"):
        body, whole = await _read_chunked(reader)
    elif transfer_encoding or "content-length" not in headers:  # the body ends when the partner closes
        body, whole = await _read_up_to(reader, SNIPPET_BYTES), False
    else:
        length = _content_length(_header(headers, "content-length"))
        body = await _read_up_to(reader, min(length, DRAIN_BYTES))
        whole = len(body) == length
    answer.snippet = body[:SNIPPET_BYTES].decode("utf-8", "replace")
    return keep and whole


async def _readline(reader: asyncio.StreamReader) -> bytes:
    """One line, with its ending; what came before a close if the partner closed mid-line."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except asyncio.LimitOverrunError:
        raise BadResponse("a line of the answer is longer than 64 KiB") from None


async def _read_up_to(reader: asyncio.StreamReader, size: int) -> bytes:
    """``size`` bytes, or fewer if the partner closes first."""
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        return exc.partial


def _content_length(value: str) -> int:
    """One length (repeated copies must agree: ``5, 5``), ASCII digits only."""
    lengths = {v.strip() for v in value.split(",")}
    if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,18}", next(iter(lengths))):
        raise BadResponse(f"Content-Length {value[:40]!r} is not one number")
    return int(next(iter(lengths)))


Headers = dict[str, list[str]]  # names in lower case; a repeated header's values in order


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, Headers]:
    """The status line and the headers of one response, at most ``MAX_HEAD_BYTES`` together."""
    line = await _readline(reader)
    if not line:
        raise http.client.RemoteDisconnected("the partner closed the connection without an answer")
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.1", "HTTP/1.0") or not re.fullmatch(r"[1-5][0-9][0-9]", parts[1]):
        raise BadResponse(f"not an HTTP/1.x status line: {line[:40]!r}")
    return int(parts[1]), parts[0], await _read_headers(reader, MAX_HEAD_BYTES - len(line))


async def _read_headers(reader: asyncio.StreamReader, budget: int = MAX_HEAD_BYTES) -> Headers:
    """Header lines up to the empty one, ``budget`` bytes of them at most. A repeated header's
    values are collected in a list, joined only when read (``_header``): joining as they come
    would copy a growing string on every repeat."""
    headers: Headers = {}
    for _ in range(MAX_HEADERS + 1):
        line = await _readline(reader)
        budget -= len(line)
        if budget < 0:
            raise BadResponse(f"response head too large: more than {MAX_HEAD_BYTES // 1024} KiB of status line "
                              "and headers")
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, colon, value = line.decode("latin-1").partition(":")
        if not colon:
            raise BadResponse(f"not a header line: {line[:40]!r}")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    raise BadResponse(f"more than {MAX_HEADERS} header lines")


def _header(headers: Headers, name: str) -> str:
    """One header's value, its repeats joined with commas (as HTTP reads them); "" if absent."""
    return ", ".join(headers.get(name, ()))


async def _read_chunked(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """A chunked body: its first ``SNIPPET_BYTES``, and whether it was read whole (within
    ``DRAIN_BYTES``) so the connection can be kept."""
    kept, total = bytearray(), 0
    while True:
        size_line = await _readline(reader)
        if not size_line:  # the partner closed mid-body: its status stands, the connection goes
            return bytes(kept), False
        size_text = size_line.split(b";")[0].strip()
        if not HEX.fullmatch(size_text):
            raise BadResponse(f"not a chunk size: {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:
            await _read_headers(reader)  # the trailers
            return bytes(kept), True
        total += size
        if total > DRAIN_BYTES:
            return bytes(kept), False
        data = await _read_up_to(reader, size)
        kept += data[:max(0, SNIPPET_BYTES - len(kept))]
        if len(data) < size:
            return bytes(kept), False
        await _readline(reader)  # the CRLF after the chunk


# --- llhttp (httptools) -------------------------------------------------------------------------


class _Enough(Exception):
    """Raised from a callback to stop parsing: the body went past ``DRAIN_BYTES``."""


class _Parse:
    """llhttp's callbacks for one answer: interim answers counted, each head's size bounded, the
    final answer's status, ``Retry-After`` and first bytes kept."""

    def __init__(self, answer: Answer):
        self.answer = answer
        self.parser = httptools.HttpResponseParser(self)
        self.keep = False
        self.head_bytes = self.headers = self.interim = self.body_bytes = 0
        self.retry_after: list[str] = []
        self.snippet = bytearray()
        self.final = False     # the final (non-1xx) answer's head has been read
        self.complete = False  # ...and its body, whole
        self.extra = False     # bytes came after it (nobody asked for them)

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True
        self.head_bytes, self.headers = 0, 0
        self.retry_after = []

    def on_status(self, reason: bytes) -> None:
        self._count(len(reason) + 15)  # "HTTP/1.1 200 " and CRLF around the reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        self.headers += 1
        if self.headers > MAX_HEADERS:
            raise BadResponse(f"more than {MAX_HEADERS} header lines")
        if name.lower() == b"retry-after":
            self.retry_after.append(value.decode("latin-1").strip())

    def _count(self, size: int) -> None:
        self.head_bytes += size
        if self.head_bytes > MAX_HEAD_BYTES:
            raise BadResponse(f"response head too large: more than {MAX_HEAD_BYTES // 1024} KiB of status line "
                              "and headers")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.interim += 1
            if self.interim > MAX_INTERIM:
                raise BadResponse(f"too many interim responses: more than {MAX_INTERIM} 1xx answers before the "
                                  "final one")
            return
        self.final = True
        self.answer.status, self.answer.retry_after = status, ", ".join(self.retry_after) or None

    def on_body(self, data: bytes) -> None:
        if len(self.snippet) < SNIPPET_BYTES:
            self.snippet += data[:SNIPPET_BYTES - len(self.snippet)]
        self.body_bytes += len(data)
        if self.body_bytes > DRAIN_BYTES:
            raise _Enough

    def on_message_complete(self) -> None:
        if self.final:
            self.complete = True
            self.keep = self.parser.should_keep_alive()


async def read_answer_llhttp(reader: asyncio.StreamReader, answer: Answer) -> bool:
    """``read_answer_python``'s job done by llhttp; an answer llhttp refuses is read again by
    ``read_answer_python`` (see the module's docstring). Returns whether the connection may
    carry the next request."""
    first = await reader.read(READ_BYTES)
    if not first:
        raise http.client.RemoteDisconnected("the partner closed the connection without an answer")
    # The parser only once the answer has begun: an attempt waiting for a slow partner holds no
    # parser and no callbacks. Thousands may wait at once, and a full collection walks every object
    # they hold (garbage.py).
    parse = _Parse(answer)
    try:
        return await _feed_llhttp(parse, reader, answer, first)
    finally:
        # The parser holds ``parse``'s bound methods and ``parse`` holds the parser: a reference
        # cycle per answer, which only the garbage collector frees. Thousands of answers a second
        # made its full collections run every half second, each holding the GIL for ~50 ms
        # (docs/performance.md). Cut, every object of the answer is freed as soon as it returns.
        parse.parser = None


async def _feed_llhttp(parse: _Parse, reader: asyncio.StreamReader, answer: Answer, data: bytes) -> bool:
    """The bytes of one answer, from its first ``data``, fed to llhttp as they arrive
    (``read_answer_llhttp``)."""
    read = bytearray()  # given back to the stream if llhttp refuses the answer
    while True:
        read += data
        try:
            parse.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Enough):
                break
            raise exc.__context__ from None  # a BadResponse of a callback
        except httptools.HttpParserError:
            if parse.complete:  # bytes nobody asked for after the answer: it stands, the connection goes
                parse.extra = True
                break
            return await _read_again(reader, read, answer)
        if parse.complete:
            break
        if len(read) > READ_AT_MOST:  # a head that never ends (a header llhttp buffers whole), endless chunk lines
            if parse.final:
                break
            raise BadResponse(f"response head too large: more than {MAX_HEAD_BYTES // 1024} KiB of status line "
                              "and headers")
        data = await reader.read(READ_BYTES)
        if not data:  # the partner closed: a body that ends at the close, or an answer cut short
            if parse.final:
                break
            return await _read_again(reader, read, answer)
    answer.snippet = parse.snippet.decode("utf-8", "replace")
    return parse.complete and parse.keep and not parse.extra and not reader._buffer  # noqa: SLF001


async def _read_again(reader: asyncio.StreamReader, read: bytearray, answer: Answer) -> bool:
    """Give the bytes llhttp read back to the stream, ahead of what it has not read yet, and let
    the Python reader decide. (asyncio's stream does not expose its buffer: hence the private name.)"""
    reader._buffer[0:0] = read  # noqa: SLF001
    answer.status = answer.retry_after = None
    return await read_answer_python(reader, answer)

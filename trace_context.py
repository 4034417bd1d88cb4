"""W3C Trace Context across the hop: a ``traceparent`` (and ``tracestate``) that comes in with a
publish or a partner's event is kept with it, and each delivery attempt carries it on.

The header, as the contract (W3C Trace Context, level 1) writes it::

    traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
                 ^^ ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^ ^^^^^^^^^^^^^^^^ ^^
                 version  trace id (32 hex)          parent id (16)  flags

Lowercase hex only; a trace id or a parent id of all zeros is invalid, and so is version ``ff``.
A later version may add fields after the flags (``-`` then more): its first four are read and
the rest dropped, as the contract asks. webhookd is not a tracer: it starts no trace of its own.
An invalid ``traceparent`` is ignored (with its ``tracestate``): the event is stored and sent
without trace context, never refused for it.

Each attempt is a new span of the sender's trace: the same trace id and flags, a parent id of
its own (``new_span``), so a partner's tracer links every retry to the publish that caused it.
``tracestate`` is passed on as received, cut to the contract's bounds: at most 32 list members
and 512 characters (the members at the right go first); a malformed one is dropped whole.

Plain headers: no tracing SDK is needed (an optional OpenTelemetry extra may come later).
"""

from __future__ import annotations

import random
import re
import secrets

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MEMBER = re.compile(r"(?:[a-z0-9][_0-9a-z*/-]{0,255}|[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13})"
                     r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
MAX_MEMBERS = 32
MAX_TRACESTATE = 512
# Span ids are not secrets and are made per attempt: a generator seeded once from the OS.
_SPANS = random.Random(secrets.randbits(256))


def parse_traceparent(value: str | None) -> str | None:
    """The ``traceparent`` to keep (version 00 form), or None when absent or invalid."""
    if not value:
        return None
    found = _TRACEPARENT.fullmatch(value.strip())
    if found is None:
        return None
    version, trace_id, parent_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return None
    return f"00-{trace_id}-{parent_id}-{flags}"


def parse_tracestate(value: str | None) -> str | None:
    """The ``tracestate`` to pass on, within the contract's bounds; None when absent or malformed."""
    if not value:
        return None
    members = [m.strip() for m in value.split(",") if m.strip()]
    if not members or not all(_MEMBER.fullmatch(m) for m in members):
        return None
    members = members[:MAX_MEMBERS]
    while len(",".join(members)) > MAX_TRACESTATE:
        members.pop()
    return ",".join(members) or None


def from_headers(headers: object) -> tuple[str | None, str | None]:
    """``(traceparent, tracestate)`` of a request's headers; a ``tracestate`` without a valid
    ``traceparent`` is dropped with it."""
    traceparent = parse_traceparent(headers.get("traceparent"))  # type: ignore[attr-defined]
    if traceparent is None:
        return None, None
    return traceparent, parse_tracestate(headers.get("tracestate"))  # type: ignore[attr-defined]


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a kept ``traceparent``."""
    return traceparent[3:35] if traceparent else None


def new_span(traceparent: str) -> str:
    """The ``traceparent`` of one attempt: the same trace and flags, a new parent (span) id."""
    span = _SPANS.getrandbits(64) or 1  # never all zeros
    return f"{traceparent[:36]}{span:016x}{traceparent[52:]}"

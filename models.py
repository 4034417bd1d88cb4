"""The nouns of webhookd: what the store hands out and the delivery loop passes around.

A **partner** subscribes to event types. Publishing stores one **event** (its canonical
body: exactly the bytes we send) and one **delivery** per subscribed partner. Every try
of a delivery is an **attempt**. The delivery loop claims a delivery as a **job** (all it
needs to send, read in one transaction) and hands back an **outcome** (the attempt and
the delivery's next state). Events that partners post to us are **inbound events**. Every
write an admin or a partner makes is an **audit entry**.

Plain frozen dataclasses, no behaviour beyond reading themselves: ``store_rows.py`` turns
rows into them, and nothing outside the store sees a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RetryTerms:
    """A partner's own retry policy (``partner_terms.py``); a field left None is the server's
    (``[delivery]`` in the config). ``schedule``: the wait after each failed attempt, in order."""

    timeout_s: float | None = None
    max_attempts: int | None = None
    base_s: float | None = None
    max_s: float | None = None
    schedule: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Partner:
    id: str
    name: str
    webhook_url: str
    status: str
    events: tuple[str, ...]
    secret: str
    previous_secret: str | None
    previous_secret_until: float | None
    created_at: float
    updated_at: float
    failing_since: float | None = None
    disabled_reason: str | None = None
    max_rate_per_s: float | None = None   # at most this many attempts started per second; None: no pace
    paused_until: float | None = None     # a circuit or Retry-After pause, shared by every process (PostgreSQL)
    suspended_reason: str | None = None   # why the admin suspended it (status "suspended")
    contact_email: str | None = None      # whom the operator writes to (the guide's registration asks for it)
    channels: tuple[str, ...] = ()        # events published to channels reach it only through one of these
    payload_filter: dict[str, list[Any]] | None = None  # {field: [values]}: only events whose field is one of them
    ordering: str = "concurrent"          # or "fifo": one attempt at a time, in publish order
    retry: RetryTerms = field(default_factory=lambda: RetryTerms())  # its own retry policy (partner_terms.py)
    # Sent with every request to it, e.g. ("Authorization", "Bearer …"): secrets, like ``secret``.
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    verification: Verification | None = None  # proof the endpoint is the partner's (verification.py); None: not asked
    client_cert: str | None = None        # PEM: the TLS client certificate its endpoint demands (egress.py)
    client_key: str | None = field(default=None, repr=False)  # PEM: its private key, a secret like the others

    def valid_secrets(self, now: float) -> list[str]:
        return valid_secrets(self.secret, self.previous_secret, self.previous_secret_until, now)

    @property
    def unverified(self) -> bool:
        """Its endpoint has not proved yet that it is its own: nothing but the challenge goes to it."""
        return self.verification is not None and self.verification.state == "unverified"

    def accepts(self, payload: dict[str, Any]) -> bool:
        """Whether an event with this payload passes the partner's filter: every field it names is
        in the payload, equal to one of its values (``true`` is not ``1``; ``1`` is ``1.0``). A field
        the payload lacks rules the event out: a filter only ever narrows what a partner gets."""
        return all(field in payload and any(_same(payload[field], v) for v in values)
                   for field, values in (self.payload_filter or {}).items())


@dataclass(frozen=True)
class Verification:
    """Where a partner stands on proving its endpoint is its own (``verification.py``): ``state``
    "unverified" (nothing else is sent to it) or "verified". The challenge itself is never here:
    it stays in the store, so no answer of the API can show it."""

    state: str
    attempts: int = 0                 # verification requests sent for the current challenge
    due_at: float | None = None       # when the next one goes (None: none planned)
    tried_at: float | None = None     # when the last one went
    error: str | None = None          # why the last one failed, in words a partner can act on
    verified_at: float | None = None


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and type(a) in (str, int, float, bool) and a == b


def valid_secrets(secret: str, previous: str | None, previous_until: float | None, now: float) -> list[str]:
    """The current secret, plus the previous one while its rotation overlap lasts: what signs
    an outgoing webhook (``webhook-signature`` carries one signature per secret) and what
    verifies an inbound one."""
    return [secret, previous] if previous and (previous_until or 0) > now else [secret]


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    body: bytes
    fanout: int
    created_at: float
    idempotency_key: str | None = None
    request_hash: str | None = None
    audience: dict[str, list[str]] | None = None  # {"partners": [...], "channels": [...]} when targeted
    traceparent: str | None = None      # W3C trace context the publisher sent (trace_context.py)
    tracestate: str | None = None
    erased_at: float | None = None  # its content erased (erasure.py): body empty, metadata kept


@dataclass(frozen=True)
class NewEvent:
    """An event about to be published: what ``Store.publish`` writes."""

    id: str
    type: str
    body: bytes                         # canonical JSON: exactly the bytes partners get
    idempotency_key: str | None = None
    request_hash: str | None = None     # sha256 of the request, to spot a reused key
    only_partner: str | None = None     # one partner whatever its subscriptions (webhook.test)
    audience: dict[str, list[str]] | None = None  # "partners" and/or "channels": only subscribers among them
    traceparent: str | None = None      # W3C trace context to pass on (trace_context.py)
    tracestate: str | None = None


@dataclass(frozen=True)
class Attempt:
    attempt: int
    started_at: float
    duration_ms: int
    status_code: int | None
    error: str | None
    response_snippet: str | None
    url: str | None = None   # where this attempt went (a partner's URL can change between attempts)
    error_detail: str | None = None  # what happened, in a few words a partner can act on (never a secret)
    signatures: dict[str, str] | None = None  # the signature headers as sent (GET /events/{id}/trace)
    decision: dict[str, Any] | None = None    # what came next and why: {"state", "wait_s", "why"}


@dataclass(frozen=True)
class Delivery:
    id: str
    event_id: str
    event: str
    partner_id: str
    state: str
    attempt_count: int
    max_attempts: int
    next_attempt_at: float
    leased_until: float | None
    created_at: float
    updated_at: float
    attempts: tuple[Attempt, ...] = field(default=())
    held_behind: str | None = None   # FIFO partner: the delivery that must end before this one goes
    event_erased_at: float | None = None  # when its event's content was erased (erasure.py)


@dataclass(frozen=True)
class Job:
    """One claimed delivery, read in the claim's transaction; its partner's URL, secrets and pace
    are filled in from the partner as it is when the attempt starts."""

    delivery_id: str
    event_id: str
    event: str
    partner_id: str
    url: str
    secrets: tuple[str, ...]
    body: bytes
    attempt: int        # the number of the attempt about to be made, from 1
    max_attempts: int
    partner_failing_since: float | None = None
    created_at: float = 0.0   # when the delivery was created (publish time)
    max_rate_per_s: float | None = None  # the partner's pace when the attempt starts
    traceparent: str | None = None  # the event's trace context: each attempt sends a new span of it
    tracestate: str | None = None
    retry: RetryTerms | None = None      # the partner's own retry policy when the attempt starts
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # its extra headers (secrets)
    client_cert: str | None = None       # the partner's client certificate and key (PEM), if it has one
    client_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt, as the delivery loop wants it written."""

    delivery_id: str
    partner_id: str
    attempt: Attempt
    state: str                          # the delivery's new state
    next_attempt_at: float
    partner_failing_since: float | None = None
    partner_failing_changed: bool = False
    disable_reason: str | None = None   # set: disable the partner
    paused_until: float | None = None   # set: this attempt paused the partner (circuit, Retry-After) until then
    event_id: str = ""                  # for the log line and metrics
    created_at: float = 0.0             # the delivery's creation (publish) time
    decision: dict[str, Any] | None = None  # what comes next and why: the attempt row's decision


@dataclass(frozen=True)
class InboundEvent:
    id: str
    partner_id: str
    type: str
    dedupe_key: str
    body: bytes
    received_at: float
    traceparent: str | None = None  # the partner's W3C trace context, if it sent one
    tracestate: str | None = None


@dataclass(frozen=True)
class Page:
    items: list[Any]
    next_cursor: str | None


@dataclass(frozen=True)
class AuditEntry:
    """Who changed what, and when: written in the same transaction as the change (``GET /audit``).
    ``changes`` never holds a secret or an API key; the store adds what only it knows (counts)."""

    id: str
    at: float
    actor: str                      # "admin", "partner" (the partner itself), or "anonymous" (open registration)
    action: str                     # partner.registered, partner.suspended, delivery.retried, ...
    partner_id: str | None
    changes: dict[str, Any]
    address: str | None = None      # the caller's address
    target: str | None = None       # what the action was on, when not the partner itself (a delivery id)

"""One event's whole story (``GET /events/{id}/trace``, ``webhookd trace EVENT_ID``).

What happened to an event, told from the rows the delivery loop already keeps: the publish;
then, for each partner it went to, each attempt — the request as it was sent (headers, the
signatures, and the exact string each signature scheme signed), the answer, and what came next
and why (the backoff drawn, a Retry-After, a circuit opened) — with the operators' retries in
between, up to the delivery's state now. Nothing here is a secret: a signature is, by design,
what anyone holding the body can check but no one can forge without the secret.

This is the page to read to learn the flow: publish → fan-out → claim → sign → send →
decide → retry or end.
"""

from __future__ import annotations

import time
from typing import Any

import trace_context
from models import Attempt, AuditEntry, Delivery, Event

# What each signature scheme signs (``signing.py``): how a partner recomputes the signature.
SCHEMES = {
    "X-Webhook-Signature": "hex HMAC-SHA256 of the body, with the partner's shared secret (the guide's scheme)",
    "webhook-signature": "v1, then base64 HMAC-SHA256 of '{webhook-id}.{webhook-timestamp}.{body}' with the "
                         "secret of standard_webhooks_secret, one per valid secret (Standard Webhooks)",
}
WAITED_LONGER_S = 1.0  # an attempt that began this much later than its backoff said: something held it


def event_story(event: Event, deliveries: list[Delivery], retries: dict[str, list[AuditEntry]],
                user_agent: str) -> dict[str, Any]:
    """The trace of ``event``: its publish, then one timeline per delivery (``retries``: the
    operators' ``delivery.retried`` audit entries, by delivery id). An erased event's story has
    no body and no signed strings: only what happened, and when its content was erased."""
    body = None if event.erased_at is not None else event.body.decode("utf-8")
    return {
        "event_id": event.id, "event": event.type, "published_at": event.created_at,
        "idempotency_key": event.idempotency_key, "audience": event.audience, "body": body,
        "fanout": event.fanout, "erased_at": event.erased_at, "trace_id": trace_context.trace_id(event.traceparent),
        "traceparent": event.traceparent, "tracestate": event.tracestate,
        "deliveries": [_delivery_story(event, d, retries.get(d.id, []), body, user_agent) for d in deliveries],
    }


def _delivery_story(event: Event, d: Delivery, retries: list[AuditEntry], body: str | None,
                    user_agent: str) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"at": d.created_at, "step": "queued", "detail":
                                    "published: one delivery for this partner, due at once"}]
    due_at: float | None = d.created_at
    for a in d.attempts:
        if due_at is not None and a.started_at - due_at > WAITED_LONGER_S:
            steps.append({"at": due_at, "step": "waited", "detail": (
                f"due, but began {a.started_at - due_at:.1f} s later: the partner was paused, its circuit open, "
                f"its pace or concurrency full, or webhookd was not running")})
        steps.append(_attempt_step(event, a, body, user_agent))
        due_at = a.started_at + a.duration_ms / 1000 + a.decision["wait_s"] \
            if a.decision and a.decision["state"] == "pending" else None
    for entry in retries:
        steps.append({"at": entry.at, "step": "retried", "detail": f"one more attempt, asked for by the {entry.actor}"})
    steps.sort(key=lambda s: s["at"])
    steps.append({"at": d.updated_at, "step": d.state, "detail": _end(d)})
    return {"delivery_id": d.id, "partner_id": d.partner_id, "state": d.state, "steps": steps}


def _attempt_step(event: Event, a: Attempt, body: str | None, user_agent: str) -> dict[str, Any]:
    """One attempt: the request as sent (the timestamp headers are its start second), the answer,
    and the decision that followed."""
    timestamp = str(int(a.started_at))
    signatures = a.signatures or {}
    headers = {"Content-Type": "application/json", "User-Agent": user_agent, "X-Webhook-Event": event.type,
               "X-Webhook-Id": event.id, "X-Webhook-Timestamp": timestamp, "webhook-id": event.id,
               "webhook-timestamp": timestamp, **signatures}
    signed = {name: {"scheme": SCHEMES[name],
                     "string_to_sign": body if name == "X-Webhook-Signature" else f"{event.id}.{timestamp}.{body}"}
              for name in signatures if name in SCHEMES} if body is not None else None
    return {"at": a.started_at, "step": "attempt", "attempt": a.attempt, "url": a.url, "request_headers": headers,
            "signed": signed, "status_code": a.status_code, "duration_ms": a.duration_ms, "error": a.error,
            "error_detail": a.error_detail, "response_snippet": a.response_snippet, "next": a.decision,
            **({} if signatures or body is None else
               {"detail": "not sent: the URL was refused before any request was made"})}


def _end(d: Delivery) -> str:
    if d.state == "delivered" and not d.attempts:  # nothing was sent: a pull-only partner took it (polling.py)
        return "taken by the partner's poll (GET /partners/{id}/events): pulled, not pushed"
    return {"delivered": "the partner answered 2xx",
            "failed": "out of attempts: retry it by hand, or recover the partner's failed deliveries",
            "expired": "pending longer than delivery.max_pending_age_s: retry it by hand if it still matters",
            "cancelled": "cancelled by the admin, its partner was deleted, or its event's content was erased: "
                         "never sent again",
            "pending": "waiting: due at " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(d.next_attempt_at)) + (
                f", behind {d.held_behind} (FIFO)" if d.held_behind else "")}.get(d.state, d.state)

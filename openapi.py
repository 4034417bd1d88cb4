"""The OpenAPI 3.1 description of webhookd's HTTP API, served at ``GET /openapi.json``.

Kept apart from ``webhookd.py`` because it is a document, not behaviour: one entry per
route, in the order of the route table, with the request and response shapes the
routes produce. ``tests/test_openapi.py`` checks it covers every route and runs
schemathesis against a live server with it. The WebSocket ``/ws`` is described in
the info text (OpenAPI has no WebSocket operations).
"""

from __future__ import annotations

from typing import Any

TIME = {"type": "integer", "description": "unix seconds"}
MAYBE_TIME = {"type": ["integer", "null"], "description": "unix seconds"}
STRING = {"type": "string"}
PROBLEM = {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
           "required": ["field", "message"], "additionalProperties": False}
EMAIL = {"type": ["string", "null"], "maxLength": 254, "pattern": "^[^@\\s]+@[^@\\s.]+(\\.[^@\\s.]+)+$",
         "description": "whom the operator writes to, e.g. ops@example.com; null: none"}
SCALAR = {"type": ["string", "number", "boolean"]}
FILTER = {"type": ["object", "null"], "maxProperties": 20,
          "additionalProperties": {"oneOf": [SCALAR, {"type": "array", "minItems": 1, "maxItems": 100, "items": SCALAR}]},
          "description": "only events whose top-level field is one of these values, e.g. {\"currency\": [\"EUR\"]}; "
                         "a field the event lacks rules it out; null: no filter"}
CHANNEL_LIST = {"type": "array", "maxItems": 50, "items": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,100}$"},
                "description": "an event published to channels reaches the partner only through one of these"}
DELIVERY_MODE = {"enum": ["push", "pull"],
                 "description": "push (default): POSTed to webhook_url; pull: no webhook_url, the partner reads "
                                "GET /partners/{partner_id}/events"}
ORDERING = {"enum": ["concurrent", "fifo"],
            "description": "fifo: one attempt at a time, in publish order; a failing delivery holds the ones behind"}
STATES = ["pending", "delivered", "failed", "expired", "cancelled"]
RATE = {"type": ["number", "null"], "minimum": 0.01, "maximum": 10000,
        "description": "at most this many attempts started per second; null: no pace"}
# A partner's own terms (partner_terms.py, with these bounds; docs/partner-terms.md).
TERMS_BY_ADMIN = (" The admin sets it; from anyone else (a partner's API key, an open registration) it is a "
                  "403 terms_admin_only.")
WAIT = {"type": "number", "minimum": 1, "maximum": 86400}
RETRY_IN = {"type": ["object", "null"], "additionalProperties": False, "properties": {
    "timeout_s": {"type": "number", "minimum": 0.5, "maximum": 30, "description": "an attempt's whole deadline"},
    "max_attempts": {"type": "integer", "minimum": 1, "maximum": 25},
    "base_s": {**WAIT, "description": "a backoff of its own: base_s doubled per attempt, with jitter"},
    "max_s": {**WAIT, "description": "the backoff's longest wait, at least base_s"},
    "schedule": {"type": "array", "minItems": 1, "maxItems": 24, "items": {"type": "number", "minimum": 1},
                 "description": "the waits themselves after attempt 1, 2, …, followed exactly; not with base_s "
                                "or max_s"}},
            "description": "the partner's own retry policy; a setting left out is the server's; all the waits "
                           "of one delivery at most 3 days; null or {}: the server's policy. A PATCH replaces it "
                           "whole." + TERMS_BY_ADMIN}
RETRY_OUT = {"type": "object", "additionalProperties": False, "properties": {
    "timeout_s": {"type": "number"}, "max_attempts": {"type": "integer"},
    "base_s": {"type": ["number", "null"]}, "max_s": {"type": ["number", "null"]},
    "schedule": {"type": ["array", "null"], "items": {"type": "number"}},
    "own": {"type": "array", "items": {"enum": ["timeout_s", "max_attempts", "base_s", "max_s", "schedule"]},
            "description": "the settings that are the partner's own; the others are the server's"}},
    "required": ["timeout_s", "max_attempts", "base_s", "max_s", "schedule", "own"],
    "description": "the retry policy in force: base_s and max_s null under a schedule"}
HEADERS_IN = {"type": ["object", "null"], "maxProperties": 10,
              "propertyNames": {"pattern": "^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$"},
              "additionalProperties": {"type": ["string", "null"], "minLength": 1, "maxLength": 4096,
                                       "pattern": "^[\\x21-\\x7e]([\\x20-\\x7e\\t]*[\\x21-\\x7e])?$"},
              "description": "extra headers sent with every request to the partner, e.g. {\"Authorization\": "
                             "\"Bearer …\"}; values are secrets, never shown again. Reserved names (Host, "
                             "Content-*, hop-by-hop, User-Agent, traceparent, webhook-*, X-Webhook-*, Proxy-*): 422. "
                             "With PATCH a name set to null is removed, the others stay; null removes them all."
                             + TERMS_BY_ADMIN}
HEADERS_OUT = {"type": "array", "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "hint"],
    "properties": {"name": {"type": "string"},
                   "hint": {"type": "string", "description": "its length, and its first 4 characters when it has "
                                                             "24 or more: never the value"}}}}
CLIENT_CERTIFICATE = {"type": "string", "minLength": 1, "maxLength": 65536,
                      "description": "PEM: the TLS client certificate (and its chain) the partner's endpoint demands; "
                                     "valid now, and loading with client_key. The admin's alone (403 otherwise)"}
CLIENT_KEY = {"type": "string", "minLength": 1, "maxLength": 16384,
              "description": "PEM: the certificate's private key, unencrypted; never shown again. May be left out "
                             "when a renewed certificate keeps the key already set"}
CERTIFICATE_SHOWN = {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
    "subject": {"type": ["string", "null"]}, "issuer": {"type": ["string", "null"]},
    "fingerprint_sha256": {"type": ["string", "null"], "description": "as openssl x509 -fingerprint -sha256 prints it"},
    "not_before": MAYBE_TIME, "not_after": MAYBE_TIME,
    "key_set": {"type": "boolean", "description": "a key is set (it is never shown)"},
    "problem": {"type": ["string", "null"], "description": "why deliveries fail now (expired, not yet valid, does "
                                                          "not load): configuration_error, not retried"}},
    "required": ["subject", "issuer", "fingerprint_sha256", "not_before", "not_after", "key_set", "problem"],
    "additionalProperties": False}], "description": "the partner's TLS client certificate (docs/egress.md); null: none"}
ADMIN_SETS = (" The admin sets it; from anyone else (a partner's API key, an open registration) it is a "
              "403 audience_admin_only.")


def _obj(properties: dict[str, Any], required: list[str] | None = None, extra: bool = False) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties) if required is None else required,
            "additionalProperties": extra}


def _admin_sets(schema: dict[str, Any]) -> dict[str, Any]:
    """A partner's audience field (channels, filter) as a request takes it: the admin's alone."""
    return {**schema, "description": schema["description"] + "." + ADMIN_SETS}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _list_of(name: str) -> dict[str, Any]:
    return _obj({"items": {"type": "array", "items": _ref(name)}, "next_cursor": {"type": ["string", "null"]}})


# Proof the endpoint is the partner's (security.verify_endpoints): the other keys are absent for not_requested.
VERIFICATION = _obj({
    "state": {"enum": ["not_requested", "unverified", "verified"],
              "description": "unverified: nothing but the webhook.verification challenge is sent to the partner"},
    "attempts": {"type": "integer", "description": "requests sent for the current challenge"},
    "max_attempts": {"type": "integer"}, "last_attempt_at": MAYBE_TIME, "next_attempt_at": MAYBE_TIME,
    "last_error": {"type": ["string", "null"], "description": "why the last request failed, in words"},
    "verified_at": MAYBE_TIME}, required=["state"])


def _schemas(catalog: dict[str, dict[str, str]]) -> dict[str, Any]:
    events = sorted(catalog)
    partner = {
        "partner_id": {"type": "string", "pattern": "^partner_[a-z0-9]{12,}$"},
        "partner_name": STRING, "webhook_url": {"type": ["string", "null"], "description": "null: pull-only"},
        "delivery": DELIVERY_MODE,
        "status": {"enum": ["active", "paused", "disabled", "suspended"]},
        "events_subscribed": {"type": "array", "items": STRING},
        "stale_subscriptions": {"type": "array", "items": STRING,
                                "description": "subscribed types no longer in the catalog: nothing comes of them"},
        "disabled_reason": {"type": ["string", "null"]}, "failing_since": MAYBE_TIME,
        "suspended_reason": {"type": ["string", "null"], "description": "why the admin suspended it"},
        "max_rate_per_s": {"type": ["number", "null"], "description": "attempts started per second, at most"},
        "contact_email": {"type": ["string", "null"], "description": "whom the operator writes to"},
        "ordering": ORDERING, "retry": RETRY_OUT, "extra_headers": HEADERS_OUT, "client_certificate": CERTIFICATE_SHOWN,
        "channels": {"type": "array", "items": STRING}, "filter": {**FILTER, "additionalProperties": {
            "type": "array", "items": SCALAR}, "description": "as sent, each value as a list"},
        "circuit": _obj({
            "state": {"enum": ["closed", "open", "half_open"],
                      "description": "open: nothing is sent until next_probe_at; half_open: one probe at a time"},
            "reason": {"enum": ["failures", "retry_after", "paused_by_another_process", None]},
            "opened_at": MAYBE_TIME, "next_probe_at": MAYBE_TIME,
            "recent_failures": {"type": "integer", "description": "failed attempts in the current failing streak"},
        }),
        "verification": VERIFICATION,
        "created_at": TIME, "updated_at": TIME,
    }
    delivery = {
        "delivery_id": STRING, "event_id": STRING, "event": STRING, "partner_id": STRING,
        "state": {"enum": STATES}, "attempt_count": {"type": "integer"},
        "next_attempt_at": MAYBE_TIME, "created_at": TIME, "updated_at": TIME,
        "held_behind": {"type": ["string", "null"],
                        "description": "a FIFO partner's pending delivery: the one that must end before it goes"},
        "event_erased_at": {**MAYBE_TIME, "description": "when its event's content was erased (never sent again)"},
    }
    attempt = {
        "attempt": {"type": "integer"}, "started_at": TIME, "duration_ms": {"type": "integer"},
        "status_code": {"type": ["integer", "null"]}, "error": {"type": ["string", "null"]},
        "error_detail": {"type": ["string", "null"]},
        "response_snippet": {"type": ["string", "null"]},
        "url": {"type": ["string", "null"], "description": "where this attempt was sent"},
    }
    return {
        "Error": _obj({"error": _obj({"code": {"type": "string", "pattern": "^[a-z_]+$"},
                                      "message": {"type": "string", "minLength": 1},
                                      "problems": {"type": "array", "items": PROBLEM, "description": (
                                          "a payload refused for its fields (invalid_field): every problem "
                                          "found, the first being the message")},
                                      "start_cursor": {"type": "string", "description": (
                                          "cursor_expired: the cursor to read again from, before the oldest "
                                          "events kept")}},
                                     required=["code", "message"])}),
        "Registration": _obj({
            "partner_name": {"type": "string", "minLength": 1, "maxLength": 200},
            "webhook_url": {"type": "string", "format": "uri", "maxLength": 2048},
            "events": {"type": "array", "minItems": 1, "items": {"enum": events}},
            "max_rate_per_s": RATE, "contact_email": EMAIL, "channels": _admin_sets(CHANNEL_LIST),
            "filter": _admin_sets(FILTER), "ordering": ORDERING, "delivery": DELIVERY_MODE, "retry": RETRY_IN,
            "extra_headers": {**HEADERS_IN, "additionalProperties": {**HEADERS_IN["additionalProperties"],
                                                                     "type": "string"}},
            "client_certificate": CLIENT_CERTIFICATE, "client_key": CLIENT_KEY,
        }, required=["partner_name", "events"]),
        "Partner": _obj(partner),
        "PartnerCreated": _obj({**partner, "shared_secret": STRING, "standard_webhooks_secret": STRING,
                                "api_key": STRING}),
        "PartnerWithKey": _obj({**partner, "api_key": STRING}),
        "PartnerRotated": _obj({**partner, "shared_secret": STRING, "standard_webhooks_secret": STRING,
                                "previous_secret_expires_at": MAYBE_TIME}),
        "PartnerUpdate": {**_obj({"webhook_url": {"type": "string", "maxLength": 2048},
                                  "events": {"type": "array", "minItems": 1, "items": {"enum": events}},
                                  "status": {"enum": ["active", "paused", "suspended"],
                                             "description": "suspended: the admin only, with a reason; "
                                                            "only the admin lifts it"},
                                  "reason": {"type": "string", "minLength": 1, "maxLength": 500,
                                             "description": "why, with status suspended"},
                                  "max_rate_per_s": RATE, "contact_email": EMAIL,
                                  "channels": _admin_sets(CHANNEL_LIST), "filter": _admin_sets(FILTER),
                                  "ordering": ORDERING, "retry": RETRY_IN, "extra_headers": HEADERS_IN,
                                  "client_certificate": {**CLIENT_CERTIFICATE, "type": ["string", "null"],
                                                         "description": CLIENT_CERTIFICATE["description"]
                                                         + "; null removes it and its key"},
                                  "client_key": CLIENT_KEY}, required=[]),
                          "minProperties": 1},
        "PartnerList": _list_of("Partner"),
        "EventPayload": {**_obj({
            "event": {"enum": events}, "timestamp": {"type": "number"},
            "partners": {"type": "array", "minItems": 1, "maxItems": 100, "items": STRING,
                         "description": "only these partners (among the type's subscribers); not sent"},
            "channels": {**CHANNEL_LIST, "minItems": 1, "maxItems": 10,
                         "description": "only partners listening on one of these (among the type's subscribers); "
                                        "not sent"}}, required=["event"], extra=True),
                         "description": "The event's fields; the catalog in webhookd.toml says which are required."},
        "EventTypes": _obj({"event_types": {"type": "array", "items": _obj({
            "type": {"enum": events}, "description": STRING,
            "schema": {"type": "object", "description": "a JSON Schema (draft 2020-12) of the body delivered"},
            "example": {"type": "object", "description": "a body of this type, as a partner receives it"}})}}),
        "EventAccepted": _obj({"event_id": STRING, "deliveries": {"type": "integer"}, "note": _obj({
            "code": {"enum": ["no_subscriber", "no_match"]}, "message": STRING}, extra=False) | {
            "description": "only when deliveries is 0: why the event reached no partner (no_subscriber: no "
                           "partner subscribes to its type; no_match: its subscribers were left out by the "
                           "partners or channels named, or by their payload filters)"}},
            required=["event_id", "deliveries"]),
        "EventBatch": _obj({"events": {"type": "array", "minItems": 1, "items": _ref("EventPayload")}}),
        "BatchAccepted": _obj({
            "accepted": {"type": "integer"}, "refused": {"type": "integer"},
            "results": {"type": "array", "description": "one per event, in order", "items": {"oneOf": [
                _ref("EventAccepted"),
                _obj({"error": _obj({"code": STRING, "message": STRING, "problems": {"type": "array", "items": PROBLEM}},
                                    required=["code", "message"]), "status": {"type": "integer"}}),
            ]}}}),
        "Event": _obj({"event_id": STRING, "event": STRING, "created_at": TIME,
                       "payload": {"type": ["object", "null"], "description": "null once its content was erased"},
                       "erased_at": {**MAYBE_TIME, "description": "when its content was erased (DELETE .../content)"},
                       "partners": {"type": ["array", "null"], "items": STRING, "description": "whom it was for"},
                       "channels": {"type": ["array", "null"], "items": STRING},
                       "fanout": {"type": "integer", "description": "deliveries made at publish time"},
                       "deliveries": {"type": "array", "items": _ref("Delivery"),
                                      "description": "the first 200; page with GET /deliveries?event_id="},
                       "more_deliveries": {"type": "boolean"}}),
        "Trace": _obj({
            "event_id": STRING, "event": STRING, "published_at": {"type": "number"},
            "idempotency_key": {"type": ["string", "null"]}, "audience": {"type": ["object", "null"]},
            "body": {"type": ["string", "null"], "description": "the exact bytes every partner was sent (and "
                     "signed); null once erased, and the attempts' signed strings with it"},
            "fanout": {"type": "integer"}, "erased_at": {"type": ["number", "null"]},
            "trace_id": {"type": ["string", "null"], "description": "the W3C trace id the publisher sent, if any"},
            "traceparent": {"type": ["string", "null"]}, "tracestate": {"type": ["string", "null"]},
            "deliveries": {"type": "array", "items": _obj({
                "delivery_id": STRING, "partner_id": STRING, "state": {"enum": STATES},
                "steps": {"type": "array", "items": {
                    "type": "object", "required": ["at", "step"],
                    "properties": {"at": {"type": "number"}, "step": {"enum": [
                        "queued", "waited", "attempt", "retried", *STATES]}},
                    "description": "queued, waited, attempt (request_headers, signed: the string each scheme "
                                   "signed, the answer, next: what came next and why), retried, then the state"}}})}}),
        "Delivery": _obj(delivery),
        "DeliveryDetail": _obj({**delivery, "attempts": {"type": "array", "items": _obj(attempt)}}),
        "DeliveryList": _list_of("Delivery"),
        "Recovered": _obj({"requeued": {"type": "integer"}}),
        "VerificationRequested": _obj({"partner_id": STRING, "verification": VERIFICATION}),
        "CheckReport": _obj({
            "partner_id": STRING, "lang": {"enum": ["en", "es"]}, "checked_at": TIME,
            "result": {"enum": ["pass", "warn", "fail"], "description": "the worst of the checks' results"},
            "checks": {"type": "array", "items": _obj({
                "name": {"enum": ["accepts_signed", "accepts_retry", "rejects_bad_signature",
                                  "rejects_stale_timestamp", "verifies_raw_body", "answer_time", "https"]},
                "result": {"enum": ["pass", "warn", "fail"]},
                "detail": {"type": "string", "description": "what the probes found"},
                "fix": {"type": ["string", "null"], "description": "one line: what to change, and the partner "
                                                                   "guide's section with the code; null for a pass"},
            })}}),
        "Replayed": _obj({"replayed": {"type": "integer", "description": "events queued again for the partner"},
                          "next_cursor": {"type": ["string", "null"],
                                          "description": "more events are in the window: call again with it"}}),
        "PulledEvents": _obj({
            "items": {"type": "array", "items": _obj({
                "delivery_id": STRING, "event_id": STRING, "event": STRING, "published_at": TIME,
                "delivery_state": {"enum": STATES, "description": "after this read (a pull-only partner's own "
                                                                  "poll makes pending ones delivered)"},
                "headers": {"type": "object", "additionalProperties": STRING,
                            "description": "the headers its push would carry, signed now"},
                "body": {"type": ["string", "null"], "description": "the exact bytes signed, as UTF-8 text; null: "
                                                                    "its content was erased"},
                "content_erased": {"const": True}}, required=["delivery_id", "event_id", "event", "published_at",
                                                              "delivery_state", "headers", "body"])},
            "next_cursor": {"type": "string", "description": "read on from here"},
            "has_more": {"type": "boolean", "description": "more events are waiting now"}}),
        "PartnerDeleted": _obj({"partner_id": STRING, "deleted": {"const": True},
                                "cancelled_deliveries": {"type": "integer"}}),
        "EventErased": _obj({"event_id": STRING, "event": STRING, "erased_at": TIME,
                             "cancelled_deliveries": {"type": "integer", "description": "by this call (0 the "
                                                      "second time)"}}),
        "PortalLinkRequest": _obj({
            "lifetime_s": {"type": "integer", "minimum": 60, "maximum": 604800, "default": 3600,
                           "description": "how long the link works"},
            "read_only": {"type": "boolean", "default": False, "description": "true: it reads, every write is "
                                                                             "403 read_only_link"}}),
        "PortalLink": _obj({"partner_id": STRING, "read_only": {"type": "boolean"}, "expires_at": TIME,
                            "url": {"type": "string", "description": "/portal#token=ptl_...: the token in the "
                                    "fragment, which no server or proxy sees"}}),
        "PendingCancelled": _obj({"partner_id": STRING, "cancelled_deliveries": {"type": "integer"}}),
        "AuditEntry": _obj({
            "audit_id": STRING, "at": TIME,
            "actor": {"enum": ["admin", "partner", "anonymous", "webhookd"],
                      "description": "partner: the partner itself, with its API key; anonymous: open registration; "
                                     "webhookd: its own endpoint verification"},
            "address": {"type": ["string", "null"]}, "action": STRING, "partner_id": {"type": ["string", "null"]},
            "target": {"type": ["string", "null"], "description": "the delivery, for delivery.retried"},
            "changes": {"type": "object", "description": "what changed (never a secret or a key)"}}),
        "AuditList": _list_of("AuditEntry"),
        "InboundAck": _obj({"status": {"const": "received"}, "timestamp": TIME}),
        "Inbound": _obj({"inbound_id": STRING, "partner_id": STRING, "event": STRING,
                         "payload": {"type": "object"}, "received_at": TIME,
                         "traceparent": {"type": ["string", "null"], "description": "the partner's W3C trace context"},
                         "tracestate": {"type": ["string", "null"]}}),
        "InboundList": _list_of("Inbound"),
        "TokenRequest": _obj({"user_id": {"type": "string", "minLength": 1, "maxLength": 200}}),
        "Token": _obj({"token": STRING, "expires_at": TIME}),
        "Health": _obj({"status": {"const": "ok"}}),
        "Stats": _obj({"partners": {"type": "array", "items": {"type": "object"}}, "totals": {"type": "object"},
                       "per_minute": {"type": "array", "items": {"type": "object"}},
                       "per_partner_hour": {"type": "array", "description": (
                           "each partner's deliveries that ended delivered or failed, by hour (Unix seconds of its "
                           "start), over the last 24 hours; hours with none are left out"), "items": _obj({
                               "partner_id": STRING, "hours": {"type": "array", "items": _obj({
                                   "hour": TIME, "delivered": {"type": "integer"}, "failed": {"type": "integer"}})}})},
                       "delivery": _obj({k: {"type": "number"} for k in (
                           "in_flight_bound", "in_flight_max", "in_flight_floor", "publish_wait_p90_ms",
                           "publish_wait_usual_ms", "gave_way", "gave_way_ms")}),
                       "processes": {"type": "array", "items": _obj({
                           "id": STRING, "host": STRING, "pid": {"type": "integer"}, "started_at": TIME,
                           "seen_at": TIME, "this": {"type": "boolean"}})},
                       "now": TIME}),
    }


def _json(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": _ref(name)}}}


def _op(summary: str, status: int, response: str | None, *, auth: bool = True, body: str | None = None,
        params: list[dict] | None = None, media: str = "application/json") -> dict[str, Any]:
    if response is None:
        ok = {"description": summary, "content": {media: {"schema": {"type": "string"}}}}
    else:
        ok = {"description": summary, **_json(response)}
    op: dict[str, Any] = {"summary": summary, "responses": {str(status): ok, "default": {
        "description": "An error: the code says what went wrong, the message what to send instead.",
        **_json("Error")}}}
    if body:
        op["requestBody"] = {"required": True, **_json(body)}
    if params:
        op["parameters"] = params
    op["security"] = [{"bearer": []}] if auth else []
    return op


def _path(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "maxLength": 200},
            "description": description}


def _query(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


PAGE = [_query("limit", {"type": "integer", "minimum": 1, "maximum": 200}, "page size (default 50)"),
        _query("cursor", {"type": "string"}, "next_cursor from the previous page")]
PARTNER = _path("partner_id", "a partner id")
QUEUE = _query("queue", {"enum": ["true", "false"]}, "true: queue it even though the partner is "
               "not active (otherwise a 409 partner_held)")
DELIVERY = _path("delivery_id", "a delivery id")
_TIME_FORMS = ("ISO 8601 with Z or an offset (2026-12-07T09:30:00Z), a date (2026-12-07: midnight UTC) or Unix "
               "seconds; 422 invalid_field naming the parameter otherwise")


def window(what: str) -> list[dict[str, Any]]:
    """``since`` and ``until`` of a list: [since, until) on ``what``."""
    schema = {"type": "string", "maxLength": 40}
    return [_query("since", schema, f"only rows {what} at or after this time (inclusive): {_TIME_FORMS}"),
            _query("until", schema, f"only rows {what} before this time (exclusive; not before since, or 422): "
                                    f"{_TIME_FORMS}")]


TRACE_HEADERS = [
    {"name": "traceparent", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 512},
     "description": "W3C Trace Context: kept with the event; each delivery attempt sends the same trace id with "
                    "a new span id. An invalid one is ignored (no trace context is kept), never refused"},
    {"name": "tracestate", "in": "header", "required": False, "schema": {"type": "string", "maxLength": 8192},
     "description": "W3C Trace Context: passed on as received (at most 32 members, 512 characters), only with a "
                    "valid traceparent"}]


def document(catalog: dict[str, dict[str, str]], version: str) -> dict[str, Any]:
    """The whole OpenAPI document for a server whose event catalog is ``catalog``."""
    states = {"type": "string", "enum": STATES}
    inbound_headers = [
        {"name": "X-Webhook-Signature", "in": "header", "required": True, "schema": STRING,
         "description": "hex HMAC-SHA256 of the body (or of its canonical JSON) with your shared secret"},
        {"name": "X-Webhook-Event", "in": "header", "required": True,
         "schema": {"type": "string", "pattern": "^[A-Za-z0-9_]+\\.[A-Za-z0-9_]+$"}},
        {"name": "X-Webhook-Id", "in": "header", "required": False, "schema": STRING,
         "description": "your id for this event; repeats are stored once"},
        {"name": "X-Partner-Id", "in": "header", "required": False, "schema": STRING,
         "description": "your partner_id: only your secrets are tried. Without it every partner's are, which is "
                        "done only for a body of at most 16384 bytes and at most 50 partners (else 400 "
                        "partner_id_required)"},
    ]
    paths = {
        "/health": {"get": _op("The database answers", 200, "Health", auth=False)},
        "/partners/register": {"post": _op("Register a partner; the only time its secret is shown", 201,
                                           "PartnerCreated", body="Registration")},
        "/partners": {"get": _op("List partners, newest first", 200, "PartnerList", params=PAGE)},
        "/partners/{partner_id}": {
            "get": _op("One partner (never its secret)", 200, "Partner", params=[PARTNER]),
            "patch": _op("Change a partner's URL, subscriptions, status, pace, ordering or contact; its channels "
                         "and filter: the admin only", 200, "Partner", body="PartnerUpdate", params=[PARTNER]),
            "delete": _op("Delete the partner: its secrets and key stop at once, its pending deliveries are "
                          "cancelled (the admin; the partner itself if security.partner_self_delete)", 200,
                          "PartnerDeleted", params=[PARTNER]),
        },
        "/partners/{partner_id}/cancel-pending": {"post": _op(
            "Cancel every pending delivery of the partner (never sent)", 200, "PendingCancelled", params=[PARTNER])},
        "/partners/{partner_id}/rotate-secret": {"post": _op(
            "A new secret; the old one stays valid for the overlap", 200, "PartnerRotated", params=[
                PARTNER, _query("revoke_old", {"enum": ["true", "false"]},
                                "true: every old secret stops at once (a leak); 409 rotation_in_progress otherwise "
                                "while an overlap runs")])},
        "/partners/{partner_id}/api-key": {"post": _op(
            "A new API key, shown once; the old one stops at once", 200, "PartnerWithKey", params=[PARTNER])},
        "/partners/{partner_id}/test": {"post": _op("Send webhook.test to this partner", 202, "EventAccepted",
                                                    params=[PARTNER])},
        "/partners/{partner_id}/check": {"post": _op(
            "Probe the partner's endpoint with marked webhook.check requests (header X-Webhook-Check: 1; not "
            "deliveries, never retried, under the deliveries' address rules) and report, check by check, whether "
            "it verifies signatures over the raw body; at most 3 checks a partner back to back, then one a minute "
            "(429 rate_limited with Retry-After)", 200, "CheckReport", params=[
                PARTNER, _query("lang", {"enum": ["en", "es"]}, "the report's language; without it, the first of "
                                "Accept-Language's that is en or es; else English")])},
        "/partners/{partner_id}/verify": {"post": _op(
            "Send the partner's endpoint a new signed webhook.verification challenge (security.verify_endpoints); "
            "unverified, so sent nothing else, until it answers 2xx echoing it (409 verification_off when the "
            "option is off, nothing_to_verify without a webhook URL)", 202, "VerificationRequested",
            params=[PARTNER])},
        "/partners/{partner_id}/recover": {"post": _op(
            "Re-queue failed and expired deliveries created since `since`", 200, "Recovered",
            params=[PARTNER, _query("since", {"type": "integer", "minimum": 0}, "unix seconds", True), QUEUE])},
        "/partners/{partner_id}/replay": {"post": _op(
            "Send again every event of the partner published in [since, until), delivered ones included, as new "
            "deliveries with the same event ids; not those still pending for it, nor those whose delivery was "
            "cancelled unless the admin asks", 202, "Replayed", params=[
                PARTNER, _query("since", {"type": "integer", "minimum": 0}, "unix seconds", True),
                _query("until", {"type": "integer", "minimum": 1}, "unix seconds, after since (default: now)"),
                _query("event", {"type": "string", "maxLength": 100}, "only this event type"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "events per call (default 100)"),
                _query("cursor", {"type": "string"}, "next_cursor from the previous call"),
                _query("include_cancelled", {"enum": ["true", "false"]}, "true (admin only; 403 admin_only for a "
                       "partner's key): also the events whose latest delivery to the partner was cancelled"),
                QUEUE])},
        "/partners/{partner_id}/events": {"get": _op(
            "The partner's events in order, each with the headers its push would carry and its exact body. "
            "Without a cursor, a pull-only partner's own key takes the events not yet taken (they become "
            "delivered; 409 partner_not_active while it is not active); anyone else reads from the oldest kept. "
            "A cursor whose events retention purged: 410 cursor_expired with start_cursor", 200, "PulledEvents",
            params=[PARTNER, _query("limit", {"type": "integer", "minimum": 1, "maximum": 200},
                                    "events per call (default 50)"),
                    _query("cursor", {"type": "string"}, "next_cursor from the previous call: reads on from "
                                                         "there (again, if already read)")])},
        "/event-types": {"get": _op("Every event type of the catalog, with a JSON Schema of its payload and an "
                                    "example (the admin token or any partner's API key)", 200, "EventTypes")},
        "/events": {"post": {**_op("Publish an event to its subscribers", 202, "EventAccepted", body="EventPayload",
                                   params=[{"name": "Idempotency-Key", "in": "header", "required": False,
                                            "schema": {"type": "string", "maxLength": 255}}, *TRACE_HEADERS])}},
        "/events/batch": {"post": {**_op(
            "Publish many events in one request and one durable commit; one result per event", 202,
            "BatchAccepted", body="EventBatch",
            params=[{"name": "Idempotency-Key", "in": "header", "required": False,
                     "schema": {"type": "string", "maxLength": 255},
                     "description": "event i gets a key of its own, made of this one and i"}, *TRACE_HEADERS])}},
        "/events/{event_id}": {"get": _op("An event and its deliveries", 200, "Event",
                                          params=[_path("event_id", "an event id")])},
        "/events/{event_id}/content": {"delete": _op(
            "Erase the event's content: its payload, the signatures sent and the partners' answers go, its "
            "metadata stays, its pending deliveries end cancelled; again: the same answer", 200, "EventErased",
            params=[_path("event_id", "an event id")])},
        "/events/{event_id}/trace": {"get": _op(
            "The event's whole story: each attempt's request, signatures and strings signed, answer, and what "
            "came next and why", 200, "Trace", params=[_path("event_id", "an event id")])},
        "/deliveries": {"get": _op("Deliveries, newest first", 200, "DeliveryList", params=[
            *PAGE, _query("partner_id", STRING, "only this partner"), _query("state", states, "only this state"),
            _query("event", STRING, "only this event type"), _query("event_id", STRING, "only this event"),
            *window("created")])},
        "/deliveries/{delivery_id}": {"get": _op("A delivery with its attempts", 200, "DeliveryDetail",
                                                 params=[DELIVERY])},
        "/deliveries/{delivery_id}/retry": {"post": _op("One more attempt of a failed or expired delivery", 202,
                                                        "Delivery",
                                                        params=[DELIVERY, QUEUE])},
        "/webhooks/partners": {"post": _op("Receive a partner's signed event", 200, "InboundAck", auth=False,
                                           body="EventPayload", params=[*inbound_headers, *TRACE_HEADERS])},
        "/inbound": {"get": _op("Received partner events, newest first", 200, "InboundList", params=[
            *PAGE, _query("partner_id", STRING, "only this partner"), _query("event", STRING, "only this type"),
            *window("received")])},
        "/realtime/tokens": {"post": _op("A short-lived token for GET /ws", 201, "Token", body="TokenRequest")},
        "/metrics": {"get": _op("Prometheus metrics", 200, None, media="text/plain")},
        "/stats": {"get": _op("What the dashboard draws", 200, "Stats")},
        "/audit": {"get": _op("The audit trail: every admin and partner write, newest first", 200, "AuditList",
                              params=[*PAGE, _query("partner_id", STRING, "only this partner"),
                                      _query("action", STRING, "only this action, e.g. partner.suspended"),
                                      *window("written")])},
        "/dashboard": {"get": _op("The operator's dashboard (a static page)", 200, None, auth=False,
                                  media="text/html")},
        "/portal": {"get": _op("The partners' own page, in English or Spanish (a static page)", 200, None,
                               auth=False, media="text/html")},
        "/partners/{partner_id}/portal-link": {"post": _op(
            "A short-lived link to /portal as this partner alone, optionally read-only; a reissue of its API key "
            "revokes it (expired: 401 portal_link_expired; altered or revoked: 401 portal_link_invalid)", 201,
            "PortalLink", body="PortalLinkRequest", params=[PARTNER])},
        "/me": {"get": _op("The partner whose API key this is (the admin token: 403 not_a_partner)", 200,
                           "Partner")},
        "/openapi.json": {"get": _op("This document", 200, None, auth=False)},
        "/ws": {"get": _op("Live offers: a WebSocket (over plain HTTP, a 426 that says so)", 426, "Error",
                           auth=False)},
    }
    paths["/partners/{partner_id}/portal-link"]["post"]["requestBody"]["required"] = False
    paths["/openapi.json"]["get"]["responses"]["200"]["content"] = {"application/json": {"schema": {"type": "object"}}}
    paths["/webhooks/partners"]["post"]["requestBody"]["content"]["application/json"]["schema"] = {
        "type": "object", "description": "your event; any type of the form word.word"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "webhookd", "version": version, "description": (
            "Signed, durable webhooks. Authenticate with `Authorization: Bearer <admin token | partner API key>`. "
            "A suspended partner's API key is read-only: it reads its record and deliveries, and any write answers "
            "403 partner_suspended until the admin lifts the suspension. A portal link's token (ptl_...) is a partner's "
            "bearer too, read-only if minted so (403 read_only_link on a write). "
            "Live offers: open a WebSocket on `/ws` offering the subprotocols `webhookd` and "
            "`token.<token from POST /realtime/tokens>` (or `/ws?token=<token>`); a bad or expired "
            "token, or one an admin token signed before it was revoked, is closed with code 1008. An offer carries "
            "the partner's `traceparent` when it sent a valid one.")},
        "paths": paths,
        "components": {"schemas": _schemas(catalog),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }

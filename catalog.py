"""The event catalog as a partner reads it: ``GET /event-types`` and ``webhookd catalog``.

The catalog in ``webhookd.toml`` says, for each event type, which fields a payload must carry and
their JSON types (``config.py``; ``POST /events`` holds every payload to it). A partner needs
the same facts in a form its tools read, so for each type this module builds:

* a description: the partner guide's words for its four types, otherwise one made of the fields;
* a JSON Schema (draft 2020-12) of the body a partner receives: ``event``, ``timestamp`` and the
  catalog's fields required, any other field allowed (they are delivered as sent);
* an example that satisfies both the schema and the catalog: a sample value per field, chosen by
  the field's name when it has the declared type, else by the type alone.

The partner guides show these examples, and a test keeps them in step with this module.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from config import FIELD_TYPES
from web import context

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
EXAMPLE_TIMESTAMP = 1795811341  # a fixed time, so the examples printed in the guides never change
ENVELOPE = ("event", "timestamp")  # in every body; a catalog that lists them too cannot change what they are

DESCRIPTIONS = {
    "payment.success": "A payment went through: the amount charged, its currency and the transaction id.",
    "payment.failed": "A payment was refused: the amount attempted and the reason.",
    "booking.confirmed": "A booking was confirmed: the tour and its dates.",
    "booking.cancelled": "A booking was cancelled.",
}

# A sample value per field name the guide's catalog uses; used when its type is the declared one.
SAMPLES: dict[str, Any] = {
    "transaction_id": "txn_abc123def456", "amount": 150.0, "currency": "USD", "user_id": "user_42",
    "reason": "insufficient_funds", "booking_id": "bkg_7f3k2m", "tour_id": "tour_xyz789",
    "start_date": "2026-03-10", "end_date": "2026-03-15",
}
# Otherwise, a sample value per JSON type.
TYPE_SAMPLES: dict[str, Any] = {
    "string": "example", "number": 1.5, "integer": 1, "boolean": True, "object": {}, "array": [],
}


def describe(event_type: str, fields: dict[str, str]) -> str:
    """The guide's sentence for a known type; for another, what the catalog requires of it."""
    if event_type in DESCRIPTIONS:
        return DESCRIPTIONS[event_type]
    if not fields:
        return f"The event {event_type}; the catalog requires no field of it."
    listed = ", ".join(f"{name} ({kind})" for name, kind in fields.items())
    return f"The event {event_type}, which carries {listed}."


def payload_schema(event_type: str, fields: dict[str, str]) -> dict[str, Any]:
    """The JSON Schema of a ``event_type`` body as delivered. ``timestamp`` is required because
    webhookd fills it in when the publisher leaves it out."""
    properties: dict[str, Any] = {
        "event": {"const": event_type},
        "timestamp": {"type": fields.get("timestamp", "number"), "description": "unix seconds: when it was published"},
    }
    properties.update({name: {"type": kind} for name, kind in fields.items() if name not in ENVELOPE})
    return {"$schema": SCHEMA_DIALECT, "title": event_type, "type": "object", "properties": properties,
            "required": list(dict.fromkeys([*ENVELOPE, *fields])), "additionalProperties": True}


def sample(name: str, kind: str) -> Any:
    """A value for the field ``name`` of JSON type ``kind``: the named sample if it is of that type."""
    named = SAMPLES.get(name)
    if named is not None and isinstance(named, FIELD_TYPES[kind]) and not isinstance(named, bool):
        return named
    return TYPE_SAMPLES[kind]


def example(event_type: str, fields: dict[str, str]) -> dict[str, Any]:
    """A body of ``event_type`` that the catalog accepts, as a partner would receive it."""
    return {"event": event_type, "timestamp": EXAMPLE_TIMESTAMP,
            **{name: sample(name, kind) for name, kind in fields.items() if name not in ENVELOPE}}


def event_types(catalog: dict[str, dict[str, str]]) -> dict[str, Any]:
    """The answer of ``GET /event-types``: every type of ``catalog``, sorted by name."""
    return {"event_types": [
        {"type": event_type, "description": describe(event_type, fields),
         "schema": payload_schema(event_type, fields), "example": example(event_type, fields)}
        for event_type, fields in sorted(catalog.items())]}


async def list_event_types(request: Request) -> JSONResponse:
    """``GET /event-types``: the catalog, for the admin and for every partner (any API key): a
    partner learns here which events exist and what they carry, before subscribing to them."""
    return JSONResponse(event_types(context(request).config.events))

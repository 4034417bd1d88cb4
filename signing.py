"""Canonical JSON, HMAC signatures and their verification.

Everything a partner needs to reproduce lives here, in plain standard library:

* ``canonical(payload)`` is the partner guide's serialization,
  ``json.dumps(payload, sort_keys=True, separators=(",", ":"))`` encoded as UTF-8.
  webhookd puts exactly these bytes on the wire, so a receiver that HMACs the raw
  body and one that re-serializes the parsed body the guide's way agree.
* ``X-Webhook-Signature`` is the lowercase hex HMAC-SHA256 of the body, keyed by the
  shared secret's UTF-8 bytes (the guide's header).
* ``webhook-signature`` is the Standard Webhooks form (standardwebhooks.com):
  ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` with the same key.

Every comparison goes through ``hmac.compare_digest``.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import Iterable
from typing import Any

MAX_JSON_DEPTH = 32


class BadJSON(ValueError):
    """Raised by ``parse_json`` when a body is not strict, finite, UTF-8 JSON."""


def canonical(payload: Any) -> bytes:
    """The guide's canonical form of ``payload``, as UTF-8 bytes."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_hex(secret: str, body: bytes) -> str:
    """The ``X-Webhook-Signature`` value: hex HMAC-SHA256 of ``body``."""
    return hmac.digest(secret.encode("utf-8"), body, "sha256").hex()  # one C call (OpenSSL's HMAC)


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One Standard Webhooks signature: ``v1,<base64 HMAC of "id.timestamp.body">``."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.digest(secret.encode("utf-8"), signed, "sha256")
    return "v1," + base64.b64encode(digest).decode("ascii")


def standard_signature_header(secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one signature per valid secret, space-separated.

    During a secret rotation both the new and the old secret are valid, so receivers
    that still hold the old one keep verifying until they switch.
    """
    return " ".join(standard_signature(s, msg_id, timestamp, body) for s in secrets)


def standard_signature_matches(secret: str, msg_id: str, timestamp: str, body: bytes, header: str,
                               now: float, tolerance_s: float = 300) -> bool:
    """Verify a Standard Webhooks request the way a receiver does: ``timestamp`` (the
    ``webhook-timestamp`` header, unix seconds) is within ``tolerance_s`` of ``now``, and one
    of the space-separated signatures of the ``webhook-signature`` ``header`` matches."""
    if not re.fullmatch(r"[0-9]{1,12}", timestamp) or abs(now - int(timestamp)) > tolerance_s:
        return False
    expected = standard_signature(secret, msg_id, int(timestamp), body).encode("ascii")
    return any(hmac.compare_digest(expected, given.encode("utf-8", "replace")) for given in header.split())


def standard_webhooks_secret(secret: str) -> str:
    """The ``whsec_`` form of a shared secret, for the official Standard Webhooks libraries."""
    return "whsec_" + base64.b64encode(secret.encode("utf-8")).decode("ascii")


def signature_matches(secret: str, body: bytes, signature: str) -> bool:
    """Constant-time check of a hex signature header against ``body``.

    The header arrives as text that may hold anything (non-ASCII, wrong length);
    comparing bytes keeps ``compare_digest`` from raising on such input.
    """
    expected = sign_hex(secret, body).encode("ascii")
    given = signature.strip().lower().encode("utf-8", "replace")
    return hmac.compare_digest(expected, given)


def verify(secret: str, raw_body: bytes, parsed: Any, signature: str, canonical_body: bytes | None = None) -> bool:
    """True when ``signature`` matches the raw body or the canonical form of ``parsed``.

    The raw body is what a careful sender signs. The canonical form is what the
    partner guide's own sender signs while posting ``requests.post(json=payload)``,
    whose bytes differ; accepting both keeps that sender working. Both comparisons
    always run, so the time taken does not reveal which one matched; when the raw body
    already is canonical (what webhookd's own senders post) they are one comparison,
    which tells the sender only what it knows: whether its bytes were canonical. A
    caller that already has ``canonical(parsed)`` passes it as ``canonical_body``.
    """
    canonical_body = canonical_body or canonical(parsed)
    raw_ok = signature_matches(secret, raw_body, signature)
    if canonical_body == raw_body:
        return raw_ok
    canonical_ok = signature_matches(secret, canonical_body, signature)
    return raw_ok or canonical_ok


def _reject_constant(name: str) -> Any:
    raise BadJSON(f"JSON value {name} is not allowed; send a finite number.")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) < len(pairs):  # a key came twice: name the first one repeated
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BadJSON(f"JSON object has the key {key!r} twice; send each key once.")
            seen.add(key)
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadJSON(f"JSON number {text[:40]} is too large for a float; send a finite number.")
    return value


def _check_structure(value: Any, max_depth: int) -> None:
    """Walk the parsed value once, without recursion: bounded depth, and every string
    encodable as UTF-8 (a lone surrogate like \\ud800 parses, but cannot be stored or sent)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level > max_depth:
                raise BadJSON(f"JSON is nested too deeply; at most {max_depth} levels are allowed.")
            if isinstance(item, dict):
                stack.extend((key, level) for key in item)
                stack.extend((child, level + 1) for child in item.values())
            else:
                stack.extend((child, level + 1) for child in item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise BadJSON("JSON text holds a lone UTF-16 surrogate (like \\ud800); send valid Unicode.") from None


# A lone surrogate can only come from a \uD800-\uDFFF escape: strict UTF-8 decoding refuses encoded ones.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _needs_structure_check(text: str, max_depth: int) -> bool:
    """Whether ``_check_structure`` could refuse ``text``'s value: it can be nested more than
    ``max_depth`` deep only with more opening brackets than that, and hold a lone surrogate only
    through a surrogate escape. Two scans in C instead of a walk in Python, for nearly every body;
    a body that may fail (or merely mentions such characters in a string) is walked."""
    return text.count("{") + text.count("[") > max_depth or _SURROGATE_ESCAPE.search(text) is not None


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a request body strictly: UTF-8, no NaN/Infinity, no duplicate keys, bounded depth."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadJSON("Body is not valid UTF-8; send UTF-8 encoded JSON.") from None
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_object_without_duplicates,
        )
    except RecursionError:
        raise BadJSON(f"JSON is nested too deeply; at most {max_depth} levels are allowed.") from None
    except json.JSONDecodeError as exc:
        raise BadJSON(f"Body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}.") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise BadJSON(f"Body is not acceptable JSON: {str(exc)[:120]}") from None
    if _needs_structure_check(text, max_depth):
        _check_structure(value, max_depth)
    return value

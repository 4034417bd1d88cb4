"""Each partner on its own terms: its retry policy and timeout, and the extra headers its endpoint demands.

A partner gets the server's retry policy (``[delivery]`` in the config: ``timeout_s``,
``max_attempts``, exponential backoff with jitter) unless the admin gives it one of its own,
``retry``; and only webhookd's own headers unless the admin gives it ``extra_headers`` (an
``Authorization: Bearer …`` that a receiver behind an API gateway demands). Both are the admin's to
set, at registration or with ``PATCH /partners/{id}``; ``docs/partner-terms.md`` is the reference.

Top to bottom:

1. the checks: ``check_retry`` and ``check_extra_headers``, each raising ``Refused``: the
   ``422 invalid_field`` that names the field (never a header's value), which
   ``partners.check_terms`` answers as the API's error (this module stays below ``web.py``, since
   the sender and the delivery loop use part 3; who may set the fields is ``partners.py``'s rule);
2. their JSON: in a partner's JSON (a header's name and a short hint, never its value) and in the
   audit trail (``store_rows.py`` writes and reads their columns);
3. what a delivery uses: the timeout, the number of attempts and the wait after a failed attempt,
   with the words the trace shows (``wait_after``), and the header lines the sender adds to a
   URL's fixed request head (``header_lines``).

A policy changed while deliveries are pending counts from each one's next attempt: its timeout,
its headers and the wait after it follow the new terms; a wait already drawn stands, and a
delivery keeps the number of attempts it was published with (as with a change of
``delivery.max_attempts`` in the config). ``recover`` and ``replay`` give the new number.
"""

from __future__ import annotations

import random
import re
from typing import Any

from config import DeliveryConfig, DeliverySettings
from models import Partner, RetryTerms

TIMEOUT_MIN_S, TIMEOUT_MAX_S = 0.5, 30.0  # a partner's own timeout_s: an attempt's whole deadline
ATTEMPTS_MAX = 25                          # max_attempts, at most
WAIT_MIN_S = 1.0                           # a wait of the schedule, or base_s, at least
MAX_S_MAX = 86_400.0                       # max_s (one wait of the backoff), at most: a day
TOTAL_MAX_S = 3 * 86_400.0                 # all the waits of one delivery together, at most: 3 days
RETRY_FIELDS = ("timeout_s", "max_attempts", "base_s", "max_s", "schedule")

HEADERS_MAX = 10          # extra headers per partner, at most
NAME_MAX = 64             # characters of a header's name
VALUE_MAX = 4096          # characters of a header's value (a long JWT fits)
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")   # RFC 9110's token: what a field name may be
VALUE = re.compile(r"[\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?")  # visible ASCII, inner spaces and tabs
# Names webhookd writes itself, or that change how the request is framed or forwarded (hop by hop),
# or that another part of webhookd adds (trace context): never a partner's extra header.
RESERVED = frozenset({
    "host", "content-length", "content-type", "content-encoding", "transfer-encoding", "connection",
    "keep-alive", "te", "trailer", "upgrade", "expect", "user-agent", "traceparent", "tracestate",
})
RESERVED_PREFIXES = ("webhook-", "x-webhook-", "proxy-")  # our signature, id and timestamp headers; a proxy's

ADMIN_ONLY = ("retry", "extra_headers")


class Refused(Exception):
    """A request's terms refused: the HTTP status, the error's code and its message."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def invalid(field_name: str, message: str) -> Refused:
    """The 422 for one field, worded as ``web.invalid`` words it: the field's name first."""
    return Refused(422, "invalid_field", f"'{field_name}' {message}")


# =====================================================================================
# 1. The checks
# =====================================================================================


def check_retry(value: Any, settings: DeliveryConfig) -> RetryTerms:
    """A partner's own retry policy: an object of ``timeout_s``, ``max_attempts``, and either
    ``base_s``/``max_s`` (exponential backoff with jitter) or ``schedule`` (the waits, in seconds,
    after attempt 1, 2, …); each left out is the server's. ``null`` or ``{}``: the server's policy."""
    if value is None:
        return RetryTerms()
    if not isinstance(value, dict):
        raise invalid("retry", "must be an object like {\"timeout_s\": 10, \"schedule\": [5, 30, 300, 3600]}, "
                               "or null for the server's policy.")
    for name in value:
        if name not in RETRY_FIELDS:
            raise invalid(f"retry.{name[:40]}", f"is not a retry setting: send {', '.join(RETRY_FIELDS)}.")
    timeout = _number(value, "timeout_s", TIMEOUT_MIN_S, TIMEOUT_MAX_S)
    attempts = value.get("max_attempts")
    if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int)
                                 or not 1 <= attempts <= ATTEMPTS_MAX):
        raise invalid("retry.max_attempts", f"must be a whole number of attempts from 1 to {ATTEMPTS_MAX}.")
    if "schedule" in value and ("base_s" in value or "max_s" in value):
        raise invalid("retry.schedule", "goes alone: send either schedule (the waits themselves) or "
                                        "base_s and max_s (a backoff), not both.")
    if "schedule" in value:
        schedule = _schedule(value["schedule"])
        if attempts is not None and attempts > len(schedule) + 1:
            raise invalid("retry.max_attempts", f"is at most {len(schedule) + 1} with a schedule of "
                                                f"{len(schedule)} waits: add waits, or leave max_attempts out.")
        return RetryTerms(timeout, attempts or len(schedule) + 1, schedule=schedule)
    terms = RetryTerms(timeout, attempts, _number(value, "base_s", WAIT_MIN_S, MAX_S_MAX),
                       _number(value, "max_s", WAIT_MIN_S, MAX_S_MAX))
    _check_backoff(terms, settings, sent=[name for name in ("max_s", "base_s", "max_attempts") if name in value])
    return terms


def _check_backoff(terms: RetryTerms, settings: DeliveryConfig, sent: list[str]) -> None:
    """A backoff (the partner's own ``base_s``/``max_s``, or the server's with its own number of
    attempts) whose ``max_s`` caps ``base_s`` and whose waits together stay within 3 days. The 422
    names a setting the request sent: the server's own policy is never refused."""
    if not sent:
        return
    base, ceiling = _backoff(terms, settings)
    if ceiling < base:
        raise invalid(f"retry.{sent[0]}", f"leaves max_s ({ceiling:g} s) under base_s ({base:g} s): max_s caps the "
                                          "doubled waits, so send a max_s at least base_s.")
    total = sum(min(ceiling, base * 2 ** (n - 1)) for n in range(1, _attempts(terms, settings)))
    if total > TOTAL_MAX_S:
        raise invalid(f"retry.{sent[0]}", f"lets one delivery wait {total / 3600:.0f} h in all; at most "
                                          f"{TOTAL_MAX_S / 3600:.0f} h: lower max_s, base_s or max_attempts.")


def _number(value: dict[str, Any], name: str, low: float, high: float) -> float | None:
    number = value.get(name)
    if number is None:
        return None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not low <= number <= high:
        raise invalid(f"retry.{name}", f"must be a number of seconds from {low:g} to {high:g}.")
    return float(number)


def _schedule(schedule: Any) -> tuple[float, ...]:
    """The waits of an explicit schedule: 1 to ``ATTEMPTS_MAX - 1`` numbers of seconds, each at
    least ``WAIT_MIN_S``, together at most ``TOTAL_MAX_S``."""
    if not isinstance(schedule, list) or not 1 <= len(schedule) < ATTEMPTS_MAX \
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= WAIT_MIN_S for w in schedule):
        raise invalid("retry.schedule", f"must be a list of 1 to {ATTEMPTS_MAX - 1} waits in seconds, each at least "
                                        f"{WAIT_MIN_S:g}, like [5, 30, 300, 3600].")
    if sum(schedule) > TOTAL_MAX_S:
        raise invalid("retry.schedule", f"adds up to {sum(schedule) / 3600:.0f} h; its waits together are at most "
                                        f"{TOTAL_MAX_S / 3600:.0f} h (3 days).")
    return tuple(float(w) for w in schedule)


def check_extra_headers(value: Any, kept: tuple[tuple[str, str], ...] = (),
                        patching: bool = False) -> tuple[tuple[str, str], ...]:
    """A partner's extra headers: an object of ``{"Name": "value"}``. At registration that is the
    whole set; with ``PATCH`` (``patching``) it changes ``kept``, the set now: a name with a value
    sets it, a name with ``null`` removes it, and ``null`` for the whole field removes them all (a
    value is never shown again, so a PATCH need not send the others). Names compare without case."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid("extra_headers", "must be an object of header names and values, like "
                                       "{\"Authorization\": \"Bearer …\"}, or null for none.")
    headers = {name.lower(): (name, v) for name, v in kept}
    seen: set[str] = set()
    for name, header_value in value.items():
        _check_name(name, seen)
        if header_value is None and patching:
            headers.pop(name.lower(), None)
            continue
        _check_value(name, header_value)
        headers[name.lower()] = (name, header_value)
    if len(headers) > HEADERS_MAX:
        raise invalid("extra_headers", f"holds at most {HEADERS_MAX} headers.")
    return tuple(headers[key] for key in sorted(headers))


def _check_name(name: str, seen: set[str]) -> None:
    """A header name: an RFC 9110 token, not one webhookd writes, each once (without case). A name
    that is not a token is not repeated in the answer: it may be a header line pasted whole."""
    if not 1 <= len(name) <= NAME_MAX or not TOKEN.fullmatch(name):
        raise invalid("extra_headers", f"has a name that is not a header name: 1 to {NAME_MAX} letters, digits "
                                       "or !#$%&'*+-.^_`|~ (no spaces, no colon), like Authorization.")
    lower = name.lower()
    if lower in RESERVED or lower.startswith(RESERVED_PREFIXES):
        raise invalid("extra_headers", f"may not set {name}: webhookd writes it itself, or it changes how the "
                                       "request is framed or forwarded. Reserved: Host, Content-Length, "
                                       "Content-Type, Transfer-Encoding, Connection and the other hop-by-hop "
                                       "headers, User-Agent, traceparent, and every webhook-*, X-Webhook-* and "
                                       "Proxy-* header.")
    if lower in seen:
        raise invalid("extra_headers", f"names {name} twice (header names compare without case).")
    seen.add(lower)


def _check_value(name: str, value: Any) -> None:
    """A header's value, never repeated in the answer: 1 to ``VALUE_MAX`` visible ASCII characters,
    inner spaces and tabs; no CR, LF, NUL or other control character (they would end the header)."""
    if not isinstance(value, str) or not 1 <= len(value) <= VALUE_MAX or not VALUE.fullmatch(value):
        raise invalid("extra_headers", f"has a value for {name} that is not a header value: 1 to {VALUE_MAX} "
                                       "visible ASCII characters (spaces inside only; no line break, NUL or "
                                       "other control character).")


# =====================================================================================
# 2. Their JSON
# =====================================================================================


def retry_json(terms: RetryTerms, settings: DeliveryConfig) -> dict[str, Any]:
    """A partner's retry policy as the API shows it: what each attempt gets, and ``own``, the
    settings that are the partner's own (the rest are the server's)."""
    base, ceiling = (None, None) if terms.schedule else _backoff(terms, settings)
    return {"timeout_s": timeout_s(terms, settings), "max_attempts": _attempts(terms, settings),
            "base_s": base, "max_s": ceiling, "schedule": list(terms.schedule) if terms.schedule else None,
            "own": own_settings(terms)}


def own_settings(terms: RetryTerms) -> list[str]:
    return [name for name in RETRY_FIELDS if getattr(terms, name) is not None]


def own_terms_json(terms: RetryTerms) -> dict[str, Any] | None:
    """The partner's own settings alone (the audit trail's record, and the stored column); None: none."""
    own = {name: getattr(terms, name) for name in own_settings(terms)}
    if "schedule" in own:
        own["schedule"] = list(own["schedule"])
    return own or None


def headers_json(headers: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    """The extra headers as the API shows them: each name, and a hint that tells two values apart
    without giving either away (its length, and its first 4 characters when it has 24 or more)."""
    return [{"name": name, "hint": hint(value)} for name, value in headers]


def hint(value: str) -> str:
    return f"{value[:4]}… ({len(value)} characters)" if len(value) >= 24 else f"{len(value)} characters"


def headers_audit(before: tuple[tuple[str, str], ...], after: tuple[tuple[str, str], ...]) -> dict[str, list[str]]:
    """What a change did to the extra headers, for the audit trail: names only, never a value."""
    old, new = dict(before), dict(after)
    return {"set": sorted(n for n in new if old.get(n) != new[n]), "removed": sorted(n for n in old if n not in new)}


# =====================================================================================
# 3. What a delivery uses
# =====================================================================================


def timeout_s(terms: RetryTerms | None, settings: DeliveryConfig) -> float:
    """An attempt's whole deadline (lookup, connect, answer)."""
    return terms.timeout_s if terms is not None and terms.timeout_s is not None else settings.timeout_s


def max_attempts(partner: Partner | None, settings: DeliveryConfig) -> int:
    """How many attempts a new delivery to ``partner`` gets (a publish, a replay, a recover)."""
    return _attempts(partner.retry if partner is not None else RetryTerms(), settings)


def _attempts(terms: RetryTerms, settings: DeliveryConfig) -> int:
    return terms.max_attempts if terms.max_attempts is not None else settings.max_attempts


def _backoff(terms: RetryTerms, settings: DeliveryConfig) -> tuple[float, float]:
    return (terms.base_s if terms.base_s is not None else settings.backoff_base_s,
            terms.max_s if terms.max_s is not None else settings.backoff_max_s)


def lease_s(settings: DeliverySettings, longest_own_timeout_s: float) -> float:
    """How long a claim holds its rows: ``DeliverySettings.lease_s``, or longer when a partner's own
    timeout is longer than the server's (an attempt must never outlive its lease: it would be sent twice)."""
    return max(settings.lease_s, 2 * longest_own_timeout_s + 10)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (from 1).

    Exponential (base, 2·base, 4·base, …, capped at ``max_s``) with "equal jitter":
    a random point in the upper half, so retries of many deliveries that failed
    together spread out, yet none comes back at once.
    """
    delay = min(max_s, base_s * 2 ** (attempt - 1))
    return delay / 2 + rng.uniform(0, delay / 2)


def wait_after(attempt: int, of: int, terms: RetryTerms | None, settings: DeliveryConfig,
               rng: random.Random) -> tuple[float, str]:
    """The wait after failed attempt ``attempt`` of ``of``, and why, in the trace's words.

    A partner's own ``schedule`` is followed exactly, without jitter: the partner asked for those
    times (past its last wait, for an attempt given by hand, the last wait again). A backoff is
    the server's, or the partner's own ``base_s``/``max_s``, with equal jitter."""
    terms = terms or RetryTerms()
    if terms.schedule:
        wait = terms.schedule[min(attempt, len(terms.schedule)) - 1]
        waits = ", ".join(f"{w:g}" for w in terms.schedule)
        return wait, (f"the partner's own schedule after attempt {attempt} of {of}: {wait:g} s "
                      f"(its waits: {waits} s)")
    base, ceiling = _backoff(terms, settings)
    delay = backoff_delay(attempt, base, ceiling, rng)
    top = min(ceiling, base * 2 ** (attempt - 1))
    whose = "the partner's own: " if terms.base_s is not None or terms.max_s is not None else ""
    return delay, (f"backoff after attempt {attempt} of {of}: {top / 2:g}-{top:g} s ({whose}base {base:g} s doubled "
                   f"per attempt, at most {ceiling:g} s), drawn {delay:.1f} s")


def header_lines(headers: tuple[tuple[str, str], ...]) -> list[str]:
    """The extra headers as lines of a request's fixed head (``sender.plan_route``)."""
    return [f"{name}: {value}" for name, value in headers]

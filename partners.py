"""What a partner's fields may hold.

Each check takes a value from a request body and returns what the store keeps, or raises the
``422 invalid_field`` that names the field and says what to send instead (a ``403`` for a change
of status the caller may not make). Registration and ``PATCH /partners/{id}`` use the same checks,
and publishing uses ``check_channels`` for an event's channels. Who may set a partner's audience
(``check_audience_setter``) and its status (``check_status_change``) is decided here too.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import targets
from config import SecurityConfig
from models import Partner
from web import ApiError, invalid

if TYPE_CHECKING:
    from store import Store

logger = logging.getLogger("webhookd")


async def check_webhook_url(url: Any, security: SecurityConfig) -> str:
    """A partner's URL: at most 2048 characters, no spaces, and ``targets.parse_target``'s rule
    (http(s), a host, no user:password@, an allowed port); unless private targets are allowed,
    a host that resolves only to public addresses. The sender checks the same before sending."""
    if not isinstance(url, str) or not url:
        raise invalid("webhook_url", "must be a non-empty string like 'https://example.com/webhooks'.")
    if len(url) > 2048:
        raise invalid("webhook_url", "must be at most 2048 characters long.")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise invalid("webhook_url", "must not contain spaces or control characters.")
    try:
        target = targets.parse_target(url, security.allowed_ports)
    except (targets.BadURL, targets.TargetRefused) as exc:
        raise invalid("webhook_url", str(exc)) from None
    if not security.allow_private_targets:
        try:
            await targets.resolve_target_async(target.host, target.port, False)
        except targets.TargetRefused as exc:
            raise invalid("webhook_url", f"must point at a public address: {exc}.") from None
        except TimeoutError:
            raise invalid("webhook_url", f"has a host whose DNS did not answer in time: {target.host!r}.") from None
        except OSError:
            raise invalid("webhook_url", f"has a host that does not resolve: {target.host!r}.") from None
    return url


def check_events(events: Any, catalog: dict[str, dict[str, str]], kept: tuple[str, ...] = ()) -> list[str]:
    """Event types to subscribe to: each in the catalog, or among ``kept`` — the partner's
    subscriptions now, which may name a type since removed from the catalog (a stale one; a PATCH
    that leaves it in place is not an error)."""
    valid = ", ".join(sorted(catalog))
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise invalid("events", f"must be a non-empty list of event types. Valid types: {valid}.")
    for event_type in events:
        if event_type not in catalog and event_type not in kept:
            raise invalid("events", f"has the unknown event type {event_type[:100]!r}. Valid types: {valid}.")
    return sorted(set(events))


def stale_subscriptions(partner: Partner, catalog: dict[str, dict[str, str]]) -> list[str]:
    """The partner's subscriptions to event types no longer in the catalog: nothing is published
    to them any more. Shown in ``GET /partners/{id}`` and logged at start-up."""
    return [e for e in partner.events if e not in catalog]


def log_stale_subscriptions(store: Store, catalog: dict[str, dict[str, str]]) -> None:
    for partner in store.all_partners():
        if stale := stale_subscriptions(partner, catalog):
            logger.warning("partner %s is subscribed to %s, no longer in the event catalog ([events] in the "
                           "config): nothing is published to them. Add them back, or PATCH the partner's events.",
                           partner.id, ", ".join(stale))


def check_max_rate(rate: Any) -> float | None:
    """A partner's pace: attempts started per second (at most 10,000), or null for none."""
    if rate is None:
        return None
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.01 <= rate <= 10_000:
        raise invalid("max_rate_per_s", "must be a number of requests per second from 0.01 to 10000, or null.")
    return float(rate)


EMAIL = re.compile(r"[^@\s]+@[^@\s.]+(\.[^@\s.]+)+")


def check_contact_email(email: Any) -> str | None:
    """Whom the operator writes to: an address like name@example.com (at most 254 characters), or
    null for none. Only its shape is checked; nothing is sent to it."""
    if email is None:
        return None
    if not isinstance(email, str) or len(email) > 254 or not EMAIL.fullmatch(email) \
            or any(ord(c) < 32 or ord(c) == 127 for c in email):
        raise invalid("contact_email", "must be an email address like ops@example.com (at most 254 characters), "
                                       "or null.")
    return email


CHANNEL = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


def check_channels(channels: Any, field: str = "channels", at_least: int = 0, at_most: int = 50) -> list[str]:
    """Channel names, like ``tour_123`` or ``operator:acme``: letters, digits and ``_.:-``, 1-100
    characters each."""
    if not isinstance(channels, list) or not at_least <= len(channels) <= at_most \
            or not all(isinstance(c, str) and CHANNEL.fullmatch(c) for c in channels):
        raise invalid(field, f"must be a list of {at_least} to {at_most} channel names, each 1-100 letters, digits "
                             "or _ . : - (like \"tour_123\").")
    return sorted(set(channels))


def check_filter(payload_filter: Any) -> dict[str, list[Any]]:
    """A partner's payload filter: ``{"field": value or [values]}`` on top-level payload fields, at
    most 20 fields and 100 values each; values are strings, numbers or booleans. An event reaches the
    partner only if each field is one of its values (``Partner.accepts``). ``{}`` or null: none."""
    if payload_filter is None:
        return {}
    if not isinstance(payload_filter, dict) or len(payload_filter) > 20:
        raise invalid("filter", "must be an object of at most 20 payload fields, like {\"currency\": [\"EUR\"]}, "
                                "or null.")
    normal = {}
    for name, values in payload_filter.items():
        values = values if isinstance(values, list) else [values]
        if not name or len(name) > 100 or not name.isprintable():
            raise invalid("filter", f"has a field name that is not 1-100 printable characters: {name[:100]!r}.")
        if not 1 <= len(values) <= 100 or not all(isinstance(v, (str, int, float)) for v in values) \
                or any(isinstance(v, str) and len(v) > 500 for v in values):
            raise invalid("filter", f"field {name[:100]!r} must be a string, number or boolean, or a list of 1 to "
                                    "100 of them (strings up to 500 characters).")
        normal[name] = values
    return normal


# Who sets a partner's audience. Beyond its event types, ``channels`` and ``filter`` decide which
# events reach a partner: one more channel is one more audience (operator B's bookings), a filter
# removed lets in everything it kept out. That is the admin's decision alone, at registration and
# with PATCH. A partner's own key (and an anonymous open registration) reads them and never sets
# them, not even to narrow them: one rule, with no comparison of old and new values to get wrong.
# A partner that wants fewer events asks the operator, or ignores what it does not need.
AUDIENCE_FIELDS = ("channels", "filter")


def check_audience_setter(body: dict[str, Any], caller: Any) -> None:
    """The 403 for ``channels`` or ``filter`` sent by anyone but the admin (``caller`` None: an
    anonymous open registration)."""
    if caller is not None and caller.is_admin:
        return
    for field in AUDIENCE_FIELDS:
        if field in body:
            raise ApiError(403, "audience_admin_only",
                           f"'{field}' is set by the admin only: a partner's channels and filter decide which "
                           "events reach it, and that is the operator's decision. Leave it out of the request, "
                           "and ask the operator to change it.")


def check_ordering(ordering: Any) -> str:
    if ordering not in ("concurrent", "fifo"):
        raise invalid("ordering", "must be 'concurrent' (the default: many attempts at once) or 'fifo' (one at a "
                                  "time, in publish order; a failing delivery holds the ones behind it).")
    return ordering


def check_partner_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise invalid("partner_name", "must be a non-empty string.")
    if len(name) > 200:
        raise invalid("partner_name", "must be at most 200 characters long.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise invalid("partner_name", "must not contain control characters.")
    return name.strip()


# Who may change a partner's status. The admin: anything among active, paused, suspended (with a
# reason). The partner itself: pause and resume, and re-enable what the delivery loop disabled (its
# endpoint, its fix); never out of or into "suspended", which is the admin's to decide.
PARTNER_MAY = {("active", "paused"), ("paused", "active"), ("disabled", "active"), ("active", "active"),
               ("paused", "paused")}


def check_status_change(partner: Partner, body: dict[str, Any], caller: Any) -> str | None:
    """The suspension reason to store (None unless suspending), or the 4xx that says why not:
    a ``status`` (``null`` included) that is not one of the three, a ``reason`` without
    ``"suspended"``, a change the caller may not make."""
    status, reason = body.get("status"), body.get("reason")
    if "reason" in body and status != "suspended":
        raise invalid("reason", "goes with \"status\": \"suspended\" only.")
    if "status" not in body:
        return None
    if status not in ("active", "paused", "suspended"):
        raise invalid("status", "must be 'active', 'paused' or (admin only) 'suspended'.")
    if not caller.is_admin and (partner.status, status) not in PARTNER_MAY:
        if partner.status == "suspended":  # the access layer refuses a suspended key's writes first; same answer
            raise ApiError(403, "partner_suspended", f"This partner was suspended by the admin "
                                                     f"({partner.suspended_reason}); only the admin can lift it.")
        raise ApiError(403, "admin_only", f"Only the admin can change a partner from {partner.status!r} to {status!r}.")
    if status != "suspended":
        return None
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise invalid("reason", "must say why, in 1 to 500 characters, when suspending a partner.")
    return reason.strip()

"""Time windows: ``?since=`` and ``?until=`` on the list endpoints (``GET /deliveries``,
``/inbound``, ``/audit``), read the same way everywhere.

A time is ISO 8601 with ``Z`` or an offset (``2026-12-07T09:30:00Z``, ``2026-12-07T10:30+01:00``),
a date alone (midnight UTC: ``2026-12-07``), or Unix seconds (``1796635800``). A date and time
without a zone is refused rather than guessed. ``since`` is inclusive, ``until`` exclusive:
``[since, until)``, so one day's window ends where the next one starts. ``since`` after
``until`` is refused; both equal is an empty window.

How a window is read: every row id begins with its creation time (``web.new_id``: the
milliseconds in 9 base-36 digits), so a window is also a range of ids. The store asks for both
(``id_range``): the id range lets the index each filter already reads through (one ending in
the id) start at the window's end and stop at its start, and the time column then decides
exactly. The id range is widened by ``ID_SLACK_S`` each side, as an id is made a moment
after the time its row records (a publish waits for its commit).

Every route reads its window with ``window_of`` (a 422 naming the parameter when it is wrong);
the store is handed the ``Window`` and asks it for its ``id_range``.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from starlette.requests import Request

from web import invalid

ID_SLACK_S = 600.0   # an id's time may differ from its row's time by this much (a commit's wait, at most)
_UNIX = re.compile(r"[0-9]{1,11}(\.[0-9]{1,6})?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_ZONED = re.compile(r".*[T ].*(Z|z|[+-][0-9]{2}(:?[0-9]{2})?)")
_BASE36 = string.digits + string.ascii_lowercase
EXAMPLES = "ISO 8601 with Z or an offset (2026-12-07T09:30:00Z), a date (2026-12-07, midnight UTC) or Unix seconds"


class WindowError(ValueError):
    """A ``since`` or ``until`` that is not a time, or a window that ends before it starts."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name
        self.message = message


@dataclass(frozen=True)
class Window:
    """``[since, until)`` in Unix seconds; None: open on that side."""

    since: float | None = None
    until: float | None = None

    def __bool__(self) -> bool:
        return self.since is not None or self.until is not None

    def id_range(self, prefix: str) -> dict[str, str]:
        """The ids (of ``prefix``) a row of the window can have, widened by ``ID_SLACK_S``:
        ``since_id`` (inclusive) and ``until_id`` (exclusive), for the sides given."""
        ids = {}
        if self.since is not None:
            ids["since_id"] = prefix + time_digits(self.since - ID_SLACK_S)
        if self.until is not None:
            ids["until_id"] = prefix + time_digits(self.until + ID_SLACK_S)
        return ids


def parse_time(name: str, text: str) -> float:
    """One ``since``/``until`` value as Unix seconds (``WindowError`` naming ``name`` otherwise)."""
    text = text.strip()
    if _UNIX.fullmatch(text):
        return float(text)
    if _DATE.fullmatch(text):
        moment = _iso(name, text + "T00:00:00+00:00", text)
    elif _ZONED.fullmatch(text):
        moment = _iso(name, text[:-1] + "+00:00" if text[-1] in "Zz" else text, text)
    elif _iso_or_none(text) is not None:
        raise WindowError(name, f"has no time zone ({text[:40]!r}): add Z for UTC or an offset like +01:00.")
    else:
        raise WindowError(name, f"is not a time ({text[:40]!r}). Give {EXAMPLES}.")
    return moment.timestamp()


def window_from(params: Mapping[str, str]) -> Window:
    """The window of a query's ``since`` and ``until`` (either may be absent)."""
    since = parse_time("since", params["since"]) if params.get("since") is not None else None
    until = parse_time("until", params["until"]) if params.get("until") is not None else None
    if since is not None and until is not None and since > until:
        raise WindowError("until", "must not be before 'since': the window is [since, until).")
    return Window(since, until)


def window_of(request: Request) -> Window:
    """The request's ``?since=&until=`` window; a 422 naming the parameter when it is wrong."""
    try:
        return window_from(request.query_params)
    except WindowError as wrong:
        raise invalid(wrong.name, wrong.message) from None


def time_digits(t: float) -> str:
    """The 9 base-36 digits of the millisecond ``t`` falls in, as an id begins (``web.new_id``)."""
    number = min(max(math.floor(t * 1000), 0), 36 ** 9 - 1)
    digits = []
    for _ in range(9):
        number, digit = divmod(number, 36)
        digits.append(_BASE36[digit])
    return "".join(reversed(digits))


def _iso(name: str, text: str, given: str) -> datetime:
    moment = _iso_or_none(text)
    if moment is None:
        raise WindowError(name, f"is not a time ({given[:40]!r}). Give {EXAMPLES}.")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _iso_or_none(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None

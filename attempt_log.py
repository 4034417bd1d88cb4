"""What the log says of delivery attempts: every failure, and the successes summed up.

As production servers do, a line per attempt is kept for what an operator acts on, and the
steady stream of successes is counted instead:

* ``WARNING``, one line per attempt: an attempt that failed (a timeout, a refused connection,
  a non-2xx answer, …), with the delivery, event, partner, status, error, duration and the
  delivery's next state; and an attempt whose result the store did not take (except one
  cancelled while in flight, an ``INFO`` line: the operator asked for it);
* ``INFO``, one line every ``summary_every_s`` (10 s) while attempts succeed: how many were
  delivered, to how many partners, their mean and slowest durations;
* ``DEBUG``, one line per successful attempt, as for a failure (``server.log_level = "debug"``).

A line per successful attempt at ``INFO`` cost about a twentieth of a delivery's CPU (the
recorder formats and writes each one while it holds the GIL); the counts cost next to nothing.
With ``server.log_format = "json"`` every field is also a key of the line's object.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from models import Outcome

logger = logging.getLogger("webhookd.delivery")

SUMMARY_EVERY_S = 10.0
CANCELLED_IN_FLIGHT = "the delivery was cancelled while in flight (cancel-pending, or its partner deleted)"


class AttemptLog:
    """The log lines of attempts, written by the recorder thread alone (no lock needed)."""

    def __init__(self, summary_every_s: float = SUMMARY_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.summary_every_s = summary_every_s
        self.clock = clock
        self._since = clock()
        self._delivered = 0
        self._partners: set[str] = set()
        self._total_ms = 0
        self._slowest_ms = 0

    def attempt(self, o: Outcome, not_recorded: str | None) -> None:
        """One attempt as the store took it (``not_recorded``: why it did not, or None)."""
        a = o.attempt
        if not_recorded is None and a.error is None:
            self._delivered += 1
            self._partners.add(o.partner_id)
            self._total_ms += a.duration_ms
            self._slowest_ms = max(self._slowest_ms, a.duration_ms)
            if logger.isEnabledFor(logging.DEBUG):
                self._line(logging.DEBUG, o, None)
            return
        self._line(logging.INFO if not_recorded == CANCELLED_IN_FLIGHT else logging.WARNING, o, not_recorded)

    def _line(self, level: int, o: Outcome, not_recorded: str | None) -> None:
        a = o.attempt
        result = o.state if not_recorded is None else f"{o.state} but dropped: {not_recorded}"
        logger.log(level, "delivery %s event=%s partner=%s attempt=%d status=%s error=%s duration_ms=%d -> %s",
                   o.delivery_id, o.event_id, o.partner_id, a.attempt, a.status_code, a.error, a.duration_ms,
                   result, extra={"delivery_id": o.delivery_id, "event_id": o.event_id, "partner_id": o.partner_id,
                                  "attempt": a.attempt, "status_code": a.status_code, "error": a.error,
                                  "duration_ms": a.duration_ms, "state": o.state, "recorded": not_recorded is None})

    def summarise_if_due(self, force: bool = False) -> None:
        """The ``INFO`` line of the successes since the last one, once ``summary_every_s`` has
        passed (or now, with ``force``: the recorder is stopping). Nothing when none succeeded."""
        now = self.clock()
        if not force and now - self._since < self.summary_every_s:
            return
        if self._delivered:
            window = now - self._since
            logger.info("delivered %d attempts to %d partners in the last %.0f s (mean %.0f ms, slowest %d ms); "
                        "failed attempts are logged one by one", self._delivered, len(self._partners), window,
                        self._total_ms / self._delivered, self._slowest_ms,
                        extra={"delivered": self._delivered, "partners": len(self._partners),
                               "window_s": round(window, 1), "mean_ms": round(self._total_ms / self._delivered, 1),
                               "slowest_ms": self._slowest_ms})
        self._since = now
        self._delivered = self._total_ms = self._slowest_ms = 0
        self._partners = set()

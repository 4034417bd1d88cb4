"""Publishes first, and slow but healthy partners keep up: two bounds the delivery loop adapts as it
runs — how many attempts may be in flight in all, by how long publishes wait (``PublishFirst``),
and how many to one partner, by how it answers (``PartnerLimits``) — and the GIL, which the
sender's and recorder's threads leave to a publish waiting for its commit (``GiveWay``).

Everything Python in webhookd shares one GIL, and SQLite one writer: a delivery storm — thousands
of attempts a second, their claims and their results — competes with ``POST /events`` for both.
The company's checkout calls that route, so it must win. ``PublishFirst`` watches how long each
publish waits for its commit (from its request's queueing to the route taking the answer up again:
the writer lock, the group commit's queue, the GIL) and moves the number of attempts the loop may
hold in flight between a floor and ``delivery.concurrency``:

* every ``WINDOW_S`` it takes the 90th percentile of the window's waits, less what a publish waits
  with nothing in the way (the lowest wait seen lately, rising only slowly: the disk's flush, which
  no bound changes);
* above ``EXCESS_TARGET_S`` (20 ms), deliveries are in the way: the bound falls to 90% of what is
  in flight (never below a quarter of ``concurrency``);
* below half of it, or with no publish at all, the bound climbs back by an eighth (at least 10)
  while the loop uses it, up to ``delivery.concurrency``.

So with nobody publishing, or publishes that do not wait, deliveries get the whole of
``concurrency``; under a storm that slows the API they give way within a few windows, without an
operator touching a knob. ``/stats`` (``delivery``) and ``/metrics`` show the bound and the wait.

Why this gently: on a 2-core machine, (d) at 100 ms (docs/performance.md) had ``POST /events`` p99
at ~41 ms with no bound, ~37 ms with this rule at 3% of the rate, and 28 ms with an 8 ms target at
half the rate (the bound at its floor). And a publish also waits when other programs take the
CPU: then fewer deliveries do not make it faster, and a sharp rule sinks to its floor for nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from metrics import Metrics

WINDOW_S = 0.5             # the waits of this long are judged together
CUT = 0.9                  # a window of waits past the target leaves this share of what is in flight
EXCESS_TARGET_S = 0.020    # what deliveries may add to a publish's wait, at the 90th percentile
FLOOR_SHARE = 4            # the bound never falls below concurrency / FLOOR_SHARE...
FLOOR_MIN = 50             # ...nor below this (nor above concurrency)
WAITS_KEPT = 10_000        # waits kept per window, at most
USUAL_RISE = 0.01          # the share of the way a higher lowest wait moves the usual one, per window


class PublishFirst:
    """The in-flight bound (``bound``). Its two calls come from the server's event loop only (the
    routes' ``publish_waited``, the delivery loop's ``adjust``): no lock."""

    def __init__(self, ceiling: int, clock: Callable[[], float] = time.monotonic):
        self.ceiling = ceiling
        self.floor = min(ceiling, max(FLOOR_MIN, ceiling // FLOOR_SHARE))
        self.bound = ceiling
        self.clock = clock
        self.wait_p90_s = 0.0              # the last window's 90th percentile
        self.usual_s: float | None = None  # what a publish waits with nothing in the way, lately
        self.lowered = 0                   # how many times the bound was lowered (a counter, for /metrics)
        self._waits: list[float] = []
        self._window_ends = clock() + WINDOW_S

    def publish_waited(self, seconds: float) -> None:
        """A publish waited ``seconds`` for its commit."""
        if len(self._waits) < WAITS_KEPT:
            self._waits.append(seconds)

    def adjust(self, in_flight: int) -> int:
        """The bound for now, judged again once a window has passed; ``in_flight`` is what the loop holds."""
        now = self.clock()
        if now < self._window_ends:
            return self.bound
        self._window_ends = now + WINDOW_S
        waits, self._waits = sorted(self._waits), []
        excess = 0.0
        if waits:
            lowest = waits[0]
            # The usual wait follows a lower one at once and a higher one slowly (a disk that got
            # slower), over a minute or so: a storm of a few seconds does not become the usual.
            self.usual_s = lowest if self.usual_s is None or lowest < self.usual_s else \
                self.usual_s + (lowest - self.usual_s) * USUAL_RISE
            self.wait_p90_s = waits[int(0.9 * (len(waits) - 1))]
            excess = self.wait_p90_s - self.usual_s
        if excess > EXCESS_TARGET_S:
            lowered = max(self.floor, int(min(self.bound, in_flight) * CUT))
            if lowered < self.bound:
                self.bound = lowered
                self.lowered += 1
        elif excess < EXCESS_TARGET_S / 2 and in_flight >= self.bound * 0.8:
            self.bound = min(self.ceiling, self.bound + max(10, self.bound // 8))
        return self.bound

    def describe(self) -> dict[str, Any]:
        """What ``/stats`` shows under ``delivery``."""
        return {"in_flight_bound": self.bound, "in_flight_max": self.ceiling, "in_flight_floor": self.floor,
                "publish_wait_p90_ms": round(self.wait_p90_s * 1000, 1),
                "publish_wait_usual_ms": round((self.usual_s or 0.0) * 1000, 1)}

    def add_gauges(self, metrics: Metrics) -> None:
        """The bound and the wait in ``/metrics``."""
        metrics.gauge("webhookd_deliveries_in_flight_bound", "Attempts the delivery loop may hold in flight now "
                      "(delivery.concurrency, less while publishes wait on deliveries).",
                      lambda: {(): float(self.bound)})
        metrics.gauge("webhookd_publish_wait_seconds", "90th percentile of how long POST /events waited for its "
                      "commit, over the last half second with publishes.", lambda: {(): self.wait_p90_s})


# --- Slow but healthy partners keep up ---------------------------------------------------------

PARTNER_START = 25   # a partner's in-flight bound to begin with (and after a restart)


class PartnerLimits:
    """Each partner's in-flight bound, adapted to how it answers (the way TCP opens its window).

    A partner starts at ``PARTNER_START`` attempts in flight. Each attempt that succeeds while the
    partner used (nearly) all of its bound raises the bound by two, so it triples every round trip
    while the partner keeps answering 2xx: a partner 2 s away offered 200 deliveries a second
    needs 400 in flight, and has them after three round trips. An attempt that fails for a reason
    of load — a timeout, a refused or reset connection, a 5xx, a 429 — halves it (at least 1): a
    partner that struggles gets fewer, and a black hole holds few of the loop's places. Never
    above ``delivery.per_partner_concurrency``; the loop's own bound and a partner's
    ``max_rate_per_s`` still apply on top. Written from the sender's thread, read by the loop's.
    """

    GROW_WHEN_USING = 0.8  # a success grows the bound only while the partner used this share of it
    GROWTH = 2             # what each such success adds: the bound triples per round trip

    def __init__(self, ceiling: int):
        self.ceiling = ceiling
        self.start = min(PARTNER_START, ceiling)
        self._limits: dict[str, float] = {}
        self._lock = threading.Lock()

    def limit(self, partner_id: str) -> int:
        return int(self._limits.get(partner_id, self.start))

    def changed(self) -> dict[str, int]:
        """The partners whose bound is not the starting one."""
        with self._lock:
            return {p: int(limit) for p, limit in self._limits.items()}

    def finished(self, partner_id: str, error: str | None, status: int | None, busy: int) -> None:
        """One attempt of the partner ended (``error`` None: a 2xx) while ``busy`` of its attempts were out."""
        with self._lock:
            limit = self._limits.get(partner_id, self.start)
            if error is None:
                if busy >= limit * self.GROW_WHEN_USING:
                    limit = min(self.ceiling, limit + self.GROWTH)
            elif status is None or status >= 500 or status in (408, 429):
                limit = max(1.0, limit / 2)
            if limit == self.start:
                self._limits.pop(partner_id, None)
            else:
                self._limits[partner_id] = limit


# --- The GIL: publishes first ------------------------------------------------------------------

GIVE_WAY_AT_MOST_S = 0.002  # a thread that gives way waits this long at most for the publishes...
RUN_AT_LEAST_S = 0.002      # ...then runs at least this long before it gives way again


class GiveWay:
    """While a publish waits for its commit, the sender's and the recorder's threads step aside.

    A publish needs the GIL three times after its request is read — the group-commit thread to
    write it, twice, and the event loop to answer — and each time it competes with the sender
    and the recorder, which want it all the time under load: each hand-off can cost the
    interpreter's switch interval (5 ms), and a few of them were most of a ``POST /events``'s
    time in bench (d). So a route's wait for its commit is marked (``waiting()``, in
    ``web_commit.group_written``), and those two threads look at safe points (``Turn.give_way``:
    an attempt starting or answered, a batch of results to write): while a publish waits, they
    block on an event — holding nothing, the GIL released — until it is answered, at most
    ``GIVE_WAY_AT_MOST_S``, then run at least ``RUN_AT_LEAST_S`` before they step aside again.
    A stream of publishes therefore slows deliveries by half at most, never stops them. Measured
    in (d) at 100 ms (docs/performance.md): ``POST /events`` p99 from ~28 ms to ~15 ms at the same
    delivery rate; the throughput row's rate and CPU per delivery did not move.

    On SQLite only (``enabled``): on PostgreSQL a commit's wait is mostly the database server's
    round trips and flush, which no thread of this process shortens by stepping aside, and the
    time the sender lost there cost (f) and (g) about 8% of their rate.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, at_most_s: float = GIVE_WAY_AT_MOST_S,
                 run_s: float = RUN_AT_LEAST_S, enabled: bool = True):
        self.clock, self.at_most_s, self.run_s, self.enabled = clock, at_most_s, run_s, enabled
        self.pending = 0                  # publishes waiting for their commit now
        self.times = 0                    # how many times a thread gave way (for /stats)
        self.seconds = 0.0                # ...and for how long in all
        self._answered = threading.Event()
        self._answered.set()
        self._lock = threading.Lock()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a route's wait for its commit (on the event loop: ``web_commit.group_written``)."""
        if not self.enabled:
            yield
            return
        with self._lock:
            self.pending += 1
            self._answered.clear()
        try:
            yield
        finally:
            with self._lock:
                self.pending -= 1
                if not self.pending:
                    self._answered.set()

    def turn(self) -> Turn:
        """What one thread consults (each thread its own: it remembers when it last gave way)."""
        return Turn(self)

    def describe(self) -> dict[str, Any]:
        """What ``/stats`` adds under ``delivery``."""
        return {"gave_way": self.times, "gave_way_ms": round(self.seconds * 1000, 1)}

    def add_gauges(self, metrics: Metrics) -> None:
        metrics.gauge("webhookd_deliveries_gave_way_seconds_total", "Time the sender's and recorder's threads "
                      "stepped aside for publishes waiting for their commit.", lambda: {(): self.seconds})


class Turn:
    """One thread's side of ``GiveWay``."""

    def __init__(self, gate: GiveWay):
        self.gate = gate
        self.times = 0                    # how many times this thread gave way
        self._runs_until = float("-inf")  # gave way lately: runs on until then

    def give_way(self) -> None:
        """Block while a publish waits for its commit (see ``GiveWay``); at once if none does."""
        gate = self.gate
        if not gate.pending:  # the common case costs one attribute read
            return
        began = gate.clock()
        if began < self._runs_until:
            return
        gate._answered.wait(gate.at_most_s)
        ended = gate.clock()
        self._runs_until = ended + gate.run_s
        self.times += 1
        with gate._lock:
            gate.times += 1
            gate.seconds += ended - began

"""Keeping bad partners in their lane: circuit breakers, failing streaks, the disable rule, pace.

The delivery loop asks two questions before each claim — how many more of this partner's
deliveries may start now? — and reports every attempt back:

* ``Breakers`` answers for the partner's health: a circuit that opens on sustained failure and
  probes one attempt at a time, ``Retry-After`` pauses, and when a failing streak (or a
  ``410 Gone``) disables the partner;
* ``Pacer`` answers for the partner's pace: ``max_rate_per_s``, and a slower pace for a while
  after a ``429``.

Both live in memory, guarded by a lock (the sender's thread reports, the loop asks); the failing
streak's start and the disabled state are also written to the store by the recorder.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from config import DeliverySettings
from models import Job
from store import DatabaseUnavailable

logger = logging.getLogger("webhookd.breakers")

if TYPE_CHECKING:
    from sender import Sent


@dataclass
class Health:
    """What the loop knows of one partner's endpoint: its failing streak and its circuit."""

    failures: int = 0                   # failed attempts in the current streak
    failing_since: float | None = None  # first failure of the streak (kept in the store)
    last_failure_at: float = 0.0
    opened_at: float | None = None      # when the circuit opened; None while it is closed
    probes_failed: int = 0              # failed probes since it opened: each doubles the pause
    open_until: float = 0.0             # claim nothing for this partner before this time
    reason: str | None = None           # why it is paused: "failures" or "retry_after"


class Breakers:
    """Per-partner circuit breakers, ``Retry-After`` pauses and the auto-disable rule.

    **A failing streak** is the partner's failed attempts with no success between them and
    no quiet spell longer than ``quiet_gap_s`` (a third of ``disable_after_s``, at least the
    retry schedule's longest wait): two isolated failures days apart are two streaks.

    **The circuit** opens on sustained failure: ``breaker_threshold`` failures in a streak
    that has lasted ``breaker_span_s`` — a burst of concurrent attempts failing within
    moments does not open it. Open: nothing is claimed until the pause ends. Half-open
    (the pause is over): one probe at a time; a success closes the circuit, a failure opens
    it again for twice as long, up to ``cooldown_max_s``. An operator's retry or recover
    probes at once (``probe_now``); making the partner active again forgets it all.

    **Disabled**: a streak that has lasted ``disable_after_s``, or a ``410 Gone``.
    """

    def __init__(self, settings: DeliverySettings, last_failure_of: Callable[[str], float | None] | None = None):
        """``last_failure_of(partner_id)``: the partner's latest failed attempt as the store
        knows it, to pick up a failing streak after a restart (it is asked once per partner)."""
        self.settings = settings
        self._last_failure_of = last_failure_of
        self._health: dict[str, Health] = {}
        self._streak_broken_at: dict[str, float] = {}  # last success or reset: older streaks are over
        self._lock = threading.Lock()

    @property
    def quiet_gap_s(self) -> float:
        s = self.settings
        return max(s.disable_after_s / 3, s.backoff_max_s, s.cooldown_max_s)

    def room(self, partner_id: str, busy: int, now: float) -> int:
        """How many more of this partner's deliveries may be claimed now."""
        with self._lock:
            health = self._health.get(partner_id)
        cap = self.settings.per_partner_concurrency - busy
        if health is None:
            return cap
        if now < health.open_until:
            return 0
        if health.opened_at is not None:
            return 1 if busy == 0 else 0  # half-open: one probe
        return cap

    def state(self, partner_id: str, now: float) -> str:
        """``closed``, ``open`` (paused) or ``half_open`` (probing)."""
        with self._lock:
            health = self._health.get(partner_id)
        if health is None:
            return "closed"
        if now < health.open_until:
            return "open"
        return "half_open" if health.opened_at is not None else "closed"

    def is_open(self, partner_id: str) -> bool:
        """Whether the circuit has opened on failures and not yet closed on a success (whatever
        the clock: open or half-open)."""
        with self._lock:
            health = self._health.get(partner_id)
            return health is not None and health.opened_at is not None

    def describe(self, partner_id: str, now: float) -> dict[str, Any]:
        """The circuit as the API shows it."""
        state = self.state(partner_id, now)
        with self._lock:
            health = self._health.get(partner_id) or Health()
        return {"state": state, "reason": health.reason if state != "closed" else None,
                "opened_at": int(health.opened_at) if health.opened_at is not None else None,
                "next_probe_at": int(math.ceil(health.open_until)) if state == "open" else None,
                "recent_failures": health.failures}

    def open_count(self, now: float) -> int:
        """Partners whose circuit is open or half-open now."""
        return sum(1 for p in self.constrained() if self.state(p, now) != "closed")

    def constrained(self) -> list[str]:
        with self._lock:
            return list(self._health)

    def paused_until(self, partner_id: str) -> float:
        """Until when nothing of this partner may be claimed (0: no pause). Recorded in the
        store when it grows, so that other processes on the same database pause too."""
        with self._lock:
            health = self._health.get(partner_id)
            return health.open_until if health is not None else 0.0

    def reopens_at(self, now: float) -> float | None:
        """The earliest future time a paused partner may be claimed again. (A pause that has
        ended is no reason to wake: the partner's due rows are.)"""
        with self._lock:
            times = [h.open_until for h in self._health.values() if h.open_until > now]
        return min(times) if times else None

    def forget(self, partner_id: str, now: float) -> None:
        """Start afresh (the partner was made active again by hand): the circuit closes, and
        a failure of an attempt that started before now cannot bring the old streak back."""
        with self._lock:
            self._health.pop(partner_id, None)
            self._streak_broken_at[partner_id] = now

    def probe_now(self, partner_id: str, now: float) -> None:
        """End an open circuit's pause now: the next claim sends one probe (an operator's retry)."""
        with self._lock:
            health = self._health.get(partner_id)
            if health is not None and health.open_until > now:
                health.open_until = now
                if health.opened_at is None:  # a Retry-After pause: simply over
                    health.reason = None

    def needs_history(self, job: Job, sent: Sent) -> bool:
        """Whether ``record`` will read the store (the partner's last failure, after a restart):
        the caller then records from a thread, not from an event loop."""
        with self._lock:
            known = job.partner_id in self._health
        return (sent.attempt.error is not None and job.partner_failing_since is not None
                and self._last_failure_of is not None and not known)

    def record(self, job: Job, sent: Sent, now: float) -> tuple[float | None, bool, str | None]:
        """Count one attempt. Returns (failing_since, whether it changed, reason to disable or None).

        When the partner's history is needed and the database cannot be read (it is restarting),
        this one failure is left out of the partner's streak and circuit, which stay as the store
        has them; the next failure reads the history again. The attempt itself is recorded all the
        same: its result never waits on this read."""
        restored_last_failure = None
        if self.needs_history(job, sent):
            try:
                restored_last_failure = self._last_failure_of(job.partner_id)  # a read: not under the lock
            except DatabaseUnavailable as exc:
                logger.warning("partner %s: its failing streak cannot be read now (%s); this failed attempt is "
                               "recorded, but not counted towards the streak", job.partner_id, exc)
                return job.partner_failing_since, False, None
        with self._lock:
            if sent.attempt.error is None:
                was = self._health.pop(job.partner_id, None)
                self._streak_broken_at[job.partner_id] = now
                return None, job.partner_failing_since is not None or was is not None, None
            health, changed = self._streak(job, now, restored_last_failure)
            health.failures += 1
            health.last_failure_at = now
            self._update_circuit(health, sent, now)
            reason = None
            if sent.attempt.status_code == 410:
                reason = "the endpoint answered 410 Gone"
            elif now - health.failing_since >= self.settings.disable_after_s:
                reason = f"every attempt failed for {int(now - health.failing_since)} s"
            if reason:
                self._health.pop(job.partner_id, None)
            return health.failing_since, changed, reason

    def _streak(self, job: Job, now: float, restored_last_failure: float | None) -> tuple[Health, bool]:
        """The partner's health with its streak brought up to ``now`` (under the lock)."""
        health = self._health.get(job.partner_id)
        changed = False
        if health is None:
            # A streak read with the job (from the store) may predate a success or a reset
            # recorded since its claim. Restored after a restart, it goes on from the latest
            # failed attempt the store knows (else from its start: the quiet-spell rule then
            # ends it rather than extend it).
            since = job.partner_failing_since
            if since is not None and since < self._streak_broken_at.get(job.partner_id, 0.0):
                since = None
            last = max(since or 0.0, restored_last_failure or 0.0)
            health = self._health[job.partner_id] = Health(failing_since=since, last_failure_at=last)
            changed = since != job.partner_failing_since
        if health.failing_since is not None and now - health.last_failure_at > self.quiet_gap_s:
            health.failing_since, health.failures = None, 0  # a quiet spell ended the old streak
        if health.failing_since is None:
            health.failing_since, changed = now, True
        return health, changed

    def _update_circuit(self, health: Health, sent: Sent, now: float) -> None:
        s = self.settings
        if health.opened_at is not None and sent.attempt.started_at >= health.opened_at:
            health.probes_failed += 1  # a probe (or an attempt made after opening) failed
            health.open_until = max(health.open_until, now + self._pause(health.probes_failed))
            health.reason = "failures"
        elif (health.opened_at is None and health.failures >= s.breaker_threshold
              and now - health.failing_since >= s.breaker_span_s):
            health.opened_at, health.probes_failed, health.reason = now, 0, "failures"
            health.open_until = max(health.open_until, now + self._pause(0))
        if sent.retry_after_s:
            health.open_until = max(health.open_until, now + sent.retry_after_s)
            if health.opened_at is None:
                health.reason = "retry_after"

    def _pause(self, probes_failed: int) -> float:
        s = self.settings
        return min(s.cooldown_max_s, s.cooldown_s * 2 ** min(probes_failed, 30))


class Pacer:
    """Per-partner pace: at most ``max_rate_per_s`` attempts started per second, and a slower
    pace for a while after the partner answers ``429 Too Many Requests``.

    A paced partner's attempts start at least ``1 / rate`` seconds apart, so no second holds
    more than ``rate + 1`` starts: the loop claims one of its jobs at a time, only once its
    next start is due, and the sender marks the start (``start``) just before it sends — or,
    if the pace was lowered since the claim, gives the job back. The next start is always
    the last one plus ``1 / rate`` at the rate in force now, so raising a pace takes effect
    at once. Retries, recoveries and manual retries all go through that claim, so the pace
    holds for every attempt. A ``429`` halves the pace (the partner's own, or the rate it was
    just getting) for ``SLOWED_S``; a ``Retry-After`` pause (the breaker's) still comes first.
    """

    SLOWED_S = 60.0
    MIN_RATE = 0.1   # a 429 never slows a partner below one attempt every ten seconds
    SLACK_S = 0.005  # a start this close to its slot is on time

    def __init__(self) -> None:
        self._last_start: dict[str, float] = {}
        self._waiting: dict[str, set[str]] = collections.defaultdict(set)  # partner -> claimed, not started
        self._slowed: dict[str, tuple[float, float]] = {}  # partner -> (rate, until)
        self._starts: dict[str, collections.deque[float]] = {}  # the last second's starts
        self._lock = threading.Lock()

    def rate(self, partner_id: str, configured: float | None, now: float) -> float | None:
        """The pace in force now: the partner's own, or lower while a 429 slows it."""
        with self._lock:
            slowed = self._slowed.get(partner_id)
        if slowed is None or slowed[1] <= now:
            return configured
        return slowed[0] if configured is None else min(configured, slowed[0])

    def paced(self, now: float) -> list[str]:
        """Partners slowed by a 429 now (those with a pace of their own are known to the caller)."""
        with self._lock:
            return [p for p, (_, until) in self._slowed.items() if until > now]

    def next_start(self, partner_id: str, rate: float) -> float:
        """When this partner's next attempt may start, at ``rate``."""
        with self._lock:
            last = self._last_start.get(partner_id)
        return float("-inf") if last is None else last + 1 / rate

    def room(self, partner_id: str, rate: float | None, now: float) -> int | None:
        """1 if one job of this paced partner may be claimed now, else 0; None without a pace."""
        if rate is None:
            return None
        with self._lock:
            waiting = bool(self._waiting[partner_id])
        return 0 if waiting or now < self.next_start(partner_id, rate) - self.SLACK_S else 1

    def claimed(self, job: Job) -> None:
        with self._lock:
            self._waiting[job.partner_id].add(job.delivery_id)

    def done(self, job: Job) -> None:
        """The job started, or was given up: it no longer holds its partner's next claim."""
        with self._lock:
            self._waiting[job.partner_id].discard(job.delivery_id)

    def start(self, job: Job, rate: float | None, now: float) -> bool:
        """Mark the start of ``job`` now, if its partner's pace allows it; False if the pace was
        lowered since the claim (a 429 meanwhile) and the job must wait: the caller gives it back."""
        self.done(job)
        if rate is not None and now < self.next_start(job.partner_id, rate) - self.SLACK_S:
            return False
        with self._lock:
            self._last_start[job.partner_id] = now
            starts = self._starts.setdefault(job.partner_id, collections.deque())
            starts.append(now)
            while starts and starts[0] < now - 1.0:
                starts.popleft()
        return True

    def slow_down(self, partner_id: str, rate: float | None, now: float) -> None:
        """The partner answered 429: halve its pace for ``SLOWED_S``."""
        with self._lock:
            recent = len([t for t in self._starts.get(partner_id, ()) if t >= now - 1.0])
            current = rate if rate is not None else max(1.0, float(recent))
            self._slowed[partner_id] = (max(self.MIN_RATE, current / 2), now + self.SLOWED_S)

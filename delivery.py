"""The delivery loop: claim due deliveries, hand them to sender threads, record the results.

How one delivery travels (the event loop on the left, threads on the right)::

    POST /events ─► store.publish() ──────────────► group-commit thread: INSERT event + deliveries,
                                                     one FULL commit for the batch; then the 202
    loop.wake() ─► DeliveryLoop.run()  (a task on the event loop)
                     │ store.claim_due()  in a thread: lease due rows, fair across partners
                     ▼
                   job queue ─────────────────────► sender threads (``concurrency``): Sender.send(job)
                                                     one HTTP POST (sender.py), then decide() and
                                                     Breakers.record(): delivered, pending after a
                                                     backoff, or failed after the last attempt
                   results queue ◄────────────────┘
                     ▼
                   recorder thread: a log line and metrics per attempt, then
                   store.finish_attempts(batch)  (many results, one commit)

The loop only claims as many rows as its senders can start soon (``claim_ahead``), so
a claimed row starts at once and its lease only has to cover one attempt. A lease
that runs out (the process died mid-send) makes the row due again: nothing is lost.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config import Config, DeliveryConfig
from metrics import Metrics
from models import Job, Outcome
from sender import Sender, Sent
from store import Store, take_batch

logger = logging.getLogger("webhookd.delivery")

IDLE_RECHECK_S = 30.0    # even with nothing due, look again now and then
RECORD_BATCH = 500       # results written per group commit, at most


@dataclass(frozen=True)
class Settings(DeliveryConfig):
    """Everything the loop needs: the ``[delivery]`` keys plus a few keys of other sections."""

    retention_s: float = 2592000.0
    purge_batch: int = 500
    purge_interval_s: float = 300.0
    allow_private_targets: bool = False
    allowed_ports: tuple[int, ...] = ()
    user_agent: str = "webhookd"

    @classmethod
    def from_config(cls, config: Config, user_agent: str) -> Settings:
        return cls(
            **dataclasses.asdict(config.delivery),
            retention_s=config.retention.max_age_s,
            purge_batch=config.retention.batch_size,
            purge_interval_s=config.retention.interval_s,
            allow_private_targets=config.security.allow_private_targets,
            allowed_ports=config.security.allowed_ports,
            user_agent=user_agent,
        )

    @property
    def cooldown_s(self) -> float:
        """The first pause of an open circuit: ``breaker_cooldown_s``, or by default the
        smaller of 30 s and ``backoff_max_s`` (no longer than the retry schedule's)."""
        return self.breaker_cooldown_s if self.breaker_cooldown_s is not None else min(30.0, self.backoff_max_s)

    @property
    def cooldown_max_s(self) -> float:
        """The longest pause: ``breaker_cooldown_max_s``, or the smaller of 600 s and ``backoff_max_s``."""
        if self.breaker_cooldown_max_s is not None:
            return self.breaker_cooldown_max_s
        return min(600.0, self.backoff_max_s)

    @property
    def claim_ahead(self) -> int:
        """How many claimed deliveries the loop holds: one per worker, plus one more round
        waiting in the pool's queue, so a worker that finishes starts its next attempt at
        once instead of waiting for the loop's next claim."""
        return 2 * self.concurrency

    @property
    def lease_s(self) -> float:
        """How long a claim holds a row. An attempt lasts at most ``timeout_s`` to connect plus
        ``timeout_s`` once connected (the watchdog cuts it off), and a claimed row waits at
        most one attempt before a worker takes it: four timeouts and a margin for DNS and for
        recording the result mean a slow attempt is never taken over — and sent twice —
        while it is still running."""
        return 4 * self.timeout_s + 10


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (from 1).

    Exponential (base, 2·base, 4·base, …, capped at ``max_s``) with "equal jitter":
    a random point in the upper half, so retries of many deliveries that failed
    together spread out, yet none comes back at once.
    """
    delay = min(max_s, base_s * 2 ** (attempt - 1))
    return delay / 2 + rng.uniform(0, delay / 2)


def decide(job: Job, sent: Sent, settings: Settings, rng: random.Random, now: float) -> tuple[str, float]:
    """The delivery's next state and due time after one attempt."""
    if sent.attempt.error is None:
        return "delivered", now
    if job.attempt >= job.max_attempts:
        return "failed", now
    delay = backoff_delay(job.attempt, settings.backoff_base_s, settings.backoff_max_s, rng)
    return "pending", now + max(delay, sent.retry_after_s or 0.0)


# --- Keeping bad partners in their lane ----------------------------------------------------


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

    def __init__(self, settings: Settings):
        self.settings = settings
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

    def record(self, job: Job, sent: Sent, now: float) -> tuple[float | None, bool, str | None]:
        """Count one attempt. Returns (failing_since, whether it changed, reason to disable or None)."""
        with self._lock:
            if sent.attempt.error is None:
                was = self._health.pop(job.partner_id, None)
                self._streak_broken_at[job.partner_id] = now
                return None, job.partner_failing_since is not None or was is not None, None
            health, changed = self._streak(job, now)
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

    def _streak(self, job: Job, now: float) -> tuple[Health, bool]:
        """The partner's health with its streak brought up to ``now`` (under the lock)."""
        health = self._health.get(job.partner_id)
        changed = False
        if health is None:
            # A streak read with the job (from the store) may predate a success or a reset
            # recorded since its claim; a restored streak's last failure is not known, so it
            # counts from its start (the quiet-spell rule then ends it rather than extend it).
            since = job.partner_failing_since
            if since is not None and since < self._streak_broken_at.get(job.partner_id, 0.0):
                since = None
            health = self._health[job.partner_id] = Health(failing_since=since, last_failure_at=since or 0.0)
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
    next start is due, and the sender marks the start (``starting``) just before it sends.
    Retries, recoveries and manual retries all go through that claim, so the pace holds for
    every attempt. A ``429`` halves the pace (the partner's own, or the rate it was just
    getting) for ``SLOWED_S``; a ``Retry-After`` pause (the breaker's) still comes first.
    """

    SLOWED_S = 60.0
    MIN_RATE = 0.1  # a 429 never slows a partner below one attempt every ten seconds

    def __init__(self) -> None:
        self._next_start: dict[str, float] = {}
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

    def room(self, partner_id: str, rate: float | None, now: float) -> int | None:
        """1 if one job of this paced partner may be claimed now, else 0; None without a pace."""
        if rate is None:
            return None
        with self._lock:
            due = not self._waiting[partner_id] and now >= self._next_start.get(partner_id, 0.0)
        return 1 if due else 0

    def claimed(self, job: Job) -> None:
        with self._lock:
            self._waiting[job.partner_id].add(job.delivery_id)

    def done(self, job: Job) -> None:
        """The job started, or was given up: it no longer holds its partner's next claim."""
        with self._lock:
            self._waiting[job.partner_id].discard(job.delivery_id)

    def starting(self, job: Job, rate: float | None, now: float) -> float:
        """Mark the start of ``job`` now; returns how long the sender must wait first (a 429
        may have lowered the pace since the claim)."""
        partner_id = job.partner_id
        self.done(job)
        with self._lock:
            wait = 0.0
            if rate is not None:
                start = max(now, self._next_start.get(partner_id, 0.0))
                wait = start - now
                self._next_start[partner_id] = start + 1 / rate
            starts = self._starts.setdefault(partner_id, collections.deque())
            starts.append(now + wait)
            while starts and starts[0] < now - 1.0:
                starts.popleft()
            return wait

    def slow_down(self, partner_id: str, rate: float | None, now: float) -> None:
        """The partner answered 429: halve its pace for ``SLOWED_S``."""
        with self._lock:
            recent = len([t for t in self._starts.get(partner_id, ()) if t >= now - 1.0])
            current = rate if rate is not None else max(1.0, float(recent))
            self._slowed[partner_id] = (max(self.MIN_RATE, current / 2), now + self.SLOWED_S)

    def next_start_at(self, now: float) -> float | None:
        """The earliest future start of a paced partner with nothing claimed (a reason to wake)."""
        with self._lock:
            times = [t for p, t in self._next_start.items() if t > now and not self._waiting[p]]
        return min(times) if times else None


# --- The loop -------------------------------------------------------------------------


class DeliveryLoop:
    """Claims due deliveries, hands them to sender threads and records every attempt.

    The loop (a task in the server's event loop) claims rows and puts them on a queue;
    ``concurrency`` sender threads take them one at a time. Completions are counted under
    a lock, and a sender wakes the loop only when the claimed work runs low, so under load
    the loop claims in batches instead of once per delivery.
    """

    def __init__(self, store: Store, settings: Settings, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None):
        self.store = store
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.rng = rng or random.Random()
        self.clock = clock
        self.sender = Sender(settings, clock)
        self.breakers = Breakers(settings)
        self.pacer = Pacer()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._senders = [threading.Thread(target=self._send_jobs, name=f"webhookd-send-{n}", daemon=True)
                         for n in range(settings.concurrency)]
        self._results: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._recorder = threading.Thread(target=self._record_results, name="webhookd-recorder", daemon=True)
        self._lock = threading.Lock()       # guards the two counts below
        self._claimed = 0                   # claimed and not finished (queued or being sent)
        self._busy: collections.Counter[str] = collections.Counter()  # the same, per partner
        self._released: list[Job] = []      # claimed, then given up unsent because of a stop
        self._all_done = threading.Event()  # set whenever nothing is claimed
        self._all_done.set()
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run_task: asyncio.Task | None = None
        self._purge_task: asyncio.Task | None = None
        self._stopping = False

    # Starting, waking and stopping ---------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        requeued = await asyncio.to_thread(self.store.requeue_expired_leases, self.clock())
        if requeued:
            logger.warning("re-queued %d deliveries whose lease ran out (an earlier run stopped mid-send)", requeued)
        self._recorder.start()
        for thread in self._senders:
            thread.start()
        self._run_task = asyncio.create_task(self.run(), name="webhookd-delivery-loop")
        self._purge_task = asyncio.create_task(self._purge_old(), name="webhookd-retention")

    def wake(self) -> None:
        """Tell the loop there may be work now. Safe to call from any thread."""
        if self._loop is None or self._wakeup is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wakeup.set()
        else:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def partner_reactivated(self, partner_id: str) -> None:
        """A partner was made active again by hand: forget its failures and look for work."""
        self.breakers.forget(partner_id, self.clock())
        self.wake()

    def probe_partner(self, partner_id: str) -> None:
        """An operator asked for another attempt (retry, recover): an open circuit probes now."""
        self.breakers.probe_now(partner_id, self.clock())
        self.wake()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop at once: no new claim and no new send. Claimed jobs that no sender has started
        are released (due again at once, their attempt count unchanged); attempts already on
        the wire get the grace period, and every result that comes back is recorded.

        An attempt still running after the grace period keeps its lease; the next
        run takes it again once the lease runs out. Nothing is lost either way.
        """
        self._stopping = True
        self.wake()
        if self._purge_task is not None:
            self._purge_task.cancel()
        await asyncio.gather(*(t for t in (self._run_task, self._purge_task) if t), return_exceptions=True)
        while True:  # the queued jobs; a sender that took one just now releases it itself
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._release(job)
        for _ in self._senders:
            self._jobs.put(None)
        grace = self.settings.timeout_s + 1 if grace_s is None else grace_s
        await asyncio.to_thread(self._all_done.wait, grace)
        unfinished = self.in_flight
        with self._lock:
            released = [job.delivery_id for job in self._released]
        if released:
            await asyncio.to_thread(self.store.release_claims, released, self.clock())
        self._results.put(None)   # the recorder writes what is queued, then stops
        await asyncio.to_thread(self._recorder.join, 10)
        logger.info("delivery loop stopped; %d attempts left unfinished (their leases will run out "
                    "and they will be sent again)", unfinished)

    @property
    def in_flight(self) -> int:
        return self._claimed

    # The loop itself ---------------------------------------------------------------------

    async def run(self) -> None:
        assert self._wakeup is not None
        while not self._stopping:
            self._wakeup.clear()
            try:
                if self.store.partners_stale:  # a reload after a partner write failed: try again
                    await asyncio.to_thread(self.store.reload_partners_if_stale)
                started = await self._claim_and_start()
                if started:
                    continue  # there may be more due right now
                pause = await self._seconds_until_next_due()
            except Exception:
                logger.exception("claiming deliveries failed; trying again shortly")
                pause = 1.0
            await self._sleep(pause)

    def _room(self, now: float) -> dict[str, int]:
        """Room of every partner that is not simply idle, healthy and unpaced (those get the
        full cap): the breaker's room, and at most the pace's."""
        with self._lock:
            busy = dict(self._busy)
        own_pace = {p.id: p.max_rate_per_s for p in self.store.all_partners() if p.max_rate_per_s}
        partners = set(busy) | set(self.breakers.constrained()) | set(own_pace) | set(self.pacer.paced(now))
        room = {}
        for p in partners:
            room[p] = self.breakers.room(p, busy.get(p, 0), now)
            paced = self.pacer.room(p, self.pacer.rate(p, own_pace.get(p), now), now)
            if paced is not None:
                room[p] = min(room[p], paced)
        return room

    async def _claim_and_start(self) -> int:
        free = self.settings.claim_ahead - self._claimed
        if free <= 0:
            return 0
        now = self.clock()
        jobs = await asyncio.to_thread(
            self.store.claim_due, now=now, lease_s=self.settings.lease_s, limit=free,
            per_partner=self.settings.per_partner_concurrency, room=self._room(now))
        with self._lock:
            self._claimed += len(jobs)
            for job in jobs:
                self._busy[job.partner_id] += 1
            if jobs:
                self._all_done.clear()
        for job in jobs:
            self.pacer.claimed(job)
        for job in jobs:
            self._jobs.put(job)
        return len(jobs)

    def _finished(self, job: Job) -> None:
        """A sender is done with ``job``: count it, and wake the loop when work runs low."""
        self.pacer.done(job)  # a job that never started (released, or crashed) must not hold the pace
        with self._lock:
            self._claimed -= 1
            self._busy[job.partner_id] -= 1
            if not self._busy[job.partner_id]:
                del self._busy[job.partner_id]
            if not self._claimed:
                self._all_done.set()
            running_low = self._claimed <= self.settings.concurrency
        if running_low:
            self.wake()

    async def _seconds_until_next_due(self) -> float:
        """Sleep until the next due row of a partner with room, or until a paused partner reopens.
        With the claimed work at its limit, sleep until a sender finishes (it wakes the loop)."""
        if self._claimed >= self.settings.claim_ahead:
            return IDLE_RECHECK_S
        now = self.clock()
        full = [p for p, room in self._room(now).items() if room <= 0]
        candidates = [await asyncio.to_thread(self.store.next_due_at, skip=full), self.breakers.reopens_at(now),
                      self.pacer.next_start_at(now)]
        times = [t for t in candidates if t is not None]
        if not times:
            return IDLE_RECHECK_S
        return min(IDLE_RECHECK_S, max(0.0, min(times) - now))

    async def _sleep(self, seconds: float) -> None:
        """Sleep until ``seconds`` pass or someone calls ``wake()``."""
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)
        except TimeoutError:
            pass

    def _send_jobs(self) -> None:
        """A sender thread: one claimed job after another, until the stop sentinel."""
        while (job := self._jobs.get()) is not None:
            if self._stopping:  # claimed before the stop, not started: it is not sent now
                self._release(job)
                continue
            try:
                self._attempt(job)
            except Exception:  # never die on one delivery: its lease brings it back
                logger.exception("delivery %s: the attempt crashed; it will be retried", job.delivery_id)
            finally:
                self._finished(job)

    def _as_partner_is_now(self, job: Job) -> Job | None:
        """The job with its partner's URL and secrets as they are now, or None (and the claim
        released) if the partner is no longer active. A change answered 200 before this
        moment — a new URL, a rotation, a pause — so reaches every attempt that starts after
        it, even of jobs claimed before it (memory only: the store's copy of partners)."""
        partner = self.store.get_partner(job.partner_id)
        if partner is None or partner.status != "active":
            self.pacer.done(job)
            self.store.release_claims([job.delivery_id], self.clock())
            return None
        return dataclasses.replace(job, url=partner.webhook_url, secrets=tuple(partner.valid_secrets(self.clock())),
                                   max_rate_per_s=partner.max_rate_per_s)

    def _release(self, job: Job) -> None:
        """Give up a claimed job without sending it; ``stop`` releases its lease in the store."""
        with self._lock:
            self._released.append(job)
        self._finished(job)

    # One attempt, in a worker thread -------------------------------------------------------

    def _attempt(self, job: Job) -> None:
        job = self._as_partner_is_now(job)
        if job is None:
            return
        rate = self.pacer.rate(job.partner_id, job.max_rate_per_s, self.clock())
        wait = self.pacer.starting(job, rate, self.clock())
        if wait > 0:
            time.sleep(wait)
        sent = self.sender.send(job)
        now = self.clock()
        if sent.attempt.status_code == 429:
            self.pacer.slow_down(job.partner_id, rate, now)
        state, next_at = decide(job, sent, self.settings, self.rng, now)
        failing_since, failing_changed, disable_reason = self.breakers.record(job, sent, now)
        self._results.put(Outcome(
            delivery_id=job.delivery_id, partner_id=job.partner_id, attempt=sent.attempt, state=state,
            next_attempt_at=next_at, partner_failing_since=failing_since,
            partner_failing_changed=failing_changed, disable_reason=disable_reason,
            event_id=job.event_id, created_at=job.created_at))

    def _report(self, o: Outcome, now: float) -> None:
        """One log line and the metrics of one attempt (in the recorder: one thread, no lock fights)."""
        a = o.attempt
        logger.info("delivery %s event=%s partner=%s attempt=%d status=%s error=%s duration_ms=%d -> %s",
                    o.delivery_id, o.event_id, o.partner_id, a.attempt, a.status_code, a.error, a.duration_ms,
                    o.state, extra={"delivery_id": o.delivery_id, "event_id": o.event_id, "partner_id": o.partner_id,
                                    "attempt": a.attempt, "status_code": a.status_code, "error": a.error,
                                    "duration_ms": a.duration_ms, "state": o.state})
        if o.disable_reason:
            logger.warning("partner %s disabled: %s; its deliveries wait until it is made active again",
                           o.partner_id, o.disable_reason)
        m = self.metrics
        m.attempts.inc(result=a.error or "success")
        m.attempt_seconds.observe(a.duration_ms / 1000)
        if o.state != "pending":
            m.deliveries.inc(partner=o.partner_id, outcome=o.state)
        if o.state == "delivered":
            m.delivered_seconds.observe(max(0.0, now - o.created_at))

    # The recorder: many results, one commit -------------------------------------------------

    def _record_results(self) -> None:
        """Write queued attempt results in batches (group commit) until the stop sentinel."""
        stopping = False
        while not stopping:
            batch, stopping = take_batch(self._results, RECORD_BATCH)
            if not batch:
                continue
            now = self.clock()
            for outcome in batch:
                self._report(outcome, now)
            try:
                lost = self.store.finish_attempts(batch, now=now)
            except Exception:
                logger.exception("recording %d attempts failed; their leases will run out and they "
                                 "will be sent again", len(batch))
                continue
            for delivery_id in lost:
                logger.warning("delivery %s: result not recorded, its lease had been taken over", delivery_id)
            if any(o.state == "pending" for o in batch):
                self.wake()  # a retry may now be due earlier than the loop thought

    # Retention ----------------------------------------------------------------------------

    async def _purge_old(self) -> None:
        """Every ``purge_interval_s``, one retention pass (``purge_expired``)."""
        while not self._stopping:
            try:
                events, inbound = await self.purge_expired()
                if events or inbound:
                    logger.info("retention: purged %d delivered events and %d inbound events older than %d s",
                                events, inbound, int(self.settings.retention_s))
            except Exception:
                logger.exception("retention purge failed; will try again")
            await asyncio.sleep(self.settings.purge_interval_s)

    async def purge_expired(self) -> tuple[int, int]:
        """Delete what is older than ``retention_s`` — delivered events, then inbound events —
        each table in batches of ``purge_batch`` until nothing old is left. Returns the counts."""
        cutoff = self.clock() - self.settings.retention_s
        counts = []
        for purge in (self.store.purge_delivered, self.store.purge_inbound):
            total = 0
            while True:
                purged = await asyncio.to_thread(purge, before=cutoff, batch=self.settings.purge_batch)
                total += purged
                if purged < self.settings.purge_batch or self._stopping:
                    break
                await asyncio.sleep(0.05)  # let other writers in between batches
            counts.append(total)
        return counts[0], counts[1]

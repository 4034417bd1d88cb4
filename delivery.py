"""The delivery loop: claim due deliveries, start each as a task on the sender's loop, record results.

How one delivery travels (the server's event loop on the left, other threads on the right)::

    POST /events ─► store.publish() ──────────────► group-commit thread: INSERT event + deliveries,
                                                     one FULL commit for the batch; then the 202
    loop.wake() ─► DeliveryLoop.run()  (a task on the server's event loop)
                     │ store.claim_due()  in a thread: lease due rows, fair across partners
                     ▼
                   one task per job ──────────────► sender thread (its own event loop, sender.py):
                                                     one HTTP POST each, thousands at once; then
                                                     decide() and Breakers.record(): delivered,
                                                     pending after a backoff, or failed
                   results queue ◄────────────────┘
                     ▼
                   recorder thread: store.finish_attempts(batch)  (many results, one
                   commit), then the metrics of each attempt, a log line per failure
                   and a summary of the successes (attempt_log.py)

The loop holds at most ``concurrency`` rows at a time — fewer while publishes wait on
deliveries (governor.py: publishes first) — and every claimed row starts at
once — or is given back, due again, if since its claim the partner was paused, its
circuit opened, its pace slowed or the process began to stop — so its lease only has
to cover one attempt. A lease that runs out (the process died mid-send) makes the row
due again: nothing is lost.

An attempt holds its place among the ``concurrency`` until its result is written, not
merely sent: a recorder that falls behind holds the claims back, so what a crash sends
again — answered, but not yet recorded — is never more than ``concurrency`` deliveries.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from alerts import Alerts
from attempt_log import CANCELLED_IN_FLIGHT, SUMMARY_EVERY_S, AttemptLog
from breakers import Breakers, Pacer
from config import DeliverySettings
from governor import WINDOW_S, GiveWay, PartnerLimits, PublishFirst
from metrics import Metrics
from models import Job, Outcome, Partner
from partner_terms import lease_s, wait_after
from sender import Sender, Sent
from store import DatabaseUnavailable, Store, take_batch

logger = logging.getLogger("webhookd.delivery")

IDLE_RECHECK_S = 30.0    # even with nothing due, look again now and then
SHARED_RECHECK_S = 1.0   # ...every second when other processes publish into the same database
RECORD_BATCH = 100      # results written per commit, at most: a commit holds SQLite's write lock while it
                        # runs, and a publish waits for it (500 a commit cost POST /events p99 ~10 ms, bench (d))
RECORD_RETRY_WAITS_S = (0.2, 1.0)  # a batch of results that failed to commit is tried again after these
CLAIM_BATCH = 100       # rows leased per claim, at most: a claim holds the write lock while it runs
CLAIM_GATHER_S = 0.005  # with attempts in flight, let finished ones gather this long before claiming again
NOTHING_CLAIMED_WAIT_S = 0.05  # after a claim that took nothing, wait at least this long (or a wake-up)
# Why an attempt's result went unrecorded (the attempt's log line says it; no metric counts it as an end).
TAKEN_OVER = "the delivery had moved on (its lease ran out and another attempt took it over)"
REFUSED = "the delivery no longer expected this attempt (cancelled, or taken over, meanwhile)"
NOT_WRITTEN = "the database did not take the result; the delivery is sent again when its lease runs out"


def decide(job: Job, sent: Sent, settings: DeliverySettings, rng: random.Random, now: float) -> tuple[str, float, str]:
    """The delivery's next state and due time after one attempt, and why, in words (its trace).
    The wait is the server's backoff, or the partner's own terms (``partner_terms.wait_after``)."""
    if sent.attempt.error is None:
        return "delivered", now, "the partner answered 2xx"
    if sent.attempt.error == "configuration_error":  # an expired client certificate: retrying cannot help
        return "failed", now, ("a configuration error, not retried (each retry would fail alike): once the admin "
                               "fixes it, POST /partners/{id}/recover sends the failed deliveries again")
    if job.attempt >= job.max_attempts:
        return "failed", now, f"attempt {job.attempt} of {job.max_attempts} failed: no attempt left"
    delay, why = wait_after(job.attempt, job.max_attempts, job.retry, settings, rng)
    if (sent.retry_after_s or 0.0) > delay:
        return "pending", now + sent.retry_after_s, (  # type: ignore[operator]
            f"the partner's Retry-After asked for {sent.retry_after_s:.0f} s, longer than the "
            f"{'schedule' if job.retry and job.retry.schedule else 'backoff'} ({delay:.1f} s)")
    return "pending", now + delay, why


# --- The loop -------------------------------------------------------------------------


class DeliveryLoop:
    """Claims due deliveries, starts each as a task on the sender's loop, records every attempt.

    The loop (a task in the server's event loop) claims rows and hands each batch to the
    sender's loop, where every job becomes a task at once. An attempt counts as in flight
    until the recorder has written its result; completions are counted under a lock, and
    they wake the loop only when a claim's worth of room has opened (or little is claimed),
    so under load the loop claims in batches instead of once per delivery.
    """

    def __init__(self, store: Store, settings: DeliverySettings, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
                 alerts: Alerts | None = None, live_processes: Callable[[], int] = lambda: 1):
        self.store = store
        self.alerts = alerts
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.rng = rng or random.Random()
        self.clock = clock
        self.sender = Sender(settings, clock)
        self.live_processes = live_processes  # how many share the database (housekeeping's heartbeats)
        self.breakers = Breakers(settings, last_failure_of=store.last_failed_attempt_at)
        self.pacer = Pacer()
        self.publish_first = PublishFirst(settings.concurrency)  # the in-flight bound: publishes first
        self.partner_limits = PartnerLimits(settings.per_partner_concurrency)  # each partner's, by how it answers
        # The GIL: the sender and the recorder step aside while a publish waits (on SQLite: see there).
        self.give_way = GiveWay(enabled=not store.shared)
        self._sender_turn, self._recorder_turn = self.give_way.turn(), self.give_way.turn()
        self._tasks: set[asyncio.Task] = set()  # the attempts running on the sender's loop
        self._results: queue.SimpleQueue[Outcome | None] = queue.SimpleQueue()
        self._recorder = threading.Thread(target=self._record_results, name="webhookd-recorder", daemon=True)
        self.attempt_log = AttemptLog()     # the recorder's alone
        self._lock = threading.Lock()       # guards the two counts below
        self._claimed = 0                   # claimed and not finished: starting, being sent, or sent
                                            # with its result not yet written
        self._busy: collections.Counter[str] = collections.Counter()  # the same, per partner
        self._released: list[Job] = []      # claimed, then given up unsent because of a stop
        self._all_done = threading.Event()  # set whenever nothing is claimed
        self._all_done.set()
        self._wakeup: asyncio.Event | None = None
        self._wake_sent = False             # a wake-up from another thread is on its way
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run_task: asyncio.Task | None = None
        self._stopping = False
        # On a shared database another process may publish what this one should send: look every second.
        self._recheck_s = SHARED_RECHECK_S if store.shared else IDLE_RECHECK_S
        self._read_partners_at = 0.0

    # Starting, waking and stopping ---------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        requeued = await asyncio.to_thread(self.store.requeue_expired_leases, self.clock())
        if requeued:
            logger.warning("deliveries re-queued because their lease ran out (an earlier run stopped mid-send): %d",
                           requeued)
        self._recorder.start()
        self._run_task = asyncio.create_task(self.run(), name="webhookd-delivery-loop")

    def wake(self) -> None:
        """Tell the loop there may be work now. Safe to call from any thread.

        From another thread, one wake-up is sent at a time: thousands of attempts finishing
        each second cost the server's event loop (which answers the API) one wake-up per
        loop turn, not one each."""
        if self._loop is None or self._wakeup is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._wakeup.set()
        elif not self._wake_sent:
            self._wake_sent = True
            self._loop.call_soon_threadsafe(self._woken)

    def _woken(self) -> None:
        self._wake_sent = False
        self._wakeup.set()

    def partner_reactivated(self, partner_id: str) -> None:
        """A partner was made active again by hand: forget its failures and look for work.
        (On PostgreSQL the store tells the other processes, which call this too.)"""
        self.breakers.forget(partner_id, self.clock())
        self.wake()

    def probe_partner(self, partner_id: str) -> None:
        """An operator asked for another attempt (retry, recover): an open circuit probes now.
        (On PostgreSQL the store tells the other processes, which call this too.)"""
        self.breakers.probe_now(partner_id, self.clock())
        self.wake()

    def partner_changed(self, note: dict[str, str]) -> None:
        """Another process changed a partner (``store.PARTNERS_CHANNEL``): the store has read
        the partners again; an operator's reset reaches this process's breaker too."""
        action = {"reactivated": self.partner_reactivated, "probe": self.probe_partner}.get(note.get("action", ""))
        if action is not None:
            action(note["partner_id"])
        else:
            self.wake()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop at once: no new claim and no new send. Claimed jobs whose attempt has not
        begun are released (due again at once, their attempt count unchanged); attempts
        already on the wire get the grace period, and every result that comes back is recorded.

        An attempt still running after the grace period is dropped and keeps its lease;
        the next run takes it again once the lease runs out. Nothing is lost either way.
        """
        self._stopping = True
        self.wake()
        if self._run_task is not None:
            await asyncio.gather(self._run_task, return_exceptions=True)
        longest = max(self.settings.timeout_s, self.store.longest_own_timeout_s())  # a partner's own may be longer
        grace = longest + 1 if grace_s is None else grace_s
        await asyncio.to_thread(self._all_done.wait, grace)
        with self._lock:
            released = [job.delivery_id for job in self._released]
        if released:
            try:
                await asyncio.to_thread(self.store.release_claims, released, self.clock())
            except Exception:  # the database is away: their leases run out and bring them back
                logger.exception("releasing %d unstarted claims failed; their leases will run out", len(released))
        self._results.put(None)   # the recorder writes what is queued, then stops
        await asyncio.to_thread(self._recorder.join, 10)
        unfinished = self.in_flight
        await asyncio.to_thread(self.sender.close)
        logger.info("delivery loop stopped; %s", "every attempt in flight finished" if not unfinished else
                    f"{unfinished} attempt{'s' * (unfinished != 1)} left unfinished, sent again once "
                    f"{'their leases run' if unfinished != 1 else 'its lease runs'} out")

    @property
    def in_flight(self) -> int:
        """Attempts claimed and not finished: being sent, or sent and their results not yet written."""
        return self._claimed

    def circuit(self, partner: Partner, now: float) -> dict[str, Any]:
        """The partner's circuit as the API shows it: this process's breaker, or, on PostgreSQL,
        a pause another process recorded (``paused_until``), which every process obeys."""
        shown = self.breakers.describe(partner.id, now)
        if shown["state"] == "closed" and partner.paused_until is not None and partner.paused_until > now:
            shown = {**shown, "state": "open", "reason": "paused_by_another_process",
                     "next_probe_at": int(math.ceil(partner.paused_until))}
        return shown

    # The loop itself ---------------------------------------------------------------------

    async def run(self) -> None:
        assert self._wakeup is not None
        while not self._stopping:
            self._wakeup.clear()
            try:
                # Read the partners again after a reload that failed, and on a shared database every
                # second: other processes change them too (registrations, pauses, circuits they opened).
                shared_due = self.store.shared and time.monotonic() >= self._read_partners_at
                if self.store.partners_stale or shared_due:
                    self._read_partners_at = time.monotonic() + SHARED_RECHECK_S
                    await asyncio.to_thread(self.store.reload_partners)
                if self._claimed:
                    # Attempts finish all the time and each one wakes us: claim for a few
                    # together rather than one transaction per finished attempt.
                    await asyncio.sleep(CLAIM_GATHER_S)
                started = await self._claim_and_start()
                if started:
                    continue  # there may be more due right now
                # Took nothing: wait for what is due next, but never spin — due rows may belong to
                # a partner another process paused or fills (PostgreSQL), which we cannot claim.
                pause = max(await self._seconds_until_next_due(), NOTHING_CLAIMED_WAIT_S)
            except DatabaseUnavailable as exc:  # a restart, an outage: expected, and said in one line
                logger.warning("claiming deliveries failed (%s); trying again shortly", exc)
                pause = 1.0
            except Exception:
                logger.exception("claiming deliveries failed; trying again shortly")
                pause = 1.0
            await self._sleep(pause)

    async def _claim_and_start(self) -> int:
        free = min(self.publish_first.adjust(self._claimed) - self._claimed, CLAIM_BATCH)
        if free <= 0:
            return 0
        now = self.clock()
        began = time.monotonic()
        jobs = await asyncio.to_thread(
            self.store.claim_due, now=now, lease_s=lease_s(self.settings, self.store.longest_own_timeout_s()),
            limit=free, per_partner=self.partner_limits.start, room=self._room(now))
        self.metrics.claim_rows.observe(len(jobs))
        self.metrics.claim_seconds.observe(time.monotonic() - began)
        if not jobs:
            return 0
        with self._lock:
            self._claimed += len(jobs)
            for job in jobs:
                self._busy[job.partner_id] += 1
            self._all_done.clear()
        for job in jobs:
            self.pacer.claimed(job)
        self.sender.loop.call_soon_threadsafe(self._start_attempts, jobs)  # one hand-off per claim
        return len(jobs)

    def _room(self, now: float) -> dict[str, int]:
        """Room of every partner that is not simply idle, healthy, unpaced and at its starting
        bound (those get that bound): the breaker's room, at most its own bound's
        (``PartnerLimits``), and at most the pace's."""
        with self._lock:
            busy = dict(self._busy)
        paces = self._paces(now)
        limits = self.partner_limits.changed()
        room = {}
        for p in set(busy) | set(self.breakers.constrained()) | set(paces) | set(limits):
            room[p] = min(self.breakers.room(p, busy.get(p, 0), now),
                          limits.get(p, self.partner_limits.start) - busy.get(p, 0))
            if p in paces:
                room[p] = min(room[p], self.pacer.room(p, paces[p], now))
        return room

    def _paces(self, now: float) -> dict[str, float]:
        """The pace in force now of every paced partner: its own ``max_rate_per_s``, or lower
        while a 429 slows it (a partner without a pace of its own may be slowed too).

        Several processes on one database each send at their share of a partner's own pace
        (``max_rate_per_s`` / the live processes), so together they keep to it. A process with
        no work for that partner leaves its share unused: the pace is a ceiling, not a promise."""
        shares = max(1, self.live_processes())
        own = {p: rate / shares for p, rate in self.store.paces().items()}
        rates = {p: self.pacer.rate(p, own.get(p), now) for p in set(own) | set(self.pacer.paced(now))}
        return {p: rate for p, rate in rates.items() if rate is not None}

    def _start_attempts(self, jobs: list[Job]) -> None:
        """On the sender's loop: one task per claimed job, all started now. (The loop is looked up
        once: on CPython 3.11 each ``get_running_loop`` is a ``getpid`` system call.)"""
        loop = asyncio.get_running_loop()
        for job in jobs:
            task = loop.create_task(self._attempt(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _finished(self, partner_ids: list[str]) -> None:
        """Attempts are over — their results written, or nothing to write: count them, and wake
        the loop when room opens."""
        with self._lock:
            self._claimed -= len(partner_ids)
            for partner_id in partner_ids:
                self._busy[partner_id] -= 1
                if not self._busy[partner_id]:
                    del self._busy[partner_id]
            if not self._claimed:
                self._all_done.set()
            room_opened = self._claimed <= self.publish_first.bound - min(CLAIM_BATCH, self._claimed + 1)
        if room_opened:
            self.wake()

    async def _seconds_until_next_due(self) -> float:
        """Sleep until the next due row of a partner with room, or until a paused partner reopens.
        With the claimed work at its limit, sleep until an attempt finishes (it wakes the loop)."""
        if self._claimed >= self.publish_first.bound:
            return min(self._recheck_s, WINDOW_S)  # the bound may rise again
        now = self.clock()
        full = [p for p, room in self._room(now).items() if room <= 0]
        candidates = [await asyncio.to_thread(self.store.next_due_at, skip=full, now=now),
                      self.breakers.reopens_at(now), self._next_paced_start(now)]
        times = [t for t in candidates if t is not None]
        if not times:
            return self._recheck_s
        return min(self._recheck_s, max(0.0, min(times) - now))

    def _next_paced_start(self, now: float) -> float | None:
        """The earliest future moment a paced partner's next attempt may start (a reason to wake)."""
        future = [t for p, rate in self._paces(now).items() if (t := self.pacer.next_start(p, rate)) > now]
        return min(future) if future else None

    async def _sleep(self, seconds: float) -> None:
        """Sleep until ``seconds`` pass or someone calls ``wake()``."""
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # One attempt, a task on the sender's loop ------------------------------------------------

    async def _attempt(self, job: Job) -> None:
        """Send ``job`` once and queue its outcome for the recorder. Never dies on one delivery.
        The job keeps its place in flight until the recorder has written the outcome."""
        outcome: Outcome | None = None
        self._sender_turn.give_way()  # a publish waiting for its commit goes first (governor.GiveWay)
        try:
            outcome = await self._send(job)
        except Exception:  # its lease brings it back
            logger.exception("delivery %s: the attempt crashed; it will be retried", job.delivery_id)
        finally:
            self.pacer.done(job)  # a job that never started (released, or crashed) must not hold the pace
            if outcome is None:   # nothing to write: its place is free now
                self._finished([job.partner_id])
            else:
                self._results.put(outcome)

    async def _send(self, job: Job) -> Outcome | None:
        """One attempt and what it means; None if it was not sent (given back, or kept for a restart)."""
        if self._stopping:  # claimed before the stop, not begun: it is not sent now
            with self._lock:
                self._released.append(job)
            return None
        now = self.clock()
        current = self._as_partner_is_now(job)
        rate = self.pacer.rate(job.partner_id, current.max_rate_per_s, now) if current else None
        if current is None or self.breakers.state(job.partner_id, now) == "open" or \
                not self.pacer.start(current, rate, now):
            # Claimed before a pause, before the circuit opened or before a 429 slowed the
            # pace: not sent now. The row is due again; a claim takes it when it may start.
            await asyncio.to_thread(self.store.release_claims, [job.delivery_id], now)
            return None
        sent = await self.sender.attempt(current)
        self._sender_turn.give_way()
        if self.breakers.needs_history(current, sent):  # a read of the store: not on this loop
            return await asyncio.to_thread(self._outcome, current, sent, rate)
        return self._outcome(current, sent, rate)

    def _as_partner_is_now(self, job: Job) -> Job | None:
        """The job with its partner's URL and secrets as they are now, or None if the partner is
        no longer active. A change answered 200 before this moment — a new URL, a rotation,
        a pause, its own retry terms and headers — so reaches every attempt that begins after
        it, even of jobs claimed before it (memory only: the store's copy of partners)."""
        partner = self.store.get_partner(job.partner_id)
        if partner is None or partner.status != "active" or partner.unverified:  # a new URL not yet proved
            return None
        # Built field by field: dataclasses.replace() costs three times as much, once per attempt.
        return Job(job.delivery_id, job.event_id, job.event, job.partner_id, partner.webhook_url,
                   tuple(partner.valid_secrets(self.clock())), job.body, job.attempt, job.max_attempts,
                   job.partner_failing_since, job.created_at, partner.max_rate_per_s, job.traceparent, job.tracestate,
                   partner.retry, partner.extra_headers, partner.client_cert, partner.client_key)

    def _outcome(self, job: Job, sent: Sent, rate: float | None) -> Outcome:
        """What the attempt means: the pace, the delivery's next state, the partner's health."""
        now = self.clock()
        if sent.attempt.status_code == 429:
            self.pacer.slow_down(job.partner_id, rate, now)
        self.partner_limits.finished(job.partner_id, sent.attempt.error, sent.attempt.status_code,
                                     busy=self._busy.get(job.partner_id, 0))
        state, next_at, why = decide(job, sent, self.settings, self.rng, now)
        paused_before, open_before = self.breakers.paused_until(job.partner_id), self.breakers.is_open(job.partner_id)
        failing_since, failing_changed, disable_reason = self.breakers.record(job, sent, now)
        paused_after = self.breakers.paused_until(job.partner_id)
        self._alert(job, state, open_before, disable_reason, now)
        if paused_after > paused_before:
            why += f"; this failure paused the partner (its circuit) for {paused_after - now:.0f} s"
        if disable_reason:
            why += f"; the partner was disabled: {disable_reason}"
        return Outcome(
            delivery_id=job.delivery_id, partner_id=job.partner_id, attempt=sent.attempt,
            decision={"state": state, "wait_s": round(next_at - now, 3), "why": why}, state=state,
            next_attempt_at=next_at, partner_failing_since=failing_since,
            partner_failing_changed=failing_changed, disable_reason=disable_reason,
            paused_until=paused_after if paused_after > paused_before else None,
            event_id=job.event_id, created_at=job.created_at)

    def _alert(self, job: Job, state: str, open_before: bool, disable_reason: str | None, now: float) -> None:
        """What of this attempt the operator is told (alerts.py): a circuit that opened or closed,
        a partner disabled, a delivery that ended failed."""
        if self.alerts is None:
            return
        open_after = self.breakers.is_open(job.partner_id)
        if open_after and not open_before:
            self.alerts.note("circuit_opened", job.partner_id, "its circuit opened: "
                             f"{self.breakers.describe(job.partner_id, now)['recent_failures']} failed attempts in a row")
        elif open_before and not open_after:
            self.alerts.note("circuit_closed", job.partner_id, "its circuit closed: an attempt succeeded")
        if disable_reason:
            self.alerts.note("partner_disabled", job.partner_id, f"disabled: {disable_reason}")
        if state == "failed":
            self.alerts.failed(job.partner_id, now)

    # The recorder: many results, one commit -------------------------------------------------

    def _record_results(self) -> None:
        """Write queued attempt results in batches (group commit) until the stop sentinel. Each
        attempt leaves the in-flight count once its batch is written (or given up)."""
        stopping = False
        while not stopping:
            batch, stopping = take_batch(self._results, RECORD_BATCH, timeout=SUMMARY_EVERY_S)
            self._recorder_turn.give_way()
            if batch:
                try:
                    self._record(batch)
                except Exception:  # never dies on one batch: what went unrecorded is sent again
                    logger.exception("recording %d attempts failed", len(batch))
                finally:
                    self._finished([o.partner_id for o in batch])
            self.attempt_log.summarise_if_due(force=stopping)

    def _record(self, batch: list[Outcome]) -> None:
        """Write one batch, then log and count each attempt as the store took it."""
        now = self.clock()
        lost = self._finish_with_retries(batch, now)
        if lost is None:
            not_recorded = {o.delivery_id: NOT_WRITTEN for o in batch}
        else:
            not_recorded = {delivery_id: self._why_not_recorded(delivery_id) for delivery_id in lost}
        for outcome in batch:
            self._report(outcome, now, not_recorded.get(outcome.delivery_id))
        if lost is not None and any(o.state == "pending" or self._in_order(o.partner_id) for o in batch):
            # A retry may now be due earlier than the loop thought; a FIFO partner's next delivery
            # may go now that the one ahead of it has ended (until this record the head looked
            # in flight, due at its lease's end).
            self.wake()

    def _finish_with_retries(self, batch: list[Outcome], now: float) -> list[str] | None:
        """``store.finish_attempts``, tried again while the database is away (a restart) or busy:
        writing a batch twice is harmless, each row expects one attempt number. It keeps trying
        for as long as a lease lasts (``lease_s``); past that, those rows are due again and sent
        again anyway. None if it never went in."""
        give_up_at = time.monotonic() + self.settings.lease_s
        waits = iter(RECORD_RETRY_WAITS_S)
        while True:
            try:
                return self.store.finish_attempts(batch, now=now)
            except DatabaseUnavailable as exc:  # expected in an outage: a line, no traceback
                wait = next(waits, RECORD_RETRY_WAITS_S[-1])
                if time.monotonic() + wait > give_up_at:
                    logger.warning("recording %d attempts failed (%s) for %.0f s; their leases have run out and "
                                   "they will be sent again", len(batch), exc, self.settings.lease_s)
                    return None
                logger.warning("recording %d attempts failed (%s); trying again in %.1f s", len(batch), exc, wait)
                time.sleep(wait)
            except Exception:
                logger.exception("recording %d attempts failed; their leases will run out and they "
                                 "will be sent again", len(batch))
                return None

    def _why_not_recorded(self, delivery_id: str) -> str:
        """Why the store refused an attempt's result: the row no longer expected it."""
        try:
            delivery = self.store.get_delivery(delivery_id)
        except Exception:  # the database is away again: say only what is sure
            return REFUSED
        if delivery is None:
            return "the delivery no longer exists"
        return CANCELLED_IN_FLIGHT if delivery.state == "cancelled" else TAKEN_OVER

    def _report(self, o: Outcome, now: float, not_recorded: str | None) -> None:
        """The log (attempt_log.py: a line per failure, successes summed up) and the metrics of one
        attempt, as the store took it (in the recorder: one thread, no lock fights). An attempt whose
        result the store refused is still an attempt, but its delivery did not end (or fail) by it:
        ``not_recorded`` says why."""
        a = o.attempt
        self.attempt_log.attempt(o, not_recorded)
        m = self.metrics
        m.attempts.inc(result=a.error or "success")
        m.attempt_seconds.observe(a.duration_ms / 1000)
        if not_recorded is not None:
            return
        if o.disable_reason:
            logger.warning("partner %s disabled: %s; its deliveries wait until it is made active again",
                           o.partner_id, o.disable_reason)
        if o.state != "pending":
            m.deliveries.inc(partner=o.partner_id, outcome=o.state)
        if o.state == "delivered":
            m.delivered_seconds.observe(max(0.0, now - o.created_at))

    def _in_order(self, partner_id: str) -> bool:
        partner = self.store.get_partner(partner_id)
        return partner is not None and partner.ordering == "fifo"

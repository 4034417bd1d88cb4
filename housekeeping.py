"""Housekeeping: the work beside the deliveries that keeps the database tidy and the processes known.

Two tasks on the server's event loop, started and stopped by the app's lifespan next to the
delivery loop, and never in its way:

* **the heartbeat**, every ``HEARTBEAT_S``: this process renews its row in ``processes`` and
  learns which others share the database (``/stats`` lists them; the delivery loop divides a
  partner's pace among them; ``webhookd restore`` refuses to run under a live one);
* **the sweep**, every ``retention.interval_s``, by one process only when several share a
  database (the one holding the ``sweeper`` role, which passes to another if it stops renewing
  it): deliveries pending too long end ``expired``, then what is older than the retention goes —
  delivered events (and, for a type with a shorter retention of its own, its older events go or
  have their content erased: ``erasure.py``), inbound events, the tombstones of deleted partners,
  old audit entries — and,
  on a shared database, the rate limits' buckets that are full again.

Each pass deletes in batches with a pause between them, so other writers get the lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import erasure
from config import DeliverySettings
from metrics import Metrics
from store import Store

logger = logging.getLogger("webhookd.housekeeping")

HEARTBEAT_S = 2.0       # each process renews its row in `processes` this often...
ALIVE_S = 3 * HEARTBEAT_S  # ...and counts as alive while its last one is this recent


class Housekeeping:
    """This process's heartbeat and, while it holds the sweeper role, the retention sweeps."""

    def __init__(self, store: Store, settings: DeliverySettings, clock: Callable[[], float] = time.time,
                 metrics: Metrics | None = None):
        self.store = store
        self.settings = settings
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.process_id = "proc_" + secrets.token_hex(8)  # this process, among several on one database
        self.started_at = clock()
        self.processes: list[dict[str, Any]] = []  # the live ones, from the last heartbeat
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    async def start(self) -> None:
        """The first heartbeat now (the delivery loop's first claim knows how many share the
        pace), then the two tasks."""
        await self._heartbeat()
        self._tasks = [asyncio.create_task(self._purge_old(), name="webhookd-retention"),
                       asyncio.create_task(self._keep_beating(), name="webhookd-heartbeat")]

    async def stop(self) -> None:
        """Cancel both tasks, then take this process out of ``processes``."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.to_thread(self.store.forget_process, self.process_id)
        except Exception:  # the database is away: the row simply stops being renewed
            logger.warning("could not remove this process from the processes table; it will age out")

    def live_processes(self) -> int:
        """How many processes share the database, this one included, as of the last heartbeat."""
        return len(self.processes)

    # The sweeper role ----------------------------------------------------------------------

    async def _purge_old(self) -> None:
        """Every ``purge_interval_s``, one retention pass (``purge_expired``) — by one process
        only when several share a database: the one holding the ``sweeper`` role, which passes
        to another if it stops renewing it for three intervals."""
        while not self._stopping:
            try:
                sweeper = await asyncio.to_thread(self.store.hold_role, "sweeper", self.process_id,
                                                  3 * self.settings.purge_interval_s, self.clock())
                if not sweeper:
                    await asyncio.sleep(self.settings.purge_interval_s)
                    continue
                await self.expire_pending()
                events, inbound = await self.purge_expired()
                if self.store.shared:  # the shared rate limits' buckets that are full again
                    await asyncio.to_thread(self.store.purge_rate_buckets, before=time.time() - 3600)
                if events or inbound:
                    logger.info("retention: purged %d delivered events and %d inbound events older than %d s",
                                events, inbound, int(self.settings.retention_s))
            except Exception:
                logger.exception("retention purge failed; will try again")
            await asyncio.sleep(self.settings.purge_interval_s)

    # The heartbeat -----------------------------------------------------------------------

    async def _keep_beating(self) -> None:
        while not self._stopping:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._heartbeat()
            except Exception as exc:  # the database is away; the next beat tries again
                logger.warning("heartbeat failed (%s); trying again in %.0f s", exc, HEARTBEAT_S)

    async def _heartbeat(self) -> None:
        """Renew this process's row in ``processes`` and learn which others are alive (``/stats``
        lists them; the pace is shared among them)."""
        self.processes = await asyncio.to_thread(
            self.store.heartbeat, self.process_id, host=socket.gethostname(), pid=os.getpid(),
            started_at=self.started_at, now=self.clock(), alive_s=ALIVE_S)

    # One sweep ---------------------------------------------------------------------------

    async def expire_pending(self) -> int:
        """End ``expired`` the deliveries pending for longer than ``max_pending_age_s`` (a partner
        paused or disabled for weeks gets nothing stale when it resumes); a log line per partner."""
        now, max_age = self.clock(), self.settings.max_pending_age_s
        expired = await asyncio.to_thread(self.store.expire_pending, queued_before=now - max_age, now=now)
        for partner_id, count in sorted(expired.items()):
            self.metrics.deliveries.inc(count, partner=partner_id, outcome="expired")
            logger.warning("partner %s: deliveries pending for over %d s ended expired: %d; retry them by hand "
                           "(POST /partners/%s/recover?since=...) if they still matter",
                           partner_id, int(max_age), count, partner_id)
        return sum(expired.values())

    async def purge_expired(self) -> tuple[int, int]:
        """Delete what is older than ``retention_s`` — delivered events, then inbound events —
        each table in batches of ``purge_batch`` until nothing old is left; then the tombstones
        of deleted partners whose history is gone, and audit entries older than
        ``audit_retention_s``. Returns the counts of events and inbound events."""
        cutoff, size = self.clock() - self.settings.retention_s, self.settings.purge_batch
        cursor: tuple[float, str] | None = None

        def events_batch() -> tuple[int, bool]:
            nonlocal cursor
            purged, cursor = self.store.purge_delivered(before=cutoff, batch=size, after=cursor)
            return purged, cursor is not None

        def inbound_batch() -> tuple[int, bool]:
            purged = self.store.purge_inbound(before=cutoff, batch=size)
            return purged, purged == size

        def audit_batch() -> tuple[int, bool]:
            purged = self.store.purge_audit(before=self.clock() - self.settings.audit_retention_s, batch=size)
            return purged, purged == size

        counts = await self._in_batches(events_batch) + await self.purge_types(), await self._in_batches(inbound_batch)
        await asyncio.to_thread(self.store.purge_deleted_partners, before=cutoff)
        await self._in_batches(audit_batch)
        return counts

    async def purge_types(self) -> int:
        """Each type with a retention of its own (``retention_days`` in the catalog, shorter than
        everyone's): its older events deleted as above, then the content of those kept erased
        (``erasure.py``). Returns how many events were deleted."""
        return sum([await self._purge_type(event_type, max_age) for event_type, max_age in self.settings.type_retention_s])

    async def _purge_type(self, event_type: str, max_age: float) -> int:
        now, size = self.clock(), self.settings.purge_batch
        cutoff, cursor = now - max_age, None

        def events_batch() -> tuple[int, bool]:
            nonlocal cursor
            purged, cursor = self.store.purge_delivered(before=cutoff, batch=size, after=cursor, event_type=event_type)
            return purged, cursor is not None

        def erase_batch() -> tuple[int, bool]:
            return erasure.erase_past_retention(self.store, event_type, before=cutoff, now=now, batch=size)

        deleted = await self._in_batches(events_batch)
        erased = await self._in_batches(erase_batch)
        if erased:
            logger.info("retention: erased the content of %d %s events older than %d s (its own retention)",
                        erased, event_type, int(max_age))
        return deleted

    async def _in_batches(self, batch: Callable[[], tuple[int, bool]]) -> int:
        """Run ``batch`` (in a thread) until it says nothing is left; the total it purged."""
        total = 0
        while True:
            purged, more = await asyncio.to_thread(batch)
            total += purged
            if not more or self._stopping:
                return total
            await asyncio.sleep(0.05)  # let other writers in between batches

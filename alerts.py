"""Operational alerts: webhookd's own signed webhooks to the operator (``[alerts]`` in the config).

webhookd tells the operator, before anyone asks, when a partner's circuit opens or closes, a
partner is disabled or made active again, deliveries end ``failed`` (grouped: at most one alert
per partner per ``interval_s``, with the count), and when an active partner's oldest pending
delivery is older than ``oldest_pending_s``. A partner can disable itself and make itself
active again at will (a test event answered 410, then a PATCH): those two alerts come at most
once each per partner per ``interval_s``, and the next one counts those held back meanwhile. Each alert is a ``webhookd.alert`` event published
to one partner of webhookd's own, ``ALERTS_PARTNER``, whose URL and secret are the config's: so an
alert is stored, signed, sent, retried and traced exactly like a partner's webhook — and, being
one more partner with its own breaker and its own share of the sender, an alert receiver that is
down holds up nobody else's deliveries. Every alert is a log line as well.

``note`` and ``failed`` are called from the delivery loop's threads; ``run`` (a task on the
server's event loop) publishes what they queued, and checks the backlog now and then.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import signing
from config import AlertsConfig
from models import NewEvent

logger = logging.getLogger("webhookd.alerts")

ALERTS_PARTNER = "partner_webhookdalerts"  # the operator's receiver, as a partner of webhookd's own
ALERT_EVENT = "webhookd.alert"
TICK_S = 0.5          # how often queued alerts are published (real time)
BACKLOG_EVERY_S = 30  # how often the oldest pending delivery is looked at (a scan of the pending rows)
LIMITED = ("partner_disabled", "partner_enabled")  # a partner can cause these on demand: one per interval


@dataclass
class _Window:
    """One partner's alert of a LIMITED kind went out at ``began``; until ``interval_s`` has passed,
    more of that kind are held back: ``held`` of them, the latest being ``latest``."""

    began: float
    held: int = 0
    latest: dict[str, Any] | None = None


class Alerts:
    def __init__(self, config: AlertsConfig, store: Any, clock: Callable[[], float],
                 new_id: Callable[[str], str], max_attempts: int):
        self.config = config
        self.enabled = bool(config.url)
        self.store = store
        self.clock = clock
        self.new_id = new_id
        self.max_attempts = max_attempts
        self._queue: list[dict[str, Any]] = []
        self._failed: dict[str, list[float]] = {}   # partner -> [count, when its window began]
        self._limited: dict[tuple[str, str], _Window] = {}  # (kind, partner) -> its window, for LIMITED kinds
        self._backlog_alerted_at = float("-inf")
        self._lock = threading.Lock()
        self._task: asyncio.Task | None = None

    def install(self, now: float) -> None:
        """Make the alerts' partner match the config (from a thread, at start-up)."""
        if self.enabled:
            self.store.ensure_system_partner(ALERTS_PARTNER, name="webhookd alerts", url=self.config.url,
                                             secret=self.config.secret, now=now)

    # --- What happened (from any thread) ---------------------------------------------------------

    def note(self, kind: str, partner_id: str, detail: str, **fields: Any) -> None:
        """Alert ``kind`` about ``partner_id`` (never about the alerts' own partner: no loops)."""
        if not self.enabled or kind not in self.config.events or partner_id == ALERTS_PARTNER:
            return
        partner = self.store.get_partner(partner_id)
        alert = {"alert": kind, "partner_id": partner_id, "partner_name": partner.name if partner else None,
                 "detail": detail, **fields}
        with self._lock:
            held = kind in LIMITED and self._hold_back(alert, self.clock())
            if not held:
                self._queue.append(alert)
        if held:
            logger.info("alert %s: partner %s: %s (held back: at most one a partner every %g s; the next one "
                        "counts it)", kind, partner_id, detail, self.config.interval_s)
        else:
            logger.warning("alert %s: partner %s: %s", kind, partner_id, detail)

    def _hold_back(self, alert: dict[str, Any], now: float) -> bool:
        """Whether this alert of a LIMITED kind waits (under the lock): one of its kind went out
        for its partner less than ``interval_s`` ago. Otherwise it opens a new window."""
        key = (alert["alert"], alert["partner_id"])
        window = self._limited.get(key)
        if window is None or now - window.began >= self.config.interval_s:
            self._limited[key] = _Window(began=now)
            return False
        window.held += 1
        window.latest = alert
        return True

    def failed(self, partner_id: str, now: float) -> None:
        """A delivery of ``partner_id`` ended failed: counted, and told once its window ends."""
        if self.enabled and "deliveries_failed" in self.config.events and partner_id != ALERTS_PARTNER:
            with self._lock:
                self._failed.setdefault(partner_id, [0, now])[0] += 1

    # --- Telling the operator (a task on the server's loop) --------------------------------------

    async def start(self, wake: Callable[[], None]) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run(wake), name="webhookd-alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, wake: Callable[[], None]) -> None:
        backlog_looked_at = float("-inf")
        while True:
            await asyncio.sleep(TICK_S)
            try:
                now = self.clock()
                if now - backlog_looked_at >= BACKLOG_EVERY_S and "backlog_old" in self.config.events:
                    backlog_looked_at = now
                    await self._check_backlog(now)
                alerts = self._take_due(now)
                for alert in alerts:
                    await asyncio.to_thread(self._publish, alert, now)
                if alerts:
                    wake()
            except Exception:
                logger.exception("publishing alerts failed; they are tried again at the next tick")

    def _take_due(self, now: float) -> list[dict[str, Any]]:
        """The queued alerts, one grouped alert per partner whose failure window has ended, and
        the latest alert held back in each LIMITED window that has ended, with the count."""
        with self._lock:
            due, self._queue = self._queue, []
            for partner_id, (count, began) in list(self._failed.items()):
                if now - began >= self.config.interval_s:
                    del self._failed[partner_id]
                    due.append(self._failed_alert(partner_id, int(count)))
            for key, window in list(self._limited.items()):
                if now - window.began < self.config.interval_s:
                    continue
                if window.latest is None:
                    del self._limited[key]
                else:
                    self._limited[key] = _Window(began=now)  # this one goes out: a new window begins
                    due.append(self._held_alert(window))
        return due

    def _held_alert(self, window: _Window) -> dict[str, Any]:
        """The latest alert a window held back, saying how many it stands for and the status now."""
        alert = dict(window.latest or {})
        partner = self.store.get_partner(alert["partner_id"])
        status = partner.status if partner else "deleted"
        alert["detail"] += (f" ({window.held} times in the last {self.config.interval_s:g} s, told once: at most "
                            f"one such alert a partner per interval; its status now: {status})")
        alert["count"] = window.held
        logger.warning("alert %s: partner %s: %s", alert["alert"], alert["partner_id"], alert["detail"])
        return alert

    def _failed_alert(self, partner_id: str, count: int) -> dict[str, Any]:
        partner = self.store.get_partner(partner_id)
        detail = f"{count} deliveries ended failed in the last {self.config.interval_s:g} s"
        logger.warning("alert deliveries_failed: partner %s: %s", partner_id, detail)
        return {"alert": "deliveries_failed", "partner_id": partner_id,
                "partner_name": partner.name if partner else None, "detail": detail, "count": count}

    async def _check_backlog(self, now: float) -> None:
        oldest = await asyncio.to_thread(self.store.oldest_pending, exclude=ALERTS_PARTNER)
        if oldest is None:
            return
        partner_id, created_at = oldest
        age = now - created_at
        if age > self.config.oldest_pending_s and now - self._backlog_alerted_at >= self.config.interval_s:
            self._backlog_alerted_at = now
            self.note("backlog_old", partner_id, f"its oldest pending delivery waits for {age:.0f} s",
                      oldest_pending_s=round(age))

    def _publish(self, alert: dict[str, Any], now: float) -> None:
        payload = {"event": ALERT_EVENT, "timestamp": int(now), **alert}
        event = NewEvent(id=self.new_id("evt_"), type=ALERT_EVENT, body=signing.canonical(payload),
                         only_partner=ALERTS_PARTNER)
        self.store.publish(event, now=now, max_attempts=self.max_attempts, new_delivery_id=lambda: self.new_id("dlv_"))

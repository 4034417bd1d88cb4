"""The processes serving from one database: the hints they send each other, the role one of
them holds at a time, their heartbeats, and the rate limits' buckets they share.

On SQLite one process owns the file and all of this is trivial: its hints go nowhere (the
engine's ``notify`` does nothing), it holds every role, its heartbeat lists itself. On
PostgreSQL several processes share the database, and these are how they stay in step:

* **hints** (``announce`` / ``listen``: ``NOTIFY`` and ``LISTEN`` on a channel) — work is due
  (``WORK_CHANNEL``), a partner changed (``PARTNERS_CHANNEL``), an offer for a
  ``/ws`` user connected to another process (``OFFERS_CHANNEL``). A hint is only a hint: whoever
  acts on one also looks by itself now and then, so a lost one costs a delay only;
* **roles** (``hold_role``) — the sweeps (retention, expiry) run in one process at a time, the
  one holding the role, renewed while it lives and taken over once it stops renewing;
* **heartbeats** (``heartbeat``) — every process renews its row every few seconds, so each knows
  how many share the work (``/health``, the per-process share of a partner's cap);
* **rate buckets** (``take_token``) — a shared store keeps the buckets of the limits that protect
  us in the database, so three processes allow what one would; a store of one process keeps them
  in memory and has none.

``Processes`` is a part of ``store.Store`` (a mixin): it uses the store's ``engine`` and
``_transaction``; the shared store writes the buckets' SQL (``store_postgres.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("webhookd.store")

WORK_CHANNEL = "webhookd_work"      # NOTIFY after publishes: deliveries are due
OFFERS_CHANNEL = "webhookd_offers"  # NOTIFY with a /ws offer, for the users connected to other processes
PARTNERS_CHANNEL = "webhookd_partners"  # NOTIFY after a partner changed, or an operator reset its circuit


class Processes:
    """The processes' half of the store (see the module docstring)."""

    def announce(self, channel: str, payload: str = "") -> None:
        """A hint to every process on the database (``NOTIFY``); a failure is only logged."""
        try:
            self.engine.notify(channel, payload)
        except Exception as exc:
            logger.warning("notifying %s failed (%s); the other processes will find out by polling", channel, exc)

    def listen(self, handlers: dict[str, Callable[[str], None]]) -> Callable[[], None]:
        """Call ``handlers[channel](payload)`` for each hint another process (or this one) sends,
        from a thread; returns the function that stops listening."""
        return self.engine.listen(lambda channel, payload: handlers[channel](payload), list(handlers))

    def hold_role(self, name: str, holder: str, ttl_s: float, now: float) -> bool:
        """Take or renew ``name`` for ``holder`` until ``now + ttl_s``; True if ``holder`` has it.
        Another process gets it only once its holder stopped renewing (died, or stopped)."""
        with self._transaction(durable=False) as db:
            row = db.execute(
                """INSERT INTO roles (name, holder, until) VALUES (:name, :holder, :until)
                   ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until = excluded.until
                   WHERE roles.holder = excluded.holder OR roles.until < :now
                   RETURNING holder""",
                {"name": name, "holder": holder, "until": now + ttl_s, "now": now}).fetchone()
        return row is not None

    def heartbeat(self, process_id: str, *, host: str, pid: int, started_at: float, now: float,
                  alive_s: float) -> list[dict[str, Any]]:
        """Renew this process's row; forget rows silent for an hour; return the processes
        seen within ``alive_s`` (this one included), oldest first."""
        with self._transaction(durable=False) as db:
            db.execute("""INSERT INTO processes (id, host, pid, started_at, seen_at)
                          VALUES (:id, :host, :pid, :started, :now)
                          ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at""",
                       {"id": process_id, "host": host, "pid": pid, "started": started_at, "now": now})
            db.execute("DELETE FROM processes WHERE seen_at < :gone", {"gone": now - 3600})
            rows = db.execute("SELECT * FROM processes WHERE seen_at >= :alive ORDER BY started_at, id",
                              {"alive": now - alive_s}).fetchall()
        return [{key: row[key] for key in row.keys()} for row in rows]

    def forget_process(self, process_id: str) -> None:
        """A process that stops says so (its heartbeats would only run out)."""
        with self._transaction(durable=False) as db:
            db.execute("DELETE FROM processes WHERE id = :id", {"id": process_id})

    def _announce_work(self) -> None:
        """Tell every process that deliveries are due (after a replay; publishes announce theirs
        through the group commit)."""
        self.announce(WORK_CHANNEL)

    def take_token(self, key: str, *, rate: float, burst: float, now: float, only_if_left: bool,
                   cost: float = 1.0) -> float | None:
        """A shared store: spend ``cost`` tokens (one; -1 gives one back) of the bucket ``key``, which
        every process shares, and return what is left; with ``only_if_left``, spend only if one is
        left, else return None. A store of one process keeps no buckets (its rate limits live in
        memory): ask only a store that is ``shared``."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared rate buckets: it is not shared")

    def tokens_left(self, key: str, *, rate: float, burst: float, now: float) -> float:
        """A shared store: the tokens in the bucket ``key`` now, without spending one."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared rate buckets: it is not shared")

    def purge_rate_buckets(self, *, before: float) -> int:
        """A shared store: forget buckets untouched since ``before`` (full again long ago)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared rate buckets: it is not shared")

"""Python's garbage collector in a busy server: the start-up heap set aside, every pause counted.

CPython frees almost everything by reference counting; its cyclic collector only finds objects
that refer to each other in a circle. But while it runs it holds the GIL, and a full collection
walks every object that has lived long — the modules, the app, the partners, thousands of attempts
in flight. At 4,500 deliveries/s that walk took 25–54 ms every half second or so, and a
``POST /events`` that arrived meanwhile waited for it: the tail of its latency
(``docs/performance.md``, "Where the time goes"). Two things keep it short:

* nothing on a delivery's path makes a reference cycle (``sender_http.read_answer_llhttp`` was the
  one; a test reads answers with the collector off and finds nothing left), so a collection finds
  no garbage there;
* ``freeze_startup_heap()``, once ``webhookd serve`` has started, moves every object alive then
  into the collector's permanent generation, which no collection walks again (``gc.freeze``: the
  standard library's answer for exactly this). A full collection then walks what changed since;
* ``FullCollections``: what changed since is mostly the attempts in flight, about 40 objects each
  (a task, its coroutines, a connection's stream). With partners half a second away thousands are
  in flight, and the collector's own rule (a full collection every hundred young ones or so) ran
  one a second, each holding the GIL for up to 74 ms. ``webhookd serve`` turns that rule off and
  collects fully once every ``FULL_COLLECTION_EVERY_S`` instead. Young collections go on as
  before and free the cycles that die young (an exception's traceback, say); only a cycle that
  lived long enough to be promoted waits for the next full collection, at most a minute.

``PAUSES`` counts the collections and the time they held the GIL, by generation, for ``/metrics``
(``webhookd_gc_collections_total``, ``webhookd_gc_pause_seconds_total``, the longest pause).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any

from metrics import Metrics


def freeze_startup_heap() -> int:
    """Collect once, then set aside every object alive now; returns how many were set aside."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


FULL_COLLECTION_EVERY_S = 60.0
NEVER = 2**31 - 1  # the oldest generation's threshold that turns the collector's own full collections off


class FullCollections:
    """A full collection every ``every_s`` on ``loop``, instead of whenever the collector's own
    rule calls for one (``start`` turns that off; ``stop`` gives it back)."""

    def __init__(self, every_s: float = FULL_COLLECTION_EVERY_S):
        self.every_s = every_s
        self._handle: asyncio.TimerHandle | None = None
        self._thresholds: tuple[int, int, int] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._thresholds = gc.get_threshold()
        young, middle, _ = self._thresholds
        gc.set_threshold(young, middle, NEVER)
        self._handle = loop.call_later(self.every_s, self._collect, loop)

    def _collect(self, loop: asyncio.AbstractEventLoop) -> None:
        gc.collect()
        self._handle = loop.call_later(self.every_s, self._collect, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None


class Pauses:
    """The collector's collections and the time each held the GIL (a ``gc.callbacks`` hook, installed
    once per process however many apps it runs: tests start many)."""

    GENERATIONS = (0, 1, 2)

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest_s = 0.0
        self._started = 0.0
        self._installed = False
        self._lock = threading.Lock()

    def install(self) -> None:
        with self._lock:
            if not self._installed:
                gc.callbacks.append(self._on_collection)
                self._installed = True

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        # The collector runs in whichever thread allocated past a threshold, holding the GIL from
        # "start" to "stop": no other callback can run between the two, so one clock will do.
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        generation = info["generation"]
        self.collections[generation] += 1
        self.seconds[generation] += took
        self.longest_s = max(self.longest_s, took)

    def add_gauges(self, metrics: Metrics) -> None:
        metrics.gauge("webhookd_gc_collections_total", "Collections of Python's cyclic garbage collector, by "
                      "generation.", lambda: {(("generation", str(g)),): float(self.collections[g])
                                              for g in self.GENERATIONS})
        metrics.gauge("webhookd_gc_pause_seconds_total", "Time the garbage collector held the GIL (nothing "
                      "else in webhookd ran), by generation.", lambda: {(("generation", str(g)),): self.seconds[g]
                                                                       for g in self.GENERATIONS})
        metrics.gauge("webhookd_gc_longest_pause_seconds", "The longest collection since the process started.",
                      lambda: {(): self.longest_s})
        metrics.gauge("webhookd_gc_threshold", "The collector's thresholds by generation; the oldest at "
                      f"{NEVER}: its own full collections are off, and `webhookd serve` runs one every "
                      f"{FULL_COLLECTION_EVERY_S:.0f} s.", lambda: {(("generation", str(g)),): float(t)
                                                              for g, t in enumerate(gc.get_threshold())})
        metrics.gauge("webhookd_gc_frozen_objects", "Objects set aside at start-up, which no collection walks "
                      "(`webhookd serve` freezes its start-up heap).", lambda: {(): float(gc.get_freeze_count())})


PAUSES = Pauses()

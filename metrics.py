"""Prometheus metrics in the text exposition format, with no dependency.

Counters and histograms are updated where things happen (the routes, the delivery
loop's threads); gauges are read when ``/metrics`` is scraped. Every update takes one lock:
worker threads and the event loop both write here.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable, Iterable

# Seconds: from a fast loopback receiver to the 5 s timeout and beyond.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 3600.0)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in labels]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            for key, value in sorted(self._values.items()):
                yield f"{self.name}{_labels(key)} {value}"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        # Per labels: the count of each bucket alone (then of the values above the last), the sum,
        # the count. Cumulated only when rendered: an observation adds to one bucket (found by
        # bisection), not to every bucket above it, as it happens several times per delivery.
        self._series: dict[Labels, list[float]] = {}
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = [0.0] * (len(self.buckets) + 3)
            series[bisect.bisect_left(self.buckets, value)] += 1
            series[-2] += value
            series[-1] += 1

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            for key, series in sorted(self._series.items()):
                for bound, count in zip(self.buckets, itertools.accumulate(series)):
                    le = f'le="{bound}"'
                    yield f"{self.name}_bucket{_labels(key, le)} {count}"
                le = 'le="+Inf"'
                yield f"{self.name}_bucket{_labels(key, le)} {series[-1]}"
                yield f"{self.name}_sum{_labels(key)} {series[-2]}"
                yield f"{self.name}_count{_labels(key)} {series[-1]}"


class Gauge:
    """A value read at scrape time from ``read()``, which returns {labels: value}."""

    def __init__(self, name: str, help_text: str, read: Callable[[], dict[Labels, float]]):
        self.name, self.help, self.read = name, help_text, read

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for key, value in sorted(self.read().items()):
            yield f"{self.name}{_labels(key)} {value}"


class Metrics:
    """Everything webhookd counts. One instance per app."""

    def __init__(self) -> None:
        self.events_published = Counter("webhookd_events_published_total", "Events accepted by POST /events.")
        self.deliveries = Counter("webhookd_deliveries_total",
                                  "Deliveries that reached a final state, by partner and outcome.")
        self.attempts = Counter("webhookd_attempts_total", "Delivery attempts by result class.")
        self.inbound = Counter("webhookd_inbound_total", "Inbound partner events by result.")
        self.inbound_partners_tried = Counter(
            "webhookd_inbound_partners_tried_total",
            "Partners whose secrets were tried on an inbound signature (an event without X-Partner-Id tries many).")
        self.storage_refusals = Counter("webhookd_storage_refusals_total",
                                        "Requests answered 503 because the database could not be written (disk full).")
        self.attempt_seconds = Histogram("webhookd_attempt_duration_seconds", "Duration of one delivery attempt.",
                                         DURATION_BUCKETS)
        self.delivered_seconds = Histogram("webhookd_publish_to_delivered_seconds",
                                           "Time from publish to a successful delivery.", LATENCY_BUCKETS)
        self.claim_rows = Histogram("webhookd_claim_rows", "Deliveries leased by one claim of the delivery loop.",
                                    (0, 1, 5, 10, 25, 50, 100))
        self.claim_seconds = Histogram("webhookd_claim_duration_seconds",
                                       "Time one claim took, waiting for the database included.", LATENCY_BUCKETS)
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help_text: str, read: Callable[[], dict[Labels, float]]) -> None:
        self.gauges.append(Gauge(name, help_text, read))

    def render(self) -> str:
        """The text format. Gauges read their sources now, so call it off the event loop."""
        families = [self.events_published, self.deliveries, self.attempts, self.inbound, self.inbound_partners_tried,
                    self.storage_refusals, self.attempt_seconds, self.delivered_seconds, self.claim_rows,
                    self.claim_seconds, *self.gauges]
        return "\n".join(line for family in families for line in family.render()) + "\n"

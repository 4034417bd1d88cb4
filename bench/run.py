"""webhookd's benchmark: `make bench` (or `.venv/bin/python bench/run.py [--quick] [--only NAME]`).

One nginx receiver (OS package, own config, 127.0.0.1) for every scenario; the guide's
payment.success payload everywhere. Scenarios (``--only`` takes one or more, comma-separated):

  throughput  deliveries/s of the guide's sender, a 32-thread urllib pool and webhookd
  latency     publish -> delivered p50/p99 at a fixed offered 1,000 deliveries/s
  blackhole   healthy partners' deliveries/s with and without a black-hole partner
  backlog     drain rate and peak RSS with 1,000,000 vs 10,000 pending deliveries
  reads       (k) GET /events/{id} and filtered GET /deliveries on a history of 1,000,000 deliveries
  inbound     POST /webhooks/partners requests/s vs GET /health
  fanout      (d) partners 100 ms and 500 ms away: 50 partners on a slow receiver, bundled config
  slow        (l) one healthy partner 2 s away offered 200 deliveries/s: does it keep up?
  idle        (e) CPU at 10 events/s to one partner, beside 10,000 idle partners and alone
  postgres    (f) one process on PostgreSQL vs one on SQLite, (g) three processes on one PostgreSQL
  crash       (j) a kill -9 under full load: how many deliveries nginx got twice after the restart

Each figure is the median of ``--runs`` runs (3 by default) with its min–max; a ratio is taken
within one round (the two runs it compares ran back to back) and then its median is reported.
Every load loop is bounded in count and time; every process started here is stopped by PID,
also on Ctrl+C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import hmac
import itertools
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# This checkout's modules first (``backlog`` and ``reads`` import its store before ``common`` puts the
# root on the path; an installed webhookd elsewhere would be measured instead), then the bench's own.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import backlog  # noqa: E402
import baselines  # noqa: E402
import loadgen  # noqa: E402
import reads  # noqa: E402
from common import (  # noqa: E402
    ADMIN_HEADERS,
    EVENT_TYPE,
    PAYLOAD_BYTES,
    PAYMENT_SUCCESS,
    ROOT,
    BlackHole,
    LogLine,
    Nginx,
    Procs,
    Series,
    SlowReceiver,
    Webhookd,
    collect,
    percentile,
    thread_count,
)

from storage import open_store  # noqa: E402

SCENARIOS = ["throughput", "latency", "blackhole", "backlog", "reads", "inbound", "fanout", "slow", "idle", "postgres",
             "crash"]
PARTNERS = 5
FLOOR_DELIVERIES = 20_000  # per floor run, at least (the floor sends 30,000-60,000/s)
PATHS = [f"/p{k}" for k in range(PARTNERS)]


@dataclass
class Params:
    runs: int = 3
    deliveries: int = 5000            # per throughput run, for each sender
    publish_threads: int = 4          # keep-alive connections publishing to webhookd
    latency_rate: float = 1000.0      # deliveries/s offered (events/s x 5 partners)
    latency_s: float = 5.0
    blackhole_deliveries: int = 5000  # healthy deliveries per black-hole run
    backlog_small: int = 10_000
    backlog_large: int = 1_000_000
    backlog_window_s: float = 20.0
    reads_history: int = 1_000_000    # (k): deliveries in the file read
    reads_repeat: int = 50            # (k): calls per read per run (their median is the run's figure)
    inbound_requests: int = 4000
    inbound_threads: int = 8
    fanout_partners: int = 50
    fanout_delays: tuple[float, ...] = (0.1, 0.5)
    fanout_deliveries: int = 20_000   # per webhookd run at 100 ms and 500 ms (see fanout_total): 4-7 s each,
                                      # ~200 probes in a run, so the p99 is not the slowest one (nearest rank)
    fanout_time_limit_s: float = 60.0
    fanout_delivery: dict[str, Any] = field(default_factory=dict)  # [delivery] keys over the bundled config
    slow_delay_s: float = 2.0         # (l): the partner answers after this long...
    slow_rate: float = 200.0          # (l): ...offered this many deliveries a second...
    slow_s: float = 20.0              # (l): ...for this long
    idle_partners: int = 10_000       # (e): registered partners that get no events
    idle_rate: float = 10.0           # (e): events/s to the one active partner
    idle_s: float = 10.0              # (e): how long that rate is offered (CPU shown per 10 s)
    pg_processes: int = 3             # (g): webhookd processes on one PostgreSQL
    pg_stall_s: float = 60.0          # (i): how long a REPEATABLE READ transaction stays open
    crash_deliveries: int = 20_000    # (j): the burst a kill -9 cuts

    @classmethod
    def quick(cls) -> Params:
        return cls(runs=1, deliveries=1500, latency_s=2.0, blackhole_deliveries=1500, idle_s=5.0,
                   backlog_large=100_000, backlog_window_s=5.0, reads_history=100_000, reads_repeat=10,
                   inbound_requests=1500, fanout_deliveries=1000, pg_stall_s=10.0, crash_deliveries=5000, slow_s=10.0)


@dataclass
class Bench:
    procs: Procs
    workdir: Path
    nginx: Nginx
    params: Params
    results: dict[str, Any] = field(default_factory=dict)
    _seq: int = 0

    def rundir(self, name: str) -> Path:
        self._seq += 1
        path = self.workdir / f"{self._seq:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def urls(self) -> list[str]:
        return [self.nginx.url(p) for p in PATHS]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- Publishing to webhookd ---------------------------------------------------------------------


def publish_request(i: int) -> tuple[str, str, bytes, dict[str, str]]:
    return "POST", "/events", PAYLOAD_BYTES, ADMIN_HEADERS


class Published:
    """Event ids webhookd answered 202 with, and when each publish request was sent."""

    def __init__(self) -> None:
        self.sent_at: dict[str, float] = {}
        self.answered_in: list[float] = []
        self.failures = 0
        self._lock = threading.Lock()

    def on_response(self, i: int, sent_at: float, status: int, body: bytes) -> None:
        if status != 202:
            with self._lock:
                self.failures += 1
            return
        event_id = json.loads(body)["event_id"]
        answered = time.time() - sent_at
        with self._lock:
            self.sent_at[event_id] = sent_at
            self.answered_in.append(answered)


def start_webhookd(bench: Bench, name: str, *, black_hole: BlackHole | None = None, register: bool = True,
                   **kwargs: Any) -> Webhookd:
    wd = Webhookd(bench.procs, bench.rundir(name), **kwargs).start()
    for k, url in enumerate(bench.urls() if register else []):
        wd.register(url, f"Bench partner {k}")
    if black_hole is not None:
        wd.register(black_hole.url(), "Black hole")
    return wd


def webhookd_throughput(bench: Bench, deliveries: int, *, name: str = "webhookd", black_hole: bool = False,
                        around: Callable[[Webhookd], contextlib.AbstractContextManager] | None = None,
                        overrides: dict[str, dict[str, Any]] | None = None, processes: int = 1) -> dict:
    """Publish deliveries/5 events (each fans out to the 5 nginx partners) from several
    keep-alive connections; deliveries/s = healthy deliveries / (first publish -> last one logged).
    ``processes`` > 1 (PostgreSQL): that many webhookd on one database, each published to by
    its share of the connections."""
    hole = BlackHole() if black_hole else None
    wd = start_webhookd(bench, name, black_hole=hole, overrides=overrides)
    others = [start_webhookd(bench, f"{name}-{n}", register=False, overrides=overrides) for n in range(1, processes)]
    try:
        tail = bench.nginx.tail()
        published = Published()
        events = deliveries // PARTNERS
        cpu_before = wd.cpu_seconds()
        with (around(wd) if around else contextlib.nullcontext()):
            pub = _publish_through(bench, [wd, *others], events, published)
            lines = collect(tail, len(published.sent_at) * PARTNERS, timeout=120, alive=wd.alive,
                            accept=lambda line: line.uri in PATHS)
        cpu = (wd.cpu_seconds() or 0) - (cpu_before or 0)
        rss = wd.peak_rss_mb()
        ids = published.sent_at
        ours = [line for line in lines if line.webhook_id in ids]
        unique = {(line.webhook_id, line.uri) for line in ours}
        end = max((line.msec for line in ours), default=pub.started)
        result = {
            "deliveries": len(ours), "expected": events * PARTNERS, "duplicates": len(ours) - len(unique),
            "non_200": sum(line.status != 200 for line in ours), "publish_failures": published.failures + pub.sent - pub.ok,
            "seconds": end - pub.started, "rate": len(ours) / max(end - pub.started, 1e-9),
            "publish_rate": pub.rate * PARTNERS, "rss_mb": rss, "cpu_s": cpu,
            "cpu_ms_per_delivery": 1000 * cpu / max(len(ours), 1),
        }
        if hole is not None:
            result["black_hole_connections"] = len(hole.accepted)
        if result["duplicates"]:
            log(f"  {name}: {result['duplicates']} deliveries arrived twice")
        if len(ours) < events * PARTNERS:
            log(f"  {name}: only {len(ours)} of {events * PARTNERS} deliveries arrived; log tail:\n{wd.log_tail(10)}")
        return result
    finally:
        if hole is not None:
            hole.stop()  # in-flight attempts to it fail at once, so webhookd stops quickly
        for each in (wd, *others):
            each.stop()


def _publish_through(bench: Bench, processes: list[Webhookd], events: int, published: Published) -> Any:
    """``events`` publishes, shared between the processes, each from its own keep-alive connections;
    returns the first process's load-generator result with the started time of the earliest."""
    if len(processes) == 1:
        return loadgen.closed_loop(processes[0].port, threads=bench.params.publish_threads, total=events,
                                   time_limit_s=120, build=publish_request, on_response=published.on_response)
    results: list[Any] = [None] * len(processes)

    def publish(n: int) -> None:
        share = events // len(processes) + (1 if n < events % len(processes) else 0)
        results[n] = loadgen.closed_loop(processes[n].port, threads=max(1, bench.params.publish_threads // 2),
                                         total=share, time_limit_s=120, build=publish_request,
                                         on_response=published.on_response)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(len(processes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    return loadgen.LoadResult(sent=sum(r.sent for r in results), ok=sum(r.ok for r in results),
                              started=min(r.started for r in results), finished=max(r.finished for r in results))


# --- 1. Throughput --------------------------------------------------------------------------


def scenario_throughput(bench: Bench) -> None:
    p = bench.params
    n = p.deliveries
    secret = "sk_live_bench_secret_for_the_baselines"
    series = {k: Series() for k in ("guide", "pool", "webhookd", "vs_pool", "vs_guide", "rss", "cpu_ms", "floor",
                                    "floor_uvloop", "vs_floor")}
    runs: list[dict] = []
    floors = ["floor", "floor_uvloop"] if baselines.uvloop_installed() else ["floor"]
    for r in range(p.runs):
        order = ["guide", "pool", "webhookd"]
        order = order[r % 3:] + order[:r % 3] + floors
        rates: dict[str, float] = {}
        for sender in order:
            tail = bench.nginx.tail()
            if sender == "guide":
                ok, seconds = baselines.guide_sender(bench.urls(), secret, PAYMENT_SUCCESS, n, time_limit_s=60)
                logged = collect(tail, n, timeout=5, accept=lambda line: line.uri in PATHS)
                rates[sender] = ok / seconds
                runs.append({"round": r, "sender": sender, "ok": ok, "logged": len(logged), "seconds": seconds})
            elif sender == "pool":
                ok, seconds = baselines.stdlib_pool(bench.urls(), secret, PAYLOAD_BYTES, EVENT_TYPE, n, time_limit_s=60)
                logged = collect(tail, n, timeout=5, accept=lambda line: line.uri in PATHS)
                rates[sender] = ok / seconds
                runs.append({"round": r, "sender": sender, "ok": ok, "logged": len(logged), "seconds": seconds})
            elif sender.startswith("floor"):
                total = max(n, FLOOR_DELIVERIES)  # it is fast: enough requests to last about a second
                ok, seconds = baselines.streams_floor(bench.urls(), secret, PAYLOAD_BYTES, EVENT_TYPE, total,
                                                      time_limit_s=60, use_uvloop=sender == "floor_uvloop")
                rates[sender] = ok / seconds
                runs.append({"round": r, "sender": sender, "ok": ok, "seconds": seconds})
            else:
                res = webhookd_throughput(bench, n, name=f"throughput-{r}")
                rates[sender] = res["rate"]
                series["rss"].add(res["rss_mb"])
                series["cpu_ms"].add(res["cpu_ms_per_delivery"])
                runs.append({"round": r, "sender": sender, **res})
            log(f"  round {r + 1}/{p.runs} {sender:<8} {rates[sender]:8.0f} deliveries/s")
        for k in ("guide", "pool", "webhookd", *floors):
            series[k].add(rates[k])
        series["vs_floor"].add(rates["webhookd"] / rates[floors[-1]])
        series["vs_pool"].add(rates["webhookd"] / rates["pool"])
        series["vs_guide"].add(rates["webhookd"] / rates["guide"])
    bench.results["throughput"] = {"series": series, "runs": runs}


# --- 2. Latency at a fixed offered rate --------------------------------------------------------


def webhookd_latency(bench: Bench, name: str, events_per_s: float, seconds: float,
                     overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    """Publish at a paced rate (after a warm-up) and time each delivery: nginx's $msec minus the
    moment its publish was sent."""
    total_events = int(events_per_s * seconds)
    wd = start_webhookd(bench, name, overrides=overrides)
    try:
        # Warm-up (not measured): connections to nginx opened, code paths warm.
        tail = bench.nginx.tail()
        warm = Published()
        loadgen.closed_loop(wd.port, threads=2, total=50, time_limit_s=20, build=publish_request,
                            on_response=warm.on_response)
        collect(tail, len(warm.sent_at) * PARTNERS, timeout=20, alive=wd.alive)
        tail.mark()
        published = Published()
        pub = loadgen.paced(wd.port, threads=8, total=total_events, rate=events_per_s, build=publish_request,
                            on_response=published.on_response)
        lines = collect(tail, len(published.sent_at) * PARTNERS, timeout=30, alive=wd.alive,
                        accept=lambda line, sent=published.sent_at: line.webhook_id in sent)
        rss = wd.peak_rss_mb()
    finally:
        wd.stop()
    latencies = sorted(1000 * (line.msec - published.sent_at[line.webhook_id]) for line in lines)
    answered = sorted(1000 * a for a in published.answered_in)
    return {
        "deliveries": len(lines), "expected": total_events * PARTNERS,
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "max_ms": latencies[-1] if latencies else float("nan"),
        "publish_p50_ms": percentile(answered, 50), "publish_p99_ms": percentile(answered, 99),
        "offered_per_s": pub.ok * PARTNERS / pub.elapsed, "late_sends": pub.late, "rss_mb": rss,
    }


def scenario_latency(bench: Bench) -> None:
    p = bench.params
    series = {k: Series() for k in ("p50", "p99", "max", "publish_p99", "offered", "rss")}
    runs = []
    for r in range(p.runs):
        res = webhookd_latency(bench, f"latency-{r}", p.latency_rate / PARTNERS, p.latency_s)
        runs.append(res)
        series["p50"].add(res["p50_ms"])
        series["p99"].add(res["p99_ms"])
        series["max"].add(res["max_ms"])
        series["publish_p99"].add(res["publish_p99_ms"])
        series["offered"].add(res["offered_per_s"])
        series["rss"].add(res["rss_mb"])
        log(f"  round {r + 1}/{p.runs} latency p50 {res['p50_ms']:.1f} ms p99 {res['p99_ms']:.1f} ms "
            f"(offered {res['offered_per_s']:.0f}/s, {res['deliveries']}/{res['expected']} delivered, "
            f"publish 202 p99 {res['publish_p99_ms']:.1f} ms, {res['late_sends']} sends late)")
    bench.results["latency"] = {"series": series, "runs": runs}


# --- 3. (a) A black-hole partner -----------------------------------------------------------------


def scenario_blackhole(bench: Bench) -> None:
    p = bench.params
    series = {k: Series() for k in ("without", "with", "ratio")}
    runs = []
    for r in range(p.runs):
        without = webhookd_throughput(bench, p.blackhole_deliveries, name=f"healthy-{r}")
        with_hole = webhookd_throughput(bench, p.blackhole_deliveries, name=f"blackhole-{r}", black_hole=True)
        series["without"].add(without["rate"])
        series["with"].add(with_hole["rate"])
        series["ratio"].add(with_hole["rate"] / without["rate"])
        runs.append({"round": r, "without": without, "with": with_hole})
        log(f"  round {r + 1}/{p.runs} healthy partners {without['rate']:.0f}/s alone, {with_hole['rate']:.0f}/s "
            f"beside a black hole ({with_hole['rate'] / without['rate']:.0%}; "
            f"{with_hole.get('black_hole_connections')} connections to the hole)")
    bench.results["blackhole"] = {"series": series, "runs": runs}


# --- 4. (b) A backlog of pending deliveries -------------------------------------------------------


def drain(bench: Bench, template: Path, size: int, window_s: float, name: str) -> dict:
    """Start webhookd on a copy of ``template`` and count deliveries at nginx: until drained, or for
    ``window_s`` seconds after the first one. Rate = deliveries in the window / window length."""
    rundir = bench.rundir(name)
    db_path = rundir / "webhookd.db"
    backlog.copy(template, db_path)
    tail = bench.nginx.tail()
    wd = Webhookd(bench.procs, rundir, db_path=db_path)
    try:
        wd.start(timeout=120)
        lines: list[LogLine] = []
        deadline = time.monotonic() + window_s + 60
        while len(lines) < size and time.monotonic() < deadline and wd.alive():
            lines += [line for line in tail.read() if line.uri in PATHS]
            if lines and time.time() > lines[0].msec + window_s + 0.3:
                break
            time.sleep(0.05)
        rss = wd.peak_rss_mb()
    finally:
        wd.stop()
        for suffix in ("", "-wal", "-shm"):
            Path(str(db_path) + suffix).unlink(missing_ok=True)
    if not lines:
        raise RuntimeError(f"{name}: nothing was delivered; webhookd log:\n{wd.log_tail()}")
    first = lines[0].msec
    drained = len(lines) >= size
    if drained:
        span = max(lines[-1].msec - first, 1e-3)
        counted = len(lines)
    else:
        span = window_s
        counted = sum(line.msec <= first + window_s for line in lines)
    return {"size": size, "delivered": counted, "drained": drained, "seconds": span, "rate": counted / span,
            "rss_mb": rss, "startup_s": wd.startup_s}


def scenario_backlog(bench: Bench) -> None:
    p = bench.params
    bdir = bench.workdir / "backlog-templates"
    secrets = [f"sk_live_bench_backlog_{k}" for k in range(PARTNERS)]
    templates = {}
    for size in (p.backlog_small, p.backlog_large):
        templates[size] = bdir / f"backlog-{size}.db"
        seconds = backlog.build(templates[size], deliveries=size, urls=bench.urls(), secrets=secrets,
                                body=PAYLOAD_BYTES, event_type=EVENT_TYPE)
        log(f"  built a backlog of {size:,} pending deliveries in {seconds:.1f} s "
            f"({templates[size].stat().st_size / 2**20:.0f} MiB)")
    series = {k: Series() for k in ("small_rate", "large_rate", "ratio", "small_rss", "large_rss",
                                    "small_startup", "large_startup")}
    runs = []
    for r in range(p.runs):
        small = drain(bench, templates[p.backlog_small], p.backlog_small, p.backlog_window_s, f"backlog-small-{r}")
        large = drain(bench, templates[p.backlog_large], p.backlog_large, p.backlog_window_s, f"backlog-large-{r}")
        runs.append({"round": r, "small": small, "large": large})
        series["small_rate"].add(small["rate"])
        series["large_rate"].add(large["rate"])
        series["ratio"].add(large["rate"] / small["rate"])
        series["small_rss"].add(small["rss_mb"])
        series["large_rss"].add(large["rss_mb"])
        series["small_startup"].add(small["startup_s"])
        series["large_startup"].add(large["startup_s"])
        log(f"  round {r + 1}/{p.runs} backlog {p.backlog_small:,}: {small['rate']:.0f}/s "
            f"({small['delivered']:,} in {small['seconds']:.1f} s), RSS {small['rss_mb']:.0f} MiB; "
            f"{p.backlog_large:,}: {large['rate']:.0f}/s ({large['delivered']:,} in {large['seconds']:.1f} s), "
            f"RSS {large['rss_mb']:.0f} MiB, start-up {large['startup_s']:.1f} s")
    shutil.rmtree(bdir, ignore_errors=True)
    bench.results["backlog"] = {"series": series, "runs": runs}


# --- 4b. (k) Reading deliveries on a long history ----------------------------------------------------


def scenario_reads(bench: Bench) -> None:
    """Each read's median time over ``reads_repeat`` calls, once per run, on one file built here;
    beside it, the event's deliveries through the statement used before (the baseline)."""
    p = bench.params
    path = bench.workdir / "reads" / "history.db"
    seconds = reads.build(path, deliveries=p.reads_history)
    log(f"  built a history of {p.reads_history:,} deliveries in {seconds:.1f} s "
        f"({path.stat().st_size / 2**20:.0f} MiB)")
    events = p.reads_history // reads.PARTNERS
    store = open_store(str(path))
    series: dict[str, Series] = {}
    runs = []
    try:
        for r in range(p.runs):
            rng = random.Random(r)
            found = {name: reads.median_ms(read, p.reads_repeat) for name, read in reads.reads(store, events, rng).items()}
            before = reads.median_ms(reads.event_page_before(store, events, rng), max(3, p.reads_repeat // 10))
            found["slowest"] = max(found.values())
            found["before"] = before
            found["before_vs_now"] = before / found["GET /events/{id}"]
            for name, value in found.items():
                series.setdefault(name, Series()).add(value)
            runs.append({"round": r, **found})
            log(f"  round {r + 1}/{p.runs}: slowest read {found['slowest']:.2f} ms; GET /events/{{id}} "
                f"{found['GET /events/{id}']:.2f} ms, with the statement used before {before:.0f} ms")
    finally:
        store.close()
        shutil.rmtree(path.parent, ignore_errors=True)
    bench.results["reads"] = {"series": series, "runs": runs}


# --- 5. (c) Inbound partner events vs a trivial route ----------------------------------------------


def start_inbound_webhookd(bench: Bench) -> Webhookd:
    # The per-partner inbound rate limit (when this webhookd has one) is raised out of the way:
    # this row measures what the route costs, not the limit.
    return start_webhookd(bench, "inbound", overrides={"security": {"inbound_rate_per_s": 1_000_000.0}})


def inbound_requests(wd: Webhookd) -> Callable[[int], tuple[str, str, bytes, dict[str, str]]]:
    """Request *i*: the guide's payment.success from partner 0 (fresh timestamp, as the 300 s window
    wants), hex HMAC-SHA256 of the body with its shared secret, a unique X-Webhook-Id."""
    partner = wd.partners[0]
    payload = dict(PAYMENT_SUCCESS, timestamp=int(time.time()))
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    signature = hmac.new(partner["shared_secret"].encode(), body, hashlib.sha256).hexdigest()
    prefix = f"inb_bench_{os.getpid()}_{time.monotonic_ns()}_"
    unique = itertools.count()  # across every load run on this server: each request is stored anew

    def build(i: int) -> tuple[str, str, bytes, dict[str, str]]:
        return "POST", "/webhooks/partners", body, {
            "Content-Type": "application/json", "X-Webhook-Signature": signature,
            "X-Webhook-Event": EVENT_TYPE, "X-Partner-Id": partner["partner_id"],
            "X-Webhook-Id": f"{prefix}{next(unique)}"}

    return build


def scenario_inbound(bench: Bench) -> None:
    p = bench.params
    series = {k: Series() for k in ("inbound", "health", "ratio")}
    runs = []
    wd = start_inbound_webhookd(bench)
    try:
        inbound = inbound_requests(wd)

        def health(i: int) -> tuple[str, str, None, dict[str, str]]:
            return "GET", "/health", None, {}

        def load(build: Callable, total: int) -> loadgen.LoadResult:
            return loadgen.closed_loop(wd.port, threads=p.inbound_threads, total=total, time_limit_s=30, build=build)

        def measured(build: Callable, total: int) -> tuple[loadgen.LoadResult, float, float]:
            """The run, with the CPU seconds the load generator (this process) and webhookd used."""
            client0, server0 = time.process_time(), wd.cpu_seconds() or 0.0
            res = load(build, total)
            return res, time.process_time() - client0, (wd.cpu_seconds() or 0.0) - server0

        load(health, 300)
        load(inbound, 300)
        for r in range(p.runs):
            rates, cpu = {}, {}
            for kind in (["health", "inbound"] if r % 2 == 0 else ["inbound", "health"]):
                res, client_cpu, server_cpu = measured(health if kind == "health" else inbound, p.inbound_requests)
                rates[kind] = res.rate
                cpu[kind] = (client_cpu / res.elapsed, server_cpu / res.elapsed)
                runs.append({"round": r, "route": kind, "ok": res.ok, "sent": res.sent,
                             "statuses": dict(res.statuses), "errors": dict(res.errors), "rate": res.rate,
                             "seconds": res.elapsed, "client_cores": cpu[kind][0], "server_cores": cpu[kind][1]})
                if res.ok != res.sent:
                    log(f"  {kind}: {res.sent - res.ok} of {res.sent} requests failed: {dict(res.statuses)} "
                        f"{dict(res.errors)}")
            series["inbound"].add(rates["inbound"])
            series["health"].add(rates["health"])
            series["ratio"].add(rates["inbound"] / rates["health"])
            log(f"  round {r + 1}/{p.runs} inbound {rates['inbound']:.0f} req/s, /health {rates['health']:.0f} req/s "
                f"(CPU cores used, load generator/webhookd: inbound {cpu['inbound'][0]:.2f}/{cpu['inbound'][1]:.2f}, "
                f"/health {cpu['health'][0]:.2f}/{cpu['health'][1]:.2f})")
    finally:
        wd.stop()
    bench.results["inbound"] = {"series": series, "runs": runs}


# --- 6. (d) Partners far away: latency, not CPU, sets the pace ----------------------------------

PROBE_PAYLOAD = json.dumps({"event": "booking.cancelled", "booking_id": "probe", "user_id": "probe"}).encode()


def fanout_total(p: Params, delay_s: float) -> int:
    """Deliveries per run: all of ``fanout_deliveries`` up to 500 ms away (the first round trips and
    the last are fixed costs: a run must be long beside them), fewer past that, so a run stays
    within its time limit."""
    return max(p.fanout_partners, int(p.fanout_deliveries * min(1.0, 0.5 / delay_s) * 2) // 2)


PROBE_EVERY_S = 0.01    # a probe's publish and health check, then this pause: ~200 of each in a 4 s run,
STATS_EVERY = 10        # enough for a 99th percentile that is not simply the slowest; /stats every 10th


class Probe:
    """While a run goes on: POST /events (a type nobody subscribes to, so it adds no delivery)
    and GET /health every ``PROBE_EVERY_S``, timing each answer; webhookd's in-flight count and
    threads."""

    def __init__(self, wd: Webhookd):
        self.wd = wd
        self.publish_ms: list[float] = []
        self.health_ms: list[float] = []
        self.in_flight = 0
        self.threads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        from common import Client

        client = Client(self.wd.port, timeout=10)
        try:
            for turn in itertools.count():
                if self._stop.wait(PROBE_EVERY_S):
                    break
                for path, body, into in (("/events", PROBE_PAYLOAD, self.publish_ms), ("/health", None, self.health_ms)):
                    started = time.perf_counter()
                    status, data = client.request("POST" if body else "GET", path, body, ADMIN_HEADERS)
                    into.append(1000 * (time.perf_counter() - started))
                if turn % STATS_EVERY:
                    continue
                status, data = client.request("GET", "/stats", None, ADMIN_HEADERS)
                if status == 200:
                    self.in_flight = max(self.in_flight, json.loads(data)["totals"]["in_flight"])
                self.threads = max(self.threads, thread_count(self.wd.pid) or 0)
        except OSError:
            pass
        finally:
            client.close()


def webhookd_fanout(bench: Bench, receiver: SlowReceiver, total: int, name: str,
                    overrides: dict[str, dict[str, Any]] | None = None) -> dict:
    """Publish total/partners events, each to every partner on the slow receiver; deliveries/s =
    requests the receiver counted / (first publish -> the receiver's count reaching ``total``)."""
    p = bench.params
    wd = Webhookd(bench.procs, bench.rundir(name), overrides=overrides).start()  # bundled config unless overridden
    try:
        for k in range(p.fanout_partners):
            wd.register(receiver.url(f"/p{k}"), f"Far partner {k}")
        receiver.stats(reset=True)
        cpu_before = receiver.stats()["cpu_s"]
        published = Published()
        with Probe(wd) as probe:
            started = time.monotonic()
            loadgen.closed_loop(wd.port, threads=bench.params.publish_threads, total=total // p.fanout_partners,
                                time_limit_s=30, build=publish_request, on_response=published.on_response)
            deadline = started + p.fanout_time_limit_s
            while (count := receiver.stats()["requests"]) < total and time.monotonic() < deadline and wd.alive():
                time.sleep(0.02)
            elapsed = time.monotonic() - started
        stats = receiver.stats()
        return {"deliveries": count, "expected": total, "seconds": elapsed, "rate": count / elapsed,
                "publish_p99_ms": percentile(sorted(probe.publish_ms), 99), "publish_max_ms": max(probe.publish_ms),
                "publish_probes": len(probe.publish_ms),
                "health_p99_ms": percentile(sorted(probe.health_ms), 99),
                "in_flight": stats["max_in_flight"], "claimed": probe.in_flight, "threads": probe.threads,
                "rss_mb": wd.peak_rss_mb(), "receiver_cpu_s": stats["cpu_s"] - cpu_before}
    finally:
        wd.stop()


def scenario_fanout(bench: Bench) -> None:
    p = bench.params
    secret = "sk_live_bench_secret_for_the_baselines"
    bench.results["fanout"] = {}
    for delay in p.fanout_delays:
        key = f"{int(delay * 1000)}ms"
        receiver = SlowReceiver(bench.procs, delay).start()
        loopback = SlowReceiver(bench.procs, 0.0).start()
        urls = [receiver.url(f"/p{k}") for k in range(p.fanout_partners)]
        total = fanout_total(p, delay)
        names = ("webhookd", "pool", "guide", "vs_pool", "vs_guide", "vs_loopback", "publish_p99", "publish_max",
                 "probes", "health_p99", "in_flight", "rss", "threads", "receiver_cpu")
        series = {k: Series() for k in names}
        runs = []
        try:
            for r in range(p.runs):
                overrides = {"delivery": p.fanout_delivery} if p.fanout_delivery else None
                res = webhookd_fanout(bench, receiver, total, f"fanout-{key}-{r}", overrides)
                own = webhookd_fanout(bench, loopback, total, f"fanout-loopback-{key}-{r}", overrides)
                receiver.stats(reset=True)
                pool_total = min(total, int(32 / delay * 10))  # about 10 s of it: its rate is steady by then
                ok, seconds = baselines.stdlib_pool(urls, secret, PAYLOAD_BYTES, EVENT_TYPE, pool_total,
                                                    time_limit_s=p.fanout_time_limit_s)
                pool = ok / seconds
                guide_n = max(5, int(3 / delay))  # about 3 s of it: sequential, one partner after the other
                ok, seconds = baselines.guide_sender(urls, secret, PAYMENT_SUCCESS, guide_n, time_limit_s=30)
                guide = ok / seconds
                for k, v in (("webhookd", res["rate"]), ("pool", pool), ("guide", guide),
                             ("vs_pool", res["rate"] / pool), ("vs_guide", res["rate"] / guide),
                             ("vs_loopback", res["rate"] / own["rate"]), ("publish_p99", res["publish_p99_ms"]),
                             ("publish_max", res["publish_max_ms"]), ("probes", res["publish_probes"]),
                             ("health_p99", res["health_p99_ms"]), ("in_flight", res["in_flight"]),
                             ("rss", res["rss_mb"]), ("threads", res["threads"]),
                             ("receiver_cpu", res["receiver_cpu_s"] / res["seconds"])):
                    series[k].add(v)
                runs.append({"round": r, "webhookd": res, "loopback": own, "pool": pool, "guide": guide})
                log(f"  round {r + 1}/{p.runs} {key}: webhookd {res['rate']:.0f}/s ({res['deliveries']}/{total}, "
                    f"{own['rate']:.0f}/s at 0 ms), pool {pool:.0f}/s, guide {guide:.1f}/s; in flight "
                    f"{res['in_flight']}, POST /events p99 {res['publish_p99_ms']:.1f} ms, RSS {res['rss_mb']:.0f} MiB, "
                    f"{res['threads']} threads, receiver CPU {res['receiver_cpu_s'] / res['seconds']:.0%}")
        finally:
            receiver.stop()
            loopback.stop()
        bench.results["fanout"][key] = {"series": series, "runs": runs}


# --- (e) Idle partners ------------------------------------------------------------------------------


def webhookd_slow_partner(bench: Bench, name: str) -> dict:
    """One partner on bench/slow_receiver.py answering 200 after ``slow_delay_s``, offered
    ``slow_rate`` events/s (one delivery each) for ``slow_s`` on the bundled config. Its rate in the
    second half of the offer (the first fills the pipe: rate x delay in flight) against the rate
    offered; how far behind it is when the offer ends; how long until every delivery arrived."""
    p = bench.params
    receiver = SlowReceiver(bench.procs, p.slow_delay_s).start()
    wd = start_webhookd(bench, name, register=False)
    try:
        partner = wd.register(receiver.url("/slow"), "Slow partner")
        total = int(p.slow_rate * p.slow_s)
        receiver.stats(reset=True)
        offer = threading.Thread(target=loadgen.paced, kwargs=dict(
            port=wd.port, threads=8, total=total, rate=p.slow_rate, build=publish_request))
        started = time.monotonic()
        offer.start()
        counts = []  # (seconds since the start, requests the receiver counted)
        while time.monotonic() - started < p.slow_s + 30 and (not counts or counts[-1][1] < total):
            time.sleep(0.5)
            counts.append((time.monotonic() - started, receiver.stats()["requests"]))
        offer.join(timeout=30)
        stats = receiver.stats()
        concurrency = next(row["concurrency"] for row in wd.get_json("/stats")["partners"]
                           if row["partner_id"] == partner["partner_id"])
    finally:
        wd.stop()
        receiver.stop()

    def count_at(t: float) -> int:
        return max((n for s, n in counts if s <= t), default=0)

    half, end = p.slow_s / 2, p.slow_s
    rate = (count_at(end) - count_at(half)) / (end - half)
    done_at = next((s for s, n in counts if n >= total), None)
    return {"offered_per_s": p.slow_rate, "rate": rate, "ratio": rate / p.slow_rate,
            "behind_at_end": total - count_at(end), "drained_after_s": None if done_at is None else done_at - end,
            "delivered": stats["requests"], "expected": total, "peak_in_flight": stats["max_in_flight"],
            "partner_concurrency": concurrency}


def scenario_slow(bench: Bench) -> None:
    p = bench.params
    series = {k: Series() for k in ("rate", "ratio", "behind", "drained", "peak", "concurrency")}
    runs = []
    for r in range(p.runs):
        res = webhookd_slow_partner(bench, f"slow-{r}")
        runs.append(res)
        for key, value in (("rate", res["rate"]), ("ratio", res["ratio"]), ("behind", res["behind_at_end"]),
                           ("drained", res["drained_after_s"]), ("peak", res["peak_in_flight"]),
                           ("concurrency", res["partner_concurrency"])):
            series[key].add(value)
        log(f"  round {r + 1}/{p.runs} slow partner: {res['rate']:.0f}/s of {res['offered_per_s']:.0f}/s offered, "
            f"{res['peak_in_flight']} in flight at most, {res['delivered']} of {res['expected']} delivered")
    bench.results["slow"] = {"series": series, "runs": runs}


def webhookd_idle_cpu(bench: Bench, name: str, idle_partners: int) -> dict:
    """webhookd on a file holding ``idle_partners`` registered partners that get nothing, plus one
    partner (nginx /p0) published to at ``idle_rate`` events/s for ``idle_s`` s (paced, after a
    warm-up): the serve process's CPU over that window, per 10 s of wall clock."""
    p = bench.params
    rundir = bench.rundir(name)
    db_path = rundir / "webhookd.db"
    backlog.idle_partners(db_path, count=idle_partners, url=bench.nginx.url("/idle"))
    wd = Webhookd(bench.procs, rundir, db_path=db_path).start()
    try:
        wd.register(bench.nginx.url(PATHS[0]), "Bench partner 0")
        tail = bench.nginx.tail()
        warm = Published()
        loadgen.closed_loop(wd.port, threads=1, total=20, time_limit_s=20, build=publish_request,
                            on_response=warm.on_response)
        collect(tail, len(warm.sent_at), timeout=20, alive=wd.alive)
        tail.mark()
        published = Published()
        cpu_before, began = wd.cpu_seconds() or 0.0, time.monotonic()
        pub = loadgen.paced(wd.port, threads=2, total=int(p.idle_rate * p.idle_s), rate=p.idle_rate,
                            build=publish_request, on_response=published.on_response)
        lines = collect(tail, len(published.sent_at), timeout=30, alive=wd.alive,
                        accept=lambda line, sent=published.sent_at: line.webhook_id in sent)
        cpu, wall = (wd.cpu_seconds() or 0.0) - cpu_before, time.monotonic() - began
    finally:
        wd.stop()
    return {"idle_partners": idle_partners, "delivered": len(lines), "expected": pub.sent, "cpu_s": cpu,
            "wall_s": wall, "cpu_per_10s": 10 * cpu / wall}


def scenario_idle(bench: Bench) -> None:
    """(e) What registered partners cost while they get nothing: the same light load (one partner,
    10 events/s) on webhookd alone and beside ``idle_partners`` idle ones, back to back."""
    p = bench.params
    series = {k: Series() for k in ("alone", "beside", "ratio")}
    runs = []
    for r in range(p.runs):
        alone = webhookd_idle_cpu(bench, f"idle-alone-{r}", 0)
        beside = webhookd_idle_cpu(bench, f"idle-beside-{r}", p.idle_partners)
        series["alone"].add(alone["cpu_per_10s"])
        series["beside"].add(beside["cpu_per_10s"])
        series["ratio"].add(beside["cpu_per_10s"] / alone["cpu_per_10s"])
        runs.append({"round": r, "alone": alone, "beside": beside})
        log(f"  round {r + 1}/{p.runs}: CPU per 10 s alone {alone['cpu_per_10s']:.2f} s "
            f"({alone['delivered']}/{alone['expected']} delivered), beside {p.idle_partners:,} idle partners "
            f"{beside['cpu_per_10s']:.2f} s ({beside['delivered']}/{beside['expected']})")
    bench.results["idle"] = {"series": series, "runs": runs}


# --- (f), (g): PostgreSQL ---------------------------------------------------------------------------


def scenario_postgres(bench: Bench) -> None:
    """(f) one process on PostgreSQL against one on SQLite, (g) several processes on one PostgreSQL,
    in the same round, same nginx, same payload. The PostgreSQL server is the OS package's, in a
    temp dir, with fsync on (tests/pg.py, durable), stopped by PID at the end."""
    sys.path.insert(0, str(ROOT / "tests"))
    from pg import PostgresServer

    p = bench.params
    names = ("sqlite", "pg_one", "pg_many", "one_vs_sqlite", "many_vs_sqlite", "commits_per_delivery",
             "idle_p50", "idle_p99")
    series = {k: Series() for k in names}
    runs = []
    server = PostgresServer(durable=True).start()
    try:
        for r in range(p.runs):
            lite = webhookd_throughput(bench, p.deliveries, name=f"pg-sqlite-{r}")
            pg = {"storage": {"url": server.new_database()}}
            one = webhookd_throughput(bench, p.deliveries, name=f"pg-one-{r}", overrides=pg)
            url = server.new_database()
            commits_before = _pg_commits(url)
            many = webhookd_throughput(bench, p.deliveries, name=f"pg-many-{r}", overrides={"storage": {"url": url}},
                                       processes=p.pg_processes)
            commits = (_pg_commits(url) - commits_before) / max(many["deliveries"], 1)
            idle = webhookd_latency(bench, f"pg-idle-{r}", events_per_s=10, seconds=5,
                                    overrides={"storage": {"url": server.new_database()}})
            for k, v in (("sqlite", lite["rate"]), ("pg_one", one["rate"]), ("pg_many", many["rate"]),
                         ("one_vs_sqlite", one["rate"] / lite["rate"]),
                         ("many_vs_sqlite", many["rate"] / lite["rate"]), ("commits_per_delivery", commits),
                         ("idle_p50", idle["p50_ms"]), ("idle_p99", idle["p99_ms"])):
                series[k].add(v)
            runs.append({"round": r, "sqlite": lite, "pg_one": one, "pg_many": many, "commits": commits, "idle": idle})
            log(f"  round {r + 1}/{p.runs}: SQLite {lite['rate']:.0f}/s, PostgreSQL one process {one['rate']:.0f}/s, "
                f"{p.pg_processes} processes {many['rate']:.0f}/s ({many['deliveries']}/{many['expected']}), "
                f"{commits:.2f} commits per delivery; from idle p50 {idle['p50_ms']:.1f} ms p99 {idle['p99_ms']:.1f} ms")
        stall = webhookd_under_an_open_transaction(bench, server, p.pg_stall_s)
        for k in ("before", "lowest_during", "recovered_after_s"):
            series[f"stall_{k}"] = Series()
            series[f"stall_{k}"].add(stall[k])
        runs.append({"stall": stall})
    finally:
        server.stop()
    bench.results["postgres"] = {"series": series, "runs": runs}


def webhookd_under_an_open_transaction(bench: Bench, server: Any, stall_s: float, window_s: float = 5.0) -> dict:
    """(i) A steady publish load on one webhookd on PostgreSQL; after 20 s another client opens a
    REPEATABLE READ transaction and holds it ``stall_s`` (vacuum cannot clean behind it: the known
    queue cliff), then commits; 60 s more. Delivered/s per ``window_s`` from nginx's log: the rate
    before, the lowest window while the transaction is open, how long after it ends the rate is
    back to 90% of before."""
    import psycopg

    url = server.new_database()
    wd = start_webhookd(bench, "pg-stall", overrides={"storage": {"url": url}})
    rate = 100.0  # events/s: 500 deliveries/s, below what one process sends
    before_s, after_s = 20.0, 60.0
    try:
        tail = bench.nginx.tail()
        published = Published()
        load = threading.Thread(target=loadgen.paced, args=(wd.port,), daemon=True, kwargs=dict(
            threads=8, total=int(rate * (before_s + stall_s + after_s)), rate=rate, build=publish_request,
            on_response=published.on_response))
        started = time.time()
        load.start()
        time.sleep(before_s)
        opened = time.time()
        with psycopg.connect(url) as reader:
            reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            reader.execute("SELECT COUNT(*) FROM deliveries").fetchone()
            time.sleep(stall_s)
            reader.execute("COMMIT")
        closed = time.time()
        load.join(timeout=before_s + stall_s + after_s + 60)
        time.sleep(window_s)
        lines = [line for line in tail.read() if line.uri in PATHS]
    finally:
        wd.stop()
    windows: dict[int, int] = {}
    for line in lines:
        windows[int((line.msec - started) // window_s)] = windows.get(int((line.msec - started) // window_s), 0) + 1

    def per_s(w: int) -> float:
        return windows.get(w, 0) / window_s

    first_open, first_closed = int((opened - started) // window_s) + 1, int((closed - started) // window_s) + 1
    before = statistics.median(per_s(w) for w in range(1, first_open - 1))
    lowest = min(per_s(w) for w in range(first_open, first_closed - 1))
    last = int((closed - started + after_s) // window_s)
    recovered = next((w * window_s + window_s - (closed - started)
                      for w in range(first_closed - 1, last) if per_s(w) >= 0.9 * before), float("nan"))
    log(f"  (i) {before:.0f}/s before, lowest {lowest:.0f}/s while a transaction was open {stall_s:.0f} s, "
        f"back to 90% {recovered:.0f} s after it ended")
    return {"before": before, "lowest_during": lowest, "recovered_after_s": recovered,
            "windows": {w: per_s(w) for w in sorted(windows)}}


# --- (j) A kill -9 under full load ------------------------------------------------------------------


# The bundled config's delivery.concurrency: what a crash may send again, at most.
CONCURRENCY = tomllib.loads((ROOT / "webhookd.toml").read_text())["delivery"]["concurrency"]


def webhookd_kill_9(bench: Bench, deliveries: int, name: str) -> dict:
    """Publish deliveries/5 events at once (bundled config), kill -9 webhookd once nginx has logged
    a third of the deliveries, start it again on the same database and wait until every delivery
    arrived (the leases of the cut ones run out after 2 x 5 s + 10 s). Duplicates: (event, partner)
    pairs nginx answered more than once — answered before the kill, not yet recorded, sent again."""
    first = start_webhookd(bench, name)
    again: Webhookd | None = None
    try:
        tail = bench.nginx.tail()
        published = Published()
        loadgen.closed_loop(first.port, threads=bench.params.publish_threads, total=deliveries // PARTNERS,
                            time_limit_s=120, build=publish_request, on_response=published.on_response)
        expected = {(event_id, path) for event_id in published.sent_at for path in PATHS}
        lines = collect(tail, deliveries // 3, timeout=120, alive=first.alive, accept=lambda line: line.uri in PATHS)
        bench.procs.stop(first.proc, signal.SIGKILL, timeout=10)
        first.proc = None
        lines += [line for line in tail.read() if line.uri in PATHS]
        before_kill = len(lines)
        again = Webhookd(bench.procs, bench.rundir(f"{name}-again"), db_path=first.db_path).start()
        deadline = time.monotonic() + 120
        while {(line.webhook_id, line.uri) for line in lines} < expected and time.monotonic() < deadline:
            time.sleep(0.2)
            lines += [line for line in tail.read() if line.uri in PATHS]
        time.sleep(1.0)  # a late duplicate still on its way
        lines += [line for line in tail.read() if line.uri in PATHS]
        ours = [line for line in lines if line.webhook_id in published.sent_at]
        unique = {(line.webhook_id, line.uri) for line in ours}
        result = {"expected": len(expected), "delivered": len(unique & expected), "before_kill": before_kill,
                  "requests": len(ours), "duplicates": len(ours) - len(unique)}
        log(f"  {name}: {result}")
        return result
    finally:
        for each in (first, again):
            if each is not None:
                each.stop()


def scenario_crash(bench: Bench) -> None:
    p = bench.params
    series = {k: Series() for k in ("duplicates", "missing")}
    runs = []
    for r in range(p.runs):
        res = webhookd_kill_9(bench, p.crash_deliveries, f"crash-{r}")
        runs.append(res)
        series["duplicates"].add(res["duplicates"])
        series["missing"].add(res["expected"] - res["delivered"])
    bench.results["crash"] = {"series": series, "runs": runs}


def _pg_commits(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()[0]


# --- The table ------------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "n/a"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "x":
        return f"{value:.2f}×"
    if unit == "%":
        return f"{100 * value:.0f}%"
    if unit == "ms":
        return f"{value:.2f} ms" if value < 1 else f"{value:.1f} ms"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    if unit == "s":
        return f"{value:.1f} s"
    return f"{value:g}"


def _row(label: str, s: Series | None, unit: str, goal: str = "", ok: Callable[[float], bool] | None = None) -> list[str]:
    if s is None or s.median is None:
        return [label, "n/a", "", goal, "" if ok is None else "n/a"]
    spread = "" if len(s.values) < 2 else f"{_fmt(s.lo, unit)} – {_fmt(s.hi, unit)}"
    met = "" if ok is None else ("yes" if ok(s.median) else "NO")
    return [label, _fmt(s.median, unit), spread, goal, met]


def table(bench: Bench) -> str:
    p = bench.params
    res = bench.results
    rows: list[list[str]] = []
    if "throughput" in res:
        s = res["throughput"]["series"]
        rows += [
            _row("deliveries/s  guide sender (sec. 4, sequential requests.post)", s["guide"], "/s"),
            _row("deliveries/s  stdlib pool (32 threads urllib.request)", s["pool"], "/s"),
            _row(f"deliveries/s  webhookd (POST /events x {PARTNERS} partners)", s["webhookd"], "/s"),
            _row("  webhookd / stdlib pool", s["vs_pool"], "x", "≥ 1.50×", lambda v: v >= 1.5),
            _row("  webhookd / guide sender", s["vs_guide"], "x", "≥ 4.00×", lambda v: v >= 4.0),
            _row("deliveries/s  floor: bare asyncio streams + HMAC, keep-alive", s["floor"], "/s"),
            _row("deliveries/s  floor on uvloop", s["floor_uvloop"], "/s"),
            _row(f"  webhookd / floor{' on uvloop' if s['floor_uvloop'].values else ''}", s["vs_floor"], "%"),
            _row("webhookd peak RSS (VmHWM, throughput runs)", s["rss"], "MiB"),
            _row("webhookd CPU per delivery (all threads, publish included)", s["cpu_ms"], "ms", "≤ 0.15 ms",
                 lambda v: v <= 0.15),
        ]
    if "latency" in res:
        s = res["latency"]["series"]
        rate = f"{p.latency_rate:,.0f}/s"
        rows += [
            _row(f"publish→delivered p50 at {rate} offered", s["p50"], "ms"),
            _row(f"publish→delivered p99 at {rate} offered", s["p99"], "ms", "≤ 25 ms", lambda v: v <= 25),
            _row("  max", s["max"], "ms"),
            _row("  POST /events answered (202) p99", s["publish_p99"], "ms"),
            _row("  offered rate achieved", s["offered"], "/s"),
            _row("  webhookd peak RSS", s["rss"], "MiB"),
        ]
    if "blackhole" in res:
        s = res["blackhole"]["series"]
        rows += [
            _row("(a) healthy partners alone", s["without"], "/s"),
            _row("(a) healthy partners beside a black hole", s["with"], "/s"),
            _row("(a)   with / without", s["ratio"], "%", "≥ 90%", lambda v: v >= 0.9),
        ]
    if "backlog" in res:
        s = res["backlog"]["series"]
        small, large = f"{p.backlog_small:,}", f"{p.backlog_large:,}"
        rows += [
            _row(f"(b) drain rate, backlog {small}", s["small_rate"], "/s"),
            _row(f"(b) drain rate, backlog {large} (first {p.backlog_window_s:.0f} s)", s["large_rate"], "/s"),
            _row(f"(b)   {large} / {small}", s["ratio"], "%", "≥ 80%", lambda v: v >= 0.8),
            _row(f"(b) peak RSS, backlog {small}", s["small_rss"], "MiB"),
            _row(f"(b) peak RSS, backlog {large}", s["large_rss"], "MiB", "≤ 150 MiB", lambda v: v <= 150),
            _row(f"(b) start-up to /health, backlog {large}", s["large_startup"], "s"),
        ]
    if "reads" in res:
        s = res["reads"]["series"]
        history = f"{p.reads_history:,}"
        rows += [_row(f"(k) {name}, {history} deliveries" if n == 0 else f"(k) {name}", s[name], "ms", "≤ 5 ms",
                      lambda v: v <= 5) for n, name in enumerate(s) if name not in ("slowest", "before", "before_vs_now")]
        rows += [
            _row("(k)   the slowest of these", s["slowest"], "ms", "≤ 5 ms", lambda v: v <= 5),
            _row("(k) GET /events/{id}, the statement used before ((:x IS NULL OR …))", s["before"], "ms"),
            _row("(k)   before / now", s["before_vs_now"], "x"),
        ]
    if "inbound" in res:
        s = res["inbound"]["series"]
        rows += [
            _row("(c) POST /webhooks/partners (signed, stored)", s["inbound"], "/s"),
            _row("(c) GET /health (trivial route)", s["health"], "/s"),
            _row("(c)   inbound / trivial", s["ratio"], "%", "≥ 50%", lambda v: v >= 0.5),
        ]
    if "slow" in res:
        s = res["slow"]["series"]
        offered = f"{p.slow_rate:.0f}/s offered, {p.slow_delay_s:g} s away"
        rows += [
            _row(f"(l) one healthy partner, {offered}: delivered/s", s["rate"], "/s"),
            _row("(l)   delivered / offered (second half of the offer)", s["ratio"], "%", "≥ 95%", lambda v: v >= 0.95),
            _row("(l)   behind when the offer ends (in flight included)", s["behind"], ""),
            _row("(l)   every delivery arrived, seconds after the offer ended", s["drained"], "s"),
            _row("(l)   peak in flight at the partner / its bound at the end", s["peak"], ""),
            _row("(l)   the partner's concurrency (GET /stats) at the end", s["concurrency"], ""),
        ]
    if "idle" in res:
        s = res["idle"]["series"]
        rate = f"{p.idle_rate:.0f} events/s"
        rows += [
            _row(f"(e) webhookd CPU per 10 s, {rate} to 1 partner", s["alone"], "s"),
            _row(f"(e) the same beside {p.idle_partners:,} idle partners", s["beside"], "s"),
            _row("(e)   beside / alone", s["ratio"], "x", "≤ 1.50×", lambda v: v <= 1.5),
        ]
    if "postgres" in res:
        s = res["postgres"]["series"]
        n = p.pg_processes
        rows += [
            _row(f"(f) SQLite, one process (POST /events x {PARTNERS} partners)", s["sqlite"], "/s"),
            _row("(f) PostgreSQL, one process", s["pg_one"], "/s"),
            _row("(f)   PostgreSQL / SQLite, one process each", s["one_vs_sqlite"], "%"),
            _row(f"(g) PostgreSQL, {n} processes on one database", s["pg_many"], "/s"),
            _row(f"(g)   {n} processes / one SQLite process", s["many_vs_sqlite"], "%", "≥ 80%",
                 lambda v: v >= 0.8),
            _row("(g)   database commits per delivery (pg_stat_database)", s["commits_per_delivery"], "x", "≤ 2",
                 lambda v: v <= 2.0),
            _row("(h) PostgreSQL, publish→delivered from idle (10 events/s) p50", s["idle_p50"], "ms", "≤ 20 ms",
                 lambda v: v <= 20),
            _row("(h) PostgreSQL, publish→delivered from idle p99", s["idle_p99"], "ms", "≤ 100 ms",
                 lambda v: v <= 100),
            _row("(i) PostgreSQL, delivered/s before a long open transaction", s["stall_before"], "/s"),
            _row(f"(i)   lowest 5 s window while it is open ({p.pg_stall_s:.0f} s)", s["stall_lowest_during"],
                 "/s", "> 0 (no stall)", lambda v: v > 0),
            _row("(i)   back to 90% of before, after it ends", s["stall_recovered_after_s"], "s", "≤ 60 s",
                 lambda v: v <= 60),
        ]
    if "crash" in res:
        s = res["crash"]["series"]
        rows += [
            _row(f"(j) kill -9 in a burst of {p.crash_deliveries:,}: deliveries sent twice", s["duplicates"], "",
                 f"≤ {CONCURRENCY:,} (concurrency)", lambda v: v <= CONCURRENCY),
            _row("(j)   deliveries lost", s["missing"], "", "0", lambda v: v == 0),
        ]
    for key, found in res.get("fanout", {}).items():
        s = found["series"]
        rows += [
            _row(f"(d) {key} away: webhookd, {p.fanout_partners} partners, "
                 + ("bundled config" if not p.fanout_delivery else "config overridden"), s["webhookd"], "/s"),
            _row(f"(d) {key}: stdlib pool (32 threads)", s["pool"], "/s"),
            _row(f"(d) {key}: guide sender", s["guide"], "/s"),
            _row(f"(d) {key}:   webhookd / stdlib pool", s["vs_pool"], "x", "≥ 5.00×", lambda v: v >= 5.0),
            _row(f"(d) {key}:   webhookd / its own rate at 0 ms", s["vs_loopback"], "%", "≥ 70%", lambda v: v >= 0.7),
            _row(f"(d) {key}:   POST /events p99 during the run", s["publish_p99"], "ms", "≤ 25 ms", lambda v: v <= 25),
            _row(f"(d) {key}:   POST /events slowest (of the probes in a run)", s["publish_max"], "ms"),
            _row(f"(d) {key}:   probes in a run", s["probes"], ""),
            _row(f"(d) {key}:   GET /health p99 during the run", s["health_p99"], "ms"),
            _row(f"(d) {key}:   peak attempts in flight", s["in_flight"], ""),
            _row(f"(d) {key}:   peak RSS", s["rss"], "MiB", "≤ 200 MiB", lambda v: v <= 200),
            _row(f"(d) {key}:   threads", s["threads"], ""),
            _row(f"(d) {key}:   receiver CPU (of one core)", s["receiver_cpu"], "%"),
        ]
    header = ["", "median", f"min – max ({p.runs} run{'s' if p.runs > 1 else ''})", "goal", "met"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    out = []
    for n, r in enumerate([header] + rows):
        out.append("  ".join([r[0].ljust(widths[0]), r[1].rjust(widths[1]), r[2].ljust(widths[2]),
                              r[3].ljust(widths[3]), r[4]]).rstrip())
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def source_state() -> str:
    """The commit measured, and which tracked files differ from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "webhookd (not a git checkout)"
    files = [line[3:] for line in changed if line.strip() and not line[3:].startswith("bench/")]
    return f"webhookd at {head or '?'}" + (f" + uncommitted changes to {', '.join(files)}" if files else "")


def describe(bench: Bench, only: list[str], source_at_start: str) -> str:
    p = bench.params
    source_now = source_state()
    lines = [
        f"webhookd benchmark — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, receiver nginx {bench.nginx.version()} (1 worker, 127.0.0.1, "
        f"answers 200)",
        source_at_start + ("" if source_now == source_at_start else f" (at the end: {source_now})"),
        f"payload: the guide's payment.success example ({len(PAYLOAD_BYTES)} bytes, canonical JSON), "
        f"{PARTNERS} partners /p0../p4 on nginx",
    ]
    if "throughput" in only:
        lines.append(f"throughput: {p.deliveries:,} deliveries per sender per run; webhookd: {p.deliveries // PARTNERS:,} "
                     f"events via POST /events from {p.publish_threads} keep-alive connections, timed from the first "
                     f"publish to the last delivery in nginx's access log; the floor: {max(p.deliveries, FLOOR_DELIVERIES):,} "
                     f"requests from 20 kept-alive asyncio streams in the bench's own process, an HMAC each")
    if "latency" in only:
        lines.append(f"latency: {p.latency_rate / PARTNERS:.0f} events/s x {PARTNERS} partners for {p.latency_s:.0f} s "
                     f"(paced, 8 connections); latency = nginx $msec (ms resolution) - time the publish was sent")
    if "blackhole" in only:
        lines.append(f"(a): {p.blackhole_deliveries:,} healthy deliveries per run; the 6th partner accepts connections "
                     f"and never answers; webhookd's default 5 s timeout")
    if "backlog" in only:
        lines.append(f"(b): rows written into a fresh SQLite file before webhookd starts; rate = deliveries logged "
                     f"until drained or for {p.backlog_window_s:.0f} s after the first one")
    if "reads" in only:
        lines.append(f"(k): a history of {p.reads_history:,} deliveries written into a fresh SQLite file (5 partners, "
                     f"3 event types, one rare; nearly all delivered), read through store.Store as the routes read "
                     f"it; each figure the median of {p.reads_repeat} calls on ids drawn across the history")
    if "inbound" in only:
        lines.append(f"(c): Python load generator (bench/loadgen.py): {p.inbound_threads} threads, one keep-alive "
                     f"http.client connection each, {p.inbound_requests:,} requests per run; every inbound request "
                     f"signed, with a unique X-Webhook-Id (so each is stored); the per-partner inbound rate limit "
                     f"raised out of the way")
    if "fanout" in only:
        lines.append(f"(d): bench/slow_receiver.py (asyncio, keep-alive) answers every POST after 100 ms or 500 ms; "
                     f"{p.fanout_partners} partners on it; webhookd on the bundled webhookd.toml"
                     + (f" with [delivery] {p.fanout_delivery}" if p.fanout_delivery else "") + "; a probe times "
                     "POST /events (no subscriber) and GET /health every 10 ms during each run")
    if "slow" in only:
        lines.append(f"(l): one partner on bench/slow_receiver.py answering 200 after {p.slow_delay_s:g} s, "
                     f"{p.slow_rate:.0f} events/s paced for {p.slow_s:.0f} s (one delivery each), bundled config; "
                     "its rate counted by the receiver over the second half of the offer")
    if "idle" in only:
        lines.append(f"(e): {p.idle_partners:,} active partners written into the file before webhookd starts, "
                     f"subscribed to a type nobody publishes; {p.idle_rate:.0f} events/s paced to one partner on "
                     f"nginx for {p.idle_s:.0f} s after 20 warm-up events; CPU of the serve process (all threads)")
    if "postgres" in only:
        lines.append(f"(f), (g): the throughput run's load, on PostgreSQL from the OS packages (temp dir, fsync on, "
                     f"127.0.0.1); (g) {p.pg_processes} processes, published to at once; (h) 10 events/s to one "
                     f"process; (i) 500 deliveries/s offered while another client holds a REPEATABLE READ "
                     f"transaction open {p.pg_stall_s:.0f} s (one run)")
    if "crash" in only:
        lines.append(f"(j): {p.crash_deliveries // PARTNERS:,} events x {PARTNERS} partners published at once "
                     f"(bundled config: {CONCURRENCY:,} in flight); kill -9 once nginx logged a third of the "
                     f"deliveries, then a restart on the same database; duplicates = requests nginx answered "
                     f"twice for one (event, partner)")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Series):
        return {"median": value.median, "min": value.lo, "max": value.hi, "values": value.values}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one smaller run of everything (a smoke check)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"scenarios to run, comma-separated: {', '.join(SCENARIOS)}")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; 1 with --quick)")
    parser.add_argument("--pg-processes", type=int, metavar="N",
                        help="(g): webhookd processes on one PostgreSQL (default 3; on 8+ cores try 3 and 1 "
                             "and compare)")
    parser.add_argument("--fanout-delivery", action="append", default=[], metavar="KEY=VALUE",
                        help="a [delivery] key for (d)'s webhookd, e.g. concurrency=300 (repeatable; "
                             "the table then no longer shows the bundled config)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs) for inspection")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "last.json",
                        help="where to write every run's numbers (default bench/out/last.json)")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    params = Params.quick() if args.quick else Params()
    if args.runs:
        params = dataclasses.replace(params, runs=args.runs)
    if args.pg_processes:
        params = dataclasses.replace(params, pg_processes=args.pg_processes)
    if args.fanout_delivery:
        try:
            keys = {k.strip(): json.loads(v) for k, v in (item.split("=", 1) for item in args.fanout_delivery)}
        except ValueError:
            parser.error("--fanout-delivery takes KEY=VALUE with a JSON value, e.g. concurrency=300")
        params = dataclasses.replace(params, fanout_delivery=keys)
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        os.environ.pop(var, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="webhookd-bench-"))
    started = time.monotonic()
    source_at_start = source_state()
    try:
        nginx = Nginx(procs, workdir).start()
        bench = Bench(procs, workdir, nginx, params)
        log(f"nginx {nginx.version()} on 127.0.0.1:{nginx.port} (pid {nginx.proc.pid}); work dir {workdir}")
        for name in SCENARIOS:
            if name in only:
                log(f"{name} ...")
                globals()[f"scenario_{name}"](bench)
        elapsed = time.monotonic() - started
        print()
        print(describe(bench, only, source_at_start))
        print()
        print(table(bench))
        print(f"\n(total {elapsed:.0f} s; every run's numbers in {args.json})")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"params": dataclasses.asdict(params), "seconds": elapsed,
                                         "results": _jsonable(bench.results)}, indent=1, default=str))
        return 0
    except KeyboardInterrupt:
        log("interrupted; stopping what was started")
        return 130
    finally:
        procs.stop_all()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

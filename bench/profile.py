"""Profile `webhookd serve` with py-spy during a throughput run (the same run as run.py's).

    .venv/bin/pip install py-spy          # once; not needed by `make bench`
    .venv/bin/python bench/profile.py [--deliveries 20000] [--gil] [--out bench/out/profile]

Writes py-spy's collapsed stacks (``<out>.txt``; any flame-graph tool reads them, e.g.
speedscope.app or flamegraph.pl) and prints where the time goes: by thread, by function (self time) and by function
including what it calls. ``--gil`` samples only the thread holding the GIL (where Python time
goes); without it every non-idle thread is sampled (which includes time in fsync, sockets, …).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import inbound_stages  # noqa: E402
import loadgen  # noqa: E402
import run  # noqa: E402
import stages  # noqa: E402
from common import ROOT, Nginx, Procs  # noqa: E402

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """'send (delivery.py:321)' -> 'delivery.py:send'; thread frames kept."""
    m = FRAME.match(frame)
    if not m:
        return frame
    return f"{Path(m['file']).name}:{m['func']}"


def summarize(collapsed: Path, top: int = 25) -> str:
    by_thread: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    total_time: collections.Counter[str] = collections.Counter()
    samples = 0
    for stack, count in stages.samples(collapsed):
        frames = stack.split(";")
        samples += count
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        if frames and frames[0].startswith("process"):
            frames = frames[1:]
            thread = frames[0] if frames and frames[0].startswith("thread") else thread
        if frames and frames[0].startswith("thread"):
            frames = frames[1:]
        by_thread[re.sub(r"\s*\(0x[0-9a-f]+\)", "", thread, flags=re.I)] += count
        names = [_short(f) for f in frames]
        if names:
            self_time[names[-1]] += count
        for name in set(names):
            total_time[name] += count
    if not samples:
        return "no samples"

    def block(title: str, counter: collections.Counter[str], n: int) -> list[str]:
        out = [title]
        for name, count in counter.most_common(n):
            out.append(f"  {100 * count / samples:5.1f}%  {name}")
        return out

    lines = [f"{samples} samples"]
    lines += block("by thread:", by_thread, 12)
    lines += block(f"top {top} by self time (the frame that was running):", self_time, top)
    lines += block(f"top {top} by total time (the frame or anything it called):", total_time, top)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="py-spy profile of webhookd serve during a throughput run")
    parser.add_argument("--scenario", choices=["throughput", "inbound", "health"], default="throughput",
                        help="throughput: run.py's webhookd throughput run; inbound: POST /webhooks/partners load "
                             "(run.py's (c)); health: GET /health load on the same kind of server")
    parser.add_argument("--deliveries", type=int, default=20000, help="throughput: deliveries; inbound: requests")
    parser.add_argument("--gil", action="store_true", help="sample only the GIL holder")
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "profile")
    parser.add_argument("--postgres", action="store_true",
                        help="throughput: webhookd on a PostgreSQL the profile starts (tests/pg.py, fsync on)")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_suffix(".txt")
    procs = Procs()
    workdir = Path(tempfile.mkdtemp(prefix="webhookd-profile-"))
    server = None  # the PostgreSQL of --postgres
    throughput: dict | None = None  # the throughput run's figures

    @contextlib.contextmanager
    def recording(wd):
        argv = [py_spy, "record", "--pid", str(wd.pid), "--format", "raw", "-o", str(raw), "--rate", str(args.rate),
                "--threads", "--nonblocking"] + (["--gil"] if args.gil else [])
        spy = procs.start("py-spy", argv, stdout=subprocess.DEVNULL, stderr=open(workdir / "py-spy.log", "w"))
        time.sleep(1.0)  # py-spy attaches
        try:
            yield
        finally:
            procs.stop(spy, signal.SIGINT, timeout=30)  # SIGINT: py-spy writes its file and exits

    try:
        nginx = Nginx(procs, workdir).start()
        bench = run.Bench(procs, workdir, nginx, run.Params())
        mode = f"py-spy {'--gil' if args.gil else 'all threads'}, --nonblocking, {args.rate} Hz"
        if args.scenario == "throughput":
            overrides = None
            if args.postgres:
                sys.path.insert(0, str(ROOT / "tests"))
                from pg import PostgresServer

                server = PostgresServer(durable=True).start()
                overrides = {"storage": {"url": server.new_database()}}
            res = run.webhookd_throughput(bench, args.deliveries, name="profile", around=recording,
                                          overrides=overrides)
            throughput = res
            print(f"webhookd: {res['deliveries']:,} deliveries at {res['rate']:,.0f}/s while profiled "
                  f"({res['cpu_ms_per_delivery']:.2f} ms CPU each; {mode})")
        else:
            wd = run.start_inbound_webhookd(bench)
            try:
                build = run.inbound_requests(wd) if args.scenario == "inbound" else (
                    lambda i: ("GET", "/health", None, {}))
                loadgen.closed_loop(wd.port, threads=bench.params.inbound_threads, total=300, time_limit_s=30,
                                    build=build)  # warm-up, as run.py's (c) does
                with recording(wd):
                    res = loadgen.closed_loop(wd.port, threads=bench.params.inbound_threads, total=args.deliveries,
                                              time_limit_s=60, build=build)
            finally:
                wd.stop()
            print(f"webhookd: {res.ok:,} of {res.sent:,} {args.scenario} requests answered 2xx at {res.rate:,.0f}/s "
                  f"while profiled ({mode})")
            print(f"\nby stage (bench/inbound_stages.py):\n{inbound_stages.table(raw, args.rate, res.ok)}\n")
    finally:
        procs.stop_all()
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if not raw.exists():
        print("py-spy wrote nothing", file=sys.stderr)
        return 1
    print(summarize(raw))
    if throughput is not None:
        print("\nby stage (bench/stages.py):")
        print(stages.table(raw, args.rate, throughput["deliveries"], throughput["cpu_ms_per_delivery"]))
    print(f"\ncollapsed stacks: {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

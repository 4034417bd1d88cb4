"""Memory per attempt in flight: webhookd's RSS before and while 1,000 attempts wait on partners.

    .venv/bin/python bench/inflight_memory.py [--runs 3]

50 partners on bench/slow_receiver.py answering after 3 s (under the 5 s timeout), the bundled
config (``concurrency`` 4,000, 25 per partner). One event is published and delivered first, so
the code paths and the first connections exist; then 20 events (1,000 deliveries) are published
and, once the receiver holds them all, VmRSS is read again. Prints the figure of each run and the
median: (RSS while waiting − RSS before) / attempts the receiver held.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen  # noqa: E402
import run  # noqa: E402
from common import Procs, SlowReceiver, Webhookd, wait_until  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def one_run(procs: Procs, workdir: Path) -> tuple[float, float, int]:
    receiver = SlowReceiver(procs, 3.0).start()
    wd = Webhookd(procs, workdir).start()
    try:
        for k in range(50):
            wd.register(receiver.url(f"/p{k}"), f"Far partner {k}")
        publish = dict(time_limit_s=30, build=run.publish_request, on_response=lambda *a: None)
        loadgen.closed_loop(wd.port, threads=1, total=1, **publish)
        wait_until(lambda: receiver.stats()["requests"] >= 50, 30, what="the first event delivered")
        time.sleep(3.5)   # its answers are in and recorded
        before = rss_mib(wd.pid)
        receiver.stats(reset=True)
        loadgen.closed_loop(wd.port, threads=4, total=20, **publish)
        wait_until(lambda: receiver.stats()["in_flight"] >= 1000, 30, what="1,000 attempts held by the receiver")
        return before, rss_mib(wd.pid), int(receiver.stats()["in_flight"])
    finally:
        wd.stop()
        receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    procs = Procs()
    per_attempt = []
    try:
        for n in range(args.runs):
            workdir = Path(tempfile.mkdtemp(prefix="webhookd-mem-"))
            try:
                before, during, held = one_run(procs, workdir)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            per_attempt.append((during - before) * 1024 / held)
            print(f"run {n + 1}: RSS {before:.1f} MiB idle, {during:.1f} MiB with {held} attempts in flight: "
                  f"{per_attempt[-1]:.1f} KiB per attempt", flush=True)
    finally:
        procs.stop_all()
    print(f"median: {statistics.median(per_attempt):.1f} KiB per attempt in flight")


if __name__ == "__main__":
    main()

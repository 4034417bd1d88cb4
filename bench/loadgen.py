"""The benchmark's Python load generator: threads, each with its own keep-alive ``http.client``
connection to 127.0.0.1. Bounded in count and in time: it stops after ``total`` requests or
``time_limit_s`` seconds, whichever comes first.

Two shapes:
* ``closed_loop`` — every thread sends its next request as soon as the last one answered
  (as fast as the server takes them);
* ``paced`` — request *i* is sent at ``start + i / rate`` (an open-loop, fixed offered rate);
  a request whose slot has passed goes at once, and its real send time is what is recorded.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from common import Client

# build(i) -> (method, path, body, headers)
Build = Callable[[int], tuple[str, str, bytes | None, dict[str, str]]]
# on_response(i, sent_at_wallclock, status, body)
OnResponse = Callable[[int, float, int, bytes], None]


@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    started: float = 0.0     # wall clock of the first send
    finished: float = 0.0    # wall clock of the last answer
    late: int = 0            # paced: requests sent more than 5 ms after their slot

    @property
    def elapsed(self) -> float:
        return max(self.finished - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed


def _run(port: int, threads: int, total: int, time_limit_s: float, build: Build,
         on_response: OnResponse | None, slot: Callable[[int], float] | None) -> LoadResult:
    result = LoadResult()
    lock = threading.Lock()
    counter = itertools.count()
    deadline = time.monotonic() + time_limit_s
    first_send: list[float] = []
    last_answer: list[float] = [0.0]

    def worker() -> None:
        client = Client(port)
        try:
            while time.monotonic() < deadline:
                i = next(counter)
                if i >= total:
                    return
                method, path, body, headers = build(i)
                late = False
                if slot is not None:
                    wait = slot(i) - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    late = wait < -0.005
                sent_at = time.time()
                try:
                    status, data = client.request(method, path, body, headers)
                except Exception as exc:  # counted, never fatal: the run is bounded anyway
                    client.close()
                    with lock:
                        result.sent += 1
                        result.errors[type(exc).__name__] += 1
                    continue
                done = time.time()
                if on_response is not None:
                    on_response(i, sent_at, status, data)
                with lock:
                    if not first_send:
                        first_send.append(sent_at)
                    first_send[0] = min(first_send[0], sent_at)
                    last_answer[0] = max(last_answer[0], done)
                    result.sent += 1
                    result.late += late
                    result.statuses[status] += 1
                    if 200 <= status < 300:
                        result.ok += 1
        finally:
            client.close()

    pool = [threading.Thread(target=worker, name=f"bench-load-{n}", daemon=True) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 15)
    result.started = first_send[0] if first_send else time.time()
    result.finished = last_answer[0] or result.started
    return result


def closed_loop(port: int, *, threads: int, total: int, time_limit_s: float, build: Build,
                on_response: OnResponse | None = None) -> LoadResult:
    return _run(port, threads, total, time_limit_s, build, on_response, None)


def paced(port: int, *, threads: int, total: int, rate: float, build: Build,
          on_response: OnResponse | None = None, slack_s: float = 10.0) -> LoadResult:
    start = time.monotonic() + 0.05
    return _run(port, threads, total, total / rate + slack_s, build, on_response,
                lambda i: start + i / rate)

"""Where a delivery's CPU goes, stage by stage, from py-spy's collapsed stacks (``profile.py``).

Each sample is one stack of the thread that held the GIL (``--gil``) or of any busy thread. It
is put in the first stage whose rule matches, in the order of ``STAGES``: logging and metrics
first (wherever they are called from), then the stages of one delivery's path. A stage's
microseconds per delivery = its samples / the sampling rate / the deliveries made while
sampled: with ``--gil`` that is Python time holding the GIL, so the stages add up to less than
the CPU per delivery (SQLite and the kernel run without it).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from pathlib import Path

# (stage, thread name prefix or None for any thread, substrings of one frame). A sample goes to the
# stage of its innermost frame that some rule names; a stack no rule names goes to its thread's
# catch-all (the rules with no substrings), else to OTHER.
RULES: list[tuple[str, str | None, tuple[str, ...]]] = [
    ("logging", None, ("(logging/",)),
    ("metrics", None, ("(metrics.py",)),
    ("group commit (publishes' transaction)", "webhookd-group-commit", ()),
    ("result recording (store)", None, ("finish_attempts (", "_finish_with_retries (")),
    ("result recording (recorder, other)", "webhookd-recorder", ()),
    ("claim", None, ("claim_due (", "_claim_and_start (", "DeliveryLoop._room (", "_seconds_until_next_due (",
                     "next_due_at (", "DeliveryLoop._paces (")),
    ("outcome (decide, breakers)", "webhookd-sender", ("DeliveryLoop._outcome (",)),
    ("HTTP exchange (write, read, parse)", "webhookd-sender",
     ("Sender._post (", "Sender._checkout (", "_read_answer (", "_read_head", "_readline (", "_write (",
      "asyncio/streams.py", "/selector_events.py", "/selectors.py", "uvloop", "httptools", "(sender_http.py")),
    ("attempt setup (job, headers, HMAC, request)", "webhookd-sender",
     ("_as_partner_is_now (", "build_headers (", "request_bytes (", "parse_target (", "Pacer.", "Breakers.state (",
      "_start_attempts (", "DeliveryLoop._send (", "(timeouts.py", "Sender.attempt (", "DeliveryLoop._attempt (")),
    ("sender loop (tasks, wake-ups)", "webhookd-sender", ()),
    ("publish route (HTTP, JSON, ids)", None, ("publish_event (", "httptools_impl", "starlette", "(web.py")),
    ("API loop, other (delivery loop, event loop)", "MainThread", ()),
]
OTHER = "other threads (workers' hand-offs)"
STAGES = list(dict.fromkeys(stage for stage, _, _ in RULES)) + [OTHER]


def _thread(frame: str) -> str:
    return re.sub(r"^thread \(\w+\): ", "", frame)


def classify(stack: str) -> str:
    frames = stack.split(";")
    if frames and frames[0].startswith("process"):
        frames = frames[1:]
    thread = _thread(frames[0]) if frames else ""
    rules = [(stage, needles) for stage, prefix, needles in RULES if prefix is None or thread.startswith(prefix)]
    for frame in reversed(frames[1:]):
        for stage, needles in rules:
            if any(needle in frame for needle in needles):
                return stage
    return next((stage for stage, needles in rules if not needles), OTHER)


def samples(collapsed: Path) -> Iterator[tuple[str, int]]:
    """Each line of py-spy's collapsed output as (the stack, its sample count)."""
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if count_text.isdigit():
            yield stack, int(count_text)


def by_stage(collapsed: Path) -> tuple[collections.Counter[str], int]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for stack, count in samples(collapsed):
        counts[classify(stack)] += count
        total += count
    return counts, total


def table(collapsed: Path, rate_hz: int, deliveries: int, cpu_ms_per_delivery: float | None = None) -> str:
    """A table of µs per delivery by stage (samples / rate / deliveries)."""
    counts, total = by_stage(collapsed)
    lines = [f"{'stage':<48} {'µs/delivery':>12} {'share':>7}"]
    for stage in STAGES:
        us = counts[stage] / rate_hz / max(deliveries, 1) * 1e6
        lines.append(f"{stage:<48} {us:12.1f} {100 * counts[stage] / max(total, 1):6.1f}%")
    sampled = total / rate_hz / max(deliveries, 1) * 1e6
    lines.append(f"{'all sampled':<48} {sampled:12.1f}")
    if cpu_ms_per_delivery is not None:
        lines.append(f"{'CPU per delivery (all threads, /proc)':<48} {cpu_ms_per_delivery * 1000:12.1f}")
    return "\n".join(lines)

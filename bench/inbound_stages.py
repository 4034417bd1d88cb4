"""Where one ``POST /webhooks/partners`` (or ``GET /health``) spends its GIL time, stage by stage,
from py-spy's collapsed stacks (``profile.py --scenario inbound|health``).

A sample goes to the stage of its innermost frame that some rule names, the rules tried in the
order of ``RULES`` for each frame: logging and metrics first (wherever they are called from),
then the route's own steps, then the framework around it. A sample of the group-commit writer's
thread is the commit's; one of a ``webhookd-store`` thread is a hop through the routes' store
threads (``web.db``). µs per request = samples / sampling rate / requests answered while sampled:
with ``--gil``, Python time holding the GIL, so SQLite's statements, the fsync and the kernel's
socket work count only where they hold it.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

from stages import samples

# (stage, a pattern one frame must match). Frames look like "func (path/file.py:line)".
RULES: list[tuple[str, str]] = [
    ("logging", r"\(.*logging/"),
    ("metrics", r"\(metrics\.py"),
    ("signature (HMAC, constant-time compare, partner lookup)",
     r"^(signature_matches|verify|sign_hex|standard_signature\w*|_find_sender\S*|_search|_verified_sender|"
     r"_named_partner|digest|compare_digest|HMAC\.\w+) "),
    ("canonical JSON", r"^canonical "),
    ("JSON parse and its checks", r"^(parse_object|parse_json|_check_structure|_needs_structure_check|"
                                  r"_object_without_duplicates|_finite_float) "),
    ("dedupe key, id, replay window, rate limit", r"^(_dedupe_key|new_id|_base36|_check_timestamp|_finite|"
                                                  r"RateLimiter\.\w+) "),
    ("headers and their checks", r"^(_signed_headers|check_content_type|_signed_type|_declared_length|"
                                 r"Headers\.\w+) "),
    ("body read", r"^(read_body|Request\.stream|Request\.body) "),
    ("group commit: queue, await, settle", r"^(group_written\S*|_settle|\w+\._group_commit_soon|"
                                           r"\w+\.add_inbound_soon) "),
    ("/ws offer", r"\(realtime\.py|^push_offer "),
    ("store thread hop (web.db: submit, wait, wake)", r"^(db|_call_by) \(web\.py"),
    ("response (JSON body, headers, send)", r"^(JSONResponse\.\w+|Response\.\w+|RequestResponseCycle\.send|"
                                            r"ServerErrorMiddleware\.__call__\.<locals>\._send) "),
    ("route's own lines (inbound.py)", r"\(inbound\.py"),
    ("routing, access rule, middleware (Starlette, web.py)", r"\((.*starlette/|web\.py)"),
    ("HTTP parsing, ASGI (uvicorn)", r"\(.*uvicorn/"),
]
THREADS = {"webhookd-group-commit": "group commit: SQL and fsync (writer thread)",
           "webhookd-store": "store thread hop (web.db: submit, wait, wake)"}
OTHER = "event loop, other"
STAGES = list(dict.fromkeys([stage for stage, _ in RULES] + list(THREADS.values()) + [OTHER]))
_COMPILED = [(stage, re.compile(pattern)) for stage, pattern in RULES]


def classify(stack: str) -> str:
    frames = stack.split(";")
    if frames and frames[0].startswith("process"):
        frames = frames[1:]
    thread = re.sub(r"^thread \(\w+\): ", "", frames[0]) if frames else ""
    for prefix, stage in THREADS.items():
        if thread.startswith(prefix):
            return stage
    for frame in reversed(frames[1:]):
        for stage, pattern in _COMPILED:
            if pattern.search(frame):
                return stage
    return OTHER


def table(collapsed: Path, rate_hz: int, requests: int) -> str:
    """µs per request by stage (samples / rate / requests), the stages in the order of a request."""
    counts: collections.Counter[str] = collections.Counter()
    for stack, count in samples(collapsed):
        counts[classify(stack)] += count
    total = sum(counts.values())
    lines = [f"{'stage':<56} {'µs/request':>11} {'share':>7}"]
    for stage in STAGES:
        if counts[stage]:
            us = counts[stage] / rate_hz / max(requests, 1) * 1e6
            lines.append(f"{stage:<56} {us:11.1f} {100 * counts[stage] / max(total, 1):6.1f}%")
    lines.append(f"{'all sampled':<56} {total / rate_hz / max(requests, 1) * 1e6:11.1f}")
    return "\n".join(lines)

"""The routes' side of the group commit: a write queued from the event loop, its answer awaited there.

``db()`` (web.py) runs a blocking store call on a worker thread; for the writes of the group
commit — a publish, an inbound event — that thread would only wait for the group-commit thread.
Queued from the event loop instead (``Store.publish_soon``, ``Store.add_inbound_soon``), the
write is committed by the group-commit thread, which hands the answer back to the loop: one
thread hop less each way, which under load cost a publish more than its share of the commit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from governor import GiveWay
from store import DatabaseBusy
from web import DB_DEADLINE_S


async def group_written(start: Callable[[float, Callable[[], None]], Any], give_way: GiveWay) -> Any:
    """A group-commit write queued from the event loop, its result awaited without a worker thread
    (``Store.publish_soon``): ``start(deadline, on_done)`` queues it; its answer comes within
    ``DB_DEADLINE_S`` as ``db()``'s does. Still queued at the deadline, it is given up unwritten
    (``DatabaseBusy``, a 503); taken by the writer, it is waited for (it may be writing). While it
    waits, the delivery loop's threads step aside (``give_way``, the loop's ``governor.GiveWay``)."""
    with give_way.waiting():
        return await _committed(start)


async def _committed(start: Callable[[float, Callable[[], None]], Any]) -> Any:
    loop = asyncio.get_running_loop()
    finished = loop.create_future()
    request = start(time.monotonic() + DB_DEADLINE_S, lambda: loop.call_soon_threadsafe(_settle, finished, True))
    timer = loop.call_later(DB_DEADLINE_S, _settle, finished, False)
    in_time = await finished
    timer.cancel()
    if not in_time:
        if request.give_up():
            raise DatabaseBusy(f"the write waited {DB_DEADLINE_S:g} s behind other writes and was not made")
        await asyncio.to_thread(request.done.wait)
    if request.error is not None:
        raise request.error
    return request.result


def _settle(future: asyncio.Future, value: bool) -> None:
    if not future.done():
        future.set_result(value)

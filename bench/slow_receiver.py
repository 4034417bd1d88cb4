"""A partner far away: answers every POST after a fixed delay (default 100 ms), on 127.0.0.1.

Run as ``python bench/slow_receiver.py PORT DELAY_S``. Plain asyncio streams, HTTP/1.1 with
keep-alive, so one process holds thousands of requests open at little CPU (``GET /stats``
reports its own CPU, to show the receiver is not what limits a run). ``GET /stats`` answers
JSON: requests counted since the last ``GET /reset``, the most it ever held at once, and
its CPU seconds. It stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sys

STATS = {"requests": 0, "in_flight": 0, "max_in_flight": 0}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path = request_line.split(" ")[:2]
            length = 0
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            if method == "GET":
                if path == "/reset":
                    STATS.update(requests=0, max_in_flight=STATS["in_flight"])
                body = json.dumps({**STATS, "cpu_s": cpu_seconds()}).encode()
            else:
                STATS["requests"] += 1
                STATS["in_flight"] += 1
                STATS["max_in_flight"] = max(STATS["max_in_flight"], STATS["in_flight"])
                try:
                    await asyncio.sleep(delay_s)
                finally:
                    STATS["in_flight"] -= 1
                body = b'{"status":"received"}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(port: int, delay_s: float) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = await asyncio.start_server(lambda r, w: handle(r, w, delay_s), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))

"""The two senders webhookd is compared with, both without any durability.

1. ``send_webhook_to_partner`` — the partner guide's section 4 code (as copied in
   tests/guide_sender.py): sequential ``requests.post`` with no Session (a new connection per
   webhook), 3 attempts with 1 s / 2 s backoff, a print per webhook. Changes, so it can run
   here and post what it signs: the missing ``import os``/``import time`` are added, the URL
   is a module variable instead of api.nuestro-sistema.com, and the body is ``data=`` the
   signed canonical bytes instead of ``json=payload`` (whose bytes differ from what is signed).
2. ``stdlib_pool`` — 32 threads of ``urllib.request``, a new connection per webhook.
3. ``streams_floor`` — the floor: a bare ``asyncio`` streams sender, kept-alive connections, a
   hex HMAC per request and nothing else (no durability, no retries, no answer beyond its status
   and length), on the standard library's loop or on uvloop. What one Python core can send.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import json
import os
import time
import urllib.parse
import urllib.request

import requests

# --- 1. The guide's sender (section 4) -------------------------------------------------------

WEBHOOK_URL = "http://127.0.0.1:8080/webhooks/partners"  # set by the benchmark before each call


def send_webhook_to_partner(event_type: str, payload: dict):
    """
    Envía webhook a nuestro sistema
    """

    # URL donde nuestro grupo recibe webhooks
    webhook_url = WEBHOOK_URL

    # Tu shared_secret (guardado en env vars)
    shared_secret = os.getenv("PARTNER_SHARED_SECRET")

    # Serializar payload
    payload_str = json.dumps(payload, sort_keys=True, separators=(',', ':'))

    # Generar firma
    signature = hmac.new(
        shared_secret.encode('utf-8'),
        payload_str.encode('utf-8'),
        hashlib.sha256
    ).hexdigest()

    # Headers
    headers = {
        "X-Webhook-Signature": signature,
        "X-Webhook-Event": event_type,
        "Content-Type": "application/json",
        "User-Agent": "TuGrupoWebhooks/1.0"
    }

    # Enviar con reintentos
    for attempt in range(3):
        try:
            response = requests.post(
                webhook_url,
                data=payload_str.encode('utf-8'),  # the guide: json=payload (not the signed bytes)
                headers=headers,
                timeout=10
            )

            if response.status_code == 200:
                print(f"✅ Webhook enviado: {event_type}")
                return True

            print(f"⚠️ Intento {attempt+1} falló: {response.status_code}")
        except requests.RequestException as e:
            print(f"⚠️ Error de conexión: {e}")

        # Esperar antes de reintentar (exponential backoff)
        if attempt < 2:
            time.sleep(2 ** attempt)

    return False


def guide_sender(urls: list[str], secret: str, payload: dict, total: int, time_limit_s: float) -> tuple[int, float]:
    """Send ``total`` webhooks one after the other, partner after partner, as a loop around the
    guide's function would. Returns (how many succeeded, seconds). Its prints go to /dev/null."""
    global WEBHOOK_URL
    os.environ["PARTNER_SHARED_SECRET"] = secret
    ok = 0
    deadline = time.monotonic() + time_limit_s
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        started = time.perf_counter()
        for i in range(total):
            if time.monotonic() > deadline:
                break
            WEBHOOK_URL = urls[i % len(urls)]
            ok += bool(send_webhook_to_partner(payload["event"], payload))
        elapsed = time.perf_counter() - started
    return ok, elapsed


# --- 2. A bare standard-library thread pool -----------------------------------------------------

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


def _pool_send(url: str, secret: str, body: bytes, event_type: str, webhook_id: str, deadline: float) -> bool:
    if time.monotonic() > deadline:
        return False
    headers = {
        "Content-Type": "application/json",
        "X-Webhook-Event": event_type,
        "X-Webhook-Id": webhook_id,
        "X-Webhook-Signature": hmac.new(secret.encode(), body, hashlib.sha256).hexdigest(),
    }
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=5) as response:
            response.read()
            return response.status == 200
    except OSError:
        return False


def stdlib_pool(urls: list[str], secret: str, body: bytes, event_type: str, total: int,
                time_limit_s: float, threads: int = 32) -> tuple[int, float]:
    """``total`` webhooks from ``threads`` urllib.request threads. Returns (succeeded, seconds)."""
    deadline = time.monotonic() + time_limit_s
    with concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-pool") as pool:
        started = time.perf_counter()
        futures = [pool.submit(_pool_send, urls[i % len(urls)], secret, body, event_type, f"pool_{i}", deadline)
                   for i in range(total)]
        ok = sum(f.result() for f in futures)
        elapsed = time.perf_counter() - started
    return ok, elapsed


# --- 3. The floor: a bare asyncio streams sender --------------------------------------------------


async def _floor_connection(host: str, port: int, paths: list[str], key: bytes, body: bytes, event_type: str,
                            next_index, total: int, deadline: float) -> int:
    """One kept-alive connection sending requests until ``total`` are taken; returns its 200s."""
    reader, writer = await asyncio.open_connection(host, port)
    ok = 0
    try:
        while (i := next_index()) < total and time.monotonic() < deadline:
            signature = hmac.new(key, body, hashlib.sha256).hexdigest()
            head = (f"POST {paths[i % len(paths)]} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    f"X-Webhook-Event: {event_type}\r\nX-Webhook-Id: floor_{i}\r\n"
                    f"X-Webhook-Signature: {signature}\r\n\r\n")
            writer.write(head.encode("latin-1") + body)
            answer = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in answer.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            ok += answer.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    return ok


async def _floor(urls: list[str], secret: str, body: bytes, event_type: str, total: int, time_limit_s: float,
                 connections: int) -> tuple[int, float]:
    first = urllib.parse.urlsplit(urls[0])
    paths = [urllib.parse.urlsplit(url).path for url in urls]
    counter = iter(range(total + connections))
    deadline = time.monotonic() + time_limit_s
    started = time.perf_counter()
    done = await asyncio.gather(*(
        _floor_connection(first.hostname, first.port, paths, secret.encode(), body, event_type,
                          lambda: next(counter), total, deadline) for _ in range(connections)))
    return sum(done), time.perf_counter() - started


def streams_floor(urls: list[str], secret: str, body: bytes, event_type: str, total: int, time_limit_s: float,
                  use_uvloop: bool = False, connections: int = 20) -> tuple[int, float]:
    """``total`` webhooks from ``connections`` kept-alive asyncio streams in this process (one
    thread), on uvloop if asked. Returns (answered 200, seconds). Every URL is on one server."""
    coroutine = _floor(urls, secret, body, event_type, total, time_limit_s, connections)
    if use_uvloop:
        import uvloop

        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True

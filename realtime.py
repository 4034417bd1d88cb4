"""Live notifications to our users over WebSocket (step 5 of the partner guide).

When a partner posts ``tour.promoted``, the users connected on ``/ws`` see the offer at
once: the user named by the payload's ``user_id``, or everyone when it names nobody.

Two rules keep this safe:

* **Short-lived signed tokens.** ``POST /realtime/tokens`` (admin) mints
  ``<base64 claims>.<hex HMAC>`` for one user; ``/ws`` accepts it until it expires,
  offered as the subprotocol ``token.<token>`` (kept out of URLs and logs) or as
  ``?token=``. Nothing is stored: the signature is the proof. The signing key is derived
  from the admin token (``key_for``), and read again with it: a rotation's overlap keeps the
  tokens it signed valid, a revoked admin token takes its /ws tokens with it.
* **A slow client never blocks anyone.** Each connection has a bounded queue and its
  own sender task. Publishing only puts into queues (never waits); when a client's
  queue is full the message is dropped for that client and counted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

logger = logging.getLogger("webhookd.realtime")

POLICY_VIOLATION = 1008  # the WebSocket close code for a refused token
PROTOCOL = "webhookd"    # the subprotocol /ws answers with when a client offers it
TOKEN_PROTOCOL_PREFIX = "token."  # an offered subprotocol "token.<token>" carries the token
REVOKED = "the admin token that signed this token was revoked; ask for a new one"


class TokenError(Exception):
    """Raised when a realtime token is malformed, forged or expired."""


def key_for(admin_token: str) -> bytes:
    """The key that signs /ws tokens while ``admin_token`` is valid. Every process that shares the
    admin token (several on one PostgreSQL) derives the same key, so any of them accepts a token
    another minted; nobody without the admin token can compute it."""
    return hmac.new(admin_token.encode(), b"webhookd realtime tokens", hashlib.sha256).digest()


class Tokens:
    """Mint and check ``/ws`` tokens, signed with a key only this server knows.

    ``keys()`` gives the keys valid now, the one that signs new tokens first; it is asked on every
    mint and check, so a key withdrawn there stops verifying at once."""

    def __init__(self, keys: Callable[[], list[bytes]], ttl_s: float):
        self._keys = keys
        self.ttl_s = ttl_s

    def mint(self, user_id: str, now: float) -> tuple[str, int]:
        expires_at = int(now + self.ttl_s)
        claims = json.dumps({"u": user_id, "exp": expires_at}, separators=(",", ":")).encode()
        body = base64.urlsafe_b64encode(claims).decode().rstrip("=")
        return f"{body}.{_sign(self._keys()[0], body)}", expires_at

    def user_for(self, token: str, now: float) -> str:
        """The user a valid token names; TokenError otherwise."""
        body, _, _ = token.partition(".")
        if not body or not self.is_signed(token):
            raise TokenError("the token is not one this server signed")
        try:
            claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            user_id, expires_at = claims["u"], claims["exp"]
        except (ValueError, KeyError, TypeError):
            raise TokenError("the token is malformed") from None
        if now >= expires_at:
            raise TokenError("the token has expired; ask for a new one")
        return user_id

    def is_signed(self, token: str) -> bool:
        """Whether a key valid now signed ``token``; its expiry aside (checked when a connection
        opens, which may then outlive it), so an open connection can be asked again later."""
        body, _, signature = token.partition(".")
        given = signature.encode("utf-8", "replace")
        signed = False
        for key in self._keys():  # each compared in constant time, whichever matches
            signed |= hmac.compare_digest(_sign(key, body).encode(), given)
        return signed


def _sign(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


@dataclass(eq=False)
class Client:
    user_id: str
    queue: asyncio.Queue
    still_signed: Callable[[], bool]   # False once the key that signed its token is withdrawn
    dropped: int = 0


@dataclass
class Notifier:
    """Who is connected, and a non-blocking way to reach them."""

    queue_size: int = 100
    clients: set[Client] = field(default_factory=set)
    sent: int = 0
    dropped: int = 0

    def notify(self, message: dict[str, Any], user_id: str | None = None) -> int:
        """Queue ``message`` for one user's connections, or for everyone. Never waits.
        Returns how many connections it was queued for."""
        text = json.dumps(message, ensure_ascii=False)
        queued = 0
        for client in list(self.clients):
            if user_id is not None and client.user_id != user_id:
                continue
            try:
                client.queue.put_nowait(text)
                queued += 1
            except asyncio.QueueFull:
                client.dropped += 1
                self.dropped += 1
        return queued

    async def serve(self, websocket: WebSocket, user_id: str, still_signed: Callable[[], bool]) -> None:
        """Hold one accepted connection: send what is queued for it until it goes away, or until
        ``still_signed()`` says its token's key was withdrawn (closed with 1008 then, before the
        next message: a connection opened before its admin token was revoked gets nothing more)."""
        client = Client(user_id=user_id, queue=asyncio.Queue(maxsize=self.queue_size), still_signed=still_signed)
        self.clients.add(client)
        sender = asyncio.create_task(self._send_queued(websocket, client))
        try:
            while True:  # we expect nothing from the client (text or binary); reading notices when it leaves
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except WebSocketDisconnect:
            pass
        finally:
            self.clients.discard(client)
            sender.cancel()
            if client.dropped:
                logger.warning("realtime client of user %s dropped %d messages (it did not read them)",
                               user_id, client.dropped)

    async def _send_queued(self, websocket: WebSocket, client: Client) -> None:
        try:
            while True:
                text = await client.queue.get()
                if not client.still_signed():
                    await websocket.close(code=POLICY_VIOLATION, reason=REVOKED)
                    return
                await websocket.send_text(text)
                self.sent += 1
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass


EVERYONE = None


def offer_from(partner_id: str, payload: dict[str, Any],
               traceparent: str | None = None) -> tuple[dict[str, Any], str | None] | None:
    """The notification for an inbound ``tour.promoted`` and whom it is for: the user named
    by ``user_id``, or ``EVERYONE`` when the payload names nobody. A ``user_id`` that is
    present but names no one (null, empty, an object) reaches nobody: a mistaken target
    must not turn into a broadcast of someone's offer. Returns None then. The partner's
    ``traceparent`` (W3C trace context), when it sent a valid one, rides along for the client's logs."""
    message = {"type": "offer", "message": "Nueva oferta disponible", "partner_id": partner_id,
               "tour_id": payload.get("tour_id"), "data": payload}
    if traceparent:
        message["traceparent"] = traceparent
    if "user_id" not in payload:
        return message, EVERYONE
    user_id = payload["user_id"]
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if isinstance(user_id, str) and user_id:
        return message, user_id
    return None

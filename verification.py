"""Proof that a webhook endpoint is the partner's own, before anything else is sent to it.

Anyone who may register a partner (the admin, or anybody when registration is open) could name
someone else's URL and have webhookd post events at it. With ``security.verify_endpoints`` on, a
new partner's URL, and every new URL a partner is given, must first answer a challenge, as Slack's
``url_verification`` and Meta's ``hub.challenge`` ask:

1. webhookd POSTs a ``webhook.verification`` event, signed exactly like every delivery (the same
   headers, the same secrets), whose body carries ``challenge``: 32 random bytes (``secrets``),
   new for each URL and each request for verification. Never a GET: a GET to an unknown endpoint
   may do something there (a link that unsubscribes, a job that starts).
2. The endpoint verifies the signature as it does for any webhook and answers 2xx with the
   challenge in the body: ``{"challenge": "<the challenge>"}`` (any other fields beside it), or the
   challenge alone as plain text or as a JSON string. It is compared in constant time.
3. Until it does, the partner is ``unverified``: the claim passes it by (``store.PENDING_PARTNERS``;
   on PostgreSQL ``_LOCK_PARTNERS`` too), an attempt claimed before its URL changed is given back
   (``delivery.py``), a retry, recover or replay by hand gets a 409 (``partners.refuse_if_held``),
   the receiver doctor probes nothing, and the backlog alert leaves its waiting deliveries out.
   Its deliveries wait like a paused partner's, and like them end ``expired`` after
   ``delivery.max_pending_age_s`` (``POST /partners/{id}/recover`` brings those back).
4. A request that fails is sent again after the deliveries' backoff (``delivery.backoff_base_s``
   doubled each time, at most ``backoff_max_s``), a new id each time, ``MAX_ATTEMPTS`` in all; then
   the partner (its API key) or the admin asks again: ``POST /partners/{id}/verify``.

The partner's JSON shows where it stands (``verification``: the state, the requests sent, the
last failure in words, the next request's time); the audit trail has every request and result.
Partners registered before the option was turned on are not asked (their state is
``not_requested``) until someone asks for a verification. With the option off, nothing is asked,
and at start-up any partner left unverified is let through again (audited).

This module holds the route, the checks the other routes call, and ``Verifier``, the task that
sends the requests (on the delivery loop's sender, so under the same target rules); the rows are
``store_verification.py``'s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

import signing
from config import Config, DeliverySettings
from models import AuditEntry, Job, Partner
from partner_terms import backoff_delay
from sender import Sender, Sent
from store import DatabaseUnavailable, Store
from store_verification import DueVerification
from web import ApiError, audit_entry, context, db, new_id, owned_partner

logger = logging.getLogger("webhookd")

VERIFICATION_EVENT = "webhook.verification"
CHALLENGE_BYTES = 32   # secrets.token_urlsafe: 43 characters
MAX_ATTEMPTS = 8       # requests per challenge; with the default backoff (30 s doubled, at most 1 h) about 1 h in all
IN_FLIGHT = 10         # requests at once, all partners together
IDLE_RECHECK_S = 30.0  # with nothing due, look again now and then ...
SHARED_RECHECK_S = 1.0  # ... every second when other processes register partners too (PostgreSQL)
ACTOR = "webhookd"     # the audit trail's actor for what the verifier itself records


# =====================================================================================
# 1. The route, and what the other routes ask of a partner's verification
# =====================================================================================


async def request_verification(request: Request) -> JSONResponse:
    """``POST /partners/{id}/verify``: a new challenge, sent now; unverified until it is echoed."""
    partner = await owned_partner(request)
    ctx = context(request)
    if not ctx.config.security.verify_endpoints:
        raise ApiError(409, "verification_off", "Endpoint verification is off on this webhookd "
                                                "(security.verify_endpoints): events go out without it.")
    if not partner.webhook_url:
        raise ApiError(409, "nothing_to_verify", f"Partner {partner.id} has no webhook URL: there is no endpoint "
                                                 "to verify.")
    audit = audit_entry(request, "partner.verification_requested", partner.id, {"webhook_url": partner.webhook_url})
    partner = await db(ctx.store.request_verification, partner.id, challenge=new_challenge(), now=ctx.clock(),
                       audit=audit)
    if partner is None:
        raise ApiError(404, "partner_not_found", "No such partner.")
    wake(request)
    logger.info("partner %s: endpoint verification requested", partner.id)
    return JSONResponse({"partner_id": partner.id, "verification": verification_json(partner)}, status_code=202)


def new_challenge() -> str:
    return secrets.token_urlsafe(CHALLENGE_BYTES)


def challenge_for(url: str | None, config: Config) -> str | None:
    """A challenge for a partner given ``url`` (at registration or by a change of URL), when the
    config asks for proof and there is an endpoint to prove; else None."""
    return new_challenge() if config.security.verify_endpoints and url else None


def wake(request: Request) -> None:
    """A challenge was just stored: send it now rather than at the verifier's next look."""
    verifier = getattr(request.app.state, "verifier", None)
    if verifier is not None:
        verifier.wake()


def verification_json(partner: Partner) -> dict[str, Any]:
    """A partner's verification as the API shows it (never the challenge)."""
    v = partner.verification
    if v is None:
        return {"state": "not_requested"}
    return {"state": v.state, "attempts": v.attempts, "max_attempts": MAX_ATTEMPTS,
            "last_attempt_at": _seconds(v.tried_at), "next_attempt_at": _seconds(v.due_at),
            "last_error": v.error, "verified_at": _seconds(v.verified_at)}


def _seconds(t: float | None) -> int | None:
    return int(t) if t is not None else None


def refuse_if_unverified(partner: Partner) -> None:
    """The 409 for a route that would send something to an endpoint not yet proved (the doctor)."""
    if partner.unverified:
        raise ApiError(409, "partner_unverified", f"Partner {partner.id}'s endpoint has not answered its verification "
                                                  "challenge yet: nothing else is sent to it until it does. See "
                                                  "'verification' on the partner.")


# =====================================================================================
# 2. Judging an answer
# =====================================================================================


def echoed_challenge(body: str | None) -> str | None:
    """The challenge an answer's body gives back: ``{"challenge": "..."}``, a JSON string, or the
    plain text itself (surrounding spaces and a final newline allowed); None if it holds none."""
    text = (body or "").strip()
    if not text:
        return None
    if text[0] in "{[\"":
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        found = parsed.get("challenge") if isinstance(parsed, dict) else parsed
        return found if isinstance(found, str) else None
    return text


def judge(sent: Sent, challenge: str) -> str | None:
    """None if the answer proves the endpoint (a 2xx echoing ``challenge``), else why not, in words
    the partner can act on."""
    a = sent.attempt
    if a.status_code is None:
        return f"no answer: {a.error_detail or a.error}"
    if not 200 <= a.status_code < 300:
        return f"the endpoint answered {a.status_code}; answer 2xx with the challenge in the body"
    found = echoed_challenge(a.response_snippet)
    if found is None:
        return (f"the endpoint answered {a.status_code} without the challenge: answer "
                '{"challenge": "<the challenge from the request body>"} (under 1 KiB)')
    if not hmac.compare_digest(found.encode("utf-8"), challenge.encode("utf-8")):
        return f"the endpoint answered {a.status_code} with another challenge: echo the one in this request's body"
    return None


def request_body(partner_id: str, challenge: str, now: float) -> bytes:
    """The verification event's body: canonical JSON, signed like every delivery."""
    return signing.canonical({
        "event": VERIFICATION_EVENT, "timestamp": int(now), "partner_id": partner_id, "challenge": challenge,
        "message": "Prove this endpoint is yours: verify the signature like any webhook, then answer 2xx with "
                   "{\"challenge\": \"<this challenge>\"}. Nothing else is sent to it until then."})


# =====================================================================================
# 3. The verifier: a task beside the delivery loop
# =====================================================================================


class Verifier:
    """Claims due verification requests, sends each on the delivery loop's sender, records each result."""

    def __init__(self, store: Store, sender: Sender, settings: DeliverySettings, wake_deliveries: Callable[[], None],
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        self.store, self.sender, self.settings, self.clock = store, sender, settings, clock
        self.wake_deliveries = wake_deliveries  # the delivery loop's wake (any thread): a verified partner's wait
        self.rng = rng or random.Random()
        self._tasks: set[asyncio.Task] = set()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._run_task: asyncio.Task | None = None
        self._stopping = False
        self._recheck_s = SHARED_RECHECK_S if store.shared else IDLE_RECHECK_S

    async def start(self, config: Config) -> None:
        """Run when the config asks for verification; otherwise let every unverified partner through."""
        if not config.security.verify_endpoints:
            await asyncio.to_thread(self._lift_gate)
            return
        self._loop = asyncio.get_running_loop()
        self._run_task = asyncio.create_task(self.run(), name="webhookd-verifier")

    def _lift_gate(self) -> None:
        now = self.clock()
        lifted = self.store.lift_verification_gate(now, lambda partner_id: AuditEntry(
            id=new_id("aud_"), at=now, actor=ACTOR, action="partner.verification_lifted", partner_id=partner_id,
            changes={"reason": "security.verify_endpoints is off"}))
        if lifted:
            logger.warning("endpoint verification is off (security.verify_endpoints): %d unverified partner(s) now "
                           "receive their events: %s", len(lifted), ", ".join(lifted))

    def wake(self) -> None:
        """Look for due requests now (from the event loop)."""
        self._wakeup.set()

    async def stop(self) -> None:
        """Stop claiming; a request on the wire is dropped, and its lease brings it back next run."""
        self._stopping = True
        self._wakeup.set()
        if self._run_task is not None:
            await asyncio.gather(self._run_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def run(self) -> None:
        while not self._stopping:
            self._wakeup.clear()
            try:
                await self._claim_and_start()
                pause = await self._seconds_until_next_due()
            except DatabaseUnavailable as exc:
                logger.warning("claiming endpoint verifications failed (%s); trying again shortly", exc)
                pause = 1.0
            except Exception:
                logger.exception("claiming endpoint verifications failed; trying again shortly")
                pause = 1.0
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=pause)
            except TimeoutError:
                pass

    async def _claim_and_start(self) -> None:
        room = IN_FLIGHT - len(self._tasks)
        if room <= 0:
            return
        due = await asyncio.to_thread(self.store.claim_verifications, now=self.clock(),
                                      lease_s=self.settings.lease_s, limit=room)
        for claimed in due:
            task = asyncio.create_task(self._verify(claimed))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._wakeup.set()

    async def _seconds_until_next_due(self) -> float:
        if len(self._tasks) >= IN_FLIGHT:
            return self._recheck_s  # a request that ends wakes the loop
        due_at = await asyncio.to_thread(self.store.next_verification_at)
        if due_at is None:
            return self._recheck_s
        return min(self._recheck_s, max(0.05, due_at - self.clock()))

    async def _verify(self, due: DueVerification) -> None:
        """Send one request and record what it proved. Never raises: its lease brings it back."""
        try:
            partner = await asyncio.to_thread(self.store.get_partner, due.partner_id)
            sent = await asyncio.wrap_future(self.sender.submit(self.sender.attempt(self._job(due, partner))))
            await asyncio.to_thread(self._record, due, sent)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("partner %s: sending the endpoint verification failed; it is tried again", due.partner_id)

    def _job(self, due: DueVerification, partner: Partner | None) -> Job:
        """The request as the sender sends a delivery: a fresh event id each time, so a receiver that
        deduplicates on ``X-Webhook-Id`` never takes a repeated request for one it has answered. It
        goes on the partner's own terms, as its deliveries will: its timeout, its extra headers (a
        gateway in front of the endpoint may demand one) and its client certificate."""
        own = {} if partner is None else {"retry": partner.retry, "extra_headers": partner.extra_headers,
                                          "client_cert": partner.client_cert, "client_key": partner.client_key}
        return Job(delivery_id="", event_id=new_id("evt_"), event=VERIFICATION_EVENT, partner_id=due.partner_id,
                   url=due.url, secrets=due.secrets, body=request_body(due.partner_id, due.challenge, self.clock()),
                   attempt=due.attempt, max_attempts=MAX_ATTEMPTS, **own)

    def _record(self, due: DueVerification, sent: Sent) -> None:
        """Write the result (in a thread): verified, or the reason and when the next request goes."""
        now = self.clock()
        error = judge(sent, due.challenge)
        due_at = None
        if error is not None and due.attempt < MAX_ATTEMPTS:
            due_at = now + backoff_delay(due.attempt, self.settings.backoff_base_s, self.settings.backoff_max_s,
                                         self.rng)
        elif error is not None:
            error += (f" (request {due.attempt} of {MAX_ATTEMPTS}, the last: ask again with "
                      f"POST /partners/{due.partner_id}/verify)")
        action = "partner.verified" if error is None else "partner.verification_failed"
        changes = {"attempt": due.attempt, "status_code": sent.attempt.status_code, "error": error,
                   "next_attempt_at": int(due_at) if due_at is not None else None}
        audit = AuditEntry(id=new_id("aud_"), at=now, actor=ACTOR, action=action, partner_id=due.partner_id,
                           changes=changes if error is not None else {"attempt": due.attempt})
        if not self.store.record_verification(due.partner_id, challenge=due.challenge, now=now, error=error,
                                              due_at=due_at, audit=audit):
            logger.info("partner %s: a verification answer came back for a challenge since replaced; not recorded",
                        due.partner_id)
        elif error is None:
            self.wake_deliveries()
            logger.info("partner %s: endpoint verified (request %d); its events go out now", due.partner_id,
                        due.attempt)
        else:
            logger.warning("partner %s: endpoint verification request %d of %d failed: %s", due.partner_id,
                           due.attempt, MAX_ATTEMPTS, error)

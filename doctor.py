"""The receiver doctor: ``POST /partners/{id}/check`` tells a partner whether its endpoint is safe
before a real event arrives.

A "send test event" button proves only that something answered 200. The doctor sends a short
series of marked probes (type ``webhook.check``, header ``X-Webhook-Check: 1``) and judges each
answer the way a careful reviewer of the receiver's code would:

1. ``accepts_signed``: a correctly signed probe gets a 2xx (the others need this first);
2. ``accepts_retry``: the same probe again, same id, gets a 2xx too (a retry is a retry);
3. ``rejects_bad_signature``: a signature made with another key, and one of another length,
   get a 4xx; a 2xx means the endpoint verifies nothing (the worst finding); a 5xx should be a 401;
4. ``rejects_stale_timestamp``: a Standard Webhooks probe signed an hour ago gets a 4xx;
5. ``verifies_raw_body``: bodies that break receivers which parse and re-serialise the JSON before
   hashing (non-ASCII text, ``150.0``, large integers, empty objects, ``"10"`` before ``"2"``,
   ``/``), each correctly signed, get a 2xx;
6. ``answer_time`` against the timeout, and ``https``: the certificate and its days left.

Probes are not deliveries: no rows, no retries, no circuit breaker; each is sent once, on a
connection of its own, under the rules every delivery obeys — ``targets.parse_target`` (scheme,
host, allowed ports) and ``targets.resolve_target_async`` (the SSRF address rule), connecting to
exactly the address that was checked (through ``delivery.proxy_url``'s tunnel, with the partner's
client certificate, as ``egress.py`` connects a delivery), redirects never followed,
``delivery.timeout_s`` at most.
The request is the sender's own (``sender.plan_route``, ``build_headers``, ``request_bytes``), so a
probe is signed and framed like a real webhook. A check is rate-limited per partner. Every finding
carries a one-line fix, in English or Spanish (``?lang=``, else ``Accept-Language``), pointing at
the partner guide's section that shows the right code.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import http.client
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse

import egress
import partner_terms
import signing
from config import VERSION, Config
from models import Job, Partner
from polling import delivery_mode
from sender import build_headers, classify_error, describe_error, plan_route, request_bytes
from sender_http import MAX_HEAD_BYTES, MAX_INTERIM, MAX_LINE, BadResponse
from targets import Target, resolve_target_async
from verification import refuse_if_unverified
from web import ApiError, RateLimiter, caller_of, context, invalid, new_id, owned_partner

logger = logging.getLogger("webhookd")

CHECK_EVENT = "webhook.check"
CHECK_HEADER = "X-Webhook-Check"
CHECKS_BURST = 3          # checks a partner may run back to back ...
CHECKS_PER_S = 1 / 60     # ... then one a minute: each check sends 11 requests to the endpoint
STALE_S = 3600            # the stale probe's age: far outside any sensible tolerance (5 minutes)
IN_FLIGHT = 3             # probes at once, after the first two: a check lasts at most 5 timeouts
CERT_WARN_DAYS = 14       # a certificate expiring sooner is a warning
LANGUAGES = ("en", "es")

# Bodies that a receiver which parses and re-serialises the JSON before hashing gets wrong in at
# least one common language (JavaScript's JSON.stringify, PHP's json_encode); each signed correctly.
AWKWARD_BODIES: dict[str, dict[str, Any]] = {
    "non_ascii": {"user_name": "Juan Pérez", "tour_name": "Amazonía Premium", "note": "¡Buen viaje! 🌴"},
    "zero_fraction": {"amount": 150.0, "currency": "USD"},
    "large_integer": {"booking_number": 9007199254740993},
    "nested_objects": {"metadata": {"reservation": {"guests": [{"name": "Ana", "age": 34}], "extras": {}},
                                    "rooms": {"0": "single", "1": "double"}}},
    "integer_keys": {"seats": {"10": "window", "2": "aisle"}},
    "slash": {"receipt_url": "https://example.com/receipts/r_1"},
}


# --- The route ------------------------------------------------------------------------------


async def check_endpoint(request: Request) -> JSONResponse:
    """``POST /partners/{id}/check?lang=en|es``: probe the partner's endpoint, answer the report."""
    partner = await owned_partner(request)
    if delivery_mode(partner) == "pull":
        raise ApiError(409, "partner_pulls", f"Partner {partner.id} is pull-only: it has no endpoint to check. "
                                             f"It reads its events with GET /partners/{partner.id}/events.")
    refuse_if_unverified(partner)  # probes are requests too: none to an endpoint not yet proved
    lang = chosen_language(request.query_params.get("lang"), request.headers.get("accept-language", ""))
    ctx = context(request)
    await _check_limit(request).check(partner.id, "endpoint checks of this partner")
    findings = await examine(partner, ctx.config, ctx.clock)
    report = report_json(partner.id, findings, lang, ctx.clock())
    logger.info("partner %s: endpoint checked by %s: %s", partner.id,
                "the admin" if caller_of(request).is_admin else "the partner",
                ", ".join(f"{f.name} {f.result}" for f in findings))
    return JSONResponse(report)


def chosen_language(asked: str | None, accept_language: str) -> str:
    """``?lang=`` when given (en or es, else a 422); otherwise the first of ``Accept-Language``'s
    languages, by preference, that is en or es; otherwise English."""
    if asked is not None:
        if asked not in LANGUAGES:
            raise invalid("lang", "must be 'en' (English) or 'es' (Spanish).")
        return asked
    ranked = []
    for position, part in enumerate(accept_language.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        q = re.search(r"q=([01](?:\.\d{0,3})?)", params)
        ranked.append((-(float(q.group(1)) if q else 1.0), position, tag.strip().lower().split("-")[0]))
    return next((tag for weight, _, tag in sorted(ranked) if tag in LANGUAGES and weight < 0), "en")


def _check_limit(request: Request) -> RateLimiter:
    """The app's per-partner limit on checks, made on first use (shared between processes on
    PostgreSQL, like the other limits)."""
    state = request.app.state
    if getattr(state, "check_limit", None) is None:
        ctx = context(request)
        state.check_limit = RateLimiter(CHECKS_PER_S, CHECKS_BURST, ctx.clock,
                                        shared=ctx.store if ctx.store.shared else None, name="endpoint_checks")
    return state.check_limit


# --- One probe ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one probe got: an HTTP status, or why none (the sender's error class and detail)."""

    status: int | None
    seconds: float
    error: str | None = None
    detail: str | None = None
    cert_not_after: float | None = None   # an https endpoint's certificate, when the handshake passed

    @property
    def kind(self) -> str:
        """2xx, 3xx, 4xx or 5xx; 429 on its own (busy, says nothing of the receiver's code); none."""
        if self.status is None:
            return "none"
        return "429" if self.status == 429 else f"{self.status // 100}xx"

    def said(self) -> str:
        return str(self.status) if self.status is not None else f"no answer ({self.detail})"


class Prober:
    """Sends probes to one partner's endpoint, each on a new connection, under the deliveries' rules."""

    def __init__(self, partner: Partner, config: Config, clock: Callable[[], float]):
        self.partner, self.config, self.clock = partner, config, clock
        self.timeout_s = partner_terms.timeout_s(partner.retry, config.delivery)  # its own, if it has one
        self.user_agent = f"webhookd/{VERSION} (endpoint check)"
        self._tls: ssl.SSLContext | None = None

    def job(self, check: str, fields: dict[str, Any], published_at: float) -> Job:
        """A probe as the sender would see it: a signed ``webhook.check`` body of its own id."""
        payload = {"event": CHECK_EVENT, "timestamp": int(published_at), "partner_id": self.partner.id,
                   "check": check, "message": "A check of your endpoint by webhookd: verify it like any webhook, "
                                              "answer 2xx, and do nothing else with it.", **fields}
        return Job(delivery_id="", event_id=new_id("evt_"), event=CHECK_EVENT, partner_id=self.partner.id,
                   url=self.partner.webhook_url, secrets=tuple(self.partner.valid_secrets(self.clock())),
                   body=signing.canonical(payload), attempt=1, max_attempts=1)

    def headers(self, job: Job, timestamp: int | None = None) -> dict[str, str]:
        signed = build_headers(job, int(self.clock()) if timestamp is None else timestamp)
        return {**signed, CHECK_HEADER: "1", "Connection": "close"}

    async def send(self, job: Job, headers: dict[str, str]) -> Answer:
        """One probe, within the partner's timeout (lookup, connect, answer). Never raises for I/O."""
        started = time.monotonic()
        got: dict[str, Any] = {}
        try:
            route = plan_route(job.url, self.config.security.allowed_ports, self.user_agent, self.partner.extra_headers)
            async with asyncio.timeout(self.timeout_s):
                await self._exchange(route.target, request_bytes(route, headers, job.body), got, started)
        except Exception as exc:  # a bad endpoint is a finding, never an error of ours
            if "status" not in got:
                return Answer(None, time.monotonic() - started, classify_error(exc),
                              describe_error(exc, self.timeout_s), got.get("cert"))
        return Answer(got["status"], got["seconds"], cert_not_after=got.get("cert"))

    async def _exchange(self, target: Target, request: bytes, got: dict[str, Any], started: float) -> None:
        ip = await resolve_target_async(target.host, target.port, self.config.security.allow_private_targets,
                                        self.timeout_s)
        tls = await self.tls() if target.scheme == "https" else None
        proxy_url = self.config.delivery.proxy_url
        reader, writer = await egress.open_connection(
            ip, target.port, tls=tls, server_hostname=target.host, limit=MAX_LINE,
            proxy=egress.Proxy.from_url(proxy_url) if proxy_url else None)
        try:
            cert = writer.get_extra_info("peercert") if tls else None
            if cert and cert.get("notAfter"):
                got["cert"] = ssl.cert_time_to_seconds(cert["notAfter"])
            writer.write(request)
            await writer.drain()
            got["status"] = await _read_status(reader)
            got["seconds"] = time.monotonic() - started
            await _drain(reader)  # the rest of the answer, so the receiver's write does not fail
        finally:
            writer.close()

    async def tls(self) -> ssl.SSLContext:
        """The deliveries' trust: the system's CAs, or ``delivery.ca_file``; with the partner's client
        certificate if it has one (an expired one is an ``egress.ConfigurationError``, as in a delivery)."""
        if self._tls is None:
            ca_file = self.config.delivery.ca_file
            if self.partner.client_cert:
                self._tls = await egress.ClientCertificates(ca_file).context(
                    self.partner.client_cert, self.partner.client_key or "", self.clock())
            else:
                self._tls = ssl.create_default_context(cafile=ca_file or None)
        return self._tls


async def _read_status(reader: asyncio.StreamReader) -> int:
    """The final status of the answer, past at most ``MAX_INTERIM`` interim (1xx) ones."""
    for _ in range(MAX_INTERIM + 1):
        line = await _line(reader)
        match = re.match(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?:[ \r\n]|$)", line)
        if not match:
            raise BadResponse(f"not an HTTP/1.x status line: {line[:40]!r}")
        status = int(match.group(1))
        if status >= 200:
            return status
        budget = MAX_HEAD_BYTES
        while (header := await _line(reader)) not in (b"\r\n", b"\n"):
            budget -= len(header)
            if budget < 0:
                raise BadResponse("response head too large")
    raise BadResponse(f"too many interim responses: more than {MAX_INTERIM} 1xx answers before the final one")


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise http.client.RemoteDisconnected("the partner closed the connection without an answer") from None
        return exc.partial
    except asyncio.LimitOverrunError:
        raise BadResponse("a line of the answer is longer than 64 KiB") from None


async def _drain(reader: asyncio.StreamReader, most: int = 65536) -> None:
    while most > 0 and (chunk := await reader.read(min(most, 16384))):
        most -= len(chunk)


# --- The probes and what their answers mean ------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One check's result: ``key`` names its words in ``WORDS``, filled in with ``values``."""

    name: str
    result: str   # pass | warn | fail
    key: str
    values: dict[str, Any]


async def examine(partner: Partner, config: Config, clock: Callable[[], float]) -> list[Finding]:
    """Run every probe against the partner's endpoint and judge the answers."""
    prober = Prober(partner, config, clock)
    first = prober.job("accepts_signed", {}, clock())
    signed = await prober.send(first, prober.headers(first))
    findings = [f for f in [_https(partner.webhook_url, signed, clock())] if f is not None]
    if signed.kind != "2xx":
        return [_first_refused(signed), *findings]
    again = await prober.send(first, prober.headers(first))   # a retry: the same id and body, a new timestamp
    other_key = prober.job("rejects_bad_signature", {}, clock())
    short = prober.job("rejects_bad_signature", {}, clock())
    stale = prober.job("rejects_stale_timestamp", {}, clock() - STALE_S)
    awkward = {name: prober.job(f"verifies_raw_body.{name}", fields, clock()) for name, fields in AWKWARD_BODIES.items()}
    at_once = asyncio.Semaphore(IN_FLIGHT)

    async def send(job: Job, headers: dict[str, str]) -> Answer:
        async with at_once:
            return await prober.send(job, headers)

    wrong, shortened, old, *bodies = await asyncio.gather(
        send(other_key, prober.headers(replace(other_key, secrets=("sk_live_not_your_secret",)))),
        send(short, _shortened(prober.headers(short))),
        send(stale, prober.headers(stale, timestamp=int(clock()) - STALE_S)),
        *(send(job, prober.headers(job)) for job in awkward.values()))
    answers = [signed, again, wrong, shortened, old, *bodies]
    return [_accepted(signed), _retry(again), _bad_signature(wrong, shortened), _stale(old),
            _raw_body(dict(zip(awkward, bodies))), _answer_time(answers, config.delivery.timeout_s), *findings]


def _shortened(headers: dict[str, str]) -> dict[str, str]:
    """The signatures cut to half their length: a receiver comparing only a prefix, or one whose
    comparison throws on a different length, shows here."""
    standard = headers["webhook-signature"].split()[0]
    digest = base64.b64decode(standard[3:])[:16]
    return {**headers, "X-Webhook-Signature": headers["X-Webhook-Signature"][:32],
            "webhook-signature": "v1," + base64.b64encode(digest).decode("ascii")}


def _first_refused(answer: Answer) -> Finding:
    if answer.status is None:
        key = "accepts_signed.blocked" if answer.error == "ssrf_blocked" else "accepts_signed.unreachable"
        return Finding("accepts_signed", "fail", key, {"detail": answer.detail})
    key = {"3xx": "redirect", "4xx": "refused", "429": "busy"}.get(answer.kind, "crashed")
    return Finding("accepts_signed", "warn" if key == "busy" else "fail", f"accepts_signed.{key}",
                   {"status": answer.status})


def _accepted(answer: Answer) -> Finding:
    return Finding("accepts_signed", "pass", "accepts_signed.pass", {"status": answer.status})


def _retry(answer: Answer) -> Finding:
    if answer.kind == "2xx":
        return Finding("accepts_retry", "pass", "accepts_retry.pass", {"status": answer.status})
    return Finding("accepts_retry", "warn", "accepts_retry.warn", {"status": answer.said()})


def _bad_signature(wrong: Answer, shortened: Answer) -> Finding:
    for answer, which in ((wrong, "other_key"), (shortened, "short")):
        if answer.kind == "2xx":
            return Finding("rejects_bad_signature", "fail", "rejects_bad_signature.fail",
                           {"status": answer.status, "which": which})
    for answer, which in ((wrong, "other_key"), (shortened, "short")):
        if answer.kind != "4xx":
            return Finding("rejects_bad_signature", "warn", "rejects_bad_signature.warn",
                           {"status": answer.said(), "which": which})
    return Finding("rejects_bad_signature", "pass", "rejects_bad_signature.pass",
                   {"first": wrong.status, "second": shortened.status})


def _stale(answer: Answer) -> Finding:
    minutes = STALE_S // 60
    if answer.kind == "4xx":
        return Finding("rejects_stale_timestamp", "pass", "rejects_stale_timestamp.pass",
                       {"status": answer.status, "minutes": minutes})
    key = "accepted" if answer.kind == "2xx" else "other"
    return Finding("rejects_stale_timestamp", "warn", f"rejects_stale_timestamp.{key}",
                   {"status": answer.said(), "minutes": minutes})


def _raw_body(answers: dict[str, Answer]) -> Finding:
    refused = [name for name, a in answers.items() if a.kind == "4xx"]
    if refused:
        return Finding("verifies_raw_body", "fail", "verifies_raw_body.refused",
                       {"bodies": refused, "count": len(refused), "total": len(answers)})
    broken = [name for name, a in answers.items() if a.kind != "2xx"]
    if broken:
        return Finding("verifies_raw_body", "fail", "verifies_raw_body.broken",
                       {"bodies": broken, "status": answers[broken[0]].said()})
    return Finding("verifies_raw_body", "pass", "verifies_raw_body.pass", {"total": len(answers)})


def _answer_time(answers: list[Answer], timeout_s: float) -> Finding:
    answered = [a.seconds for a in answers if a.status is not None]
    slowest = max(answered, default=0.0)
    values = {"ms": round(slowest * 1000), "timeout": f"{timeout_s:g}"}
    if any(a.error == "timeout" for a in answers):
        return Finding("answer_time", "fail", "answer_time.timeout", values)
    if slowest > timeout_s / 2:
        return Finding("answer_time", "warn", "answer_time.slow", values)
    return Finding("answer_time", "pass", "answer_time.pass", values)


def _https(url: str, answer: Answer, now: float) -> Finding | None:
    """Plain http:// (a warning, but to this machine), or the certificate: valid, its days left.
    None when an https endpoint could not be reached at all (``accepts_signed`` says why)."""
    if not url.lower().startswith("https://"):
        local = _is_loopback(urlsplit(url).hostname or "")
        return Finding("https", "pass" if local else "warn", "https.local" if local else "https.plain", {})
    if answer.error == "tls_error":
        return Finding("https", "fail", "https.invalid", {"detail": answer.detail})
    if answer.cert_not_after is None:
        return None
    days = int((answer.cert_not_after - now) // 86400)
    date = datetime.datetime.fromtimestamp(answer.cert_not_after, datetime.UTC).strftime("%Y-%m-%d")
    if days < CERT_WARN_DAYS:
        return Finding("https", "warn", "https.expiring", {"date": date, "days": days})
    return Finding("https", "pass", "https.pass", {"date": date, "days": days})


def _is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address: plain http:// there is local testing, not a risk."""
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- The report, in the partner's language ---------------------------------------------------------------

WORST = {"pass": 0, "warn": 1, "fail": 2}


def report_json(partner_id: str, findings: list[Finding], lang: str, now: float) -> dict[str, Any]:
    """``{"partner_id", "lang", "checked_at", "result", "checks": [{"name", "result", "detail", "fix"}]}``;
    ``result`` is the worst of the checks'; ``fix`` is null for a pass."""
    checks = [{"name": f.name, "result": f.result, **words(f, lang)} for f in findings]
    worst = max((f.result for f in findings), key=WORST.__getitem__, default="pass")
    return {"partner_id": partner_id, "lang": lang, "checked_at": int(now), "result": worst, "checks": checks}


def words(finding: Finding, lang: str) -> dict[str, str | None]:
    """The finding's detail and fix in ``lang``."""
    detail, fix = WORDS[finding.key][lang]
    values = dict(finding.values)
    if "which" in values:
        values["which"] = WHICH[values["which"]][lang]
    if "bodies" in values:
        values["bodies"] = ", ".join(BODY_NAMES[name][lang] for name in values["bodies"])
    return {"detail": detail.format(**values), "fix": fix.format(**values) if fix else None}


GUIDE = {"en": "partner guide, section {n}", "es": "guía para socios, sección {n}"}
WHICH = {"other_key": {"en": "a signature made with another key", "es": "una firma hecha con otra clave"},
         "short": {"en": "a signature of half the length", "es": "una firma de la mitad de la longitud"}}
BODY_NAMES = {
    "non_ascii": {"en": "non-ASCII text (é, ñ, emoji)", "es": "texto no ASCII (é, ñ, emoji)"},
    "zero_fraction": {"en": "a number written 150.0", "es": "un número escrito 150.0"},
    "large_integer": {"en": "an integer above 2^53", "es": "un entero mayor que 2^53"},
    "nested_objects": {"en": "nested and empty objects, keys \"0\" and \"1\"",
                       "es": "objetos anidados y vacíos, claves \"0\" y \"1\""},
    "integer_keys": {"en": "keys \"10\" before \"2\"", "es": "claves \"10\" antes que \"2\""},
    "slash": {"en": "a URL with \"/\"", "es": "una URL con \"/\""},
}


def _both(en: tuple[str, str | None], es: tuple[str, str | None], section: int | None = None) -> dict[str, Any]:
    """One finding's words in both languages; ``section`` of the partner guide appended to the fixes."""
    if section is None:
        return {"en": en, "es": es}
    return {lang: (detail, f"{fix} ({GUIDE[lang].format(n=section)}).") for lang, (detail, fix)
            in (("en", en), ("es", es))}


_VERIFY_EN = ("Compute the HMAC-SHA256 of the raw body with your shared secret, compare it in constant time with "
              "X-Webhook-Signature, and answer 401 when they differ")
_VERIFY_ES = ("Calcula el HMAC-SHA256 del cuerpo crudo con tu secreto compartido, compáralo en tiempo constante con "
              "X-Webhook-Signature y responde 401 si no coinciden")
_NEXT_EN = " The other checks run once this one passes."
_NEXT_ES = " Las demás comprobaciones se hacen cuando esta pase."

WORDS: dict[str, dict[str, tuple[str, str | None]]] = {
    "accepts_signed.pass": _both(("Answered {status} to a correctly signed webhook.check event.", None),
                                 ("Respondió {status} a un evento webhook.check bien firmado.", None)),
    "accepts_signed.unreachable": _both(
        ("No HTTP answer to a correctly signed event: {detail}." + _NEXT_EN,
         "Check that the URL is right and that the endpoint is up and reachable from the internet"),
        ("Ninguna respuesta HTTP a un evento bien firmado: {detail}." + _NEXT_ES,
         "Comprueba que la URL es correcta y que el endpoint está en marcha y accesible desde internet"), 7),
    "accepts_signed.blocked": _both(
        ("Not sent: {detail}. Webhooks go only to public addresses, on the ports the operator allows." + _NEXT_EN,
         "Register a URL whose host resolves to public addresses only, on an allowed port"),
        ("No se envió: {detail}. Los webhooks solo van a direcciones públicas, en los puertos que permite el "
         "operador." + _NEXT_ES,
         "Registra una URL cuyo host resuelva solo a direcciones públicas, en un puerto permitido"), 1),
    "accepts_signed.redirect": _both(
        ("Answered {status} to a correctly signed event: redirects are not followed." + _NEXT_EN,
         "Register the final URL, the one that answers without redirecting"),
        ("Respondió {status} a un evento bien firmado: las redirecciones no se siguen." + _NEXT_ES,
         "Registra la URL final, la que responde sin redirigir"), 1),
    "accepts_signed.refused": _both(
        ("Refused a correctly signed event with {status}." + _NEXT_EN,
         "Verify X-Webhook-Signature over the raw body with your current shared secret, and answer 2xx when it "
         "matches"),
        ("Rechazó con {status} un evento bien firmado." + _NEXT_ES,
         "Verifica X-Webhook-Signature sobre el cuerpo crudo con tu secreto compartido actual y responde 2xx si "
         "coincide"), 2),
    "accepts_signed.busy": _both(
        ("Answered 429 (too many requests) to a correctly signed event." + _NEXT_EN,
         "Let webhookd's requests through your rate limit, then run the check again"),
        ("Respondió 429 (demasiadas peticiones) a un evento bien firmado." + _NEXT_ES,
         "Deja pasar las peticiones de webhookd por tu límite de peticiones y repite la comprobación"), 3),
    "accepts_signed.crashed": _both(
        ("Answered {status} to a correctly signed event." + _NEXT_EN,
         "Look at your endpoint's logs: it fails on a valid webhook. Read the raw body, verify it, then parse it"),
        ("Respondió {status} a un evento bien firmado." + _NEXT_ES,
         "Mira los registros de tu endpoint: falla con un webhook válido. Lee el cuerpo crudo, verifícalo y "
         "después interprétalo"), 2),
    "accepts_retry.pass": _both(("Answered {status} to the same event sent again with the same X-Webhook-Id.", None),
                                ("Respondió {status} al mismo evento enviado otra vez con el mismo X-Webhook-Id.",
                                 None)),
    "accepts_retry.warn": _both(
        ("Answered {status} to the same event sent again with the same X-Webhook-Id: webhookd counts that as a "
         "failure and tries again.",
         "Remember the X-Webhook-Id of each event you processed, and answer 200 to a repeat without processing "
         "it again"),
        ("Respondió {status} al mismo evento enviado otra vez con el mismo X-Webhook-Id: webhookd lo cuenta como "
         "un fallo y lo vuelve a intentar.",
         "Guarda el X-Webhook-Id de cada evento que procesas y responde 200 a una repetición sin procesarla otra "
         "vez"), 4),
    "rejects_bad_signature.pass": _both(
        ("Refused wrongly signed events ({first} and {second}).", None),
        ("Rechazó los eventos mal firmados ({first} y {second}).", None)),
    "rejects_bad_signature.fail": _both(
        ("Answered {status} to {which}: the endpoint does not verify signatures, so anyone can send it fake events.",
         _VERIFY_EN),
        ("Respondió {status} a {which}: el endpoint no verifica las firmas, así que cualquiera puede enviarle "
         "eventos falsos.", _VERIFY_ES), 2),
    "rejects_bad_signature.warn": _both(
        ("Answered {status} to {which}, instead of refusing it with 401.",
         "Answer 401 to any signature that does not verify, whatever its length or content: compare bytes with "
         "hmac.compare_digest or hash_equals, or check the length before crypto.timingSafeEqual"),
        ("Respondió {status} a {which}, en lugar de rechazarla con 401.",
         "Responde 401 a cualquier firma que no verifique, sea cual sea su longitud o contenido: compara bytes con "
         "hmac.compare_digest o hash_equals, o comprueba la longitud antes de crypto.timingSafeEqual"), 2),
    "rejects_stale_timestamp.pass": _both(
        ("Refused with {status} a correctly signed event whose timestamp is {minutes} minutes old.", None),
        ("Rechazó con {status} un evento bien firmado cuya marca de tiempo tiene {minutes} minutos.", None)),
    "rejects_stale_timestamp.accepted": _both(
        ("Answered {status} to a correctly signed event whose timestamp is {minutes} minutes old: a captured "
         "webhook can be replayed to it.",
         "Verify webhook-signature, which signs webhook-timestamp (X-Webhook-Signature does not), and refuse a "
         "webhook-timestamp more than 5 minutes away from your clock, as the Standard Webhooks libraries do"),
        ("Respondió {status} a un evento bien firmado cuya marca de tiempo tiene {minutes} minutos: se le puede "
         "reenviar un webhook capturado.",
         "Verifica webhook-signature, que firma webhook-timestamp (X-Webhook-Signature no lo firma), y rechaza un "
         "webhook-timestamp que se aleje más de 5 minutos de tu reloj, como hacen las bibliotecas de Standard "
         "Webhooks"), 2),
    "rejects_stale_timestamp.other": _both(
        ("Answered {status} to a correctly signed event whose timestamp is {minutes} minutes old, instead of 401.",
         "Answer 401 to a webhook-timestamp more than 5 minutes away from your clock"),
        ("Respondió {status} a un evento bien firmado cuya marca de tiempo tiene {minutes} minutos, en lugar "
         "de 401.", "Responde 401 a un webhook-timestamp que se aleje más de 5 minutos de tu reloj"), 2),
    "verifies_raw_body.pass": _both(
        ("Accepted all {total} correctly signed bodies that break receivers which re-serialise the JSON.", None),
        ("Aceptó los {total} cuerpos bien firmados que rompen a los receptores que vuelven a serializar el JSON.",
         None)),
    "verifies_raw_body.refused": _both(
        ("Refused {count} of {total} correctly signed bodies ({bodies}): the endpoint re-serialises the parsed JSON "
         "before hashing it, instead of hashing the raw bytes it received.",
         "Compute the HMAC over the raw body exactly as received (express.raw(), php://input, "
         "await request.body()), before parsing it; never over JSON.stringify or json_encode of the parsed body"),
        ("Rechazó {count} de {total} cuerpos bien firmados ({bodies}): el endpoint vuelve a serializar el JSON "
         "interpretado antes de calcular el hash, en lugar de usar los bytes crudos que recibió.",
         "Calcula el HMAC sobre el cuerpo crudo tal como llega (express.raw(), php://input, "
         "await request.body()), antes de interpretarlo; nunca sobre JSON.stringify o json_encode del cuerpo "
         "interpretado"), 2),
    "verifies_raw_body.broken": _both(
        ("Answered {status} to correctly signed bodies ({bodies}).",
         "Look at your endpoint's logs: it fails on valid JSON. Verify the raw body first, then parse it"),
        ("Respondió {status} a cuerpos bien firmados ({bodies}).",
         "Mira los registros de tu endpoint: falla con JSON válido. Verifica primero el cuerpo crudo y después "
         "interprétalo"), 2),
    "answer_time.pass": _both(("Slowest answer: {ms} ms, within half of the {timeout} s timeout.", None),
                              ("Respuesta más lenta: {ms} ms, dentro de la mitad del plazo de {timeout} s.", None)),
    "answer_time.slow": _both(
        ("Slowest answer: {ms} ms, more than half of the {timeout} s timeout: a slower moment fails deliveries.",
         "Answer first and work afterwards: store or queue the event, answer 2xx, then process it"),
        ("Respuesta más lenta: {ms} ms, más de la mitad del plazo de {timeout} s: en un momento más lento las "
         "entregas fallarán.",
         "Responde primero y trabaja después: guarda o encola el evento, responde 2xx y luego procésalo"), 3),
    "answer_time.timeout": _both(
        ("An event got no answer within the {timeout} s timeout; the slowest answer took {ms} ms.",
         "Answer first and work afterwards: store or queue the event, answer 2xx, then process it"),
        ("Un evento no obtuvo respuesta dentro del plazo de {timeout} s; la respuesta más lenta tardó {ms} ms.",
         "Responde primero y trabaja después: guarda o encola el evento, responde 2xx y luego procésalo"), 3),
    "https.pass": _both(("The TLS certificate is valid until {date} ({days} days left).", None),
                        ("El certificado TLS es válido hasta el {date} (quedan {days} días).", None)),
    "https.expiring": _both(
        ("The TLS certificate expires on {date}, in {days} days: from then on every delivery fails.",
         "Renew the certificate now, and check that its automatic renewal works"),
        ("El certificado TLS caduca el {date}, dentro de {days} días: desde entonces fallará cada entrega.",
         "Renueva el certificado ya y comprueba que su renovación automática funciona"), 9),
    "https.invalid": _both(
        ("The TLS handshake failed: {detail}.",
         "Serve a certificate from a public certificate authority for this host name, with its whole chain"),
        ("Falló la negociación TLS: {detail}.",
         "Sirve un certificado de una autoridad de certificación pública para este nombre de host, con toda su cadena"), 9),
    "https.plain": _both(
        ("The URL uses plain http://: your webhooks and their signatures cross the network unencrypted.",
         "Serve the endpoint over HTTPS and register its https:// URL"),
        ("La URL usa http://: tus webhooks y sus firmas viajan por la red sin cifrar.",
         "Sirve el endpoint por HTTPS y registra su URL https://"), 9),
    "https.local": _both(
        ("Plain http:// to this machine: fine while you test locally; register an https:// URL for real "
         "deliveries.", None),
        ("http:// sin cifrar hacia esta misma máquina: vale mientras pruebas en local; registra una URL https:// "
         "para las entregas reales.", None)),
}

"""The bad-input matrix (issue 4, item 8): hostile or broken requests on every route.

One webhookd with two partners, published events, settled deliveries (one delivered, one
failed) and a stored inbound event is built once for the module. Then every row of the
table below is sent to it. Each row must get its expected 4xx in the SPEC's error shape
``{"error": {"code": snake_case, "message": non-empty}}`` — never a 5xx, never a secret in
the answer. After the whole matrix the database dump must be byte-for-byte what it was,
the server must still answer ``GET /health`` and a normal publish must still go out.

A row is ``Row(name, method, path, headers, body, status, code, field)``:

* ``path`` is sent as httpx builds it; a ``Raw`` path is put on the wire byte for byte
  (httpx would otherwise remove ``..`` segments before they reach the server);
* ``headers`` is a dict, or a list of ``(bytes, bytes)`` for raw (non-ASCII) header values;
* ``body`` is ``None``, bytes, or a callable returning a generator (sent chunked); a body
  without its own Content-Type gets ``application/json``;
* ``code`` is the expected ``error.code`` (or None), ``field`` the field a 422's message
  must name (as ``'field'``).

All failures are collected and reported together, with the request, what came back and
what the SPEC expects, so one run shows every broken row.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import hmac
import json
import re
import sqlite3
import time
from collections.abc import Callable
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx
import pytest

from conftest import ADMIN, ADMIN_TOKEN, Receiver, Webhookd, bearer, make_config, wait_for
from payloads import BOOKING_CONFIRMED, PAYMENT_SUCCESS

MAX_BODY = 262144
SQLI = "'; DROP TABLE partners; --"
TRAVERSAL = "../../etc/passwd"
ENCODED_TRAVERSAL = "%2e%2e%2f%2e%2e%2fetc%2fpasswd"
HUGE = "x" * 100_000
IDEMPOTENCY_KEY = "bad-input-idem-0001"
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def _client_pems() -> dict[str, str]:
    """Client certificates for the rows of client_certificate and client_key: a good one, a key of
    another certificate, an expired one."""
    import datetime

    import trustme
    ca, now = trustme.CA(), datetime.datetime.now(datetime.UTC)
    good, other = ca.issue_cert("m.example"), ca.issue_cert("other.example")
    old = ca.issue_cert("old.example", not_before=now - datetime.timedelta(days=9),
                        not_after=now - datetime.timedelta(days=1))
    return {"cert": good.cert_chain_pems[0].bytes().decode(), "other_key": other.private_key_pem.bytes().decode(),
            "old_cert": old.cert_chain_pems[0].bytes().decode(), "old_key": old.private_key_pem.bytes().decode()}


PEMS = _client_pems()
BROKEN_PEM = "-----BEGIN CERTIFICATE-----\nMIIB!!notbase64\n-----END CERTIFICATE-----\n"


class Raw(str):
    """A request target sent exactly as written (no dot-segment removal, no re-encoding)."""


class Row(NamedTuple):
    name: str
    method: str
    path: str
    headers: dict[str, str] | list[tuple[bytes, bytes]]
    body: bytes | Callable[[], Any] | None
    status: int
    code: str | None = None
    field: str | None = None


def j(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


def sign(secret: str, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


WINDOW_VALUES = [("since", "yesterday"), ("since", "2026-12-07T09:30"), ("until", "2026-02-30"),
                 ("until", "1e10"), ("since", "9" * 5000), ("since", "%00"), ("until", "%FF"),
                 ("since", "2026-12-07T09:30:00Z&until=2026-12-06"), ("until", "'; DROP TABLE audit_log; --")]


def window_rows(admin: dict[str, str]) -> list[Row]:
    """``since``/``until`` that are not times, or a window that ends before it starts, on every list."""
    rows = []
    for path in ("/deliveries", "/inbound", "/audit"):
        for name, value in WINDOW_VALUES:
            shown = value if value.startswith("%") or "&" in value else q(value)
            field = "until" if "&until" in value else name
            rows.append(Row(f"{path[1:]}: {name}={value[:30]!r}", "GET", f"{path}?{name}={shown}", admin, None, 422,
                            "invalid_field", field))
    return rows


def q(text: str) -> str:
    """``text`` percent-encoded for a path segment or a query value (nothing left as a delimiter)."""
    return quote(text, safe="")


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


def chunked(prefix: bytes = b'{"pad": "', total: int = MAX_BODY + 65536) -> Callable[[], Any]:
    """A body sent with Transfer-Encoding: chunked (no Content-Length), larger than the limit."""

    def gen():
        yield prefix
        sent = len(prefix)
        while sent < total:
            yield b"x" * 16384
            sent += 16384
        yield b'"}'

    return gen


def over_limit(prefix: bytes = b'{"pad": "') -> bytes:
    return prefix + b"x" * (MAX_BODY + 10) + b'"}'


# --- The module's webhookd, with data in every table ----------------------------------------


class World(NamedTuple):
    hub: Webhookd
    good: Receiver
    a: dict       # partner A (receiver answers 200): its api_key and shared_secret are known
    b: dict       # partner B (receiver answers 500): its delivery failed
    dlv_a: str    # A's delivered payment.success delivery
    dlv_b: str    # B's failed payment.success delivery
    event_id: str
    db_path: str
    limits: bool  # the rate limits at their defaults (else out of the way)


# Rows a running server rewrites by itself, whatever the requests: its heartbeat and its roles.
LIVENESS = ('INSERT INTO "processes"', 'INSERT INTO "roles"')


def dump(path: str) -> str:
    """The whole database as SQL, but the liveness rows: what a request could have changed."""
    con = sqlite3.connect(path)
    try:
        return "\n".join(line for line in con.iterdump() if not line.startswith(LIVENESS))
    finally:
        con.close()


@pytest.fixture(scope="module", params=["limits off", "limits on"])
def world(request, tmp_path_factory):
    """Once with the rate limits out of the way, so every row meets its own check; once with them
    on and tight (1 refused signature and 1 inbound event a second), so that many rows meet a limit
    first: then a row may be a 429 instead, but never a 5xx or a change to the data."""
    limits = request.param == "limits on"
    overrides = dict(security__inbound_rate_per_s=1.0, security__inbound_failures_per_s=1.0,
                     security__registration_rate_per_min=1.0) if limits else {}
    hub = Webhookd(make_config(tmp_path_factory.mktemp("bad_input"), **overrides))
    good = Receiver().start()
    bad = Receiver(default=(500, 0.0)).start()
    try:
        a = hub.register(good.url, ["payment.success", "booking.confirmed"], name="Alpha Tours")
        b = hub.register(bad.url, ["payment.success"], name="Beta Travel")
        good.secret = a["shared_secret"]
        published = hub.publish(PAYMENT_SUCCESS, headers={"Idempotency-Key": IDEMPOTENCY_KEY})
        assert published.status_code == 202 and published.json()["deliveries"] == 2, published.text
        assert hub.publish(BOOKING_CONFIRMED).status_code == 202
        inbound = b'{"event":"tour.purchased","n":1}'
        r = hub.http.post("/webhooks/partners", content=inbound, headers={
            "X-Webhook-Signature": sign(a["shared_secret"], inbound), "X-Webhook-Event": "tour.purchased"})
        assert r.status_code == 200, r.text

        # Every delivery settles into delivered/failed before the "before" dump.
        def settled():
            items = hub.deliveries()
            return len(items) == 3 and all(d["state"] in ("delivered", "failed") for d in items) and items

        items = wait_for(settled, timeout=15)
        assert {d["state"] for d in items if d["partner_id"] == b["partner_id"]} == {"failed"}
        assert {d["state"] for d in items if d["partner_id"] == a["partner_id"]} == {"delivered"}
        dlv_a = next(d["delivery_id"] for d in items if d["partner_id"] == a["partner_id"]
                     and d["event"] == "payment.success")
        dlv_b = next(d["delivery_id"] for d in items if d["partner_id"] == b["partner_id"])
        yield World(hub, good, a, b, dlv_a, dlv_b, published.json()["event_id"], hub.config.storage.path, limits)
    finally:
        hub.stop()
        good.stop()
        bad.stop()


# --- The matrix ------------------------------------------------------------------------------


def build_rows(w: World) -> list[Row]:
    ADM = ADMIN
    KA = bearer(w.a["api_key"])
    A, B = w.a["partner_id"], w.b["partner_id"]
    secret_a = w.a["shared_secret"]
    adm_raw = (b"authorization", f"Bearer {ADMIN_TOKEN}".encode())
    json_ct = (b"content-type", b"application/json")

    good_partner = {"partner_name": "Gamma", "webhook_url": "http://127.0.0.1:9/in", "events": ["payment.success"]}
    good_event = {**PAYMENT_SUCCESS, "transaction_id": "txn_matrix"}

    def reg(**change: Any) -> bytes:
        return j({**good_partner, **change})

    def pub(**change: Any) -> bytes:
        return j({**good_event, **change})

    def without(payload: dict, key: str) -> bytes:
        return j({k: v for k, v in payload.items() if k != key})

    def hook(signature: str | None, event: str | None = "tour.purchased", **extra: str) -> dict[str, str]:
        h = dict(extra)
        if signature is not None:
            h["X-Webhook-Signature"] = signature
        if event is not None:
            h["X-Webhook-Event"] = event
        return h

    def signed(body: bytes, **extra: str) -> dict[str, str]:
        return hook(sign(secret_a, body), **extra)

    inbound_body = b'{"event":"tour.purchased","n":2}'
    real_sig = sign(secret_a, inbound_body)
    now = int(time.time())
    stale = j({"event": "tour.purchased", "timestamp": now - 10_000})
    future = j({"event": "tour.purchased", "timestamp": now + 10_000})
    ts_text = j({"event": "tour.purchased", "timestamp": "yesterday"})
    ts_bool = j({"event": "tour.purchased", "timestamp": True})
    ts_sqli = j({"event": "tour.purchased", "timestamp": SQLI})

    rows = [
        # ---- POST /partners/register ----------------------------------------------------
        Row("register: no credentials", "POST", "/partners/register", {}, reg(), 401, "missing_credentials"),
        Row("register: wrong bearer token", "POST", "/partners/register", {"Authorization": "Bearer nope"},
            reg(), 401, "invalid_credentials"),
        Row("register: Basic scheme with the admin token", "POST", "/partners/register",
            {"Authorization": f"Basic {ADMIN_TOKEN}"}, reg(), 401, "missing_credentials"),
        Row("register: admin token without a scheme", "POST", "/partners/register",
            {"Authorization": ADMIN_TOKEN}, reg(), 401, "missing_credentials"),
        Row("register: 'Bearer' with no token", "POST", "/partners/register",
            {"Authorization": "Bearer"}, reg(), 401, "missing_credentials"),
        Row("register: SQL injection as the bearer token", "POST", "/partners/register",
            bearer(SQLI), reg(), 401, "invalid_credentials"),
        Row("register: pak_ + SQL injection as the API key", "POST", "/partners/register",
            {"Authorization": f"Bearer pak_{SQLI}"}, reg(), 401, "invalid_credentials"),
        Row("register: admin token + a non-UTF-8 byte (raw header)", "POST", "/partners/register",
            [(b"authorization", f"Bearer {ADMIN_TOKEN}".encode() + b"\xff"), json_ct], reg(), 401,
            "invalid_credentials"),
        Row("register: UTF-8 unicode bearer token (raw header)", "POST", "/partners/register",
            [(b"authorization", "Bearer clé-ñandú-🔑".encode()), json_ct], reg(), 401, "invalid_credentials"),
        Row("register: a partner API key on an admin route", "POST", "/partners/register", KA, reg(), 403,
            "admin_only"),
        Row("register: truncated JSON", "POST", "/partners/register", ADM,
            b'{"partner_name": "A", "webhook_url": "http', 400, "malformed_json"),
        Row("register: empty body", "POST", "/partners/register", ADM, b"", 400, "malformed_json"),
        Row("register: JSON array body", "POST", "/partners/register", ADM, j([good_partner]), 400,
            "not_an_object"),
        Row("register: JSON null body", "POST", "/partners/register", ADM, b"null", 400, "not_an_object"),
        Row("register: duplicate key", "POST", "/partners/register", ADM,
            b'{"partner_name": "A", "partner_name": "B", "webhook_url": "http://127.0.0.1:9/x", '
            b'"events": ["payment.success"]}', 400, "malformed_json"),
        Row("register: NaN", "POST", "/partners/register", ADM,
            b'{"partner_name": NaN, "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"]}',
            400, "malformed_json"),
        Row("register: non-UTF-8 (latin-1) body", "POST", "/partners/register", ADM,
            '{"partner_name": "Montaña", "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"]}'
            .encode("latin-1"), 400, "malformed_json"),
        Row("register: whitespace-only body", "POST", "/partners/register", ADM, b" \r\n\t ", 400,
            "malformed_json"),
        Row("register: two JSON objects", "POST", "/partners/register", ADM, reg() + reg(), 400,
            "malformed_json"),
        Row("register: UTF-16 body", "POST", "/partners/register", ADM,
            json.dumps(good_partner).encode("utf-16"), 400, "malformed_json"),
        Row("register: UTF-8 BOM before the JSON", "POST", "/partners/register", ADM,
            b"\xef\xbb\xbf" + reg(), 400, "malformed_json"),
        Row("register: nested 40 deep", "POST", "/partners/register", ADM,
            ('{"partner_name": ' + nested(40) + ', "webhook_url": "http://127.0.0.1:9/x", '
             '"events": ["payment.success"]}').encode(), 400, "malformed_json"),
        Row("register: 100000 nested arrays", "POST", "/partners/register", ADM,
            b"[" * 100_000 + b"]" * 100_000, 400, "malformed_json"),
        Row("register: Content-Type text/plain", "POST", "/partners/register",
            {**ADM, "Content-Type": "text/plain"}, reg(), 415, "unsupported_media_type"),
        Row("register: form-urlencoded", "POST", "/partners/register",
            {**ADM, "Content-Type": "application/x-www-form-urlencoded"},
            b"partner_name=A&webhook_url=http://127.0.0.1:9/x&events=payment.success", 415,
            "unsupported_media_type"),
        Row("register: multipart", "POST", "/partners/register",
            {**ADM, "Content-Type": "multipart/form-data; boundary=xyz"},
            b"--xyz\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--xyz--\r\n", 415,
            "unsupported_media_type"),
        Row("register: unicode Content-Type (raw header)", "POST", "/partners/register",
            [adm_raw, (b"content-type", "application/jsón".encode())], reg(), 415, "unsupported_media_type"),
        Row("register: body over max_body_bytes (Content-Length)", "POST", "/partners/register", ADM,
            over_limit(b'{"partner_name": "'), 413, "body_too_large"),
        Row("register: body over max_body_bytes (chunked)", "POST", "/partners/register", ADM,
            chunked(b'{"partner_name": "'), 413, "body_too_large"),
        Row("register: client_certificate a number", "POST", "/partners/register", ADM,
            reg(client_certificate=5, client_key=PEMS["other_key"]), 422, "invalid_field", "client_certificate"),
        Row("register: client_certificate not PEM", "POST", "/partners/register", ADM,
            reg(client_certificate="hello", client_key=PEMS["other_key"]), 422, "invalid_field", "client_certificate"),
        Row("register: client_certificate SQL injection", "POST", "/partners/register", ADM,
            reg(client_certificate=SQLI, client_key=SQLI), 422, "invalid_field", "client_certificate"),
        Row("register: client_certificate 100k chars", "POST", "/partners/register", ADM,
            reg(client_certificate=HUGE, client_key=PEMS["other_key"]), 422, "invalid_field", "client_certificate"),
        Row("register: client_certificate PEM of broken base64", "POST", "/partners/register", ADM,
            reg(client_certificate=BROKEN_PEM, client_key=PEMS["other_key"]), 422, "invalid_field",
            "client_certificate"),
        Row("register: client_key without a certificate", "POST", "/partners/register", ADM,
            reg(client_key=PEMS["other_key"]), 422, "invalid_field", "client_certificate"),
        Row("register: client_key of another certificate", "POST", "/partners/register", ADM,
            reg(client_certificate=PEMS["cert"], client_key=PEMS["other_key"]), 422, "invalid_field", "client_key"),
        Row("register: client_key path traversal", "POST", "/partners/register", ADM,
            reg(client_certificate=PEMS["cert"], client_key=TRAVERSAL), 422, "invalid_field", "client_key"),
        Row("register: client_key a list", "POST", "/partners/register", ADM,
            reg(client_certificate=PEMS["cert"], client_key=[PEMS["other_key"]]), 422, "invalid_field", "client_key"),
        Row("register: expired client_certificate", "POST", "/partners/register", ADM,
            reg(client_certificate=PEMS["old_cert"], client_key=PEMS["old_key"]), 422, "invalid_field",
            "client_certificate"),
        Row("register: partner_name a number", "POST", "/partners/register", ADM, reg(partner_name=5), 422,
            "invalid_field", "partner_name"),
        Row("register: partner_name a list", "POST", "/partners/register", ADM, reg(partner_name=["A"]), 422,
            "invalid_field", "partner_name"),
        Row("register: partner_name null", "POST", "/partners/register", ADM, reg(partner_name=None), 422,
            "invalid_field", "partner_name"),
        Row("register: partner_name 100k chars", "POST", "/partners/register", ADM, reg(partner_name=HUGE), 422,
            "invalid_field", "partner_name"),
        Row("register: partner_name with NUL and control characters", "POST", "/partners/register", ADM,
            reg(partner_name="Alpha\x00\x1b[31m\x07"), 422, "invalid_field", "partner_name"),
        Row("register: SQL injection name, SQL injection event type", "POST", "/partners/register", ADM,
            reg(partner_name=SQLI, events=[SQLI]), 422, "invalid_field", "events"),
        Row("register: webhook_url SQL injection", "POST", "/partners/register", ADM, reg(webhook_url=SQLI), 422,
            "invalid_field", "webhook_url"),
        Row("register: webhook_url path traversal", "POST", "/partners/register", ADM,
            reg(partner_name=TRAVERSAL, webhook_url=TRAVERSAL), 422, "invalid_field", "webhook_url"),
        Row("register: webhook_url file:///etc/passwd", "POST", "/partners/register", ADM,
            reg(webhook_url="file:///etc/passwd"), 422, "invalid_field", "webhook_url"),
        Row("register: webhook_url %2e%2e%2f", "POST", "/partners/register", ADM,
            reg(webhook_url=ENCODED_TRAVERSAL), 422, "invalid_field", "webhook_url"),
        Row("register: webhook_url with a NUL byte", "POST", "/partners/register", ADM,
            reg(webhook_url="http://127.0.0.1:9/in\x00.evil"), 422, "invalid_field", "webhook_url"),
        Row("register: webhook_url with an unclosed IPv6 bracket", "POST", "/partners/register", ADM,
            reg(webhook_url="http://[::1/in"), 422, "invalid_field", "webhook_url"),
        Row("register: webhook_url with port -1", "POST", "/partners/register", ADM,
            reg(webhook_url="http://127.0.0.1:-1/in"), 422, "invalid_field", "webhook_url"),
        Row("register: webhook_url 100k chars", "POST", "/partners/register", ADM,
            reg(webhook_url="http://127.0.0.1:9/" + HUGE), 422, "invalid_field", "webhook_url"),
        Row("register: webhook_url an object", "POST", "/partners/register", ADM,
            reg(webhook_url={"url": "http://127.0.0.1:9/x"}), 422, "invalid_field", "webhook_url"),
        Row("register: events a string", "POST", "/partners/register", ADM, reg(events="payment.success"), 422,
            "invalid_field", "events"),
        Row("register: events 60000 numbers", "POST", "/partners/register", ADM, reg(events=[1] * 60_000), 422,
            "invalid_field", "events"),
        Row("register: events path traversal", "POST", "/partners/register", ADM,
            reg(events=[TRAVERSAL, ENCODED_TRAVERSAL]), 422, "invalid_field", "events"),
        Row("register: events a 100k-char type", "POST", "/partners/register", ADM, reg(events=[HUGE]), 422,
            "invalid_field", "events"),
        Row("register: events empty", "POST", "/partners/register", ADM, reg(events=[]), 422,
            "invalid_field", "events"),
        Row("register: unknown field is_admin", "POST", "/partners/register", ADM, reg(is_admin=True), 422,
            "invalid_field", "is_admin"),
        Row("register: unknown field api_key (choose my own key)", "POST", "/partners/register", ADM,
            reg(api_key="pak_mine"), 422, "invalid_field", "api_key"),
        Row("register: SQL injection as a field name", "POST", "/partners/register", ADM,
            reg(**{SQLI: 1}), 422, "invalid_field", SQLI),
        Row("register: PUT", "PUT", "/partners/register", ADM, reg(), 405, "method_not_allowed"),
        Row("GET /partners/register is no partner", "GET", "/partners/register", ADM, None, 404,
            "partner_not_found"),

        # ---- GET /partners ----------------------------------------------------------------
        Row("partners: no credentials", "GET", "/partners", {}, None, 401, "missing_credentials"),
        Row("partners: partner API key", "GET", "/partners", KA, None, 403, "admin_only"),
        Row("partners: POST", "POST", "/partners", ADM, reg(), 405, "method_not_allowed"),
        Row("partners: limit=0", "GET", "/partners?limit=0", ADM, None, 422, "invalid_field", "limit"),
        Row("partners: limit=-1", "GET", "/partners?limit=-1", ADM, None, 422, "invalid_field", "limit"),
        Row("partners: limit=201", "GET", "/partners?limit=201", ADM, None, 422, "invalid_field", "limit"),
        Row("partners: limit=SQL injection", "GET", f"/partners?limit={q(SQLI)}", ADM, None, 422,
            "invalid_field", "limit"),
        Row("partners: limit=NaN", "GET", "/partners?limit=NaN", ADM, None, 422, "invalid_field", "limit"),
        Row("partners: limit=superscript two", "GET", f"/partners?limit={q('²')}", ADM, None, 422,
            "invalid_field", "limit"),
        Row("partners: limit of 5000 digits", "GET", "/partners?limit=" + "9" * 5000, ADM, None, 422,
            "invalid_field", "limit"),
        Row("partners: cursor SQL injection", "GET", f"/partners?cursor={q(SQLI)}", ADM, None, 422,
            "invalid_field", "cursor"),
        Row("partners: cursor path traversal", "GET", f"/partners?cursor={q(TRAVERSAL)}", ADM, None, 422,
            "invalid_field", "cursor"),
        Row("partners: cursor = base64 of a traversal", "GET", f"/partners?cursor={b64(TRAVERSAL)}", ADM, None,
            422, "invalid_field", "cursor"),
        Row("partners: cursor = base64 of SQL", "GET", f"/partners?cursor={b64(A + SQLI)}", ADM, None, 422,
            "invalid_field", "cursor"),
        Row("partners: cursor non-ASCII", "GET", f"/partners?cursor={q('curseur-é')}", ADM, None, 422,
            "invalid_field", "cursor"),
        Row("partners: cursor 20000 chars", "GET", "/partners?cursor=" + "A" * 20_000, ADM, None, 422,
            "invalid_field", "cursor"),
        Row("partners: cursor NUL", "GET", "/partners?cursor=%00", ADM, None, 422, "invalid_field", "cursor"),

        # ---- GET / PATCH /partners/{id} ---------------------------------------------------
        Row("partner: another partner's id with my key", "GET", f"/partners/{B}", KA, None, 404,
            "partner_not_found"),
        Row("partner: SQL injection id", "GET", f"/partners/{q(SQLI)}", ADM, None, 404, "partner_not_found"),
        Row("partner: literal %2e%2e%2f id", "GET", f"/partners/{q(ENCODED_TRAVERSAL)}", ADM, None, 404,
            "partner_not_found"),
        Row("partner: encoded ../../ id (raw)", "GET", Raw("/partners/" + ENCODED_TRAVERSAL), ADM, None, 404,
            "not_found"),
        Row("partner: /partners/A/../B with A's key (raw)", "GET", Raw(f"/partners/{A}/../{B}"), KA, None, 404,
            "not_found"),
        Row("partner: /partners/A/..%2fB with A's key (raw)", "GET", Raw(f"/partners/{A}/..%2f{B}"), KA, None,
            404, "not_found"),
        Row("partner: non-UTF-8 id %FF", "GET", "/partners/%FF", ADM, None, 404, "partner_not_found"),
        Row("partner: NUL id", "GET", "/partners/%00", ADM, None, 404, "partner_not_found"),
        Row("partner: no credentials", "GET", f"/partners/{A}", {}, None, 401, "missing_credentials"),
        Row("partner: PUT", "PUT", f"/partners/{A}", ADM, j({"status": "active"}), 405, "method_not_allowed"),
        Row("delete: my own id, self-deletion off", "DELETE", f"/partners/{A}", KA, None, 403, "admin_only"),
        Row("delete: another partner's id with my key", "DELETE", f"/partners/{B}", KA, None, 404,
            "partner_not_found"),
        Row("delete: SQL injection id", "DELETE", f"/partners/{q(SQLI)}", ADM, None, 404, "partner_not_found"),
        Row("delete: no credentials", "DELETE", f"/partners/{A}", {}, None, 401, "missing_credentials"),
        Row("cancel-pending: my own, with my key", "POST", f"/partners/{A}/cancel-pending", KA, None, 403,
            "admin_only"),
        Row("cancel-pending: unknown id", "POST", f"/partners/{q(SQLI)}/cancel-pending", ADM, None, 404,
            "partner_not_found"),
        # ---- GET /partners/{id}/events (pulling) -------------------------------------------
        Row("events: another partner's id with my key", "GET", f"/partners/{B}/events", KA, None, 404,
            "partner_not_found"),
        Row("events: unknown id", "GET", f"/partners/{q(SQLI)}/events", ADM, None, 404, "partner_not_found"),
        Row("events: no credentials", "GET", f"/partners/{A}/events", {}, None, 401, "missing_credentials"),
        Row("events: POST", "POST", f"/partners/{A}/events", KA, None, 405, "method_not_allowed"),
        Row("events: limit=0", "GET", f"/partners/{A}/events?limit=0", KA, None, 422, "invalid_field", "limit"),
        Row("events: limit=201", "GET", f"/partners/{A}/events?limit=201", KA, None, 422, "invalid_field", "limit"),
        Row("events: limit=-1", "GET", f"/partners/{A}/events?limit=-1", KA, None, 422, "invalid_field", "limit"),
        Row("events: limit=abc", "GET", f"/partners/{A}/events?limit=abc", KA, None, 422, "invalid_field", "limit"),
        Row("events: cursor garbage", "GET", f"/partners/{A}/events?cursor=!!!", KA, None, 422, "invalid_field",
            "cursor"),
        Row("events: cursor SQL injection", "GET", f"/partners/{A}/events?cursor={q(SQLI)}", KA, None, 422,
            "invalid_field", "cursor"),
        Row("events: cursor = base64 of a partner id", "GET", f"/partners/{A}/events?cursor={b64(A)}", KA, None,
            422, "invalid_field", "cursor"),
        Row("events: cursor = base64 of a traversal", "GET", f"/partners/{A}/events?cursor={b64(TRAVERSAL)}", KA,
            None, 422, "invalid_field", "cursor"),
        Row("events: cursor 20000 chars", "GET", f"/partners/{A}/events?cursor=" + "A" * 20_000, KA, None, 422,
            "invalid_field", "cursor"),
        Row("events: cursor of a delivery never given", "GET",
            f"/partners/{A}/events?cursor={b64('dlv_' + 'z' * 21)}", KA, None, 410, "cursor_expired"),
        Row("audit: a partner key", "GET", "/audit", KA, None, 403, "admin_only"),
        Row("audit: limit=0", "GET", "/audit?limit=0", ADM, None, 422, "invalid_field", "limit"),
        Row("audit: cursor SQL injection", "GET", f"/audit?cursor={q(SQLI)}", ADM, None, 422, "invalid_field",
            "cursor"),
        Row("audit: DELETE", "DELETE", "/audit", ADM, None, 405, "method_not_allowed"),
        *window_rows(ADM),
        Row("deliveries: since garbage with my key", "GET", "/deliveries?since=soon", KA, None, 422,
            "invalid_field", "since"),
        Row("publish: bad traceparent and no event", "POST", "/events",
            {**ADM, "traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "tracestate": "=" * 9000}, j({}), 422,
            "invalid_field", "event"),
        Row("patch: empty object", "PATCH", f"/partners/{A}", KA, b"{}", 422, "invalid_field"),
        # ---- A partner's own terms: retry and extra_headers (partner_terms.py) ---------------------------
        *(Row(f"patch: retry {name}", "PATCH", f"/partners/{A}", ADM, j({"retry": value}), 422, "invalid_field",
              field) for name, value, field in [
            ("a list", [5, 30], "retry"), ("a string", "fast", "retry"),
            ("unknown setting", {"delay": 5}, "retry.delay"),
            ("timeout_s 31", {"timeout_s": 31}, "retry.timeout_s"), ("timeout_s 0", {"timeout_s": 0}, "retry.timeout_s"),
            ("timeout_s a string", {"timeout_s": "5"}, "retry.timeout_s"),
            ("timeout_s true", {"timeout_s": True}, "retry.timeout_s"),
            ("max_attempts 0", {"max_attempts": 0}, "retry.max_attempts"),
            ("max_attempts 26", {"max_attempts": 26}, "retry.max_attempts"),
            ("max_attempts 2.5", {"max_attempts": 2.5}, "retry.max_attempts"),
            ("max_attempts 10**30", {"max_attempts": 10**30}, "retry.max_attempts"),
            ("base_s 0.5", {"base_s": 0.5}, "retry.base_s"), ("max_s a day and one", {"max_s": 86401}, "retry.max_s"),
            ("max_s under base_s", {"base_s": 60, "max_s": 10}, "retry.max_s"),
            ("backoff over 3 days", {"base_s": 86400, "max_s": 86400, "max_attempts": 5}, "retry.max_s"),
            ("schedule empty", {"schedule": []}, "retry.schedule"),
            ("schedule a number", {"schedule": 5}, "retry.schedule"),
            ("schedule with a string", {"schedule": [5, "30"]}, "retry.schedule"),
            ("schedule with 0.5", {"schedule": [0.5]}, "retry.schedule"),
            ("schedule with null", {"schedule": [5, None]}, "retry.schedule"),
            ("schedule of 25 waits", {"schedule": [1] * 25}, "retry.schedule"),
            ("schedule over 3 days", {"schedule": [86400, 86400, 86400, 1]}, "retry.schedule"),
            ("schedule with base_s", {"schedule": [5], "base_s": 5}, "retry.schedule"),
            ("max_attempts past the schedule", {"schedule": [5, 30], "max_attempts": 4}, "retry.max_attempts"),
        ]),
        *(Row(f"patch: extra_headers {name}", "PATCH", f"/partners/{A}", ADM, j({"extra_headers": value}), 422,
              "invalid_field", "extra_headers") for name, value in [
            ("a list", [["Authorization", "Bearer x"]]), ("a string", "Authorization: Bearer x"),
            ("Host", {"Host": "evil.example"}), ("Content-Length", {"content-length": "0"}),
            ("Content-Type", {"Content-Type": "text/plain"}), ("Transfer-Encoding", {"Transfer-Encoding": "chunked"}),
            ("Connection", {"Connection": "close"}), ("User-Agent", {"User-Agent": "me"}),
            ("X-Webhook-Signature", {"X-Webhook-Signature": "00"}), ("webhook-id", {"webhook-id": "evt_1"}),
            ("webhook-timestamp", {"Webhook-Timestamp": "1"}), ("X-Webhook-Other", {"X-Webhook-Other": "1"}),
            ("Proxy-Authorization", {"Proxy-Authorization": "Basic eA=="}), ("traceparent", {"traceparent": "00"}),
            ("a name with a space", {"X Bad": "1"}), ("a name with a colon", {"X-Bad:": "1"}),
            ("an empty name", {"": "1"}), ("a 65-character name", {"X" * 65: "1"}), ("a unicode name", {"X-Ñ": "1"}),
            ("a value with CRLF", {"X-Ok": "a\r\nX-Evil: 1"}), ("a value with LF", {"X-Ok": "a\nb"}),
            ("a value with NUL", {"X-Ok": "a\u0000b"}), ("an empty value", {"X-Ok": ""}),
            ("a value with a leading space", {"X-Ok": " a"}), ("a 4097-character value", {"X-Ok": "v" * 4097}),
            ("a non-ASCII value", {"X-Ok": "café"}), ("a number value", {"X-Ok": 1}), ("a list value", {"X-Ok": ["a"]}),
            ("the same name twice", {"X-Ok": "1", "x-ok": "2"}), ("11 headers", {f"X-{i}": "v" for i in range(11)}),
        ]),
        Row("patch: retry with a partner key", "PATCH", f"/partners/{A}", KA, j({"retry": {"max_attempts": 5}}), 403,
            "terms_admin_only"),
        Row("patch: extra_headers with a partner key", "PATCH", f"/partners/{A}", KA,
            j({"extra_headers": {"X-Mine": "1"}}), 403, "terms_admin_only"),
        Row("register: retry timeout_s 100", "POST", "/partners/register", ADM, reg(retry={"timeout_s": 100}), 422,
            "invalid_field", "retry.timeout_s"),
        Row("register: retry schedule over 3 days", "POST", "/partners/register", ADM,
            reg(retry={"schedule": [259200, 1]}), 422, "invalid_field", "retry.schedule"),
        Row("register: extra_headers Host", "POST", "/partners/register", ADM, reg(extra_headers={"Host": "x"}), 422,
            "invalid_field", "extra_headers"),
        Row("register: extra_headers a null value", "POST", "/partners/register", ADM,
            reg(extra_headers={"X-Ok": None}), 422, "invalid_field", "extra_headers"),
        Row("register: extra_headers a CRLF value", "POST", "/partners/register", ADM,
            reg(extra_headers={"X-Ok": "a\r\nHost: evil"}), 422, "invalid_field", "extra_headers"),
        Row("patch: status disabled", "PATCH", f"/partners/{A}", KA, j({"status": "disabled"}), 422,
            "invalid_field", "status"),
        Row("patch: status SQL injection", "PATCH", f"/partners/{A}", KA, j({"status": SQLI}), 422,
            "invalid_field", "status"),
        Row("patch: status a number", "PATCH", f"/partners/{A}", KA, j({"status": 1}), 422, "invalid_field",
            "status"),
        Row("patch: status null", "PATCH", f"/partners/{A}", KA, j({"status": None}), 422, "invalid_field",
            "status"),
        Row("patch: status 100k chars", "PATCH", f"/partners/{A}", KA, j({"status": HUGE}), 422, "invalid_field",
            "status"),
        Row("patch: events a string", "PATCH", f"/partners/{A}", KA, j({"events": "payment.success"}), 422,
            "invalid_field", "events"),
        Row("patch: events [null]", "PATCH", f"/partners/{A}", KA, j({"events": [None]}), 422, "invalid_field",
            "events"),
        Row("patch: events 40000 unknown types", "PATCH", f"/partners/{A}", KA, j({"events": ["x"] * 40_000}),
            422, "invalid_field", "events"),
        Row("patch: valid status, SQL injection event", "PATCH", f"/partners/{A}", KA,
            j({"status": "paused", "events": [SQLI]}), 422, "invalid_field", "events"),
        Row("patch: webhook_url path traversal", "PATCH", f"/partners/{A}", KA, j({"webhook_url": TRAVERSAL}),
            422, "invalid_field", "webhook_url"),
        Row("patch: webhook_url with user:password@", "PATCH", f"/partners/{A}", KA,
            j({"webhook_url": "http://user:pw@127.0.0.1:9/x"}), 422, "invalid_field", "webhook_url"),
        Row("patch: webhook_url a list", "PATCH", f"/partners/{A}", KA, j({"webhook_url": [w.good.url]}), 422,
            "invalid_field", "webhook_url"),
        Row("patch: unknown field secret", "PATCH", f"/partners/{A}", KA, j({"secret": "sk_live_mine"}), 422,
            "invalid_field", "secret"),
        Row("patch: unknown field partner_id", "PATCH", f"/partners/{A}", KA, j({"partner_id": B}), 422,
            "invalid_field", "partner_id"),
        Row("patch: unknown field api_key_hash", "PATCH", f"/partners/{A}", ADM, j({"api_key_hash": "00"}), 422,
            "invalid_field", "api_key_hash"),
        Row("patch: client_certificate with a partner's own key", "PATCH", f"/partners/{A}", KA,
            j({"client_certificate": PEMS["old_cert"], "client_key": PEMS["old_key"]}), 403, "admin_only"),
        Row("patch: client_key alone, no certificate set", "PATCH", f"/partners/{A}", ADM,
            j({"client_key": PEMS["other_key"]}), 422, "invalid_field", "client_certificate"),
        Row("patch: client_certificate null with a client_key", "PATCH", f"/partners/{A}", ADM,
            j({"client_certificate": None, "client_key": PEMS["other_key"]}), 422, "invalid_field", "client_key"),
        Row("patch: expired client_certificate", "PATCH", f"/partners/{A}", ADM,
            j({"client_certificate": PEMS["old_cert"], "client_key": PEMS["old_key"]}), 422, "invalid_field",
            "client_certificate"),
        Row("patch: client_certificate a key", "PATCH", f"/partners/{A}", ADM,
            j({"client_certificate": PEMS["other_key"], "client_key": PEMS["other_key"]}), 422, "invalid_field",
            "client_certificate"),
        Row("patch: partner_name is not patchable", "PATCH", f"/partners/{A}", ADM, j({"partner_name": SQLI}),
            422, "invalid_field", "partner_name"),
        Row("patch: truncated JSON", "PATCH", f"/partners/{A}", KA, b'{"status": "pau', 400, "malformed_json"),
        Row("patch: duplicate status keys", "PATCH", f"/partners/{A}", KA,
            b'{"status": "active", "status": "paused"}', 400, "malformed_json"),
        Row("patch: Infinity", "PATCH", f"/partners/{A}", KA, b'{"status": Infinity}', 400, "malformed_json"),
        Row("patch: -Infinity", "PATCH", f"/partners/{A}", KA, b'{"status": -Infinity}', 400, "malformed_json"),
        Row("patch: non-UTF-8 body", "PATCH", f"/partners/{A}", KA, b'{"status": "\xff\xfe"}', 400,
            "malformed_json"),
        Row("patch: JSON string body", "PATCH", f"/partners/{A}", KA, b'"paused"', 400, "not_an_object"),
        Row("patch: empty body", "PATCH", f"/partners/{A}", KA, b"", 400, "malformed_json"),
        Row("patch: Content-Type text/plain", "PATCH", f"/partners/{A}", {**KA, "Content-Type": "text/plain"},
            j({"status": "paused"}), 415, "unsupported_media_type"),
        Row("patch: body over max_body_bytes", "PATCH", f"/partners/{A}", KA, over_limit(b'{"status": "'), 413,
            "body_too_large"),
        Row("patch: another partner with my key", "PATCH", f"/partners/{B}", KA, j({"status": "paused"}), 404,
            "partner_not_found"),
        Row("patch: unknown id", "PATCH", "/partners/partner_0000000000000000000000", ADM,
            j({"status": "paused"}), 404, "partner_not_found"),
        Row("patch: SQL injection id", "PATCH", f"/partners/{q(SQLI)}", ADM, j({"status": "paused"}), 404,
            "partner_not_found"),
        Row("patch: wrong credentials", "PATCH", f"/partners/{A}", {"Authorization": "Bearer pak_nope"},
            j({"status": "paused"}), 401, "invalid_credentials"),

        # ---- POST /partners/{id}/rotate-secret, /test, /recover -------------------------------
        Row("rotate: another partner with my key", "POST", f"/partners/{B}/rotate-secret", KA, None, 404,
            "partner_not_found"),
        Row("rotate: no credentials", "POST", f"/partners/{A}/rotate-secret", {}, None, 401,
            "missing_credentials"),
        Row("rotate: SQL injection id", "POST", f"/partners/{q(SQLI)}/rotate-secret", ADM, None, 404,
            "partner_not_found"),
        Row("rotate: traversal id '..' (raw)", "POST", Raw("/partners/%2e%2e/rotate-secret"), ADM, None, 404,
            "partner_not_found"),
        Row("rotate: GET", "GET", f"/partners/{A}/rotate-secret", ADM, None, 405, "method_not_allowed"),
        Row("rotate: unicode bearer (raw header)", "POST", f"/partners/{A}/rotate-secret",
            [(b"authorization", "Bearer pak_ñ€".encode())], None, 401, "invalid_credentials"),
        Row("test: another partner with my key", "POST", f"/partners/{B}/test", KA, None, 404,
            "partner_not_found"),
        Row("test: unknown id '..' (raw)", "POST", Raw("/partners/%2e%2e/test"), ADM, None, 404,
            "partner_not_found"),
        Row("test: GET", "GET", f"/partners/{A}/test", KA, None, 405, "method_not_allowed"),
        Row("test: wrong credentials", "POST", f"/partners/{A}/test", {"Authorization": "Bearer wrong"}, None,
            401, "invalid_credentials"),
        # ---- POST /partners/{id}/verify (endpoint verification is off on this hub) ---------------
        Row("verify: option off", "POST", f"/partners/{A}/verify", KA, None, 409, "verification_off"),
        Row("verify: another partner with my key", "POST", f"/partners/{B}/verify", KA, None, 404,
            "partner_not_found"),
        Row("verify: SQL injection id", "POST", f"/partners/{q(SQLI)}/verify", ADM, None, 404, "partner_not_found"),
        Row("verify: unknown id '..' (raw)", "POST", Raw("/partners/%2e%2e/verify"), ADM, None, 404,
            "partner_not_found"),
        Row("verify: GET", "GET", f"/partners/{A}/verify", KA, None, 405, "method_not_allowed"),
        Row("verify: wrong credentials", "POST", f"/partners/{A}/verify", {"Authorization": "Bearer wrong"}, None,
            401, "invalid_credentials"),
        Row("recover: another partner with my key", "POST", f"/partners/{B}/recover?since=0", KA, None, 404,
            "partner_not_found"),
        Row("recover: no since", "POST", f"/partners/{A}/recover", KA, None, 422, "invalid_field", "since"),
        Row("recover: since=-1", "POST", f"/partners/{A}/recover?since=-1", KA, None, 422, "invalid_field",
            "since"),
        Row("recover: since=1e9", "POST", f"/partners/{A}/recover?since=1e9", KA, None, 422, "invalid_field",
            "since"),
        Row("recover: since SQL injection", "POST", f"/partners/{A}/recover?since={q(SQLI)}", KA, None, 422,
            "invalid_field", "since"),
        Row("recover: since 13 digits", "POST", f"/partners/{A}/recover?since=" + "1" * 13, KA, None, 422,
            "invalid_field", "since"),
        Row("recover: since=superscript two", "POST", f"/partners/{A}/recover?since={q('²')}", KA, None, 422,
            "invalid_field", "since"),
        Row("recover: encoded ../../ in the id", "POST", f"/partners/{q(TRAVERSAL)}/recover?since=0", ADM, None, 404,
            "not_found"),
        Row("recover: SQL injection id", "POST", f"/partners/{q(SQLI)}/recover?since=0", ADM, None, 404,
            "partner_not_found"),
        Row("recover: wrong credentials", "POST", f"/partners/{A}/recover?since=0",
            {"Authorization": "Bearer " + "A" * 4000}, None, 401, "invalid_credentials"),

        # ---- POST /events -------------------------------------------------------------------
        Row("publish: no credentials", "POST", "/events", {}, pub(), 401, "missing_credentials"),
        Row("publish: partner API key", "POST", "/events", KA, pub(), 403, "admin_only"),
        Row("publish: truncated JSON", "POST", "/events", ADM, pub()[:-7], 400, "malformed_json"),
        Row("publish: empty body", "POST", "/events", ADM, b"", 400, "malformed_json"),
        Row("publish: JSON array", "POST", "/events", ADM, j([good_event]), 400, "not_an_object"),
        Row("publish: JSON number", "POST", "/events", ADM, b"42", 400, "not_an_object"),
        Row("publish: amount NaN", "POST", "/events", ADM, pub()[:-1] + b', "amount": NaN}', 400,
            "malformed_json"),
        Row("publish: amount Infinity", "POST", "/events", ADM,
            without(good_event, "amount")[:-1] + b', "amount": Infinity}', 400, "malformed_json"),
        Row("publish: amount -Infinity", "POST", "/events", ADM,
            without(good_event, "amount")[:-1] + b', "amount": -Infinity}', 400, "malformed_json"),
        Row("publish: duplicate event keys", "POST", "/events", ADM,
            pub()[:-1] + b', "event": "booking.cancelled"}', 400, "malformed_json"),
        Row("publish: non-UTF-8 body", "POST", "/events", ADM,
            json.dumps(good_event, ensure_ascii=False).encode("latin-1"), 400, "malformed_json"),
        Row("publish: metadata nested 40 deep", "POST", "/events", ADM,
            pub()[:-1] + b', "deep": ' + nested(40).encode() + b"}", 400, "malformed_json"),
        Row("publish: Content-Type text/plain", "POST", "/events", {**ADM, "Content-Type": "text/plain"}, pub(),
            415, "unsupported_media_type"),
        Row("publish: Content-Type application/xml", "POST", "/events", {**ADM, "Content-Type": "application/xml"},
            b"<event>payment.success</event>", 415, "unsupported_media_type"),
        Row("publish: body over max_body_bytes (Content-Length)", "POST", "/events", ADM, over_limit(), 413,
            "body_too_large"),
        Row("publish: body over max_body_bytes (chunked)", "POST", "/events", ADM, chunked(), 413,
            "body_too_large"),
        Row("publish: unknown event type", "POST", "/events", ADM, pub(event="payment.refunded"), 422,
            "invalid_field", "event"),
        Row("publish: event SQL injection", "POST", "/events", ADM, pub(event=SQLI), 422, "invalid_field", "event"),
        Row("publish: event path traversal", "POST", "/events", ADM, pub(event=TRAVERSAL), 422, "invalid_field",
            "event"),
        Row("publish: event 100k chars", "POST", "/events", ADM, pub(event=HUGE), 422, "invalid_field", "event"),
        Row("publish: event a number", "POST", "/events", ADM, pub(event=7), 422, "invalid_field", "event"),
        Row("publish: event a 60000-item array", "POST", "/events", ADM, pub(event=[0] * 60_000), 422,
            "invalid_field", "event"),
        Row("publish: event with NUL", "POST", "/events", ADM, pub(event="payment.success\x00"), 422,
            "invalid_field", "event"),
        Row("publish: amount a string", "POST", "/events", ADM, pub(amount="150"), 422, "invalid_field", "amount"),
        Row("publish: amount true", "POST", "/events", ADM, pub(amount=True), 422, "invalid_field", "amount"),
        Row("publish: amount null", "POST", "/events", ADM, pub(amount=None), 422, "invalid_field", "amount"),
        Row("publish: currency a number", "POST", "/events", ADM, pub(currency=840), 422, "invalid_field",
            "currency"),
        Row("publish: user_id a list", "POST", "/events", ADM, pub(user_id=[SQLI]), 422, "invalid_field", "user_id"),
        Row("publish: transaction_id an object", "POST", "/events", ADM, pub(transaction_id={"$ne": None}), 422,
            "invalid_field", "transaction_id"),
        Row("publish: currency missing (SQL in the other strings)", "POST", "/events", ADM,
            without({**good_event, "transaction_id": SQLI, "user_id": TRAVERSAL}, "currency"), 422,
            "invalid_field", "currency"),
        Row("publish: timestamp a string", "POST", "/events", ADM, pub(timestamp=SQLI), 422, "invalid_field",
            "timestamp"),
        Row("publish: timestamp true", "POST", "/events", ADM, pub(timestamp=True), 422, "invalid_field",
            "timestamp"),
        Row("publish: Idempotency-Key of 256 chars", "POST", "/events", {**ADM, "Idempotency-Key": "k" * 256},
            pub(), 400, "bad_idempotency_key"),
        Row("publish: empty Idempotency-Key", "POST", "/events", {**ADM, "Idempotency-Key": ""}, pub(), 400,
            "bad_idempotency_key"),
        Row("publish: non-ASCII Idempotency-Key (raw header)", "POST", "/events",
            [adm_raw, json_ct, (b"idempotency-key", "clé-ñ-🔑".encode())], pub(), 400, "bad_idempotency_key"),
        Row("publish: Idempotency-Key with a tab", "POST", "/events", {**ADM, "Idempotency-Key": "a\tb"}, pub(),
            400, "bad_idempotency_key"),
        Row("publish: Idempotency-Key reused, SQL injection body", "POST", "/events",
            {**ADM, "Idempotency-Key": IDEMPOTENCY_KEY}, pub(transaction_id=SQLI, user_id=TRAVERSAL), 409,
            "idempotency_key_reused"),
        Row("publish: Idempotency-Key reused, 100k string body", "POST", "/events",
            {**ADM, "Idempotency-Key": IDEMPOTENCY_KEY}, pub(transaction_id=HUGE, user_name=ENCODED_TRAVERSAL),
            409, "idempotency_key_reused"),
        Row("publish: PUT", "PUT", "/events", ADM, pub(), 405, "method_not_allowed"),
        Row("publish: GET /events", "GET", "/events", ADM, None, 405, "method_not_allowed"),

        # ---- GET /events/{id} -----------------------------------------------------------------
        Row("event: unknown id", "GET", "/events/evt_0000000000000000000000", ADM, None, 404, "event_not_found"),
        Row("event: SQL injection id", "GET", f"/events/{q(SQLI)}", ADM, None, 404, "event_not_found"),
        Row("event: traversal id (raw ../)", "GET", Raw(f"/events/{w.event_id}/../../partners"), ADM, None, 404,
            "not_found"),
        Row("event: literal %2e%2e%2f id", "GET", f"/events/{q(ENCODED_TRAVERSAL)}", ADM, None, 404,
            "event_not_found"),
        Row("event: 5000-char id", "GET", "/events/evt_" + "z" * 5000, ADM, None, 404, "event_not_found"),
        Row("event: partner API key", "GET", f"/events/{w.event_id}", KA, None, 403, "admin_only"),
        Row("event: no credentials", "GET", f"/events/{w.event_id}", {}, None, 401, "missing_credentials"),
        Row("event: DELETE", "DELETE", f"/events/{w.event_id}", ADM, None, 405, "method_not_allowed"),

        # ---- DELETE /events/{id}/content ------------------------------------------------------
        Row("erase: unknown id", "DELETE", "/events/evt_0000000000000000000000/content", ADM, None, 404,
            "event_not_found"),
        Row("erase: SQL injection id", "DELETE", f"/events/{q(SQLI)}/content", ADM, None, 404, "event_not_found"),
        Row("erase: 5000-char id", "DELETE", "/events/evt_" + "z" * 5000 + "/content", ADM, None, 404,
            "event_not_found"),
        Row("erase: partner API key", "DELETE", f"/events/{w.event_id}/content", KA, None, 403, "admin_only"),
        Row("erase: no credentials", "DELETE", f"/events/{w.event_id}/content", {}, None, 401, "missing_credentials"),
        Row("erase: GET", "GET", f"/events/{w.event_id}/content", ADM, None, 405, "method_not_allowed"),

        # ---- POST /partners/{id}/portal-link, and its tokens ----------------------------------
        Row("portal link: partner API key", "POST", f"/partners/{A}/portal-link", KA, None, 403, "admin_only"),
        Row("portal link: unknown partner", "POST", "/partners/prt_nobody/portal-link", ADM, None, 404,
            "partner_not_found"),
        Row("portal link: lifetime_s 59", "POST", f"/partners/{A}/portal-link", ADM, j({"lifetime_s": 59}), 422,
            "invalid_field", "lifetime_s"),
        Row("portal link: lifetime_s over 7 days", "POST", f"/partners/{A}/portal-link", ADM,
            j({"lifetime_s": 604801}), 422, "invalid_field", "lifetime_s"),
        Row("portal link: lifetime_s as a string", "POST", f"/partners/{A}/portal-link", ADM,
            j({"lifetime_s": "3600"}), 422, "invalid_field", "lifetime_s"),
        Row("portal link: lifetime_s true", "POST", f"/partners/{A}/portal-link", ADM, j({"lifetime_s": True}), 422,
            "invalid_field", "lifetime_s"),
        Row("portal link: lifetime_s 1.5", "POST", f"/partners/{A}/portal-link", ADM, j({"lifetime_s": 1.5}), 422,
            "invalid_field", "lifetime_s"),
        Row("portal link: read_only 'yes'", "POST", f"/partners/{A}/portal-link", ADM, j({"read_only": "yes"}), 422,
            "invalid_field", "read_only"),
        Row("portal link: unknown field", "POST", f"/partners/{A}/portal-link", ADM, j({"scope": "all"}), 422,
            "invalid_field", "scope"),
        Row("portal link: malformed JSON", "POST", f"/partners/{A}/portal-link", ADM, b"{", 400, "malformed_json"),
        Row("portal link: token of garbage", "GET", "/me", bearer("ptl_garbage"), None, 401, "portal_link_invalid"),
        Row("portal link: forged token", "GET", "/me", bearer(f"ptl_{A}.9999999999.0.{'A' * 43}"), None, 401,
            "portal_link_invalid"),
        Row("portal link: forged read-only token, a write", "POST", f"/partners/{A}/test",
            bearer(f"ptl_{A}.9999999999.1.{'A' * 43}"), None, 401, "portal_link_invalid"),

        # ---- GET /deliveries ------------------------------------------------------------------
        Row("deliveries: limit=0", "GET", "/deliveries?limit=0", ADM, None, 422, "invalid_field", "limit"),
        Row("deliveries: limit=201", "GET", "/deliveries?limit=201", ADM, None, 422, "invalid_field", "limit"),
        Row("deliveries: limit=ten", "GET", "/deliveries?limit=ten", ADM, None, 422, "invalid_field", "limit"),
        Row("deliveries: limit=1.5", "GET", "/deliveries?limit=1.5", ADM, None, 422, "invalid_field", "limit"),
        Row("deliveries: limit=superscript two", "GET", f"/deliveries?limit={q('²')}", KA, None, 422,
            "invalid_field", "limit"),
        Row("deliveries: limit of 5000 digits", "GET", "/deliveries?limit=" + "1" * 5000, ADM, None, 422,
            "invalid_field", "limit"),
        Row("deliveries: cursor !!!", "GET", "/deliveries?cursor=!!!", ADM, None, 422, "invalid_field", "cursor"),
        Row("deliveries: cursor SQL injection", "GET", f"/deliveries?cursor={q(SQLI)}", KA, None, 422,
            "invalid_field", "cursor"),
        Row("deliveries: cursor = base64 of a traversal", "GET", f"/deliveries?cursor={b64(TRAVERSAL)}", ADM,
            None, 422, "invalid_field", "cursor"),
        Row("deliveries: state=lost", "GET", "/deliveries?state=lost", ADM, None, 422, "invalid_field", "state"),
        Row("deliveries: state SQL injection", "GET", f"/deliveries?state={q(SQLI)}", ADM, None, 422,
            "invalid_field", "state"),
        Row("deliveries: status alias path traversal", "GET", f"/deliveries?status={q(TRAVERSAL)}", KA, None, 422,
            "invalid_field", "state"),
        Row("deliveries: state NUL", "GET", "/deliveries?state=%00", ADM, None, 422, "invalid_field", "state"),
        Row("deliveries: state non-UTF-8 %FF", "GET", "/deliveries?state=%FF", ADM, None, 422, "invalid_field",
            "state"),
        Row("deliveries: another partner's id with my key", "GET", f"/deliveries?partner_id={B}", KA, None, 404,
            "partner_not_found"),
        Row("deliveries: partner_id SQL injection with my key", "GET", f"/deliveries?partner_id={q(SQLI)}", KA,
            None, 404, "partner_not_found"),
        Row("deliveries: partner_id %2e%2e%2f with my key", "GET", f"/deliveries?partner_id={ENCODED_TRAVERSAL}",
            KA, None, 404, "partner_not_found"),
        Row("deliveries: no credentials", "GET", "/deliveries", {}, None, 401, "missing_credentials"),
        Row("deliveries: POST", "POST", "/deliveries", ADM, b"{}", 405, "method_not_allowed"),

        # ---- GET /deliveries/{id}, POST /deliveries/{id}/retry -----------------------------------
        Row("delivery: another partner's delivery with my key", "GET", f"/deliveries/{w.dlv_b}", KA, None, 404,
            "delivery_not_found"),
        Row("delivery: unknown id", "GET", "/deliveries/dlv_0000000000000000000000", ADM, None, 404,
            "delivery_not_found"),
        Row("delivery: SQL injection id", "GET", f"/deliveries/{q(SQLI)}", ADM, None, 404, "delivery_not_found"),
        Row("delivery: traversal (raw ../)", "GET", Raw(f"/deliveries/{w.dlv_a}/../{w.dlv_b}"), KA, None, 404,
            "not_found"),
        Row("delivery: no credentials", "GET", f"/deliveries/{w.dlv_a}", {}, None, 401, "missing_credentials"),
        Row("delivery: PUT", "PUT", f"/deliveries/{w.dlv_a}", ADM, b"{}", 405, "method_not_allowed"),
        Row("retry: a delivered delivery (admin)", "POST", f"/deliveries/{w.dlv_a}/retry", ADM, None, 409,
            "not_failed"),
        Row("retry: my delivered delivery (my key)", "POST", f"/deliveries/{w.dlv_a}/retry", KA, None, 409,
            "not_failed"),
        Row("retry: another partner's failed delivery with my key", "POST", f"/deliveries/{w.dlv_b}/retry", KA,
            None, 404, "delivery_not_found"),
        Row("retry: unknown id", "POST", "/deliveries/dlv_0000000000000000000000/retry", ADM, None, 404,
            "delivery_not_found"),
        Row("retry: SQL injection id", "POST", f"/deliveries/{q(SQLI)}/retry", ADM, None, 404,
            "delivery_not_found"),
        Row("retry: GET", "GET", f"/deliveries/{w.dlv_b}/retry", ADM, None, 405, "method_not_allowed"),
        Row("retry: wrong credentials", "POST", f"/deliveries/{w.dlv_b}/retry", {"Authorization": "Bearer x"},
            None, 401, "invalid_credentials"),

        # ---- POST /webhooks/partners --------------------------------------------------------
        Row("inbound: no headers", "POST", "/webhooks/partners", {}, inbound_body, 400, "missing_headers"),
        Row("inbound: signature only", "POST", "/webhooks/partners", hook(real_sig, None), inbound_body, 400,
            "missing_headers"),
        Row("inbound: event only", "POST", "/webhooks/partners", hook(None), inbound_body, 400, "missing_headers"),
        Row("inbound: empty signature", "POST", "/webhooks/partners", hook(""), inbound_body, 400,
            "missing_headers"),
        Row("inbound: event header 'tour'", "POST", "/webhooks/partners", hook(real_sig, "tour"), inbound_body,
            400, "bad_event_header"),
        Row("inbound: event header SQL injection", "POST", "/webhooks/partners", hook(real_sig, SQLI),
            inbound_body, 400, "bad_event_header"),
        Row("inbound: event header path traversal", "POST", "/webhooks/partners", hook(real_sig, TRAVERSAL),
            inbound_body, 400, "bad_event_header"),
        Row("inbound: unicode event header (raw)", "POST", "/webhooks/partners",
            [(b"x-webhook-signature", real_sig.encode()), (b"x-webhook-event", "tour.promoción".encode()),
             json_ct], inbound_body, 400, "bad_event_header"),
        Row("inbound: no headers and text/plain (headers come first)", "POST", "/webhooks/partners",
            {"Content-Type": "text/plain"}, inbound_body, 400, "missing_headers"),
        Row("inbound: text/plain", "POST", "/webhooks/partners", {**hook(real_sig), "Content-Type": "text/plain"},
            inbound_body, 415, "unsupported_media_type"),
        Row("inbound: over max_body_bytes, bad signature (Content-Length)", "POST", "/webhooks/partners",
            hook("ab" * 32), over_limit(b'{"event": "tour.purchased", "pad": "'), 413, "body_too_large"),
        Row("inbound: over max_body_bytes (chunked)", "POST", "/webhooks/partners", hook("ab" * 32),
            chunked(b'{"event": "tour.purchased", "pad": "'), 413, "body_too_large"),
        Row("inbound: malformed JSON with a bad signature", "POST", "/webhooks/partners", hook("ab" * 32),
            b'{"event": tour.purchased}', 400, "malformed_json"),
        Row("inbound: truncated JSON, signed", "POST", "/webhooks/partners", signed(inbound_body[:-3]),
            inbound_body[:-3], 400, "malformed_json"),
        Row("inbound: empty body, signed", "POST", "/webhooks/partners", signed(b""), b"", 400, "malformed_json"),
        Row("inbound: JSON array, signed", "POST", "/webhooks/partners", signed(b"[1,2]"), b"[1,2]", 400,
            "not_an_object"),
        Row("inbound: NaN, signed", "POST", "/webhooks/partners", signed(b'{"n": NaN}'), b'{"n": NaN}', 400,
            "malformed_json"),
        Row("inbound: duplicate keys, signed", "POST", "/webhooks/partners", signed(b'{"n": 1, "n": 2}'),
            b'{"n": 1, "n": 2}', 400, "malformed_json"),
        Row("inbound: non-UTF-8, signed", "POST", "/webhooks/partners", signed(b'{"name": "Pe\xf1a"}'),
            b'{"name": "Pe\xf1a"}', 400, "malformed_json"),
        Row("inbound: nested 40 deep, signed", "POST", "/webhooks/partners", signed(nested(40).encode()),
            nested(40).encode(), 400, "malformed_json"),
        Row("inbound: signature 63 hex chars", "POST", "/webhooks/partners", hook(real_sig[:-1]), inbound_body,
            401, "invalid_signature"),
        Row("inbound: signature 65 hex chars", "POST", "/webhooks/partners", hook(real_sig + "0"), inbound_body,
            401, "invalid_signature"),
        Row("inbound: signature 128 hex chars", "POST", "/webhooks/partners", hook(real_sig * 2), inbound_body,
            401, "invalid_signature"),
        Row("inbound: signature wrong alphabet", "POST", "/webhooks/partners", hook("z" * 64), inbound_body, 401,
            "invalid_signature"),
        Row("inbound: signature in base64", "POST", "/webhooks/partners",
            hook(base64.b64encode(bytes.fromhex(real_sig)).decode()), inbound_body, 401, "invalid_signature"),
        Row("inbound: signature with a sha256= prefix", "POST", "/webhooks/partners", hook("sha256=" + real_sig),
            inbound_body, 401, "invalid_signature"),
        Row("inbound: unicode signature (raw)", "POST", "/webhooks/partners",
            [(b"x-webhook-signature", ("é" * 32).encode()), (b"x-webhook-event", b"tour.purchased"), json_ct],
            inbound_body, 401, "invalid_signature"),
        Row("inbound: signature 8000 chars", "POST", "/webhooks/partners", hook("a" * 8000), inbound_body, 401,
            "invalid_signature"),
        Row("inbound: signature SQL injection", "POST", "/webhooks/partners", hook(SQLI), inbound_body, 401,
            "invalid_signature"),
        Row("inbound: A's signature claiming to be B", "POST", "/webhooks/partners",
            hook(real_sig, **{"X-Partner-Id": B}), inbound_body, 401, "invalid_signature"),
        Row("inbound: X-Partner-Id SQL injection", "POST", "/webhooks/partners",
            hook(real_sig, **{"X-Partner-Id": SQLI}), inbound_body, 401, "invalid_signature"),
        Row("inbound: X-Partner-Id path traversal", "POST", "/webhooks/partners",
            hook(real_sig, **{"X-Partner-Id": TRAVERSAL}), inbound_body, 401, "invalid_signature"),
        Row("inbound: stale timestamp, signed", "POST", "/webhooks/partners", signed(stale), stale, 401,
            "stale_timestamp"),
        Row("inbound: future timestamp, signed", "POST", "/webhooks/partners", signed(future), future, 401,
            "stale_timestamp"),
        Row("inbound: timestamp a string, signed", "POST", "/webhooks/partners", signed(ts_text), ts_text, 401,
            "bad_timestamp"),
        Row("inbound: timestamp true, signed", "POST", "/webhooks/partners", signed(ts_bool), ts_bool, 401,
            "bad_timestamp"),
        Row("inbound: timestamp SQL injection, signed", "POST", "/webhooks/partners", signed(ts_sqli), ts_sqli,
            401, "bad_timestamp"),
        Row("inbound: GET", "GET", "/webhooks/partners", {}, None, 405, "method_not_allowed"),

        # ---- GET /inbound ---------------------------------------------------------------------
        Row("inbound list: partner API key", "GET", "/inbound", KA, None, 403, "admin_only"),
        Row("inbound list: no credentials", "GET", "/inbound", {}, None, 401, "missing_credentials"),
        Row("inbound list: limit SQL injection", "GET", f"/inbound?limit={q(SQLI)}", ADM, None, 422,
            "invalid_field", "limit"),
        Row("inbound list: cursor path traversal", "GET", f"/inbound?cursor={q(TRAVERSAL)}", ADM, None, 422,
            "invalid_field", "cursor"),
        Row("inbound list: POST", "POST", "/inbound", ADM, b"{}", 405, "method_not_allowed"),

        # ---- POST /realtime/tokens ---------------------------------------------------------------
        Row("tokens: no credentials", "POST", "/realtime/tokens", {}, j({"user_id": "u"}), 401,
            "missing_credentials"),
        Row("tokens: partner API key", "POST", "/realtime/tokens", KA, j({"user_id": "u"}), 403, "admin_only"),
        Row("tokens: truncated JSON", "POST", "/realtime/tokens", ADM, b'{"user_id": "u', 400, "malformed_json"),
        Row("tokens: empty body", "POST", "/realtime/tokens", ADM, b"", 400, "malformed_json"),
        Row("tokens: NaN", "POST", "/realtime/tokens", ADM, b'{"user_id": NaN}', 400, "malformed_json"),
        Row("tokens: duplicate keys", "POST", "/realtime/tokens", ADM, b'{"user_id": "a", "user_id": "b"}', 400,
            "malformed_json"),
        Row("tokens: non-UTF-8", "POST", "/realtime/tokens", ADM, b'{"user_id": "\xc0\xaf"}', 400,
            "malformed_json"),
        Row("tokens: user_id a number", "POST", "/realtime/tokens", ADM, j({"user_id": 42}), 422, "invalid_field",
            "user_id"),
        Row("tokens: user_id null", "POST", "/realtime/tokens", ADM, j({"user_id": None}), 422, "invalid_field",
            "user_id"),
        Row("tokens: user_id blank", "POST", "/realtime/tokens", ADM, j({"user_id": "   "}), 422, "invalid_field",
            "user_id"),
        Row("tokens: user_id 100k chars", "POST", "/realtime/tokens", ADM, j({"user_id": HUGE}), 422,
            "invalid_field", "user_id"),
        Row("tokens: user_id an 8000-item array", "POST", "/realtime/tokens", ADM, j({"user_id": [SQLI] * 8000}),
            422, "invalid_field", "user_id"),
        Row("tokens: unknown field exp (choose my expiry)", "POST", "/realtime/tokens", ADM,
            j({"user_id": TRAVERSAL, "exp": 99999999999}), 422, "invalid_field", "exp"),
        Row("tokens: Content-Type text/plain", "POST", "/realtime/tokens", {**ADM, "Content-Type": "text/plain"},
            j({"user_id": "u"}), 415, "unsupported_media_type"),
        Row("tokens: body over max_body_bytes", "POST", "/realtime/tokens", ADM, over_limit(b'{"user_id": "'), 413,
            "body_too_large"),
        Row("tokens: GET", "GET", "/realtime/tokens", ADM, None, 405, "method_not_allowed"),

        # ---- The operator's routes: /metrics, /stats, /dashboard, /openapi.json, /ws ------------
        Row("metrics: no credentials", "GET", "/metrics", {}, None, 401, "missing_credentials"),
        Row("metrics: a partner API key", "GET", "/metrics", KA, None, 403, "admin_only"),
        Row("metrics: SQL injection as the token", "GET", "/metrics", bearer(SQLI), None,
            401, "invalid_credentials"),
        Row("metrics: POST", "POST", "/metrics", ADM, b"{}", 405, "method_not_allowed"),
        Row("stats: no credentials", "GET", "/stats", {}, None, 401, "missing_credentials"),
        Row("stats: a partner API key", "GET", "/stats", KA, None, 403, "admin_only"),
        Row("stats: the admin token in the query, not the header", "GET", f"/stats?token={ADMIN_TOKEN}", {}, None,
            401, "missing_credentials"),
        Row("stats: DELETE", "DELETE", "/stats", ADM, None, 405, "method_not_allowed"),
        Row("dashboard: POST", "POST", "/dashboard", {}, reg(), 405, "method_not_allowed"),
        Row("dashboard: /dashboard/../partners (raw)", "GET", Raw("/dashboard/../partners"), {}, None, 404,
            "not_found"),
        Row("openapi: PUT", "PUT", "/openapi.json", ADM, b"{}", 405, "method_not_allowed"),
        Row("openapi: /openapi.json/../../etc/passwd (raw)", "GET", Raw("/openapi.json/../../etc/passwd"), {},
            None, 404, "not_found"),
        Row("ws: plain HTTP GET", "GET", "/ws", {}, None, 426, "websocket_required"),
        Row("ws: plain HTTP GET with a forged token", "GET", "/ws?token=" + "A" * 5000, {}, None, 426,
            "websocket_required"),
        Row("ws: POST", "POST", "/ws", ADM, b"{}", 405, "method_not_allowed"),

        # ---- GET /health and unknown routes --------------------------------------------------
        Row("health: POST", "POST", "/health", {}, b"{}", 405, "method_not_allowed"),
        Row("health: DELETE", "DELETE", "/health", ADM, None, 405, "method_not_allowed"),
        Row("health: /health/../partners (raw)", "GET", Raw("/health/../partners"), {}, None, 404, "not_found"),
        Row("health: /health%2f..%2fpartners (raw)", "GET", Raw("/health%2f..%2fpartners"), {}, None, 404,
            "not_found"),
        Row("unknown route /admin", "GET", "/admin", ADM, None, 404, "not_found"),
        Row("unknown route /../../etc/passwd (raw)", "GET", Raw("/../../etc/passwd"), {}, None, 404, "not_found"),
        Row("unknown route /partners/{A}/secret", "GET", f"/partners/{A}/secret", KA, None, 404, "not_found"),

        # ---- Numbers Python's json accepts but JSON cannot carry: last, since a server that
        # ---- wrongly accepts them stores something. The SPEC: 400 for malformed / Infinity.
        Row("register: partner_name with a lone surrogate \\ud800", "POST", "/partners/register", ADM,
            b'{"partner_name": "Alpha\\ud800", "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"]}',
            400, "malformed_json"),
        Row("patch: webhook_url with a lone surrogate \\udfff", "PATCH", f"/partners/{A}", KA,
            b'{"webhook_url": "http://127.0.0.1:9/\\udfff"}', 400, "malformed_json"),
        Row("inbound: a 5000-digit number, bad signature", "POST", "/webhooks/partners", hook("ab" * 32),
            b'{"event": "tour.purchased", "n": ' + b"7" * 5000 + b"}", 400),
        Row("publish: amount with 5000 digits", "POST", "/events", ADM,
            without(good_event, "amount")[:-1] + b', "amount": ' + b"1" * 5000 + b"}", 400),
        Row("publish: amount 1e400 (overflows to Infinity)", "POST", "/events", ADM,
            without(good_event, "amount")[:-1] + b', "amount": 1e400}', 400, "malformed_json"),
        Row("inbound: -1e400 (overflows to -Infinity), signed", "POST", "/webhooks/partners",
            signed(b'{"event": "tour.purchased", "n": -1e400}'), b'{"event": "tour.purchased", "n": -1e400}',
            400, "malformed_json"),
    ]
    return rows


def send(client: httpx.Client, row: Row) -> httpx.Response:
    if isinstance(row.headers, list):
        headers = list(row.headers)
    else:
        headers = [(k.encode("utf-8"), v.encode("utf-8")) for k, v in row.headers.items()]
    body = row.body() if callable(row.body) else row.body
    if body is not None and not any(k.lower() == b"content-type" for k, _ in headers):
        headers.append((b"content-type", b"application/json"))
    if isinstance(row.path, Raw):
        return client.request(row.method, "/", headers=headers, content=body,
                              extensions={"target": row.path.encode("ascii")})
    return client.request(row.method, row.path, headers=headers, content=body)


def problems_with(row: Row, r: httpx.Response, secrets_issued: list[str]) -> list[str]:
    found = []
    if r.status_code != row.status:
        found.append(f"status {r.status_code}, expected {row.status}")
    if r.status_code >= 500:
        found.append("a 5xx for bad input")
    try:
        body = r.json()
    except ValueError:
        return found + [f"not JSON ({r.headers.get('content-type')!r}): {r.text[:200]!r}"]
    if not (r.headers.get("content-type", "").startswith("application/json")):
        found.append(f"Content-Type {r.headers.get('content-type')!r}")
    error = body.get("error") if isinstance(body, dict) else None
    # A payload refused for its fields lists every problem too (the first is the message).
    listed = isinstance(error, dict) and error.get("code") == "invalid_field" and "problems" in error
    # A cursor whose events were purged says where to read again from.
    restart = isinstance(error, dict) and error.get("code") == "cursor_expired"
    if not (isinstance(body, dict) and set(body) == {"error"} and isinstance(error, dict)
            and set(error) == {"code", "message"} | ({"problems"} if listed else set())
            | ({"start_cursor"} if restart else set())):
        return found + [f"not the error shape: {r.text[:300]!r}"]
    if listed and not (isinstance(error["problems"], list) and error["problems"]
                       and error["problems"][0].get("message") == error["message"]):
        found.append(f"problems do not begin with the message: {r.text[:300]!r}")
    code, message = error["code"], error["message"]
    if not (isinstance(code, str) and SNAKE_CASE.match(code)):
        found.append(f"code {code!r} is not snake_case")
    if not (isinstance(message, str) and message.strip()):
        found.append(f"empty message {message!r}")
    if row.code and code != row.code:
        found.append(f"code {code!r}, expected {row.code!r}")
    if row.field and isinstance(message, str) and f"'{row.field}'" not in message:
        found.append(f"message does not name {row.field!r}: {message[:200]!r}")
    if r.status_code == 429 and not r.headers.get("retry-after"):
        found.append("429 without Retry-After")
    for secret in secrets_issued:
        if secret in r.text:
            found.append("a secret or key appears in the answer")
    return found


def fresh(hub: Webhookd, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One request on a new connection (uvicorn drops a connection after an unhandled error)."""
    with httpx.Client(base_url=hub.url, timeout=10) as client:
        return client.request(method, path, **kwargs)


def test_hostile_requests_get_their_4xx_and_change_nothing(world: World):
    hub = world.hub
    rows = build_rows(world)
    names = [row.name for row in rows]
    assert len(rows) >= 70 and len(set(names)) == len(names), "rows need unique names, at least 70 of them"
    methods_and_routes = {(row.method, re.sub(r"\?.*", "", str(row.path))) for row in rows}
    assert len(methods_and_routes) >= 30

    # The "before" dump: all deliveries settled, and nothing moving any more.
    hub.wait_until_nothing_is_due()
    before = dump(world.db_path)
    for _ in range(50):
        time.sleep(0.1)
        again = dump(world.db_path)
        if again == before:
            break
        before = again
    else:
        pytest.fail("the database kept changing after every delivery settled")

    secrets_issued = [world.a["shared_secret"], world.a["api_key"], world.b["shared_secret"], world.b["api_key"],
                      world.a["standard_webhooks_secret"], ADMIN_TOKEN]
    failures: list[str] = []
    limited = 0  # rows a rate limit answered (limits on) instead of their own check
    started = time.monotonic()
    client = httpx.Client(base_url=hub.url, timeout=10)
    try:
        for row in rows:
            shown = f"{row.name!r}: {row.method} {str(row.path)[:120]}"
            try:
                r = send(client, row)
            except httpx.HTTPError as exc:
                failures.append(f"{shown} -> transport error {exc!r}, expected {row.status} {row.code or ''}")
                continue
            if r.status_code >= 500:   # uvicorn drops the connection after an unhandled error
                client.close()
                client = httpx.Client(base_url=hub.url, timeout=10)
            if world.limits and r.status_code == 429 and row.status != 429:
                limited += 1
                row = row._replace(status=429, code="rate_limited", field=None)
            found = problems_with(row, r, secrets_issued)
            if found:
                failures.append(f"{shown} -> got {r.status_code} {r.text[:240]!r}; expected {row.status} "
                                f"{row.code or ''}: " + "; ".join(found))

        # Hostile text in free-form filters is a harmless filter: 200, nothing found, nothing run.
        admin = ADMIN
        for path in (f"/deliveries?event={q(SQLI)}", f"/deliveries?event_id={q(TRAVERSAL)}",
                     f"/deliveries?partner_id={q(SQLI)}", f"/deliveries?event={ENCODED_TRAVERSAL}",
                     f"/inbound?partner_id={q(SQLI)}", f"/inbound?event={q(TRAVERSAL)}"):
            r = client.get(path, headers=admin)
            if r.status_code != 200 or r.json() != {"items": [], "next_cursor": None}:
                failures.append(f"filter GET {path} -> got {r.status_code} {r.text[:200]!r}; expected 200 and no items")
    finally:
        client.close()
    elapsed = time.monotonic() - started

    hub.wait_until_nothing_is_due()  # anything a row wrongly queued has been sent and recorded: it shows in the dump
    health = fresh(hub, "GET", "/health")
    if health.status_code != 200 or health.json() != {"status": "ok"}:
        failures.append(f"GET /health after the matrix -> {health.status_code} {health.text[:200]!r}")
    # Still serving every read: nothing a row left behind (had it been stored) breaks a listing.
    reads = ["/partners", "/deliveries", "/inbound"]
    listed = fresh(hub, "GET", "/deliveries", headers=hub.admin)
    if listed.status_code == 200:
        reads += sorted({f"/events/{d['event_id']}" for d in listed.json()["items"]})
    for path in reads:
        r = fresh(hub, "GET", path, headers=hub.admin)
        if r.status_code != 200:
            failures.append(f"GET {path} after the matrix -> {r.status_code} {r.text[:200]!r}; expected 200")
    after = dump(world.db_path)
    if after != before:
        diff = list(difflib.unified_diff(before.splitlines(), after.splitlines(), "before", "after", lineterm="", n=0))
        failures.append("the database changed during the matrix:\n    "
                        + "\n    ".join(line[:300] for line in diff[:40]))

    # Still serving: a normal publish goes out to the partners.
    published = fresh(hub, "POST", "/events", headers=hub.admin,
                      json={**PAYMENT_SUCCESS, "transaction_id": "txn_after_matrix"})
    if published.status_code != 202 or published.json().get("deliveries") != 2:
        failures.append(f"publish after the matrix -> {published.status_code} {published.text[:200]!r}")
    else:
        event_id = published.json()["event_id"]
        try:
            wait_for(lambda: event_id in world.good.event_ids, timeout=10)
        except AssertionError:
            failures.append(f"the event published after the matrix ({event_id}) never reached partner A")

    if world.limits and not limited:
        failures.append("with the rate limits on, not one row was rate limited: the limits were not exercised")
    assert not failures, (f"{len(failures)} of {len(rows)} hostile requests (run in {elapsed:.1f} s) went wrong:\n"
                          + "\n".join(f"- {f}" for f in failures))

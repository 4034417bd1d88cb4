"""A webhookd receiver in plain Python (standard library only).

Run it from this folder:

    PARTNER_SHARED_SECRET=sk_live_... PORT=9100 python3 receiver.py

then register http://127.0.0.1:9100/webhooks/events with webhookd.

What it checks, for every POST /webhooks/events:
  1. X-Webhook-Signature: lowercase hex HMAC-SHA256 of the RAW body bytes, keyed by the shared
     secret's UTF-8 bytes. We hash the bytes exactly as they arrived: parsing the JSON and
     printing it again can change them (150.0 -> 150, "é" -> "\\u00e9") and break the signature.
  2. Standard Webhooks headers (webhook-id, webhook-timestamp, webhook-signature): base64
     HMAC-SHA256 of "{id}.{timestamp}.{body}" with the same key, and a timestamp at most
     5 minutes away from our clock, so a captured request cannot be replayed later.
  Both must pass, else 401. A webhook.verification event (webhookd asking this endpoint to prove
  it is yours) is answered 200 {"challenge": <the challenge from its body>}. Any other event is
  deduplicated on X-Webhook-Id (webhookd delivers at least once: a retry carries the same id) and
  answered 200 {"status": "received"}.
"""

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ.get("PARTNER_SHARED_SECRET", "")
PORT = int(os.environ.get("PORT", "9100"))
HOST = os.environ.get("HOST", "127.0.0.1")
RECEIVER_LOG = os.environ.get("RECEIVER_LOG")  # optional: one JSON line per request, for tests
TOLERANCE_S = 5 * 60
MAX_BODY = 1 << 20  # 1 MiB; webhookd never sends more than 256 KiB

# Ids of webhooks already processed. In memory, so it is lost on restart and not shared
# between processes: a real receiver keeps it in its database (a unique index on the id).
seen_ids = set()
lock = threading.Lock()


def hex_signature_ok(body: bytes, header: str) -> bool:
    """X-Webhook-Signature: compare in constant time.

    compare_digest on *bytes* never raises: a missing header (""), a wrong length or
    non-hex text simply compare unequal, so bad input gets a 401, never a 500.
    """
    expected = hmac.new(SECRET.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode("ascii"), header.encode("utf-8", "replace"))


def standard_signature_ok(body: bytes, msg_id: str, timestamp: str, header: str) -> bool:
    """Standard Webhooks: 'v1,<base64>' entries separated by spaces (two during a secret rotation)."""
    # at most 12 ASCII digits: int() of anything longer could not be compared with a float
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        return False  # missing or not a number
    if abs(time.time() - int(timestamp)) > TOLERANCE_S:
        return False  # too old (a replay?) or too far in the future
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(SECRET.encode("utf-8"), signed, hashlib.sha256).digest())
    for entry in header.split():
        version, _, signature = entry.partition(",")
        if version == "v1" and hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
            return True
    return False


def handle_event(event_type: str, payload: dict) -> None:
    """Your business logic goes here. Keep it fast (webhookd waits 5 s) or queue it."""
    if event_type == "payment.success":
        pass  # e.g. mark payload["metadata"]["reservation_id"] as paid
    elif event_type == "booking.confirmed":
        pass  # e.g. prepare the tour package for payload["booking_id"]


def challenge_answer(body: bytes) -> tuple[int, dict]:
    """webhookd's verification request holds {"challenge": "..."}: answer it back, as is."""
    try:
        challenge = json.loads(body).get("challenge")
    except (ValueError, AttributeError):
        challenge = None
    if not isinstance(challenge, str):
        return 400, {"error": {"code": "bad_json", "message": "A verification without a challenge."}}
    return 200, {"challenge": challenge}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        if self.path.split("?")[0] != "/webhooks/events":
            return self.answer(404, {"error": {"code": "not_found", "message": "POST /webhooks/events"}})
        length = self.headers.get("Content-Length") or "0"
        length = int(length) if length.isascii() and length.isdigit() else MAX_BODY + 1
        if length > MAX_BODY:
            return self.answer(413, {"error": {"code": "too_large", "message": "Body too large."}})
        body = self.rfile.read(length)  # the raw bytes: verify THESE, before any json.loads

        header = lambda name: self.headers.get(name) or ""  # noqa: E731  (missing header -> "")
        event_type, webhook_id = header("X-Webhook-Event"), header("X-Webhook-Id")
        hex_ok = hex_signature_ok(body, header("X-Webhook-Signature"))
        standard_ok = standard_signature_ok(body, header("webhook-id"), header("webhook-timestamp"),
                                            header("webhook-signature"))
        duplicate = False
        if not (hex_ok and standard_ok):
            status, answer = 401, {"error": {"code": "invalid_signature",
                                             "message": "The webhook signature does not verify."}}
        elif event_type == "webhook.verification":
            # Prove this endpoint is yours: echo the challenge of the (verified) body. Not deduplicated:
            # each request has an id of its own, and answering one twice is harmless.
            status, answer = challenge_answer(body)
        else:
            with lock:  # check-and-add in one step, so two concurrent retries cannot both pass
                duplicate = webhook_id in seen_ids
                seen_ids.add(webhook_id)  # webhookd always sends X-Webhook-Id
            status, answer = 200, {"status": "received"}
            if not duplicate:
                try:
                    handle_event(event_type, json.loads(body))  # parse only now that it is verified
                except ValueError:
                    status, answer = 400, {"error": {"code": "bad_json", "message": "Body is not JSON."}}

        verdict = "duplicate" if duplicate else ("ok" if status == 200 else "REJECTED")
        print(f"{event_type or '?':<20} {webhook_id or '?'}  hex={'ok' if hex_ok else 'BAD'} "
              f"standard={'ok' if standard_ok else 'BAD'}  -> {status} {verdict}", flush=True)
        if RECEIVER_LOG:
            record = {"id": webhook_id, "event": event_type, "hex_ok": hex_ok,
                      "standard_ok": standard_ok, "duplicate": duplicate, "status": status}
            with lock, open(RECEIVER_LOG, "a", encoding="utf-8") as log:
                log.write(json.dumps(record) + "\n")
        self.answer(status, answer)

    def answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        pass  # we print our own line per webhook above


if __name__ == "__main__":
    if not SECRET:
        raise SystemExit("set PARTNER_SHARED_SECRET to the shared_secret webhookd gave you at registration")
    server = ThreadingHTTPServer((HOST, PORT), Handler)
    print(f"listening on http://{HOST}:{PORT}/webhooks/events", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass

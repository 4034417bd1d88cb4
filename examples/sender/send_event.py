"""Send one of your own events to webhookd, signed, with retries (standard library only).

Run it from this folder:

    PARTNER_SHARED_SECRET=sk_live_... PARTNER_ID=partner_... python3 send_event.py

which posts a sample tour.promoted event to $WEBHOOKD_URL/webhooks/partners
(default http://127.0.0.1:8080). Your own event:

    python3 send_event.py tour.purchased '{"tour_id": "tour_xyz789", "price": 250.0}'
    python3 send_event.py tour.purchased @event.json --id msg_0001   # same id = same event

How it signs: it serializes the payload ONCE (canonical JSON: sorted keys, no spaces), signs
exactly those bytes (hex HMAC-SHA256 keyed by the shared secret) and sends exactly those bytes.
(The partner guide's sender signs one string but posts another, `requests.post(json=...)`.)

Every event gets a unique X-Webhook-Id, reused on each retry: if an attempt reached webhookd
but the answer got lost, the retry is recognised and stored once, not twice.
"""

import argparse
import hashlib
import hmac
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
import uuid

WEBHOOKD_URL = os.environ.get("WEBHOOKD_URL", "http://127.0.0.1:8080").rstrip("/")
SECRET = os.environ.get("PARTNER_SHARED_SECRET", "")
PARTNER_ID = os.environ.get("PARTNER_ID", "")  # recommended; required past 16 KiB or 50 partners

SAMPLE = {"tour_id": "tour_xyz789", "tour_name": "Montaña Blanca", "price": 250.0,
          "url": "https://example.com/tours/montana-blanca"}


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would turn the POST into a GET without the body."""

    def redirect_request(self, *args, **kwargs):
        return None


def send(event_type: str, payload: dict, webhook_id: str, attempts: int, backoff_s: float) -> bool:
    payload.setdefault("event", event_type)
    payload.setdefault("timestamp", int(time.time()))  # webhookd refuses events older than 5 min
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
    headers = {
        "Content-Type": "application/json",
        "X-Webhook-Event": event_type,
        "X-Webhook-Id": webhook_id,
        "X-Webhook-Signature": hmac.new(SECRET.encode("utf-8"), body, hashlib.sha256).hexdigest(),
        "User-Agent": "webhookd-example-sender/1.0",
    }
    if PARTNER_ID:
        headers["X-Partner-Id"] = PARTNER_ID
    opener = urllib.request.build_opener(NoRedirects)
    url = WEBHOOKD_URL + "/webhooks/partners"

    for attempt in range(1, attempts + 1):
        retry_after = None
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with opener.open(request, timeout=10) as response:
                print(f"{event_type} {webhook_id}: attempt {attempt} -> {response.status} "
                      f"{response.read(200).decode('utf-8', 'replace')}", flush=True)
                return True
        except urllib.error.HTTPError as error:  # webhookd answered, with an error status
            detail = error.read(300).decode("utf-8", "replace")
            print(f"{event_type} {webhook_id}: attempt {attempt} -> {error.code} {detail}", flush=True)
            if error.code != 429 and error.code < 500:
                return False  # 4xx: the request itself is wrong (secret, headers, JSON); retrying won't help
            retry_after = error.headers.get("Retry-After")
        except (urllib.error.URLError, OSError) as error:  # refused, reset, timeout, DNS...
            print(f"{event_type} {webhook_id}: attempt {attempt} -> {error}", flush=True)
        if attempt < attempts:
            # Exponential backoff with jitter: ~1 s, 2 s, 4 s... (or what Retry-After asks for).
            delay = backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            if retry_after and retry_after.isascii() and retry_after.isdigit():
                delay = max(delay, int(retry_after))
            time.sleep(min(delay, 60))
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("event_type", nargs="?", default="tour.promoted", help="e.g. tour.purchased")
    parser.add_argument("payload", nargs="?", help="the event as JSON, or @file.json (default: a sample)")
    parser.add_argument("--id", help="X-Webhook-Id (default: a new unique id); reuse it to resend the same event")
    parser.add_argument("--attempts", type=int, default=5, help="tries before giving up (default 5)")
    parser.add_argument("--backoff", type=float, default=1.0, help="first wait between tries, seconds (default 1)")
    args = parser.parse_args()
    if not SECRET:
        parser.error("set PARTNER_SHARED_SECRET to the shared_secret webhookd gave you at registration")
    if args.payload is None:
        payload = dict(SAMPLE)
    elif args.payload.startswith("@"):
        with open(args.payload[1:], encoding="utf-8") as f:
            payload = json.load(f)
    else:
        payload = json.loads(args.payload)
    if not isinstance(payload, dict):
        parser.error("the payload must be a JSON object")
    webhook_id = args.id or f"msg_{uuid.uuid4().hex}"
    return 0 if send(args.event_type, payload, webhook_id, args.attempts, args.backoff) else 1


if __name__ == "__main__":
    sys.exit(main())

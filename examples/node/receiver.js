// A webhookd receiver in Node.js + Express.
//
// Run it from this folder:
//
//     npm install && PARTNER_SHARED_SECRET=sk_live_... PORT=9200 node receiver.js
//
// then register http://127.0.0.1:9200/webhooks/events with webhookd.
//
// What it checks, for every POST /webhooks/events:
//   1. X-Webhook-Signature: lowercase hex HMAC-SHA256 of the RAW body bytes, keyed by the shared
//      secret. express.raw() keeps those bytes as a Buffer. Do NOT use express.json() and
//      JSON.stringify(req.body): that prints 150.0 as 150 and "\u00e9" as a raw "é", so the
//      bytes (and the signature) differ from what webhookd signed.
//   2. Standard Webhooks headers (webhook-id, webhook-timestamp, webhook-signature): base64
//      HMAC-SHA256 of "{id}.{timestamp}.{body}" with the same key, timestamp at most 5 minutes
//      from our clock (so a captured request cannot be replayed later).
//   Both must pass, else 401. A webhook.verification event (webhookd asking this endpoint to prove
//   it is yours) is answered 200 {"challenge": <the challenge from its body>}. Any other event is
//   deduplicated on X-Webhook-Id (webhookd delivers at least once: a retry carries the same id)
//   and answered 200 {"status": "received"}.

const crypto = require("crypto");
const fs = require("fs");
const express = require("express");

const SECRET = process.env.PARTNER_SHARED_SECRET || "";
const PORT = Number(process.env.PORT || 9200);
const HOST = process.env.HOST || "127.0.0.1";
const RECEIVER_LOG = process.env.RECEIVER_LOG; // optional: one JSON line per request, for tests
const TOLERANCE_S = 5 * 60;

// Ids of webhooks already processed. In memory, so it is lost on restart and not shared between
// processes: a real receiver keeps it in its database (a unique index on the id).
const seenIds = new Set();

// Constant-time comparison of two strings. crypto.timingSafeEqual THROWS when the lengths
// differ (the guide's receiver answers 500 then), so check the length first. Comparing the
// lengths first only reveals the length, which is public anyway (64 hex characters).
function safeEqual(expected, given) {
  const a = Buffer.from(expected, "utf8");
  const b = Buffer.from(typeof given === "string" ? given : "", "utf8"); // missing header -> ""
  return a.length === b.length && crypto.timingSafeEqual(a, b);
}

function hexSignatureOk(body, header) {
  const expected = crypto.createHmac("sha256", SECRET).update(body).digest("hex");
  return safeEqual(expected, header);
}

function standardSignatureOk(body, msgId, timestamp, header) {
  if (typeof timestamp !== "string" || !/^[0-9]{1,12}$/.test(timestamp)) return false;
  if (Math.abs(Date.now() / 1000 - Number(timestamp)) > TOLERANCE_S) return false; // replay window
  const signed = Buffer.concat([Buffer.from(`${msgId || ""}.${timestamp}.`, "utf8"), body]);
  const expected = crypto.createHmac("sha256", SECRET).update(signed).digest("base64");
  // "v1,<base64>" entries separated by spaces (two of them during a secret rotation)
  return String(header || "").split(" ").some((entry) => {
    const comma = entry.indexOf(",");
    return comma > 0 && entry.slice(0, comma) === "v1" && safeEqual(expected, entry.slice(comma + 1));
  });
}

function handleEvent(eventType, payload) {
  // Your business logic goes here. Keep it fast (webhookd waits 5 s) or queue it.
  if (eventType === "payment.success") {
    // e.g. mark payload.metadata.reservation_id as paid
  }
}

const app = express();

// express.raw keeps the body as a Buffer of the exact bytes received (1 MB is plenty:
// webhookd never sends more than 256 KiB).
app.post("/webhooks/events", express.raw({ type: "application/json", limit: "1mb" }), (req, res) => {
  const body = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0); // other content types: empty
  const eventType = req.get("X-Webhook-Event") || "";
  const webhookId = req.get("X-Webhook-Id") || "";
  const hexOk = hexSignatureOk(body, req.get("X-Webhook-Signature"));
  const standardOk = standardSignatureOk(body, req.get("webhook-id"), req.get("webhook-timestamp"),
                                         req.get("webhook-signature"));
  let duplicate = false;
  let status = 200;
  let answer = { status: "received" };
  if (!(hexOk && standardOk)) {
    status = 401;
    answer = { error: { code: "invalid_signature", message: "The webhook signature does not verify." } };
  } else if (eventType === "webhook.verification") {
    // Prove this endpoint is yours: echo the challenge of the (verified) body. Not deduplicated:
    // each request has an id of its own, and answering one twice is harmless.
    let challenge;
    try { challenge = JSON.parse(body.toString("utf8")).challenge; } catch (err) { challenge = undefined; }
    if (typeof challenge === "string") {
      answer = { challenge };
    } else {
      status = 400;
      answer = { error: { code: "bad_json", message: "A verification without a challenge." } };
    }
  } else {
    duplicate = seenIds.has(webhookId); // Node runs one handler at a time: check-and-add is safe
    seenIds.add(webhookId);
    if (!duplicate) {
      try {
        handleEvent(eventType, JSON.parse(body.toString("utf8"))); // parse only now that it is verified
      } catch (err) {
        status = 400;
        answer = { error: { code: "bad_json", message: "Body is not JSON." } };
      }
    }
  }

  const verdict = duplicate ? "duplicate" : status === 200 ? "ok" : "REJECTED";
  console.log(`${(eventType || "?").padEnd(20)} ${webhookId || "?"}  hex=${hexOk ? "ok" : "BAD"} ` +
              `standard=${standardOk ? "ok" : "BAD"}  -> ${status} ${verdict}`);
  if (RECEIVER_LOG) {
    const record = { id: webhookId, event: eventType, hex_ok: hexOk, standard_ok: standardOk,
                     duplicate, status };
    fs.appendFileSync(RECEIVER_LOG, JSON.stringify(record) + "\n");
  }
  res.status(status).json(answer);
});

// Anything else (a body over the limit, a broken request) -> a JSON error, never an HTML page.
app.use((err, req, res, next) => {
  res.status(err.status >= 400 && err.status < 500 ? err.status : 400).json({ error: { code: "bad_request", message: err.message } });
});

if (!SECRET) {
  console.error("set PARTNER_SHARED_SECRET to the shared_secret webhookd gave you at registration");
  process.exit(1);
}
app.listen(PORT, HOST, () => console.log(`listening on http://${HOST}:${PORT}/webhooks/events`));

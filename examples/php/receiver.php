<?php
// A webhookd receiver in plain PHP (no framework, no Composer).
//
// Run it from this folder with PHP's built-in server:
//
//     PARTNER_SHARED_SECRET=sk_live_... php -S 127.0.0.1:9300 receiver.php
//
// then register http://127.0.0.1:9300/webhooks/events with webhookd.
// (Behind Apache or nginx + PHP-FPM the same file works as the endpoint's script.)
//
// What it checks, for every POST /webhooks/events:
//   1. X-Webhook-Signature: lowercase hex HMAC-SHA256 of the RAW body (php://input), keyed by
//      the shared secret. Do NOT json_decode and json_encode the body again before hashing:
//      json_encode prints 150.0 as 150 and "/" as "\/", so the bytes (and the signature)
//      differ from what webhookd signed.
//   2. Standard Webhooks headers (webhook-id, webhook-timestamp, webhook-signature): base64
//      HMAC-SHA256 of "{id}.{timestamp}.{body}" with the same key, timestamp at most 5 minutes
//      from our clock (so a captured request cannot be replayed later).
//   Both must pass, else 401. A webhook.verification event (webhookd asking this endpoint to prove
//   it is yours) is answered 200 {"challenge": <the challenge from its body>}. Any other event is
//   deduplicated on X-Webhook-Id (webhookd delivers at least once: a retry carries the same id)
//   and answered 200 {"status": "received"}.

$secret = getenv('PARTNER_SHARED_SECRET') ?: '';
$receiverLog = getenv('RECEIVER_LOG');   // optional: one JSON line per request, for tests
const TOLERANCE_S = 300;                 // 5 minutes

// A request header as a string ('' when missing). PHP exposes "X-Webhook-Id" as HTTP_X_WEBHOOK_ID.
function header_value(string $name): string {
    $value = $_SERVER['HTTP_' . strtoupper(str_replace('-', '_', $name))] ?? '';
    return is_string($value) ? $value : '';
}

function answer(int $status, array $payload): void {
    http_response_code($status);
    header('Content-Type: application/json');
    echo json_encode($payload, JSON_INVALID_UTF8_SUBSTITUTE | JSON_UNESCAPED_SLASHES);
}

// hash_equals() is constant-time and simply returns false for a different length, an empty
// string or non-hex text: bad input gets a 401, never a 500.
function hex_signature_ok(string $secret, string $body, string $given): bool {
    return hash_equals(hash_hmac('sha256', $body, $secret), $given);
}

function standard_signature_ok(string $secret, string $body, string $id, string $timestamp, string $header): bool {
    if (!preg_match('/\A[0-9]{1,12}\z/', $timestamp) || abs(time() - (int) $timestamp) > TOLERANCE_S) {
        return false;   // missing, not a number, or outside the replay window
    }
    $expected = base64_encode(hash_hmac('sha256', "$id.$timestamp.$body", $secret, true));
    // "v1,<base64>" entries separated by spaces (two of them during a secret rotation)
    foreach (explode(' ', $header) as $entry) {
        $parts = explode(',', $entry, 2);
        if (count($parts) === 2 && $parts[0] === 'v1' && hash_equals($expected, $parts[1])) {
            return true;
        }
    }
    return false;
}

// PHP starts afresh for every request, so "in memory" cannot remember ids between requests:
// we remember each id as an empty file, created atomically ('x' fails if it already exists).
// A real receiver keeps the ids in its database (a unique index on the id).
function already_seen(string $id): bool {
    $dir = getenv('WEBHOOK_SEEN_DIR') ?: sys_get_temp_dir() . '/webhookd-example-seen';
    @mkdir($dir, 0700, true);
    $path = $dir . '/' . hash('sha256', $id);
    $file = @fopen($path, 'x');
    if ($file === false) {
        return file_exists($path);
    }
    fclose($file);
    return false;
}

function handle_event(string $eventType, array $payload): void {
    // Your business logic goes here. Keep it fast (webhookd waits 5 s) or queue it.
    if ($eventType === 'payment.success') {
        // e.g. mark $payload['metadata']['reservation_id'] as paid
    }
}

$path = parse_url($_SERVER['REQUEST_URI'] ?? '/', PHP_URL_PATH);
if ($_SERVER['REQUEST_METHOD'] !== 'POST' || $path !== '/webhooks/events') {
    answer(404, ['error' => ['code' => 'not_found', 'message' => 'POST /webhooks/events']]);
    return;
}
if ($secret === '') {
    answer(500, ['error' => ['code' => 'not_configured', 'message' => 'PARTNER_SHARED_SECRET is not set.']]);
    return;
}

$body = file_get_contents('php://input');   // the raw bytes: verify THESE, before json_decode
$eventType = header_value('X-Webhook-Event');
$webhookId = header_value('X-Webhook-Id');
$hexOk = hex_signature_ok($secret, $body, header_value('X-Webhook-Signature'));
$standardOk = standard_signature_ok($secret, $body, header_value('webhook-id'),
                                    header_value('webhook-timestamp'), header_value('webhook-signature'));
$duplicate = false;
if (!($hexOk && $standardOk)) {
    $status = 401;
    $reply = ['error' => ['code' => 'invalid_signature', 'message' => 'The webhook signature does not verify.']];
} elseif ($eventType === 'webhook.verification') {
    // Prove this endpoint is yours: echo the challenge of the (verified) body. Not deduplicated:
    // each request has an id of its own, and answering one twice is harmless.
    $payload = json_decode($body, true);
    if (is_array($payload) && is_string($payload['challenge'] ?? null)) {
        $status = 200;
        $reply = ['challenge' => $payload['challenge']];
    } else {
        $status = 400;
        $reply = ['error' => ['code' => 'bad_json', 'message' => 'A verification without a challenge.']];
    }
} else {
    $duplicate = already_seen($webhookId);
    $status = 200;
    $reply = ['status' => 'received'];
    if (!$duplicate) {
        $payload = json_decode($body, true);   // parse only now that it is verified
        if (is_array($payload)) {
            handle_event($eventType, $payload);
        } else {
            $status = 400;
            $reply = ['error' => ['code' => 'bad_json', 'message' => 'Body is not a JSON object.']];
        }
    }
}

$verdict = $duplicate ? 'duplicate' : ($status === 200 ? 'ok' : 'REJECTED');
file_put_contents('php://stderr', sprintf("%-20s %s  hex=%s standard=%s  -> %d %s\n",
    $eventType ?: '?', $webhookId ?: '?', $hexOk ? 'ok' : 'BAD', $standardOk ? 'ok' : 'BAD', $status, $verdict));
if ($receiverLog) {
    $record = ['id' => $webhookId, 'event' => $eventType, 'hex_ok' => $hexOk,
               'standard_ok' => $standardOk, 'duplicate' => $duplicate, 'status' => $status];
    file_put_contents($receiverLog, json_encode($record, JSON_INVALID_UTF8_SUBSTITUTE) . "\n", FILE_APPEND | LOCK_EX);
}
answer($status, $reply);

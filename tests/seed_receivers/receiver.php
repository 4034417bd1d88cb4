<?php
$sharedSecret = getenv('PARTNER_SHARED_SECRET');
$payload = json_decode(file_get_contents('php://input'), true);
$signature = $_SERVER['HTTP_X_WEBHOOK_SIGNATURE'];

$payloadStr = json_encode($payload);
$expectedSignature = hash_hmac('sha256', $payloadStr, $sharedSecret);

if (!hash_equals($signature, $expectedSignature)) {
    http_response_code(401);
    die('Invalid signature');
}

echo json_encode(['status' => 'received']);
?>

const express = require('express');
const crypto = require('crypto');
const app = express();

app.use(express.json());

const SHARED_SECRET = process.env.PARTNER_SHARED_SECRET;

function verifySignature(payload, signature) {
  const payloadStr = JSON.stringify(payload);
  const expectedSignature = crypto
    .createHmac('sha256', SHARED_SECRET)
    .update(payloadStr)
    .digest('hex');

  return crypto.timingSafeEqual(
    Buffer.from(signature),
    Buffer.from(expectedSignature)
  );
}

app.post('/webhooks/events', (req, res) => {
  const signature = req.headers['x-webhook-signature'];
  const eventType = req.headers['x-webhook-event'];

  if (!verifySignature(req.body, signature)) {
    return res.status(401).json({ error: 'Invalid signature' });
  }

  console.log(`✅ Webhook recibido: ${eventType}`);

  // Procesar evento
  if (eventType === 'payment.success') {
    handlePaymentSuccess(req.body);
  }

  res.json({ status: 'received' });
});

app.listen(3000);

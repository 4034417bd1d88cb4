"""The partner guide's section 4 sender, as written.

Two changes only, so it can run at all: the guide forgets ``import os`` and
``import time``, and its hard-coded URL (api.nuestro-sistema.com) becomes
``WEBHOOK_URL``, which the test points at webhookd on 127.0.0.1.
"""
import os
import time

import hmac
import hashlib
import json
import requests
from datetime import datetime

WEBHOOK_URL = "http://127.0.0.1:8080/webhooks/partners"


def send_webhook_to_partner(event_type: str, payload: dict):
    """
    Envía webhook a nuestro sistema
    """

    # URL donde nuestro grupo recibe webhooks
    webhook_url = WEBHOOK_URL

    # Tu shared_secret (guardado en env vars)
    shared_secret = os.getenv("PARTNER_SHARED_SECRET")

    # Serializar payload
    payload_str = json.dumps(payload, sort_keys=True, separators=(',', ':'))

    # Generar firma
    signature = hmac.new(
        shared_secret.encode('utf-8'),
        payload_str.encode('utf-8'),
        hashlib.sha256
    ).hexdigest()

    # Headers
    headers = {
        "X-Webhook-Signature": signature,
        "X-Webhook-Event": event_type,
        "Content-Type": "application/json",
        "User-Agent": "TuGrupoWebhooks/1.0"
    }

    # Enviar con reintentos
    for attempt in range(3):
        try:
            response = requests.post(
                webhook_url,
                json=payload,
                headers=headers,
                timeout=10
            )

            if response.status_code == 200:
                print(f"✅ Webhook enviado: {event_type}")
                return True

            print(f"⚠️ Intento {attempt+1} falló: {response.status_code}")
        except requests.RequestException as e:
            print(f"⚠️ Error de conexión: {e}")

        # Esperar antes de reintentar (exponential backoff)
        if attempt < 2:
            time.sleep(2 ** attempt)

    return False


def tour_payload():
    # Ejemplo de uso
    return {
        "event": "tour.purchased",
        "timestamp": int(datetime.now().timestamp()),
        "tour_id": "tour_xyz789",
        "tour_name": "Montaña Blanca",
        "buyer_email": "turista@example.com",
        "buyer_name": "María González",
        "purchase_date": "2024-01-02T10:30:00Z",
        "price": 250.00
    }

"""The partner guide's own example payloads (section 3), accents and 150.0 included."""

PAYMENT_SUCCESS = {
    "event": "payment.success",
    "timestamp": 1704186000,
    "transaction_id": "txn_abc123def456",
    "amount": 150.0,
    "currency": "USD",
    "user_id": "user_uuid_here",
    "user_email": "cliente@example.com",
    "user_name": "Juan Pérez",
    "metadata": {
        "tour_id": "tour_uuid_here",
        "tour_name": "Amazonía Premium",
        "destination": "Amazonía",
        "reservation_id": "res_uuid_here",
        "start_date": "2024-02-15",
        "end_date": "2024-02-18",
        "num_people": 4,
    },
    "provider": "stripe",
}

BOOKING_CONFIRMED = {
    "event": "booking.confirmed",
    "timestamp": 1704186000,
    "booking_id": "res_uuid_here",
    "tour_id": "tour_uuid_here",
    "tour_name": "Galápagos Explorer",
    "user_id": "user_uuid_here",
    "user_email": "cliente@example.com",
    "start_date": "2024-03-10",
    "end_date": "2024-03-15",
    "total_participants": 2,
    "status": "confirmed",
    "payment_status": "completed",
}

PAYMENT_FAILED = {
    "event": "payment.failed",
    "timestamp": 1704186000,
    "transaction_id": "txn_failed_123",
    "reason": "insufficient_funds",
    "user_id": "user_uuid_here",
    "user_email": "cliente@example.com",
    "amount": 100.0,
    "attempted_at": "2024-01-02T10:30:00Z",
}

GUIDE_EVENTS = [PAYMENT_SUCCESS, BOOKING_CONFIRMED, PAYMENT_FAILED]
ALL_OUTBOUND = ["payment.success", "payment.failed", "booking.confirmed", "booking.cancelled"]

# Not in the guide: "/" in strings (URLs) and nested metadata with a 50.0 deposit. PHP's
# json_encode prints "/" as "\/", so the guide's PHP receiver cannot verify this one.
BOOKING_CANCELLED_WITH_URL = {
    "event": "booking.cancelled",
    "timestamp": 1704186000,
    "booking_id": "res_uuid_here",
    "user_id": "user_uuid_here",
    "reason": "weather",
    "refund_url": "https://pagos.example.com/refunds/res_uuid_here?lang=es",
    "metadata": {
        "tour_name": "Montaña Blanca",
        "links": {"itinerary": "https://example.com/tours/montana-blanca/itinerary"},
        "num_people": 3,
        "deposit": 50.0,
    },
}

"""Canonical JSON and signatures, against vectors computed independently with openssl:

    printf '%s' '<canonical body>' | openssl dgst -sha256 -hmac '<secret>'
"""

import json
from datetime import UTC

import pytest
import standardwebhooks

import signing

SECRET = "sk_live_test_secret"
GUIDE_PAYLOAD = {"event": "payment.success", "amount": 150.0, "currency": "USD", "user_name": "Juan Pérez"}
GUIDE_CANONICAL = b'{"amount":150.0,"currency":"USD","event":"payment.success","user_name":"Juan P\\u00e9rez"}'


def test_canonical_is_the_guides_serialization_with_accents_and_float_150_0():
    assert signing.canonical(GUIDE_PAYLOAD) == GUIDE_CANONICAL
    assert signing.canonical(GUIDE_PAYLOAD) == json.dumps(
        GUIDE_PAYLOAD, sort_keys=True, separators=(",", ":")).encode()


def test_hex_signature_matches_openssl_vector():
    assert signing.sign_hex(SECRET, GUIDE_CANONICAL) == (
        "a8f205beed4fb92af9db6a2b58f1e66340279b4d46ce1f07561de9ab9d6aa685")


def test_guide_troubleshooting_example_vector():
    body = signing.canonical({"event": "test", "data": 123})
    assert signing.sign_hex("test_secret", body) == (
        "6d2c88f3cf5e2ab91f79fbde2f24d550ba260b1271f66ddf45bcd7de350ac9cc")


def test_standard_webhooks_signature_matches_openssl_vector():
    assert signing.standard_signature(SECRET, "evt_1", 1704186000, GUIDE_CANONICAL) == (
        "v1,GSF8QRpCKEp5h6tVBgAaVHolp/xFpq/COkG7MqxO+6Y=")
    assert signing.standard_webhooks_secret(SECRET) == "whsec_c2tfbGl2ZV90ZXN0X3NlY3JldA=="


def test_official_standardwebhooks_library_verifies_our_headers():
    import time

    ts = int(time.time())
    header = signing.standard_signature_header([SECRET, "sk_live_old"], "evt_42", ts, GUIDE_CANONICAL)
    assert header.count("v1,") == 2
    verifier = standardwebhooks.Webhook(signing.standard_webhooks_secret(SECRET))
    headers = {"webhook-id": "evt_42", "webhook-timestamp": str(ts), "webhook-signature": header}
    assert verifier.verify(GUIDE_CANONICAL, headers) == GUIDE_PAYLOAD
    old_only = standardwebhooks.Webhook(signing.standard_webhooks_secret("sk_live_old"))
    assert old_only.verify(GUIDE_CANONICAL, headers) == GUIDE_PAYLOAD
    stranger = standardwebhooks.Webhook(signing.standard_webhooks_secret("sk_live_other"))
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        stranger.verify(GUIDE_CANONICAL, headers)


def test_standard_signature_matches_agrees_with_the_official_library():
    """Our receiver-side check (used by `webhookd listen`) accepts what the official library
    signs, and refuses another secret, a stale or malformed timestamp and a changed body."""
    from datetime import datetime

    now = 1704186000
    official = standardwebhooks.Webhook(signing.standard_webhooks_secret(SECRET))
    header = official.sign("evt_42", datetime.fromtimestamp(now, tz=UTC), GUIDE_CANONICAL.decode())
    assert signing.standard_signature_matches(SECRET, "evt_42", str(now), GUIDE_CANONICAL, header, now + 299)
    assert signing.standard_signature_matches(SECRET, "evt_42", str(now), GUIDE_CANONICAL,
                                              "v1,bm90IGl0 " + header, now)  # any one of several
    assert not signing.standard_signature_matches("sk_live_other", "evt_42", str(now), GUIDE_CANONICAL, header, now)
    assert not signing.standard_signature_matches(SECRET, "evt_42", str(now), GUIDE_CANONICAL, header, now + 301)
    assert not signing.standard_signature_matches(SECRET, "evt_42", "17e8", GUIDE_CANONICAL, header, now)
    assert not signing.standard_signature_matches(SECRET, "evt_43", str(now), GUIDE_CANONICAL, header, now)
    assert not signing.standard_signature_matches(SECRET, "evt_42", str(now), GUIDE_CANONICAL + b" ", header, now)


def test_verify_accepts_raw_body_and_the_guides_requests_json_body():
    # The guide's sender signs the canonical string but posts json.dumps(payload) bytes.
    sent_body = json.dumps(GUIDE_PAYLOAD).encode()
    assert sent_body != GUIDE_CANONICAL
    signature = signing.sign_hex(SECRET, GUIDE_CANONICAL)
    assert signing.verify(SECRET, sent_body, json.loads(sent_body), signature)
    raw_signature = signing.sign_hex(SECRET, sent_body)
    assert signing.verify(SECRET, sent_body, json.loads(sent_body), raw_signature)


@pytest.mark.parametrize("bad", ["", "00", "é" * 64, "a8f2" * 100, "zz" * 32,
                                 "a8f205beed4fb92af9db6a2b58f1e66340279b4d46ce1f07561de9ab9d6aa686"])
def test_verify_refuses_wrong_or_odd_signatures_without_raising(bad):
    assert signing.verify(SECRET, GUIDE_CANONICAL, GUIDE_PAYLOAD, bad) is False


def test_verify_refuses_the_right_signature_under_another_secret():
    signature = signing.sign_hex(SECRET, GUIDE_CANONICAL)
    assert not signing.verify("sk_live_other", GUIDE_CANONICAL, GUIDE_PAYLOAD, signature)


@pytest.mark.parametrize("raw, fragment", [
    (b'{"a": NaN}', "NaN"),
    (b'{"a": Infinity}', "Infinity"),
    (b'{"a": -Infinity}', "-Infinity"),
    (b'{"a": 1, "a": 2}', "twice"),
    (b'\xff\xfe{}', "UTF-8"),
    (b'{"a": ', "not valid JSON"),
    (b"[" * 40 + b"]" * 40, "nested too deeply"),
    (b"[" * 100000, "nested too deeply"),
    (b'{"a": 1e400}', "too large for a float"),
    (b'{"a": -1e400}', "too large for a float"),
    (b'{"a": ' + b"9" * 5000 + b"}", "not acceptable JSON"),
    (b'{"a": "x\\ud800"}', "surrogate"),
    (b'{"\\udfff": 1}', "surrogate"),
])
def test_parse_json_is_strict(raw, fragment):
    with pytest.raises(signing.BadJSON) as caught:
        signing.parse_json(raw)
    assert fragment in str(caught.value)


def test_parse_json_keeps_unicode_and_floats():
    assert signing.parse_json('{"name":"Juan Pérez","amount":150.0}'.encode()) == {
        "name": "Juan Pérez", "amount": 150.0}




def test_parse_json_walks_only_what_could_fail_and_still_refuses_it():
    """The walk that checks depth and lone surrogates is skipped when a bracket count and a scan for
    surrogate escapes say it cannot fail: a value exactly as deep as allowed, brackets inside a
    string, an escaped emoji (a surrogate pair, which is valid) still parse; one level more, or a
    lone surrogate among many other escapes, is still refused."""
    assert signing.parse_json(b"[" * 4 + b"]" * 4, max_depth=4) == [[[[]]]]
    assert signing.parse_json(b'{"a": "[[[[[{{{{{"}', max_depth=2) == {"a": "[[[[[{{{{{"}
    assert signing.parse_json(b'{"e": "\\ud83d\\ude00 \\u00eda"}') == {"e": "\U0001F600 \u00eda"}
    with pytest.raises(signing.BadJSON, match="nested too deeply"):
        signing.parse_json(b"[" * 5 + b"]" * 5, max_depth=4)
    with pytest.raises(signing.BadJSON, match="surrogate"):
        signing.parse_json(b'{"a": "\\u00ed\\u00e1 \\uDBFF x"}')


def test_verify_a_canonical_body_with_one_comparison_and_a_raw_one_with_both():
    """A body that already is canonical is one comparison (the same bytes twice); a raw body that is
    not still verifies under either signature, and a wrong one under neither."""
    raw = b'{ "b": 1, "a": 2 }'
    parsed = signing.parse_json(raw)
    canonical = signing.canonical(parsed)
    assert signing.verify(SECRET, canonical, parsed, signing.sign_hex(SECRET, canonical))
    assert signing.verify(SECRET, raw, parsed, signing.sign_hex(SECRET, raw))
    assert signing.verify(SECRET, raw, parsed, signing.sign_hex(SECRET, canonical))
    assert not signing.verify(SECRET, raw, parsed, signing.sign_hex("sk_live_other", raw))
    assert not signing.verify(SECRET, canonical, parsed, signing.sign_hex("sk_live_other", canonical))

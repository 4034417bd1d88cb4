"""Rotating the admin token: `webhookd token --rotate` issues a new one, the running server takes
it at once, the old one keeps working for the overlap and then stops; neither is ever logged.
`--revoke-old` (or an overlap of 0) ends the old one at once, a second rotation ends the token
from two rotations ago, and the /ws tokens an admin token signs end with it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import config
import signing
from conftest import bearer, wait_for, webhookd_cli

FILE_TOKEN = dict(WEBHOOKD_ADMIN_TOKEN="")   # the generated token file beside the database, not the config's


def status(serve, token: str) -> int:
    return httpx.get(serve.url + "/stats", headers=bearer(token), timeout=10).status_code


def forged_ws_token(admin_token: str, user_id: str) -> str:
    """A /ws token made offline from an admin token, the way webhookd derived its signing key
    (HMAC-SHA256 of "webhookd realtime tokens" keyed with the admin token), without asking it."""
    key = hmac.new(admin_token.encode(), b"webhookd realtime tokens", hashlib.sha256).digest()
    claims = json.dumps({"u": user_id, "exp": int(time.time()) + 900}, separators=(",", ":")).encode()
    body = base64.urlsafe_b64encode(claims).decode().rstrip("=")
    return f"{body}.{hmac.new(key, body.encode(), hashlib.sha256).hexdigest()}"


def minted_ws_token(serve, admin_token: str, user_id: str) -> str:
    r = httpx.post(serve.url + "/realtime/tokens", headers=bearer(admin_token),
                   json={"user_id": user_id}, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["token"]


def ws_clients(serve, admin_token: str) -> int:
    metrics = httpx.get(serve.url + "/metrics", headers=bearer(admin_token), timeout=10).text
    return int(float(re.search(r"^webhookd_websocket_clients (\S+)$", metrics, re.M).group(1)))


def open_ws(serve, ws_token: str):
    return connect(serve.url.replace("http://", "ws://") + "/ws", subprotocols=["webhookd", f"token.{ws_token}"],
                   open_timeout=5)


def assert_ws_accepts(serve, ws_token: str, admin_token: str) -> None:
    """/ws takes the token: the connection counts among the server's clients."""
    with open_ws(serve, ws_token):
        wait_for(lambda: ws_clients(serve, admin_token) == 1, timeout=10)
    wait_for(lambda: ws_clients(serve, admin_token) == 0, timeout=10)


def assert_ws_refuses(serve, ws_token: str) -> None:
    """/ws closes the connection with 1008, as for any token it did not sign."""
    with open_ws(serve, ws_token) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1008 and "not one this server signed" in closed.value.rcvd.reason


def promote_to_everyone(serve, partner: dict, tour_id: str) -> None:
    """The partner's signed tour.promoted naming no user: an offer for every /ws connection."""
    body = json.dumps({"event": "tour.promoted", "tour_id": tour_id}).encode()
    r = httpx.post(serve.url + "/webhooks/partners", content=body, timeout=10, headers={
        "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body), "X-Webhook-Event": "tour.promoted",
        "X-Partner-Id": partner["partner_id"]})
    assert r.status_code == 200, r.text


def test_a_rotated_admin_token_overlaps_then_the_old_one_stops_and_neither_is_logged(serve_factory):
    # The token from the file beside the database (not set in the config), with a 3 s overlap.
    serve = serve_factory(**FILE_TOKEN, WEBHOOKD_SECURITY_ADMIN_TOKEN_OVERLAP_S="3", WEBHOOKD_SERVER_ACCESS_LOG="true")
    old = webhookd_cli(serve.env, "token").stdout.strip()
    assert old.startswith("adm_") and status(serve, old) == 200
    ws_token = minted_ws_token(serve, old, "ana")
    rotated = webhookd_cli(serve.env, "token", "--rotate")
    assert rotated.returncode == 0 and "keeps working until" in rotated.stderr, rotated.stderr
    new = rotated.stdout.strip()
    assert new.startswith("adm_") and new != old
    assert webhookd_cli(serve.env, "token").stdout.strip() == new
    wait_for(lambda: status(serve, new) == 200, timeout=10)   # the running server reads it again within a second
    assert status(serve, old) == 200                          # the overlap
    wait_for(lambda: status(serve, old) == 401, timeout=20)   # the overlap ran out
    assert status(serve, new) == 200 and status(serve, "adm_" + "x" * 43) == 401
    assert_ws_refuses(serve, ws_token)                        # the /ws token the old one signed went with it
    logged = serve.output()
    assert old not in logged and new not in logged and "GET /stats" in logged   # access log on, tokens out


def test_revoke_old_ends_the_old_token_and_every_ws_token_it_could_sign_at_once(serve_factory):
    """A leaked admin token: `--rotate --revoke-old` and it is refused within the re-read second,
    and so is a /ws token it minted or one forged offline from it (the key derived from it)."""
    serve = serve_factory(**FILE_TOKEN)   # the default overlap, a day: --revoke-old overrides it
    leaked = webhookd_cli(serve.env, "token").stdout.strip()
    partner = httpx.post(serve.url + "/partners/register", headers=bearer(leaked), json={
        "partner_name": "Promo Tours", "webhook_url": "http://127.0.0.1:9/hook", "events": ["payment.success"]}).json()
    minted, forged = minted_ws_token(serve, leaked, "ana"), forged_ws_token(leaked, "ana")
    assert_ws_accepts(serve, minted, leaked)
    assert_ws_accepts(serve, forged, leaked)   # the forgery is well made: before the revocation it passes

    with open_ws(serve, forged_ws_token(leaked, "mallory")) as held:   # opened before, held across the revocation
        wait_for(lambda: ws_clients(serve, leaked) == 1, timeout=10)
        revoked = webhookd_cli(serve.env, "token", "--rotate", "--revoke-old")
        assert revoked.returncode == 0 and "revoked" in revoked.stderr, revoked.stderr
        new = revoked.stdout.strip()
        assert new.startswith("adm_") and new != leaked and leaked not in revoked.stdout + revoked.stderr
        wait_for(lambda: status(serve, leaked) == 401, timeout=10)
        assert status(serve, new) == 200
        with open_ws(serve, minted_ws_token(serve, new, "ana")) as ana:
            wait_for(lambda: ws_clients(serve, new) == 2, timeout=10)
            promote_to_everyone(serve, partner, "tour_1")
            assert json.loads(ana.recv(timeout=10))["tour_id"] == "tour_1"
            with pytest.raises(ConnectionClosed) as closed:   # closed before the offer, which it never gets
                held.recv(timeout=10)
            assert closed.value.rcvd.code == 1008 and "revoked" in closed.value.rcvd.reason
    assert_ws_refuses(serve, minted)
    assert_ws_refuses(serve, forged)
    assert_ws_refuses(serve, forged_ws_token(leaked, "ben"))                        # nor can it sign new ones
    assert_ws_accepts(serve, minted_ws_token(serve, new, "ana"), new)               # the new one can
    assert leaked not in serve.output() and new not in serve.output()


def test_an_overlap_of_zero_in_the_config_revokes_at_every_rotation(serve_factory):
    serve = serve_factory(**FILE_TOKEN, WEBHOOKD_SECURITY_ADMIN_TOKEN_OVERLAP_S="0")
    old = webhookd_cli(serve.env, "token").stdout.strip()
    assert status(serve, old) == 200
    rotated = webhookd_cli(serve.env, "token", "--rotate")
    assert rotated.returncode == 0 and "revoked" in rotated.stderr, rotated.stderr
    wait_for(lambda: status(serve, old) == 401, timeout=10)
    assert status(serve, rotated.stdout.strip()) == 200


def test_rotating_again_during_the_overlap_ends_the_token_from_two_rotations_ago(serve_factory):
    """One previous token at most: the second rotation keeps the first one's token for the overlap
    and ends the original at once (whoever rotated twice has moved off it), and says so."""
    serve = serve_factory(**FILE_TOKEN)   # a day of overlap
    first = webhookd_cli(serve.env, "token").stdout.strip()
    once = webhookd_cli(serve.env, "token", "--rotate")
    assert once.returncode == 0 and "stopped working" not in once.stderr, once.stderr
    second = once.stdout.strip()
    wait_for(lambda: status(serve, second) == 200, timeout=10)
    assert status(serve, first) == 200                         # the first rotation's overlap runs
    twice = webhookd_cli(serve.env, "token", "--rotate")
    assert twice.returncode == 0 and "stopped working now" in twice.stderr, twice.stderr
    third = twice.stdout.strip()
    assert len({first, second, third}) == 3
    wait_for(lambda: status(serve, first) == 401, timeout=10)  # two rotations ago: gone at once
    assert status(serve, second) == 200 and status(serve, third) == 200


def test_revoke_old_goes_with_rotate_and_a_negative_overlap_is_refused(serve_factory, tmp_path):
    serve = serve_factory(**FILE_TOKEN)
    alone = webhookd_cli(serve.env, "token", "--revoke-old")
    assert alone.returncode == 2 and "--rotate --revoke-old" in alone.stderr and not alone.stdout
    config.load_config(None, {"WEBHOOKD_SECURITY_ADMIN_TOKEN_OVERLAP_S": "0"})   # zero is allowed
    with pytest.raises(config.ConfigError, match="security.admin_token_overlap_s.*zero or more"):
        config.load_config(None, {"WEBHOOKD_SECURITY_ADMIN_TOKEN_OVERLAP_S": "-1"})


def test_a_token_set_in_the_config_is_changed_there(serve_factory):
    serve = serve_factory()   # WEBHOOKD_ADMIN_TOKEN is set
    refused = webhookd_cli(serve.env, "token", "--rotate")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "change it there" in refused.stderr


def test_a_token_set_in_the_config_keeps_the_previous_one_while_everyone_switches(serve_factory):
    """Several processes share a token set in the config: the new one there, the old one in
    security.admin_token_previous, both accepted; without the previous one, only the new."""
    from conftest import ADMIN_TOKEN

    new = "adm_new_0123456789abcdefghijklmnopqrstu"
    both = serve_factory(WEBHOOKD_ADMIN_TOKEN=new, WEBHOOKD_SECURITY_ADMIN_TOKEN_PREVIOUS=ADMIN_TOKEN)

    assert status(both, new) == 200 and status(both, ADMIN_TOKEN) == 200
    both.stop()
    only_new = serve_factory(WEBHOOKD_ADMIN_TOKEN=new)
    assert status(only_new, new) == 200 and status(only_new, ADMIN_TOKEN) == 401
    assert ADMIN_TOKEN not in both.output() + only_new.output() and new not in both.output() + only_new.output()

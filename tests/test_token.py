"""Rotating the admin token: `webhookd token --rotate` issues a new one, the running server takes
it at once, the old one keeps working for the overlap and then stops; neither is ever logged."""

from __future__ import annotations

import httpx

from conftest import wait_for, webhookd_cli


def test_a_rotated_admin_token_overlaps_then_the_old_one_stops_and_neither_is_logged(serve_factory):
    # The token from the file beside the database (not set in the config), with a 3 s overlap.
    serve = serve_factory(WEBHOOKD_ADMIN_TOKEN="", WEBHOOKD_SECURITY_ADMIN_TOKEN_OVERLAP_S="3",
                          WEBHOOKD_SERVER_ACCESS_LOG="true")

    def status(token: str) -> int:
        return httpx.get(serve.url + "/stats", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code

    old = webhookd_cli(serve.env, "token").stdout.strip()
    assert old.startswith("adm_") and status(old) == 200
    rotated = webhookd_cli(serve.env, "token", "--rotate")
    assert rotated.returncode == 0 and "keeps working until" in rotated.stderr, rotated.stderr
    new = rotated.stdout.strip()
    assert new.startswith("adm_") and new != old
    assert webhookd_cli(serve.env, "token").stdout.strip() == new
    wait_for(lambda: status(new) == 200, timeout=10)      # the running server reads it again within a second
    assert status(old) == 200                             # the overlap
    again = webhookd_cli(serve.env, "token", "--rotate")  # the overlap the first rotation promised is running
    assert again.returncode == 1 and "rotate again after that" in again.stderr
    wait_for(lambda: status(old) == 401, timeout=20)      # the overlap ran out
    assert status(new) == 200 and status("adm_" + "x" * 43) == 401
    logged = serve.output()
    assert old not in logged and new not in logged and "GET /stats" in logged   # access log on, tokens out


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

    def status(serve, token: str) -> int:
        return httpx.get(serve.url + "/stats", headers={"Authorization": f"Bearer {token}"}, timeout=10).status_code

    assert status(both, new) == 200 and status(both, ADMIN_TOKEN) == 200
    both.stop()
    only_new = serve_factory(WEBHOOKD_ADMIN_TOKEN=new)
    assert status(only_new, new) == 200 and status(only_new, ADMIN_TOKEN) == 401
    assert ADMIN_TOKEN not in both.output() + only_new.output() and new not in both.output() + only_new.output()

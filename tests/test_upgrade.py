"""Upgrades: `webhookd migrate` on a database made by the previous schema version (built here from
the recorded migrations, with its data in it) applies what is missing and says so; the server
then delivers what waited. A database newer than the code is refused with one line naming the
version to run."""

from __future__ import annotations

import os
import sqlite3
import time

import httpx

import config
import signing
import store_sqlite
from conftest import ADMIN, ADMIN_TOKEN, Receiver, free_port, wait_for, webhookd_cli
from payloads import PAYMENT_SUCCESS
from storage import open_store

PREVIOUS = "partners.suspended_reason"   # the last migration of the release before this one


def previous_database(path, receiver_url: str) -> list[str]:
    """The schema as the previous release left it, with a partner and a pending delivery in it;
    the migrations it lacks."""
    names = [name for name, _ in store_sqlite.MIGRATIONS]
    done = names[:names.index(PREVIOUS) + 1]
    with sqlite3.connect(path) as db:
        for statement in store_sqlite.SCHEMA:
            db.execute(statement)
        for name, statements in store_sqlite.MIGRATIONS[:len(done)]:
            for statement in statements:
                db.execute(statement)
            db.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, 1.0))
        db.execute("""INSERT INTO partners (id, name, webhook_url, status, secret, api_key_hash, created_at, updated_at)
                      VALUES ('partner_oldtimer0001', 'Old Tours', ?, 'active', 'sk_live_old_secret', 'h', 1.0, 1.0)""",
                   (receiver_url,))
        db.execute("INSERT INTO subscriptions (partner_id, event_type) VALUES ('partner_oldtimer0001', 'payment.success')")
        db.execute("INSERT INTO events (id, type, body, fanout, created_at) VALUES ('evt_old0001', 'payment.success', ?, 1, ?)",
                   (signing.canonical(PAYMENT_SUCCESS), time.time()))
        db.execute("""INSERT INTO deliveries (id, event_id, partner_id, state, max_attempts, next_attempt_at, created_at,
                                              updated_at)
                      VALUES ('dlv_old0001', 'evt_old0001', 'partner_oldtimer0001', 'pending', 3, 0, ?, ?)""",
                   (time.time(), time.time()))
    return names[len(done):]


def test_migrate_upgrades_a_previous_database_and_the_server_delivers_what_waited(serve_factory, tmp_path):
    receiver_port = free_port()
    path = tmp_path / "old.db"
    missing = previous_database(path, f"http://127.0.0.1:{receiver_port}/hook")
    assert len(missing) >= 5
    env = {**os.environ, "WEBHOOKD_STORAGE_PATH": str(path), "WEBHOOKD_ADMIN_TOKEN": ADMIN_TOKEN}
    first = webhookd_cli(env, "migrate")
    assert first.returncode == 0, first.stderr
    assert f"applied {len(missing)} migrations" in first.stdout and ", ".join(missing) in first.stdout
    again = webhookd_cli(env, "migrate")
    assert again.returncode == 0 and "up to date" in again.stdout
    with sqlite3.connect(path) as db:
        versions = dict(db.execute("SELECT name, version FROM schema_migrations"))
    assert {versions[name] for name in missing} == {config.VERSION} and versions[PREVIOUS] is None

    receiver = Receiver(secret="sk_live_old_secret", port=receiver_port).start()
    try:
        serve = serve_factory(WEBHOOKD_STORAGE_PATH=str(path))
        wait_for(lambda: "evt_old0001" in receiver.event_ids, timeout=30)
        assert receiver.received[0].guide_ok
        shown = httpx.get(serve.url + "/partners/partner_oldtimer0001", headers=ADMIN).json()
        assert shown["ordering"] == "concurrent" and shown["channels"] == [] and shown["contact_email"] is None
    finally:
        receiver.stop()


def test_a_database_newer_than_the_code_is_refused_with_one_line_naming_the_version(tmp_path):
    path = tmp_path / "new.db"
    open_store(str(path)).close()
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations (name, applied_at, version) VALUES ('from.the.future', 1.0, '9.9.9')")
    env = {**os.environ, "WEBHOOKD_STORAGE_PATH": str(path), "WEBHOOKD_ADMIN_TOKEN": ADMIN_TOKEN}
    for command in (["migrate"], ["serve", "--port", str(free_port())]):
        done = webhookd_cli(env, *command)
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and "run webhookd 9.9.9 or newer" in done.stderr, done.stderr
        assert "from.the.future" in done.stderr and "Traceback" not in done.stderr

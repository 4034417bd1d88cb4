"""`webhookd backup` while a publishing burst runs, `webhookd restore` into a fresh folder, and a
server started on the restored file: every event accepted before the backup began is in it, and
its pending deliveries go out. A restore under a running server is refused. A backup or restore
stopped midway leaves nothing at its path, and what it leaves beside it only its owner can read;
a restore names the credentials it brings back that were revoked after the backup."""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN, ROOT, Receiver, free_port, wait_for, webhookd_cli
from payloads import PAYMENT_SUCCESS

pytestmark = pytest.mark.slow
RETRYING = dict(WEBHOOKD_DELIVERY_MAX_ATTEMPTS="100", WEBHOOKD_DELIVERY_BACKOFF_BASE_S="0.5",
                WEBHOOKD_DELIVERY_BACKOFF_MAX_S="1")


def test_a_backup_taken_during_a_burst_restores_every_accepted_event_and_its_deliveries_go_out(serve_factory,
                                                                                                tmp_path):
    receiver_port = free_port()   # nobody listens yet: every delivery stays pending, retrying
    serve = serve_factory(**RETRYING)
    r = httpx.post(serve.url + "/partners/register", headers=ADMIN, json={
        "partner_name": "Backup Tours", "webhook_url": f"http://127.0.0.1:{receiver_port}/hook",
        "events": ["payment.success"]})
    assert r.status_code == 201, r.text
    partner = r.json()

    accepted: list[tuple[str, float]] = []   # (event id, when its 202 came back)
    stop = threading.Event()

    def burst() -> None:
        with httpx.Client(base_url=serve.url, headers=ADMIN, timeout=10) as client:
            for i in range(2000):
                if stop.is_set():
                    return
                answer = client.post("/events", json={**PAYMENT_SUCCESS, "transaction_id": f"t{i}"})
                assert answer.status_code == 202, answer.text
                accepted.append((answer.json()["event_id"], time.time()))

    publisher = threading.Thread(target=burst, daemon=True)
    publisher.start()
    try:
        wait_for(lambda: len(accepted) >= 100, timeout=60)
        began = time.time()
        backup = tmp_path / "backup" / "webhookd.db"
        backup.parent.mkdir()
        done = webhookd_cli(serve.env, "backup", str(backup))
        assert done.returncode == 0 and "backed up" in done.stdout, done.stderr
        wait_for(lambda: accepted and accepted[-1][1] > time.time() - 0.5 and len(accepted) > 150, timeout=60)
    finally:
        stop.set()
        publisher.join(timeout=30)
    assert not publisher.is_alive()
    before = [event_id for event_id, at in accepted if at < began]
    during = len(accepted) - len(before)
    assert len(before) >= 100 and during > 0, "the burst must go on while the backup runs"

    # Restoring over the live file is refused while its server runs (it holds the file's lock), naming it.
    refused = webhookd_cli(serve.env, "restore", str(backup), "--replace")
    assert refused.returncode == 1, refused.stderr
    assert f"a webhookd server (pid {serve.proc.pid} on " in refused.stderr, refused.stderr
    assert f"at {serve.url}) is serving" in refused.stderr and "stop it first, then restore" in refused.stderr

    fresh = {**serve.env, "WEBHOOKD_STORAGE_PATH": str(tmp_path / "fresh" / "webhookd.db")}
    restored = webhookd_cli(fresh, "restore", str(backup))
    assert restored.returncode == 0, restored.stderr
    with sqlite3.connect(fresh["WEBHOOKD_STORAGE_PATH"]) as db:
        stored = {row[0] for row in db.execute("SELECT id FROM events")}
        pending = {row[0] for row in db.execute("SELECT event_id FROM deliveries WHERE state = 'pending'")}
    assert set(before) <= stored and set(before) <= pending

    serve.stop()
    receiver = Receiver(secret=partner["shared_secret"], port=receiver_port).start()
    try:
        again = serve_factory(WEBHOOKD_STORAGE_PATH=fresh["WEBHOOKD_STORAGE_PATH"], **RETRYING)
        wait_for(lambda: set(before) <= set(receiver.event_ids), timeout=120)
        assert all(r.guide_ok for r in receiver.received)    # the restored secret signs
        wait_for(lambda: httpx.get(again.url + "/stats", headers=ADMIN).json()["totals"]["pending"] == 0, timeout=120)
    finally:
        receiver.stop()


# --- Stopped midway -------------------------------------------------------------------------

MAX_FILE_BYTES = 256 * 1024   # the copies below stop once they have written this much


def webhookd_cli_stopped_midway(env: dict[str, str], *args: str, killed: bool) -> subprocess.CompletedProcess:
    """`webhookd ARGS` in a process that may not make a file larger than MAX_FILE_BYTES
    (RLIMIT_FSIZE): the write past it kills the process (SIGXFSZ, ``killed``) or fails with EFBIG
    (SIGXFSZ ignored, as Python does by default). Copying a larger database then stops midway, at
    a point that depends on the bytes written, not on timing."""
    code = ("import resource, signal, sys; sys.dont_write_bytecode = True; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({MAX_FILE_BYTES}, {MAX_FILE_BYTES})); "
            "resource.setrlimit(resource.RLIMIT_CORE, (0, 0)); "
            f"signal.signal(signal.SIGXFSZ, signal.{'SIG_DFL' if killed else 'SIG_IGN'}); "
            "import cli; sys.exit(cli.main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, "--config", str(ROOT / "webhookd.toml"), *args],
                          capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=120)


def fill(serve, events: int = 1000) -> dict:
    """A partner (its secret is what a backup must not show) and enough pending deliveries that
    the database is several times MAX_FILE_BYTES."""
    partner = httpx.post(serve.url + "/partners/register", headers=ADMIN, timeout=10, json={
        "partner_name": "Secret Tours", "webhook_url": f"http://127.0.0.1:{free_port()}/hook",
        "events": ["payment.success"]}).json()
    for start in range(0, events, 200):   # 200 events a batch stay under max_body_bytes
        batch = [{**PAYMENT_SUCCESS, "transaction_id": f"t{i}", "user_name": "x" * 400}
                 for i in range(start, start + 200)]
        r = httpx.post(serve.url + "/events/batch", headers=ADMIN, json={"events": batch}, timeout=60)
        assert r.status_code == 202 and r.json()["accepted"] == 200, r.text
    return partner


def private_leftovers(folder: Path, of: str) -> list[Path]:
    """What a stopped copy to ``folder/of`` left beside it (its ``.<of>.*`` files); each must be
    readable by its owner only."""
    left = [f for f in folder.iterdir() if f.name.startswith(f".{of}.")]
    modes = {f.name: stat.filemode(f.stat().st_mode) for f in left}
    assert all(mode == "-rw-------" for mode in modes.values()), modes
    return left


def query(path: Path, sql: str) -> Any:
    with closing(sqlite3.connect(path)) as db:
        return db.execute(sql).fetchone()[0]


def test_a_backup_stopped_midway_leaves_nothing_at_its_path_and_nothing_others_can_read(serve_factory, tmp_path):
    serve = serve_factory()
    fill(serve)
    size = query(Path(serve.env["WEBHOOKD_STORAGE_PATH"]),
                 "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()")
    assert size > 4 * MAX_FILE_BYTES
    folder = tmp_path / "backups"
    folder.mkdir(mode=0o755)
    target = folder / "webhookd.db"

    killed = webhookd_cli_stopped_midway(serve.env, "backup", str(target), killed=True)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr
    assert not target.exists()                           # no partial backup where a whole one is expected
    assert [f.name for f in folder.iterdir() if not f.name.startswith(".webhookd.db.")] == []
    left = private_leftovers(folder, "webhookd.db")
    assert max(f.stat().st_size for f in left) > MAX_FILE_BYTES // 2   # well under way, and 0600 from the start

    failed = webhookd_cli_stopped_midway(serve.env, "backup", str(target), killed=False)
    assert failed.returncode == 1 and "nothing was written" in failed.stderr and "Traceback" not in failed.stderr
    assert not target.exists() and sorted(folder.iterdir()) == sorted(left)   # a failure cleans up after itself

    done = webhookd_cli(serve.env, "backup", str(target))
    assert done.returncode == 0, done.stderr
    assert stat.filemode(target.stat().st_mode) == "-rw-------"
    assert query(target, "SELECT COUNT(*) FROM events") == 1000


def test_a_restore_stopped_midway_leaves_nothing_at_storage_path_or_the_database_it_replaces(serve_factory, tmp_path):
    serve = serve_factory()
    fill(serve)
    backup = tmp_path / "webhookd-backup.db"
    assert webhookd_cli(serve.env, "backup", str(backup)).returncode == 0
    serve.stop()

    fresh_folder = tmp_path / "fresh"
    fresh = {**serve.env, "WEBHOOKD_STORAGE_PATH": str(fresh_folder / "webhookd.db")}
    killed = webhookd_cli_stopped_midway(fresh, "restore", str(backup), killed=True)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr
    assert not (fresh_folder / "webhookd.db").exists()
    assert private_leftovers(fresh_folder, "webhookd.db")

    live = Path(serve.env["WEBHOOKD_STORAGE_PATH"])
    with closing(sqlite3.connect(live)) as db, db:
        db.execute("DELETE FROM deliveries WHERE rowid % 2 = 0")   # the live database differs from the backup
    deliveries = query(live, "SELECT COUNT(*) FROM deliveries")
    for killed in (True, False):
        stopped = webhookd_cli_stopped_midway(serve.env, "restore", str(backup), "--replace", killed=killed)
        assert stopped.returncode == (-signal.SIGXFSZ if killed else 1), stopped.stderr
        assert query(live, "PRAGMA integrity_check") == "ok"
        assert query(live, "SELECT COUNT(*) FROM deliveries") == deliveries   # as it was
    assert "is as it was" in stopped.stderr and "Traceback" not in stopped.stderr
    assert private_leftovers(live.parent, live.name)   # the killed one's, 0600


def test_a_restore_over_a_crashed_server_s_database_does_not_replay_its_write_ahead_log(serve_factory, tmp_path):
    """The server killed with -9 leaves its WAL beside the file; the restored file must not get
    those pages (SQLite would replay a WAL left at the name onto whatever file is there)."""
    serve = serve_factory()
    before = httpx.post(serve.url + "/partners/register", headers=ADMIN, json={
        "partner_name": "Before", "webhook_url": "http://127.0.0.1:9/hook", "events": ["payment.success"]}).json()
    backup = tmp_path / "webhookd-backup.db"
    assert webhookd_cli(serve.env, "backup", str(backup)).returncode == 0
    after = httpx.post(serve.url + "/partners/register", headers=ADMIN, json={
        "partner_name": "After", "webhook_url": "http://127.0.0.1:9/hook", "events": ["payment.success"]}).json()
    serve.stop(signal.SIGKILL)
    live = Path(serve.env["WEBHOOKD_STORAGE_PATH"])
    assert live.with_name(live.name + "-wal").stat().st_size > 0

    # The dead server's lock died with it: the restore goes ahead at once (no heartbeat to wait out).
    done = webhookd_cli(serve.env, "restore", str(backup), "--replace")
    assert done.returncode == 0, done.stderr
    assert query(live, "PRAGMA integrity_check") == "ok"
    with closing(sqlite3.connect(live)) as db:
        names = {row[0] for row in db.execute("SELECT id FROM partners")}
    assert before["partner_id"] in names and after["partner_id"] not in names



# --- What a restore brings back ----------------------------------------------------------------


def test_a_restore_names_the_keys_and_secrets_revoked_after_the_backup(serve_factory, tmp_path):
    serve = serve_factory()
    env = {**serve.env, "WEBHOOKD_SERVER_PORT": str(serve.port)}   # the operator commands find this server

    def partner(name: str) -> str:
        added = webhookd_cli(env, "partners", "add", "--name", name, "--url", "http://127.0.0.1:9/hook",
                             "--events", "payment.success", "--json")
        assert added.returncode == 0, added.stderr
        return json.loads(added.stdout)["partner_id"]

    reissued, revoked, rotated, suspended, deleted, untouched = (
        partner(name) for name in ("Reissued", "Revoked", "Rotated", "Suspended", "Deleted", "Untouched"))
    backup = tmp_path / "webhookd-backup.db"
    assert webhookd_cli(env, "backup", str(backup)).returncode == 0
    later = partner("Registered Later")
    for args in (("api-key", reissued), ("rotate", revoked, "--revoke-old"), ("rotate", rotated),
                 ("suspend", suspended, "--reason", "unpaid invoices"), ("delete", deleted, "--yes"),
                 ("api-key", later)):
        done = webhookd_cli(env, "partners", *args)
        assert done.returncode == 0, done.stderr
    serve.stop()

    restored = webhookd_cli(env, "restore", str(backup), "--replace")
    assert restored.returncode == 0 and "restored" in restored.stdout, restored.stderr
    warning = restored.stderr
    assert warning.startswith("webhookd: warning: the backup is from about ") and "brings them back" in warning
    line = {pid: next((ln for ln in warning.splitlines() if ln.strip().startswith(pid)), "")
            for pid in (reissued, revoked, rotated, suspended, deleted, untouched, later)}
    assert "(Reissued): API key reissued at" in line[reissued] and "the old key works again" in line[reissued]
    assert "(Revoked): secret rotated with the old ones revoked at" in line[revoked]
    assert "(Rotated): secret rotated at" in line[rotated] and "the secret it replaced" in line[rotated]
    assert "(Suspended): suspended at" in line[suspended]
    assert "(Deleted): deleted at" in line[deleted] and "pending deliveries" in line[deleted]
    assert line[untouched] == "" and line[later] == ""   # nothing taken away; not in the backup at all
    take_away = warning.splitlines()[-1]
    assert take_away.startswith("Once webhookd runs on the restored database, take them away again: ")
    for command in (f"webhookd partners api-key {reissued}", f"webhookd partners rotate {revoked} --revoke-old",
                    f"webhookd partners rotate {rotated};", f"webhookd partners suspend {suspended} --reason",
                    f"webhookd partners delete {deleted} --yes"):
        assert command in take_away, take_away

    again = webhookd_cli(env, "restore", str(backup), "--replace")   # now the live database is the backup
    assert again.returncode == 0 and "warning" not in again.stderr, again.stderr
    fresh = webhookd_cli({**env, "WEBHOOKD_STORAGE_PATH": str(tmp_path / "fresh" / "webhookd.db")},
                         "restore", str(backup))
    assert fresh.returncode == 0 and "no database at storage.path to compare with" in fresh.stderr

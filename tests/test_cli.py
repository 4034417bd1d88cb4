"""The command line (cli.py), run as a user runs it: `python cli.py ...` in a subprocess.

Starting and configuring (`serve`, `token`, `sign`, `--help`), the partner's local receiver
(`listen`), and the operator commands against a running `webhookd serve`."""

import json
import os
import stat
import subprocess
import sys

import httpx

from conftest import ADMIN, GUARD_DIR, ROOT, free_port, wait_for
from payloads import PAYMENT_SUCCESS

# --- Starting: serve, token, sign, help ---------------------------------------------------


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=30)


def test_serve_with_a_bad_value_stops_with_one_line(tmp_path):
    result = _cli("--config", str(ROOT / "webhookd.toml"), "serve",
                  env={"WEBHOOKD_DELIVERY_MAX_ATTEMPTS": "three", "WEBHOOKD_STORAGE_PATH": str(tmp_path / "x.db")})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["webhookd: Config 'delivery.max_attempts' has value 'three'. Expected a whole number."]


def test_config_can_follow_the_subcommand(tmp_path):
    env = {"WEBHOOKD_STORAGE_PATH": str(tmp_path / "w.db"), "WEBHOOKD_ADMIN_TOKEN": "adm_x"}
    result = _cli("token", "--config", str(ROOT / "webhookd.toml"), env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "adm_x"


def test_token_is_generated_once_into_a_private_file(tmp_path):
    env = {"WEBHOOKD_STORAGE_PATH": str(tmp_path / "d" / "w.db")}
    first = _cli("--config", str(ROOT / "webhookd.toml"), "token", env=env)
    second = _cli("--config", str(ROOT / "webhookd.toml"), "token", env=env)
    assert first.returncode == 0 and first.stdout == second.stdout
    token = first.stdout.strip()
    assert len(token) >= 32
    token_file = tmp_path / "d" / "admin_token"
    assert token_file.read_text().strip() == token
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600


def test_sign_prints_the_guides_troubleshooting_signature(tmp_path):
    result = _cli("sign", "--secret", "test_secret", '{"event": "test", "data": 123}', cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == "6d2c88f3cf5e2ab91f79fbde2f24d550ba260b1271f66ddf45bcd7de350ac9cc"


def test_catalog_prints_what_get_event_types_answers(hub):
    """The same catalog (the bundled webhookd.toml's) through the command and through the API."""
    as_json = _cli("--config", str(ROOT / "webhookd.toml"), "catalog", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == hub.http.get("/event-types", headers=ADMIN).json()
    table = _cli("--config", str(ROOT / "webhookd.toml"), "catalog")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["TYPE", "REQUIRED", "DESCRIPTION"]
    assert [line.split()[0] for line in lines[1:]] == sorted(hub.config.events)
    assert "booking_id:string,user_id:string" in lines[1]


def test_every_command_has_help():
    for command in ("serve", "token", "partners", "publish", "deliveries", "retry", "recover", "sign", "listen"):
        result = _cli(command, "--help")
        assert result.returncode == 0 and "usage: webhookd" in result.stdout


# --- listen: a partner's local receiver ---------------------------------------------------


def test_listen_verifies_a_real_delivery_three_ways(hub, tmp_path):
    port = free_port()
    partner = hub.register(f"http://127.0.0.1:{port}/", ["payment.success"])
    out = open(tmp_path / "listen.out", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "listen", "--secret", partner["shared_secret"],
         "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(GUARD_DIR)})
    try:
        wait_for(lambda: "listening on" in (tmp_path / "listen.out").read_text())
        event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
        line = wait_for(lambda: next((text for text in (tmp_path / "listen.out").read_text().splitlines()
                                      if event_id in text), None))
        assert "payment.success" in line and "raw=ok" in line and "canonical=ok" in line and "standard=ok" in line
        wait_for(lambda: hub.deliveries(event_id=event_id)[0]["state"] == "delivered")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        out.close()


def test_listen_accepts_either_secret_during_a_rotation(hub, tmp_path):
    port = free_port()
    partner = hub.register(f"http://127.0.0.1:{port}/", ["payment.success"])
    rotated = hub.http.post(f"/partners/{partner['partner_id']}/rotate-secret", headers=hub.admin).json()
    out = open(tmp_path / "listen.out", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "listen", "--secret",
         f"{rotated['shared_secret']},{partner['shared_secret']}", "--port", str(port)],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(GUARD_DIR)})
    try:
        wait_for(lambda: "listening on" in (tmp_path / "listen.out").read_text())
        event_id = hub.publish(PAYMENT_SUCCESS).json()["event_id"]
        wait_for(lambda: hub.deliveries(event_id=event_id)[0]["state"] == "delivered")
        line = next(text for text in (tmp_path / "listen.out").read_text().splitlines() if event_id in text)
        assert "raw=ok" in line and "standard=ok" in line
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        out.close()


def test_listen_refuses_a_wrong_signature_with_401(tmp_path):
    import httpx

    port = free_port()
    out = open(tmp_path / "listen.out", "w+")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "listen", "--secret", "sk_live_right", "--port", str(port)],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(GUARD_DIR)})
    try:
        wait_for(lambda: "listening on" in (tmp_path / "listen.out").read_text())
        r = httpx.post(f"http://127.0.0.1:{port}/", content=b'{"event":"x.y"}',
                       headers={"X-Webhook-Signature": "00" * 32, "X-Webhook-Event": "x.y", "X-Webhook-Id": "evt_1"})
        assert r.status_code == 401
        assert "raw=BAD" in wait_for(lambda: (tmp_path / "listen.out").read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        out.close()


def test_backup_and_restore_send_a_database_server_to_its_own_tools_and_migrate_store_wants_one(tmp_path):
    """``backup`` and ``restore`` copy one SQLite file: with ``storage.url`` set they name the
    server's own tool instead (nothing is connected to); ``migrate-store --to`` takes a server's URL."""
    server = {"WEBHOOKD_STORAGE_URL": "postgresql://webhookd@127.0.0.1:9/webhookd", "WEBHOOKD_ADMIN_TOKEN": "adm_x"}
    config = ("--config", str(ROOT / "webhookd.toml"))
    backup = _cli(*config, "backup", str(tmp_path / "copy.db"), env=server)
    restore = _cli(*config, "restore", str(tmp_path / "copy.db"), env=server)
    assert (backup.returncode, restore.returncode) == (1, 1)
    assert "pg_dump" in backup.stderr and "pg_restore" in restore.stderr
    assert not (tmp_path / "copy.db").exists()
    migrate = _cli(*config, "migrate-store", "--to", str(tmp_path / "other.db"),
                   env={"WEBHOOKD_STORAGE_PATH": str(tmp_path / "w.db")})
    assert migrate.returncode == 1 and "--to must be a PostgreSQL URL" in migrate.stderr


# --- Operator commands against a running `webhookd serve` ---------------------------------


def _run(serve, *args):
    env = {**serve.env, "WEBHOOKD_SERVER_PORT": str(serve.port)}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", str(ROOT / "webhookd.toml"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def _ok(result):
    assert result.returncode == 0, result.stderr
    return result.stdout


def _column(table, row_key, column):
    """The cell of ``column`` in the row holding ``row_key`` of a printed table."""
    lines = table.splitlines()
    start = lines[0].index(column)
    return next(line for line in lines if row_key in line)[start:].split()[0]


def test_operator_commands_work_while_the_server_runs(serve_factory, receiver_factory):
    receiver = receiver_factory(default=(500, 0))
    # Two failed attempts open the circuit for a minute: only an operator's retry probes sooner.
    serve = serve_factory(WEBHOOKD_DELIVERY_MAX_ATTEMPTS="2", WEBHOOKD_DELIVERY_BREAKER_THRESHOLD="2",
                          WEBHOOKD_DELIVERY_BREAKER_SPAN_S="0.01", WEBHOOKD_DELIVERY_BREAKER_COOLDOWN_S="60",
                          WEBHOOKD_DELIVERY_BREAKER_COOLDOWN_MAX_S="60")
    added = json.loads(_ok(_run(serve, "partners", "add", "--name", "CLI Tours", "--url", receiver.url,
                                "--events", "payment.success,booking.confirmed", "--email", "ops@cli.example.com",
                                "--json")))
    pid = added["partner_id"]
    assert added["contact_email"] == "ops@cli.example.com"
    assert added["shared_secret"].startswith("sk_live_") and added["events_subscribed"] == [
        "booking.confirmed", "payment.success"]

    table = _ok(_run(serve, "partners", "list"))
    assert table.splitlines()[0].split()[:4] == ["PARTNER_ID", "PARTNER_NAME", "STATUS", "CIRCUIT"] and pid in table
    assert _column(table, pid, "CIRCUIT") == "closed"
    assert json.loads(_ok(_run(serve, "partners", "show", pid, "--json")))["status"] == "active"
    shown = _ok(_run(serve, "partners", "show", pid))
    assert "partner_name" in shown and "shared_secret" not in shown

    event = json.loads(_ok(_run(serve, "publish", "payment.success", "--data", json.dumps(
        {k: v for k, v in PAYMENT_SUCCESS.items() if k != "event"}), "--json")))
    assert event["deliveries"] == 1
    wait_for(lambda: "failed" in _ok(_run(serve, "deliveries", "--status", "failed")))
    failed = json.loads(_ok(_run(serve, "deliveries", "--status", "failed", "--partner", pid, "--json")))["items"]
    assert len(failed) == 1 and failed[0]["event_id"] == event["event_id"]
    shown = _ok(_run(serve, "deliveries", failed[0]["delivery_id"]))
    assert "ERROR_DETAIL" in shown and shown.count("the partner answered 500") == 2
    assert _column(_ok(_run(serve, "partners", "list")), pid, "CIRCUIT") == "open"
    story = _ok(_run(serve, "trace", event["event_id"]))
    assert "#1 HTTP 500" in story and "#2 HTTP 500" in story and "no attempt left" in story and "backoff" in story

    receiver.default = (200, 0)
    assert "pending" in _ok(_run(serve, "retry", failed[0]["delivery_id"]))
    wait_for(lambda: failed[0]["delivery_id"] in _ok(_run(serve, "deliveries", "--status", "delivered")))
    assert _column(_ok(_run(serve, "partners", "list")), pid, "CIRCUIT") == "closed"  # the probe closed it
    again = _run(serve, "retry", failed[0]["delivery_id"])
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "only a failed or expired delivery" in again.stderr

    assert json.loads(_ok(_run(serve, "recover", pid, "--since", "0", "--json"))) == {"requeued": 0}
    assert json.loads(_ok(_run(serve, "partners", "pause", pid, "--json")))["status"] == "paused"
    assert json.loads(_ok(_run(serve, "partners", "resume", pid, "--json")))["status"] == "active"
    assert "--reason" in _run(serve, "partners", "suspend", pid).stderr
    suspended = json.loads(_ok(_run(serve, "partners", "suspend", pid, "--reason", "abuse report", "--json")))
    assert (suspended["status"], suspended["suspended_reason"]) == ("suspended", "abuse report")
    assert json.loads(_ok(_run(serve, "partners", "resume", pid, "--json")))["status"] == "active"
    assert json.loads(_ok(_run(serve, "partners", "pace", pid, "--max-rate", "5", "--json")))["max_rate_per_s"] == 5.0
    assert _column(_ok(_run(serve, "partners", "list")), pid, "MAX_RATE_PER_S") == "5.0"
    assert json.loads(_ok(_run(serve, "partners", "pace", pid, "--max-rate", "0", "--json")))["max_rate_per_s"] is None
    rotated = json.loads(_ok(_run(serve, "partners", "rotate", pid, "--json")))
    assert rotated["shared_secret"] != added["shared_secret"]
    during = _run(serve, "partners", "rotate", pid)  # the overlap the first rotation promised is running
    assert during.returncode == 1 and "revoke_old=true" in during.stderr
    revoked = json.loads(_ok(_run(serve, "partners", "rotate", pid, "--revoke-old", "--json")))
    assert revoked["previous_secret_expires_at"] is None

    assert json.loads(_ok(_run(serve, "partners", "contact", pid, "--email", "new@cli.example.com", "--json")))[
        "contact_email"] == "new@cli.example.com"
    assert json.loads(_ok(_run(serve, "partners", "contact", pid, "--json")))["contact_email"] is None
    assert json.loads(_ok(_run(serve, "partners", "pause", pid, "--json")))["status"] == "paused"
    _ok(_run(serve, "publish", "payment.success", "--data", json.dumps(
        {k: v for k, v in PAYMENT_SUCCESS.items() if k != "event"})))
    assert json.loads(_ok(_run(serve, "partners", "cancel-pending", pid, "--json")))["cancelled_deliveries"] == 1
    assert "cancelled" in _ok(_run(serve, "deliveries", "--status", "cancelled", "--partner", pid))
    unsure = _run(serve, "partners", "delete", pid)
    assert unsure.returncode == 2 and "--yes" in unsure.stderr  # a usage mistake
    assert json.loads(_ok(_run(serve, "partners", "delete", pid, "--yes", "--json")))["deleted"] is True
    assert "404" in _run(serve, "partners", "show", pid).stderr
    trail = _ok(_run(serve, "audit", "--partner", pid))
    assert trail.splitlines()[0].split() == ["AT", "ACTOR", "ACTION", "PARTNER_ID", "TARGET", "CHANGES"]
    for action in ("partner.registered", "delivery.retried", "partner.suspended", "partner.secret_rotated",
                   "partner.pending_cancelled", "partner.deleted"):
        assert action in trail
    assert _column(trail, "partner.deleted", "ACTION") == "partner.deleted"
    assert trail.splitlines()[1] == next(line for line in trail.splitlines() if "partner.deleted" in line)  # newest first
    assert added["shared_secret"] not in trail and rotated["shared_secret"] not in trail


def test_commands_fail_with_one_clear_line(serve_factory, tmp_path):
    serve = serve_factory()
    bad_json = _run(serve, "publish", "payment.success", "--data", "{oops")
    assert bad_json.returncode == 2 and bad_json.stderr.startswith("webhookd: the JSON given is not valid")
    invalid = _run(serve, "publish", "payment.success", "--data", "{}")
    assert invalid.returncode == 1 and "'transaction_id' is required" in invalid.stderr
    assert invalid.stderr.count("\n") == 1
    missing = _run(serve, "partners", "show")
    assert missing.returncode == 2 and "needs a PARTNER_ID" in missing.stderr
    serve.stop()
    down = _run(serve, "partners", "list")
    assert down.returncode == 1 and "cannot reach webhookd" in down.stderr and down.stderr.count("\n") == 1


def test_json_log_format_prints_one_json_object_per_line(serve_factory, receiver_factory):
    receiver = receiver_factory()
    # At debug level a successful attempt has a line of its own (at info it is summed up every 10 s).
    serve = serve_factory(WEBHOOKD_SERVER_LOG_FORMAT="json", WEBHOOKD_SERVER_LOG_LEVEL="debug")
    added = json.loads(_ok(_run(serve, "partners", "add", "--name", "J", "--url", receiver.url,
                                "--events", "payment.success", "--json")))
    _ok(_run(serve, "publish", "payment.success", "--data", json.dumps(
        {k: v for k, v in PAYMENT_SUCCESS.items() if k != "event"})))
    wait_for(lambda: receiver.received)
    wait_for(lambda: '"delivery_id"' in serve.output())
    lines = [json.loads(line) for line in serve.output().splitlines() if line.startswith("{")]
    attempt = next(line for line in lines if "delivery_id" in line)
    assert attempt["partner_id"] == added["partner_id"] and attempt["status_code"] == 200
    assert attempt["state"] == "delivered" and isinstance(attempt["duration_ms"], int)


def test_channels_filters_and_targeted_publishes_from_the_command_line(serve_factory):
    serve = serve_factory()

    def add(name, *extra):
        return json.loads(_ok(_run(serve, "partners", "add", "--name", name, "--url", "http://127.0.0.1:9/x",
                                   "--events", "payment.success", *extra, "--json")))

    euro = add("Euro", "--channels", "tour_1, tour_2", "--filter", '{"currency": "EUR"}')
    other = add("Other")
    assert euro["channels"] == ["tour_1", "tour_2"] and euro["filter"] == {"currency": ["EUR"]}
    data = json.dumps({k: v for k, v in PAYMENT_SUCCESS.items() if k != "event"})

    def fanout(*audience):
        return json.loads(_ok(_run(serve, "publish", "payment.success", "--data", data, *audience, "--json")))[
            "deliveries"]

    assert fanout("--channels", "tour_2") == 0                       # the guide's payment is in USD
    assert fanout("--partners", other["partner_id"]) == 1
    assert json.loads(_ok(_run(serve, "partners", "filter", euro["partner_id"], "--json")))["filter"] is None
    assert fanout("--channels", "tour_2") == 1
    changed = json.loads(_ok(_run(serve, "partners", "channels", euro["partner_id"], "--channels", "tour_9", "--json")))
    assert changed["channels"] == ["tour_9"] and fanout("--channels", "tour_2") == 0
    bad = _run(serve, "partners", "filter", euro["partner_id"], "--filter", '{"currency": {}}')
    assert bad.returncode == 1 and "'filter'" in bad.stderr
    ordered = add("Ledger", "--ordering", "fifo")
    assert ordered["ordering"] == "fifo" and euro["ordering"] == "concurrent"
    back = json.loads(_ok(_run(serve, "partners", "ordering", ordered["partner_id"], "--ordering", "concurrent",
                                "--json")))
    assert back["ordering"] == "concurrent"
    wait_for(lambda: not json.loads(_ok(_run(serve, "deliveries", "--partner", other["partner_id"], "--status",
                                             "pending", "--json")))["items"])  # a replay skips what is pending
    replayed = _run(serve, "replay", other["partner_id"], "--since", "0", "--json")
    assert json.loads(_ok(replayed)) == {"replayed": 1}             # its one event: the one named for it


def test_replay_from_the_command_line_leaves_cancelled_deliveries_out_unless_asked(serve_factory):
    serve = serve_factory()
    late = json.loads(_ok(_run(serve, "partners", "add", "--name", "Late", "--url", "http://127.0.0.1:9/x",
                               "--events", "payment.success", "--json")))["partner_id"]
    _ok(_run(serve, "partners", "pause", late))                    # its delivery waits, pending
    data = json.dumps({k: v for k, v in PAYMENT_SUCCESS.items() if k != "event"})
    _ok(_run(serve, "publish", "payment.success", "--data", data, "--json"))
    replay = ("replay", late, "--since", "0", "--json")
    cancelled = _run(serve, "partners", "cancel-pending", late, "--json")
    assert json.loads(_ok(cancelled))["cancelled_deliveries"] == 1
    _ok(_run(serve, "partners", "resume", late))
    assert json.loads(_ok(_run(serve, *replay))) == {"replayed": 0}  # cancelled: left out
    assert json.loads(_ok(_run(serve, *replay, "--include-cancelled"))) == {"replayed": 1}


def test_deliveries_and_audit_take_a_time_window_from_the_command_line(serve_factory):
    serve = serve_factory()
    added = json.loads(_ok(_run(serve, "partners", "add", "--name", "Window Tours", "--url", "http://127.0.0.1:9/x",
                                "--events", "payment.success", "--json")))
    _ok(_run(serve, "publish", "payment.success", "--data", json.dumps(
        {k: v for k, v in PAYMENT_SUCCESS.items() if k != "event"})))
    recent = json.loads(_ok(_run(serve, "deliveries", "--since", "1h", "--json")))["items"]
    assert [d["partner_id"] for d in recent] == [added["partner_id"]]
    assert json.loads(_ok(_run(serve, "deliveries", "--until", "2020-01-01T00:00Z", "--json")))["items"] == []
    assert "partner.registered" in _ok(_run(serve, "audit", "--since", "1d", "--until", "2099-01-01T00:00Z"))
    assert "partner.registered" not in _ok(_run(serve, "audit", "--since", "2099-01-01T00:00Z"))
    backwards = _run(serve, "audit", "--since", "2099-01-02T00:00Z", "--until", "2099-01-01T00:00Z")
    assert backwards.returncode == 1 and "'until' must not be before 'since'" in backwards.stderr
    traced = httpx.post(serve.url + "/events", json=PAYMENT_SUCCESS, headers={
        **ADMIN, "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    assert "trace 4bf92f3577b34da6a3ce929d0e0e4736" in _ok(_run(serve, "trace", traced.json()["event_id"]))

"""``webhookd serve`` before it serves (serving.py): one server per SQLite file, a busy port named
before any start-up work, and start-up lines that say where to go — real processes on 127.0.0.1."""

import os
import signal
import socket
import stat
import subprocess
import sys

import httpx

from conftest import ADMIN_TOKEN, ROOT, bearer, free_port, wait_for

ADMIN = bearer(ADMIN_TOKEN)


def _serve_once(env: dict[str, str], port: int) -> subprocess.CompletedProcess:
    """A second ``webhookd serve`` that is expected to refuse: its exit status and output."""
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", str(ROOT / "webhookd.toml"), "serve",
                           "--port", str(port)], capture_output=True, text=True, env=env, timeout=60)


def test_a_second_server_on_the_same_sqlite_file_is_refused_in_one_line_and_the_first_serves_on(serve_factory):
    first = serve_factory()
    partner = httpx.post(first.url + "/partners/register", headers=ADMIN, json={
        "partner_name": "Uno", "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"]}).json()

    second = _serve_once(first.env, free_port())   # another port, the same file
    assert second.returncode == 1, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    line = lines[0]
    assert line.startswith("webhookd: another webhookd (pid ") and str(first.proc.pid) in line
    assert f"at {first.url}" in line and socket.gethostname() in line and "since " in line
    assert "one server per SQLite file" in line and "[storage] path" in line
    assert "ready" not in second.stdout + second.stderr   # it stopped before any start-up work

    assert first.proc.poll() is None
    assert httpx.get(first.url + "/health").status_code == 200
    assert httpx.get(first.url + f"/partners/{partner['partner_id']}", headers=ADMIN).status_code == 200
    processes = httpx.get(first.url + "/stats", headers=ADMIN).json()["processes"]
    assert [p["pid"] for p in processes] == [first.proc.pid]   # the refused one never joined
    lock_file = first.env["WEBHOOKD_STORAGE_PATH"] + ".lock"
    assert stat.S_IMODE(os.stat(lock_file).st_mode) == 0o600

    same_port = _serve_once(first.env, first.port)  # `make run` twice: the port is busy, the server is named
    assert same_port.returncode == 1 and same_port.stderr.count("\n") == 1
    assert same_port.stderr.startswith("webhookd: another webhookd (pid ")


def test_after_kill_9_the_lock_is_gone_and_serve_starts_again(serve_factory):
    first = serve_factory()
    first.stop(signal.SIGKILL)
    assert os.path.exists(first.env["WEBHOOKD_STORAGE_PATH"] + ".lock")   # the file stays; its lock does not
    again = serve_factory(port=first.port)
    assert httpx.get(again.url + "/health").status_code == 200
    assert f"(pid {again.proc.pid} on" in _serve_once(again.env, free_port()).stderr   # the new holder, named


def test_a_busy_port_is_refused_in_one_line_naming_it_and_what_to_change(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "WEBHOOKD_STORAGE_PATH": str(tmp_path / "data" / "w.db"), "WEBHOOKD_ADMIN_TOKEN": "adm_x"}
        refused = _serve_once(env, port)
    assert refused.returncode == 1
    assert refused.stderr == (f"webhookd: port {port} on 127.0.0.1 is already in use by another program: stop it, "
                              "or choose another port with --port or [server] port in the config\n")
    assert not (tmp_path / "data").exists()   # refused before any start-up work: not even the folder


def test_start_up_says_where_the_api_dashboard_and_portal_are_and_how_to_get_the_token(serve_factory):
    serve = serve_factory(WEBHOOKD_ADMIN_TOKEN="")   # the generated token file
    token_file = os.path.join(os.path.dirname(serve.env["WEBHOOKD_STORAGE_PATH"]), "admin_token")
    wait_for(lambda: "configuration" in serve.output())
    log = serve.output()
    assert f"API        {serve.url}/" in log
    assert f"dashboard  {serve.url}/dashboard" in log and f"portal     {serve.url}/portal" in log
    assert "webhookd --config" in log and "token` prints it" in log
    token = open(token_file).read().strip()
    assert token and token not in log
    assert httpx.get(f"{serve.url}/dashboard").status_code == 200

    with_token = serve_factory(WEBHOOKD_STORAGE_PATH=serve.env["WEBHOOKD_STORAGE_PATH"] + "-2")  # token in the config
    wait_for(lambda: "configuration" in with_token.output())
    assert "security.admin_token in the config" in with_token.output()
    assert ADMIN_TOKEN not in with_token.output()


def _open_files_limit(pid: int) -> tuple[int, int]:
    """A process's (soft, hard) limit on open files, as /proc shows it."""
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_serve_raises_its_open_files_limit_to_what_delivery_concurrency_needs(serve_factory):
    """Started with the soft limit most Linux processes get (1,024 under a higher hard limit),
    ``delivery.concurrency`` 1,000 needs 2 x 1,000 + 256 sockets and files: the soft limit is raised
    to that, no further, and the whole concurrency is the delivery loop's."""
    serve = serve_factory(open_files=(1024, 8192), WEBHOOKD_DELIVERY_CONCURRENCY="1000")
    assert _open_files_limit(serve.proc.pid) == (2256, 8192)
    stats = httpx.get(serve.url + "/stats", headers=ADMIN, timeout=10).json()
    assert stats["delivery"]["in_flight_max"] == 1000
    assert "open files" not in serve.output()


def test_serve_under_a_low_hard_limit_delivers_with_fewer_in_flight_and_says_how_to_give_more(serve_factory):
    """A hard limit of 600 files fits (600 - 256) / 2 = 172 attempts in flight, not 1,000: the
    delivery loop is given that, and a warning names the setting and the limit to raise (without
    it, attempts past the limit would fail to open their sockets)."""
    serve = serve_factory(open_files=(300, 600), WEBHOOKD_DELIVERY_CONCURRENCY="1000")
    assert _open_files_limit(serve.proc.pid) == (600, 600)
    stats = httpx.get(serve.url + "/stats", headers=ADMIN, timeout=10).json()
    assert stats["delivery"]["in_flight_max"] == 172
    [warning] = [line for line in serve.output().splitlines() if "open files" in line]
    assert "delivery.concurrency = 1000 needs 2256 open files" in warning
    assert "at most 172 attempts will be in flight" in warning and "LimitNOFILE=" in warning


def test_the_operations_page_shows_the_open_files_warning_as_serve_writes_it():
    from serving import fewer_in_flight

    page = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    assert f"`{fewer_in_flight(4000, 4096, 1920)}`" in page

"""Shared pieces of the benchmark: processes we start (and stop by PID), the nginx receiver
and its access log, a black-hole endpoint, `webhookd serve` as a subprocess, and statistics.

Everything listens on and connects to 127.0.0.1 only. Every wait here is bounded in time.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ADMIN_TOKEN = "adm_bench_token_0123456789abcdefghijklmnop"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import signing  # noqa: E402
from payloads import PAYMENT_SUCCESS  # noqa: E402  (the guide's own example: 150.0 and accents)

# The bytes webhookd stores and sends for PAYMENT_SUCCESS (canonical JSON). Every sender in the
# benchmark puts exactly these bytes on the wire, so the receiver sees the same payload.
PAYLOAD_BYTES = signing.canonical(PAYMENT_SUCCESS)
EVENT_TYPE = PAYMENT_SUCCESS["event"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout:.0f} s")
        time.sleep(interval)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


# --- Processes ------------------------------------------------------------------------------


class Procs:
    """Every process the benchmark starts. ``stop_all`` (called from a ``finally``) stops each
    one still running by its PID: SIGTERM, a bounded wait, then SIGKILL."""

    def __init__(self) -> None:
        self._procs: list[tuple[str, subprocess.Popen, list[int]]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kwargs)
        self._procs.append((name, proc, []))
        return proc

    def also_kill(self, proc: subprocess.Popen, pids: Iterable[int]) -> None:
        """Remember child PIDs (nginx workers) to kill if their parent must be SIGKILLed."""
        for _, p, extra in self._procs:
            if p is proc:
                extra.extend(pids)

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        extra: list[int] = []
        for entry in list(self._procs):
            if entry[1] is proc:
                extra = entry[2]
                self._procs.remove(entry)
        if proc.poll() is None:
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
                for pid in extra:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        return proc.returncode

    def stop_all(self) -> None:
        for _, proc, _ in reversed(list(self._procs)):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"bench: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def children_of(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of a live process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a live process (all its threads) has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


# --- The receiver: nginx --------------------------------------------------------------------

NGINX_CONF = """\
# Written by bench/common.py: the benchmark's own nginx, nothing of the distro's config.
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    # $msec: when the request was answered (ms resolution); the id is webhookd's X-Webhook-Id.
    log_format bench '$msec $status $request_uri $http_x_webhook_id';
    access_log {prefix}/access.log bench;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    server {{
        listen {host}:{port} backlog=4096;
        default_type application/json;
        location / {{ return 200 '{{"status":"received"}}'; }}
    }}
}}
"""


@dataclass
class LogLine:
    msec: float
    status: int
    uri: str
    webhook_id: str


class LogTail:
    """Reads the access log from a mark onwards: every line is one request nginx answered."""

    def __init__(self, path: Path):
        self.path = path
        self.pos = 0
        self._partial = b""
        self.mark()

    def mark(self) -> None:
        self.pos = self.path.stat().st_size if self.path.exists() else 0
        self._partial = b""

    def read(self) -> list[LogLine]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        lines = []
        for raw in complete:
            parts = raw.decode("utf-8", "replace").split(" ")
            if len(parts) >= 4:
                lines.append(LogLine(float(parts[0]), int(parts[1]), parts[2], parts[3]))
        return lines


class Nginx:
    """nginx from the OS packages with its own config, prefix, logs and pid file in ``workdir``,
    run in the foreground (``daemon off``) so the PID we hold is its master's."""

    def __init__(self, procs: Procs, workdir: Path):
        self.procs = procs
        self.prefix = workdir / "nginx"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"

    @property
    def access_log(self) -> Path:
        return self.prefix / "access.log"

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def version(self) -> str:
        out = subprocess.run([self.binary, "-v"], capture_output=True, text=True, timeout=10)
        return (out.stderr or out.stdout).strip().split("/")[-1]

    def start(self) -> Nginx:
        if not os.path.exists(self.binary):
            raise RuntimeError("nginx is not installed: run bench/ensure-nginx.sh (make bench does)")
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=self.prefix, host=HOST, port=self.port))
        self.access_log.touch()
        self.proc = self.procs.start(
            "nginx", [self.binary, "-e", str(self.prefix / "error.log"), "-c", str(conf), "-p", str(self.prefix) + "/"],
            stdout=subprocess.DEVNULL, stderr=open(self.prefix / "stderr.log", "w"))
        try:
            wait_until(lambda: self.proc.poll() is not None or port_open(self.port), 10, what="nginx listening")
        finally:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx did not start:\n" + (self.prefix / "error.log").read_text()
                                   + (self.prefix / "stderr.log").read_text())
        # If nginx's master must be SIGKILLed, its worker goes too (by PID).
        self.procs.also_kill(self.proc, children_of(self.proc.pid))
        return self

    def tail(self) -> LogTail:
        return LogTail(self.access_log)

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None


def collect(tail: LogTail, want: int, timeout: float, accept: Callable[[LogLine], bool] = lambda line: True,
            alive: Callable[[], bool] = lambda: True, stop_after_msec: float | None = None) -> list[LogLine]:
    """Lines from ``tail`` that ``accept`` takes, until ``want`` of them, ``timeout`` s, the
    watched process dies, or (with ``stop_after_msec``) nginx logged a line past that time."""
    got: list[LogLine] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        new = [line for line in tail.read() if accept(line)]
        got += new
        if stop_after_msec is not None and got and got[-1].msec > stop_after_msec:
            break
        if not new:
            if not alive():
                got += [line for line in tail.read() if accept(line)]
                break
            time.sleep(0.02)
    return got


# --- A partner that never answers ------------------------------------------------------------


class BlackHole:
    """Accepts connections and never sends a byte (nor reads one). Runs in a thread of the
    benchmark; ``stop`` closes every accepted socket, so attempts still waiting fail at once."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="bench-black-hole", daemon=True)
        self.thread.start()

    def url(self, path: str = "/hole") -> str:
        return f"http://{HOST}:{self.port}{path}"

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)
            except OSError:
                continue

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


# --- webhookd serve as a subprocess -----------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def known_key(section: str, key: str) -> bool:
    """Whether this webhookd's config has ``section.key`` (the benchmark runs on older and newer
    trees alike: an override of a key a version lacks is left out, not refused at start-up)."""
    try:
        try:
            import config as sections_module  # since the split of webhookd.py
        except ImportError:
            import webhookd as sections_module
        return any(f.name == key for f in dataclasses.fields(sections_module.SECTIONS[section]))
    except Exception:
        return True


def write_config(path: Path, *, port: int, db_path: Path, overrides: dict[str, dict[str, Any]] | None = None) -> None:
    """The bundled webhookd.toml with a temp database, a fixed admin token, private (loopback)
    targets allowed and a free port; ``overrides`` change further keys per section (keys this
    webhookd does not know are skipped)."""
    with open(ROOT / "webhookd.toml", "rb") as fh:
        config = tomllib.load(fh)
    config.setdefault("server", {}).update(host=HOST, port=port)
    config.setdefault("storage", {})["path"] = str(db_path)
    config.setdefault("security", {}).update(admin_token=ADMIN_TOKEN, allow_private_targets=True)
    if config["security"].get("allowed_ports"):
        config["security"]["allowed_ports"] = []  # empty: any port (nginx and the black hole use free ones)
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update({k: v for k, v in values.items() if known_key(section, k)})
    lines = ["# written by bench/common.py from webhookd.toml"]
    for section, table in config.items():
        if section == "events":
            continue
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    for event_type, fields in config.get("events", {}).items():
        lines.append(f'\n[events."{event_type}"]')
        lines += [f"{key} = {_toml_value(value)}" for key, value in fields.items()]
    path.write_text("\n".join(lines) + "\n")


class SlowReceiver:
    """bench/slow_receiver.py in its own process: answers every POST after ``delay_s``."""

    def __init__(self, procs: Procs, delay_s: float):
        self.procs = procs
        self.delay_s = delay_s
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"

    def start(self) -> SlowReceiver:
        self.proc = self.procs.start("slow receiver", [sys.executable, str(ROOT / "bench" / "slow_receiver.py"),
                                                       str(self.port), str(self.delay_s)])
        wait_until(lambda: port_open(self.port), 10, what="slow receiver listening")
        return self

    def stats(self, reset: bool = False) -> dict[str, float]:
        client = Client(self.port)
        try:
            return json.loads(client.request("GET", "/reset" if reset else "/stats")[1])
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)


def thread_count(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class Client:
    """One keep-alive HTTP/1.1 connection (``http.client``) to 127.0.0.1:port."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.port = port
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                response = self.conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


class Webhookd:
    """`webhookd serve` in its own process on a config written to ``workdir``; its log goes to a
    file there (never an unread pipe)."""

    def __init__(self, procs: Procs, workdir: Path, *, db_path: Path | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None):
        self.procs = procs
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.db_path = db_path or workdir / "webhookd.db"
        self.config_path = workdir / "webhookd.toml"
        write_config(self.config_path, port=self.port, db_path=self.db_path, overrides=overrides)
        self.log_path = workdir / "serve.log"
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self.partners: list[dict] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 120.0) -> Webhookd:
        # `python cli.py` rather than the console script: the script's editable install lists
        # its modules as of the last `pip install -e`, the source folder always has them all.
        argv = [sys.executable, str(ROOT / "cli.py"), "--config", str(self.config_path), "serve"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_")}
        started = time.monotonic()
        self.proc = self.procs.start("webhookd", argv, cwd=str(ROOT), env=env,
                                     stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT)
        client = Client(self.port, timeout=2)

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"webhookd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return client.request("GET", "/health")[0] == 200
            except OSError:
                client.close()
                return False

        wait_until(healthy, timeout, interval=0.05, what="webhookd /health")
        client.close()
        self.startup_s = time.monotonic() - started
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def register(self, url: str, name: str, events: list[str] | None = None) -> dict:
        client = Client(self.port)
        body = json.dumps({"partner_name": name, "webhook_url": url, "events": events or [EVENT_TYPE]}).encode()
        status, data = client.request("POST", "/partners/register", body, ADMIN_HEADERS)
        client.close()
        if status != 201:
            raise RuntimeError(f"register {url}: {status} {data[:300]!r}")
        partner = json.loads(data)
        self.partners.append(partner)
        return partner

    def get_json(self, path: str) -> Any:
        """GET ``path`` as the admin; its JSON answer."""
        client = Client(self.port)
        try:
            return json.loads(client.request("GET", path, None, ADMIN_HEADERS)[1])
        finally:
            client.close()

    def peak_rss_mb(self) -> float | None:
        return peak_rss_mb(self.pid) if self.alive() else None

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid) if self.alive() else None

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, signal.SIGTERM, timeout=20)
            self.proc = None


# --- Statistics -------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(-(-p * len(sorted_values) // 100)))  # ceil(p/100 * n)
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Series:
    """Several runs of one figure: the median and the min–max."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        if value is not None:
            self.values.append(value)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def lo(self) -> float | None:
        return min(self.values) if self.values else None

    @property
    def hi(self) -> float | None:
        return max(self.values) if self.values else None

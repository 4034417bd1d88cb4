"""Shared test set-up: real servers on 127.0.0.1, and a guard that keeps every packet there.

* ``loopback_guard`` (``tests/guard/sitecustomize.py``) refuses any connect to an address
  outside 127.0.0.0/8 and ::1, in this process and — through PYTHONPATH — in every
  ``webhookd serve`` subprocess the tests start. Even a bug in the SSRF protection
  cannot send a packet beyond this machine.
* ``Receiver`` is a real uvicorn server playing a partner: it verifies each webhook the
  way the partner guide's Python receiver does (re-serialize the parsed body) *and*
  over the raw body, records everything, and answers what the test scripts.
* ``webhookd`` runs the app under test on a real uvicorn server, with a tmp database.
* Tests wait for a condition (``wait_for``), never for a while. One that says something did NOT
  happen first waits for a later event that proves the moment has passed, such as
  ``wait_until_nothing_is_due`` (the delivery loop has nothing left to send), then looks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ROOT = Path(__file__).resolve().parent.parent
GUARD_DIR = Path(__file__).resolve().parent / "guard"
sys.path.insert(0, str(GUARD_DIR))
import sitecustomize  # noqa: E402  (installs the loopback guard in this process)

ADMIN_TOKEN = "adm_test_token_0123456789abcdefghijklmnop"


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header that presents ``token`` (the admin token or a partner's API key)."""
    return {"Authorization": f"Bearer {token}"}


ADMIN = bearer(ADMIN_TOKEN)  # the admin's header; spread it (``{**ADMIN, ...}``) to add others

assert sitecustomize.GUARD_INSTALLED


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser_ready() -> None:
    """Install chromium and Playwright when missing (the dashboard and portal tests); fail, never
    skip, when still missing."""
    import importlib

    subprocess.run(["bash", str(ROOT / "scripts" / "ensure-browser.sh"), sys.executable], check=True, timeout=900)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing after scripts/ensure-browser.sh")
    importlib.invalidate_caches()
    try:
        importlib.import_module("playwright.sync_api")
    except ImportError as exc:
        pytest.fail(f"Playwright is not importable after scripts/ensure-browser.sh: {exc}")


@pytest.fixture(scope="module")
def browser(browser_ready):
    """One headless Chromium for a module's page tests; each test opens its own contexts in it."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=10_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="session")
def example_runtimes() -> None:
    """Run scripts/ensure-example-deps.sh once (examples/ and the partner guides' receivers); fail,
    never skip, if node, php, Express, standardwebhooks or FastAPI is still missing."""
    import importlib
    import shutil

    done = subprocess.run(["bash", str(ROOT / "scripts" / "ensure-example-deps.sh")], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    missing = [tool for tool in ("node", "php") if shutil.which(tool) is None]
    for package in ("express", "standardwebhooks"):
        if not (ROOT / "examples" / "node" / "node_modules" / package).is_dir():
            missing.append(f"examples/node/node_modules/{package}")
    importlib.invalidate_caches()
    for module in ("fastapi", "uvicorn", "standardwebhooks"):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"python: {module}")
    if done.returncode != 0 or missing:
        pytest.fail(f"example runtimes missing: {missing or 'none'}; ensure-example-deps.sh exited "
                    f"{done.returncode}:\n{done.stdout}\n{done.stderr}")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@contextlib.contextmanager
def holding_the_write_lock(hub: Any, partner_id: str) -> Any:
    """A transaction opened elsewhere and left open, holding what a publish or an inbound event of
    ``partner_id`` needs to be written: on SQLite the file's one write lock (``BEGIN IMMEDIATE``),
    on PostgreSQL the partner's row (``SELECT … FOR UPDATE``: the new rows point at it)."""
    if hub.config.storage.url:
        import psycopg

        with psycopg.connect(hub.config.storage.url) as holder:
            holder.execute("SELECT id FROM partners WHERE id = %s FOR UPDATE", (partner_id,))
            yield
            holder.rollback()
    else:
        import sqlite3

        holder = sqlite3.connect(hub.config.storage.path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()


class ReceiverProcess:
    """A receiver run as a subprocess in a session of its own, listening on 127.0.0.1:``port``, its
    output kept in a file (``output()``); ``stop()`` ends it and whatever it started."""

    def start(self, command: list[str], *, port: int, cwd: Path, env: dict[str, str], out_path: Path,
              timeout: float = 15.0) -> None:
        self.port = port
        self.out = open(out_path, "w+")
        self.proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self.listening, timeout=timeout, interval=0.05)

    def listening(self) -> bool:
        assert self.proc.poll() is None, f"the receiver exited {self.proc.returncode}:\n{self.output()}"
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def output(self) -> str:
        self.out.flush()
        self.out.seek(0)
        return self.out.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.out.close()


class ShiftedClock:
    """The wall clock plus an offset a test moves forward (``advance``), for rules measured in hours;
    ``frozen``: the time of its creation plus that offset only, so that only ``advance`` moves it
    (for rules measured in seconds, such as rate limits, on a machine of any speed)."""

    def __init__(self, frozen: bool = False) -> None:
        self.offset = 0.0
        self.frozen_at = time.time() if frozen else None

    def __call__(self) -> float:
        return (self.frozen_at if self.frozen_at is not None else time.time()) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """A uvicorn server for ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any, port: int | None = None):
        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on", access_log=False, proxy_headers=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ThreadServer:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=10)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


# --- A partner's receiver -------------------------------------------------------------


def guide_python_verify(secret: str, body: bytes, signature: str) -> bool:
    """Exactly the partner guide's verify_signature(): re-serialize the parsed body."""
    payload = json.loads(body)
    payload_str = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    expected = hmac.new(secret.encode("utf-8"), payload_str.encode("utf-8"), hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature, expected)


def raw_body_verify(secret: str, body: bytes, signature: str) -> bool:
    expected = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature.encode(), expected.encode())


class StreamServer:
    """An ``asyncio`` streams server on 127.0.0.1 (TLS with ``ssl_context``) in a thread of its own,
    for peers that speak raw bytes (a TLS receiver, a CONNECT proxy): a subclass writes
    ``_handle(reader, writer)``. ``stop`` closes the listener, cancels what is still being handled
    and ends the loop."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None):
        self.ssl_context = ssl_context
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self.ssl_context))
        self._started.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def start(self):
        self._thread.start()
        assert self._started.wait(10)
        return self

    def stop(self) -> None:
        async def shut_down() -> None:
            self._server.close()
            handling = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in handling:
                task.cancel()
            await asyncio.gather(*handling, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut_down(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    guide_ok: bool | None
    raw_ok: bool | None
    client: tuple[str, int] | None = None
    path: str = ""
    at: float = field(default_factory=time.time)

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    """A scripted partner endpoint. ``script`` holds answers — (status, delay_s) or
    (status, delay_s, headers) — used in order; when it runs out, every request gets
    ``default``. It records every request, which connection it came on, and the most
    requests it ever had in flight at once (in all, and per path)."""

    def __init__(self, secret: str | None = None, default: tuple = (200, 0.0), port: int | None = None):
        self.secret = secret
        self.default = default
        self.script: list[tuple] = []
        self.received: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.in_flight_by_path: collections.Counter[str] = collections.Counter()
        self.max_in_flight_by_path: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["POST"])])
        self.server = ThreadServer(app, port)

    @property
    def url(self) -> str:
        return self.server.url + "/webhooks/events"

    @property
    def connections(self) -> set[tuple[str, int]]:
        return {r.client for r in self.received}

    @property
    def event_ids(self) -> list[str]:
        return [r.headers.get("x-webhook-id", "") for r in self.received]

    async def _handle(self, request: Request) -> Response:
        import asyncio

        body = await request.body()
        signature = request.headers.get("x-webhook-signature", "")
        guide_ok = raw_ok = None
        if self.secret:
            guide_ok = guide_python_verify(self.secret, body, signature)
            raw_ok = raw_body_verify(self.secret, body, signature)
        client = (request.client.host, request.client.port) if request.client else None
        with self._lock:
            self.received.append(Received(dict(request.headers), body, guide_ok, raw_ok, client, request.url.path))
            answer = self.script.pop(0) if self.script else self.default
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            path = request.url.path
            self.in_flight_by_path[path] += 1
            self.max_in_flight_by_path[path] = max(self.max_in_flight_by_path[path], self.in_flight_by_path[path])
        status, delay, headers = (tuple(answer) + ({},))[:3]
        try:
            if delay:
                await asyncio.sleep(delay)
        finally:
            with self._lock:
                self.in_flight -= 1
                self.in_flight_by_path[request.url.path] -= 1
        if 300 <= status < 400:
            return Response(status_code=status, headers={"Location": "http://127.0.0.1:9/elsewhere", **headers})
        return JSONResponse({"status": "received" if status < 300 else "error"}, status_code=status,
                            headers=headers)

    def start(self) -> Receiver:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


class BlackHole:
    """A partner endpoint that accepts connections and never answers a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/webhooks/events"

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)
            except OSError:
                continue

    def stop(self) -> None:
        self._stop = True
        self.thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL for the whole run (tests/pg.py), started on first use."""
    from pg import PostgresServer

    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request, tmp_path) -> str:
    """Where a store lives, once per engine: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "data" / "w.db")
    return request.getfixturevalue("postgres_server").new_database()


@pytest.fixture
def black_hole():
    hole = BlackHole()
    yield hole
    hole.stop()


@pytest.fixture
def receiver_factory():
    started: list[Receiver] = []

    def make(secret: str | None = None, default: tuple = (200, 0.0)) -> Receiver:
        r = Receiver(secret, default).start()
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


# --- webhookd under test ------------------------------------------------------------------


def make_config(tmp_path: Path, **overrides: Any):
    """A config for tests: tmp database, fixed admin token, local receivers allowed, fast retries.

    ``overrides`` are ``section__key=value``, e.g. ``delivery__max_attempts=2``; ``events=`` replaces
    the event catalog.
    """
    import dataclasses

    import config

    cfg = config.load_config(ROOT / "webhookd.toml", environ={})
    security = dict(admin_token=ADMIN_TOKEN, allow_private_targets=True, inbound_rate_per_s=10_000.0,
                    inbound_failures_per_s=10_000.0, registration_rate_per_min=10_000.0,
                    partner_writes_per_min=10_000.0)
    deliveryc = dict(timeout_s=1.0, backoff_base_s=0.05, backoff_max_s=0.2, breaker_cooldown_s=0.2,
                     breaker_cooldown_max_s=0.5)
    storage: dict[str, Any] = dict(path=str(tmp_path / "webhookd.db"))
    retention: dict[str, Any] = {}
    alerts: dict[str, Any] = {}
    catalog = overrides.pop("events", cfg.events)
    type_retention = overrides.pop("event_retention_s", {})  # type -> seconds (the catalog's retention_days)
    for key, value in overrides.items():
        section, name = key.split("__")
        {"security": security, "delivery": deliveryc, "storage": storage, "retention": retention,
         "alerts": alerts}[section][name] = value
    return dataclasses.replace(
        cfg,
        events=catalog,
        event_retention_s=type_retention,
        alerts=dataclasses.replace(cfg.alerts, **alerts),
        retention=dataclasses.replace(cfg.retention, **retention),
        storage=config.StorageConfig(**storage),
        security=dataclasses.replace(cfg.security, **security),
        delivery=dataclasses.replace(cfg.delivery, **deliveryc),
    )


class Webhookd:
    """webhookd on a real uvicorn server, plus an httpx client that speaks to it."""

    def __init__(self, config, clock=None):
        import webhookd

        self.config = config
        self.app = webhookd.create_app(config, **({"clock": clock} if clock else {}))
        self.server = ThreadServer(self.app).start()
        self.http = httpx.Client(base_url=self.server.url, timeout=10)
        self.admin = ADMIN

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def store(self):
        return self.app.state.ctx.store

    def rows(self, sql: str, params: dict | None = None) -> list[tuple]:
        """Rows straight from the database, whichever engine (each as a plain tuple)."""
        with self.store._reader() as db:
            return [tuple(row) for row in db.execute(sql, params or {})]

    def register(self, url: str, events: list[str], name: str = "Tour Group") -> dict:
        r = self.http.post("/partners/register", headers=self.admin,
                           json={"partner_name": name, "webhook_url": url, "events": events})
        assert r.status_code == 201, r.text
        return r.json()

    def publish(self, payload: dict, headers: dict | None = None) -> httpx.Response:
        return self.http.post("/events", headers={**self.admin, **(headers or {})}, json=payload)

    def publish_many(self, n: int, **extra: Any) -> list[str]:
        """Publish ``n`` payment.success events (``transaction_id`` txn_0, txn_1, ...); their event ids."""
        from payloads import PAYMENT_SUCCESS

        ids = []
        for i in range(n):
            r = self.publish({**PAYMENT_SUCCESS, "transaction_id": f"txn_{i}", **extra})
            assert r.status_code == 202, r.text
            ids.append(r.json()["event_id"])
        return ids

    def delivery(self, delivery_id: str) -> dict:
        r = self.http.get(f"/deliveries/{delivery_id}", headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()

    def deliveries(self, **filters: str) -> list[dict]:
        r = self.http.get("/deliveries", headers=self.admin, params=filters)
        assert r.status_code == 200, r.text
        return r.json()["items"]

    def all_deliveries(self, partner_id: str) -> list[dict]:
        """Every delivery to ``partner_id``, page after page."""
        items, cursor = [], None
        while True:
            params = {"partner_id": partner_id, "limit": 200, **({"cursor": cursor} if cursor else {})}
            page = self.http.get("/deliveries", headers=self.admin, params=params).json()
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items

    def inbound(self) -> list[dict]:
        """The inbound events, as ``GET /inbound`` lists them."""
        r = self.http.get("/inbound", headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()["items"]

    def wait_until_nothing_is_due(self, timeout: float = 30.0) -> None:
        """``wait_until_nothing_is_due`` on this server, waking its delivery loop as it goes."""
        wait_until_nothing_is_due(self.url, wake=self.app.state.ctx.loop.wake, timeout=timeout)

    def wait_for_a_retention_pass(self, timeout: float = 30.0) -> None:
        """Wait until a whole retention pass (the sweeper's: expiry, then the purges) has run since
        this call. Each pass begins by renewing the ``sweeper`` role until now + 3 intervals: a
        renewal written after this call, then a later one, frame a whole pass."""
        called_at = self.app.state.ctx.clock()
        ttl_s = 3 * self.config.retention.interval_s

        def sweeper_until() -> float:
            rows = self.rows("SELECT until FROM roles WHERE name = 'sweeper'")
            return rows[0][0] if rows else float("-inf")

        began = wait_for(lambda: (until := sweeper_until()) >= called_at + ttl_s and until, timeout=timeout)
        wait_for(lambda: sweeper_until() > began, timeout=timeout)

    def stop(self) -> None:
        self.http.close()
        self.server.stop()


def loop_counts(url: str) -> tuple[float, float]:
    """From the /metrics of the webhookd at ``url``: how many claims of its delivery loop found
    nothing to take (the ``le="0"`` bucket of ``webhookd_claim_rows``), then (read after) how many
    attempts it has in flight."""
    r = httpx.get(url + "/metrics", headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text

    claims = re.search(r'^webhookd_claim_rows_bucket\{le="0"\} (\S+)$', r.text, re.MULTILINE)  # none before the first
    in_flight = re.search(r"^webhookd_deliveries_in_flight (\S+)$", r.text, re.MULTILINE)
    assert in_flight, "webhookd_deliveries_in_flight is not on /metrics"
    return float(claims.group(1)) if claims else 0.0, float(in_flight.group(1))


def wait_until_nothing_is_due(url: str, wake: Callable[[], None] = lambda: None, timeout: float = 30.0) -> None:
    """Wait until the delivery loop of the webhookd at ``url`` has twice found nothing to claim
    since this call (the first may have begun before it) and has no attempt in flight: whatever
    was due at the call, with room to go, has been sent and its result recorded. A test that says
    something was NOT sent waits for this first, so that it cannot pass only because it looked too
    early on a slow machine. ``wake`` (the loop's, in this process) makes it look at once; a
    process of its own looks again within a second on PostgreSQL, or within 30 s on SQLite."""
    first, _ = loop_counts(url)

    def nothing_left() -> bool:
        wake()
        empty_claims, in_flight = loop_counts(url)
        return empty_claims >= first + 2 and in_flight == 0

    wait_for(nothing_left, timeout=timeout)


@pytest.fixture
def webhookd_factory(tmp_path):
    started: list[Webhookd] = []

    def make(clock: Any = None, **overrides: Any) -> Webhookd:
        w = Webhookd(make_config(tmp_path, **overrides), clock=clock)
        started.append(w)
        return w

    yield make
    for w in started:
        w.stop()


@pytest.fixture
def hub(request, webhookd_factory) -> Webhookd:
    """webhookd with the test config: on SQLite, or on both engines in a module that sets
    ``BOTH_ENGINES = True`` (its tests then run once on each; see pytest_generate_tests)."""
    if getattr(request, "param", "sqlite") == "postgresql":
        return webhookd_factory(storage__url=request.getfixturevalue("postgres_server").new_database())
    return webhookd_factory()


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_factory(request, webhookd_factory):
    """``webhookd_factory`` on each engine in turn, for tests that need a config of their own."""

    def make(**overrides: Any) -> Webhookd:
        if request.param == "postgresql":
            overrides["storage__url"] = request.getfixturevalue("postgres_server").new_database()
        return webhookd_factory(**overrides)

    return make


def pytest_generate_tests(metafunc):
    if "hub" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_ENGINES", False):
        metafunc.parametrize("hub", ["sqlite", "postgresql"], indirect=True)


# --- webhookd serve as a subprocess ------------------------------------------------------


class ServeProcess:
    """``webhookd serve`` in its own process, with the loopback guard loaded through PYTHONPATH."""

    def __init__(self, tmp_path: Path, port: int, extra_env: dict[str, str] | None = None,
                 open_files: tuple[int, int] | None = None):
        self.port = port
        self.open_files = open_files  # (soft, hard) RLIMIT_NOFILE to start it with; None: this process's
        self.log = open(tmp_path / f"serve-{port}-{time.time_ns()}.log", "w+")
        self.env = {
            **os.environ,
            "PYTHONPATH": str(GUARD_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "WEBHOOKD_STORAGE_PATH": str(tmp_path / "serve.db"),
            "WEBHOOKD_ADMIN_TOKEN": ADMIN_TOKEN,
            "WEBHOOKD_SECURITY_ALLOW_PRIVATE_TARGETS": "true",
            "WEBHOOKD_SECURITY_INBOUND_FAILURES_PER_S": "10000",
            "WEBHOOKD_DELIVERY_TIMEOUT_S": "1",
            "WEBHOOKD_DELIVERY_BACKOFF_BASE_S": "0.05",
            "WEBHOOKD_DELIVERY_BACKOFF_MAX_S": "0.2",
            "WEBHOOKD_DELIVERY_BREAKER_COOLDOWN_S": "0.2",
            "WEBHOOKD_DELIVERY_BREAKER_COOLDOWN_MAX_S": "0.5",
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServeProcess:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "--config", str(ROOT / "webhookd.toml"),
             "serve", "--port", str(self.port)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT), preexec_fn=self._limit)
        wait_for(self._responds, timeout=20, interval=0.1)
        return self

    def _limit(self) -> None:
        if self.open_files is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, self.open_files)

    def _responds(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.output()
        try:
            return httpx.get(self.url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int | None = None) -> int:
        import signal

        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)


def webhookd_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``webhookd ARGS`` on the bundled config as a subprocess with ``env`` (a ServeProcess's, for its
    database and token); its exit status and output."""
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", str(ROOT / "webhookd.toml"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture
def serve_factory(tmp_path):
    started: list[ServeProcess] = []

    def make(port: int | None = None, open_files: tuple[int, int] | None = None, **env: str) -> ServeProcess:
        p = ServeProcess(tmp_path, port or free_port(), env, open_files).start()
        started.append(p)
        return p

    yield make
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(timeout=5)
        p.log.close()

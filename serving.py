"""``webhookd serve``: the checks before start-up, then the HTTP API on uvicorn.

In the order they run, each refusing in one line before the next step does any work:

1. **one server per SQLite file**: an exclusive lock on ``<storage.path>.lock`` (``flock``), held
   for the life of the process. Two processes on one SQLite file would each keep their own cache
   of partners and circuits, and each deliver the same rows; a second one is refused, naming the
   first (its pid, host, since when, its address). The kernel drops the lock of a process that
   dies, ``kill -9`` included, so a stale lock file never blocks a restart. On PostgreSQL
   several processes are the supported way: no lock;
2. **the port**: bound here, before the database is touched, and handed to uvicorn, so a busy
   port is named with the setting to change rather than found after the delivery loop started;
3. **the database**: migrations, then the admin token file;
4. **open files**: every attempt in flight holds a socket, and so may as many kept alive: the
   soft limit on open files is raised to what ``delivery.concurrency`` needs (``fit_open_files``);
   if the hard limit is lower, fewer attempts are let in flight and the log says so;
5. **start-up**: once the app is ready, where to go: the API, ``/dashboard``, ``/portal``, and
   how to get the admin token (never the token itself).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import ipaddress
import json
import logging
import os
import resource
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import uvicorn

import garbage
from config import Config, admin_token

logger = logging.getLogger("webhookd")


class Refused(Exception):
    """Start-up cannot go on; the message is the one line that says why and what to do."""


# --- 1. One server per SQLite file ---------------------------------------------------------


def lock_database(config: Config, address: str) -> int | None:
    """Take the exclusive lock beside the SQLite file (``Refused`` if another server holds it) and
    write who holds it; the open descriptor, which holds the lock until this process ends. None on
    PostgreSQL, where several processes share the database."""
    if not config.storage.is_one_file:
        return None
    database = Path(config.storage.path)
    database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_file = _lock_file(config)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder(fd)
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise Refused(f"cannot lock {lock_file} ({exc.strerror}): check the folder's permissions") from None
        raise Refused(_another_server(holder, database)) from None
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "address": address}
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(me) + "\n").encode())
    return fd


def running_server(config: Config) -> str | None:
    """The line naming the webhookd that holds the SQLite file's lock, or None when none does
    (creating nothing: this runs when start-up is already refused)."""
    holder = lock_holder(config)
    return None if holder is None else _another_server(holder, Path(config.storage.path))


def lock_holder(config: Config) -> str | None:
    """Who holds the SQLite file's lock ("pid 1234 on host, since …, at http://…"), or None when
    nobody does: no lock file, or a stale one whose server is gone (``kill -9`` included: the
    kernel drops a dead process's lock). Creates nothing."""
    if not config.storage.is_one_file:
        return None
    try:
        fd = os.open(_lock_file(config), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it: a stale file
    except OSError:
        return _holder(fd)
    finally:
        os.close(fd)


def was_ever_locked(config: Config) -> bool:
    """Whether a webhookd that locks its file has served this database (the lock file stays after it stops)."""
    return _lock_file(config).exists()


def _lock_file(config: Config) -> Path:
    database = Path(config.storage.path)
    return database.with_name(database.name + ".lock")


def _another_server(holder: str, database: Path) -> str:
    return (f"another webhookd ({holder}) is serving {database}: one server per SQLite file. Stop that one "
            "first, or give this one its own [storage] path (several processes share one PostgreSQL "
            "database: docs/postgresql.md).")


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says: pid, host, since when, address."""
    try:
        holder: dict[str, Any] = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"pid {holder['pid']} on {holder['host']}, since {since}, at {holder['address']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "still starting, pid not written yet"


# --- 2. The port ---------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it); ``Refused`` naming the port and the
    setting to change when it is taken or cannot be had."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise Refused(f"cannot listen on {host!r} ({exc.strerror}): set --host or [server] host to an "
                      "address of this machine, like 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
    try:
        sock.bind(where)
    except OSError as exc:
        sock.close()
        raise Refused(busy_port_line(host, port, exc, "--port or [server] port in the config")) from None
    sock.set_inheritable(True)
    return sock


def busy_port_line(host: str, port: int, exc: OSError, setting: str) -> str:
    """The one line for a port that cannot be had, naming ``setting``, the key or flag to change."""
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use by another program: stop it, or choose another port with {setting}"
    if exc.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges this user lacks: choose a port above 1023 with {setting}"
    return f"cannot listen on {host} port {port} ({exc.strerror}): change {setting}"


# --- 3 and 5. The database, then start-up ----------------------------------------------------


def serve(config: Config, config_path: str | None, host: str, port: int) -> int:
    """Run the service until it is stopped: the lock, the port, migrations, then uvicorn."""
    from webhookd import create_app

    base = base_url(host, port)
    try:
        sock = bind(host, port)
    except Refused as busy:  # by the webhookd already serving this file? Then name it rather than the port
        raise Refused(running_server(config) or str(busy)) from None
    lock = lock_database(config, base)  # a refusal ends the process, which closes the socket
    where, _ = migrate(config)  # a database newer than this code: one line that says which version to run
    admin_token(config)  # created now, so `webhookd token` works at once
    config = fit_open_files(config)
    if not _is_loopback(host) and config.security.allow_private_targets:
        logger.warning("listening on %s with allow_private_targets = true: partners could reach your "
                       "internal network. Set [security] allow_private_targets = false.", host)
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1 by default.
    # Whom to believe is server.trusted_proxies' to say (web.RealClient), and by default nobody.
    settings = uvicorn.Config(create_app(config), host=host, port=port, log_level=config.server.log_level,
                              log_config=None, access_log=config.server.access_log, proxy_headers=False,
                              timeout_graceful_shutdown=int(config.delivery.timeout_s) + 2)
    server = _AnnouncingServer(settings, where_to_go(config, config_path, base))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if lock is not None:
            os.close(lock)
    return 0


class _AnnouncingServer(uvicorn.Server):
    """uvicorn's server, which says where to go once the app has started (not before: a start-up
    that fails must not have promised an address)."""

    def __init__(self, settings: uvicorn.Config, lines: list[str]):
        super().__init__(settings)
        self.lines = lines
        self.full_collections = garbage.FullCollections()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            frozen = garbage.freeze_startup_heap()  # the collector's pauses stay short and rare (garbage.py)
            self.full_collections.start(asyncio.get_running_loop())
            logger.debug("start-up heap set aside from the garbage collector: %d objects", frozen)
            for line in self.lines:
                logger.info(line)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.full_collections.stop()
        await super().shutdown(sockets=sockets)


def where_to_go(config: Config, config_path: str | None, base: str) -> list[str]:
    """The start-up lines after "ready": the URLs and how to get the admin token."""
    if config.security.admin_token:
        token = "the admin token is security.admin_token in the config (or WEBHOOKD_ADMIN_TOKEN)"
    else:
        with_config = f" --config {config_path}" if config_path and config_path != "webhookd.toml" else ""
        token = f"`{own_command()}{with_config} token` prints it"
    settings = str(Path(config_path).resolve()) if config_path else (
        f"built-in defaults, no webhookd.toml in {Path.cwd()} (`webhookd init` writes one to edit)")
    return [f"API        {base}/  (its contract: {base}/openapi.json)",
            f"dashboard  {base}/dashboard  (sign in with the admin token: {token})",
            f"portal     {base}/portal  (for partners, with their own API key)",
            f"configuration  {settings}; Ctrl+C stops"]


def own_command() -> str:
    """How to call webhookd again, as it was started: ``webhookd`` when that is on the PATH, else
    the path it was started by (``.venv/bin/webhookd`` under ``make run``)."""
    started_as = sys.argv[0] if sys.argv and os.path.basename(sys.argv[0]) == "webhookd" else ""
    on_path = shutil.which("webhookd")
    if not started_as or (on_path and os.path.realpath(on_path) == os.path.realpath(started_as)):
        return "webhookd"
    return started_as


def base_url(host: str, port: int) -> str:
    """The URL a browser on this machine opens: a wildcard address becomes 127.0.0.1."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def migrate(config: Config) -> tuple[str, list[str]]:
    """Open the store once (which applies what is pending); where it is, and what was applied."""
    from storage import open_store
    from store import SchemaTooNew

    try:
        store = open_store(config.storage.target, lock_timeout_s=config.storage.lock_timeout_s,
                           statement_timeout_s=config.storage.statement_timeout_s)
    except SchemaTooNew as exc:
        raise Refused(str(exc)) from None
    try:
        return store.engine.describe(), store.migrated
    finally:
        store.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# --- 4. Open files -----------------------------------------------------------------------

FILES_BESIDE_DELIVERIES = 256  # the API's connections, SQLite's files, the log: what is not a partner's socket


def fit_open_files(config: Config) -> Config:
    """``config`` with a ``delivery.concurrency`` this process can open sockets for.

    Each attempt in flight holds a socket, and the sender keeps up to as many idle for the next
    ones: twice ``concurrency``, plus ``FILES_BESIDE_DELIVERIES``. Linux starts most processes
    with a soft limit of 1,024 (systemd's default) under a far higher hard one, which a process
    may raise itself, as Go's runtime does at start: webhookd raises it to what it needs, no
    further. Past the hard limit, the attempts in flight are fewer and a warning says how to
    give more (``LimitNOFILE=`` in a systemd unit, ``ulimit -Hn`` in a shell)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = files_needed(config.delivery.concurrency)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return config
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    except (ValueError, OSError):  # a kernel that caps it lower than it says (macOS' OPEN_MAX): keep what we have
        pass
    if soft >= needed:
        return config
    fits = max(1, (soft - FILES_BESIDE_DELIVERIES) // 2)
    logger.warning(fewer_in_flight(config.delivery.concurrency, soft, fits))
    return dataclasses.replace(config, delivery=dataclasses.replace(config.delivery, concurrency=fits))


def files_needed(concurrency: int) -> int:
    return 2 * concurrency + FILES_BESIDE_DELIVERIES


def fewer_in_flight(concurrency: int, limit: int, fits: int) -> str:
    """The start-up warning of ``fit_open_files`` (docs/operations.md shows one)."""
    return (f"delivery.concurrency = {concurrency} needs {files_needed(concurrency)} open files, "
            f"and this process may open {limit}: at most {fits} attempts will be in flight. "
            "Raise the limit (LimitNOFILE= in a systemd unit, ulimit -Hn in a shell) or lower delivery.concurrency.")

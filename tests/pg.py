"""A throwaway PostgreSQL server for the tests: the OS package's binaries, our own data dir.

``initdb`` and ``pg_ctl`` refuse to run as root, and CI runs as root, so they run as the
``postgres`` user (``runuser``) in a temp dir that user owns. The server listens on
127.0.0.1 only, on a free port, with a socket dir of its own; it is stopped by the PID in its
``postmaster.pid`` (``pg_ctl stop``, then SIGKILL to that PID if it lingers). Each test that
needs a database gets a fresh one (``CREATE DATABASE``), so tests never see each other's rows.

``fsync = off``: the tests need PostgreSQL's behaviour, not its durability on this box.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bin(name: str) -> str:
    """``initdb``/``pg_ctl`` of the newest server installed (Debian keeps them off PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path:
        return on_path
    raise RuntimeError(f"{name} is missing after scripts/ensure-postgres.sh")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, durable: bool = False) -> None:
        """``durable``: fsync as a real deployment does (the benchmark); the tests need not."""
        self.durable = durable
        self.dir = Path(tempfile.mkdtemp(prefix="webhookd-pg-"))
        self.data = self.dir / "data"
        self.sockets = self.dir / "sockets"
        self.port = _free_port()
        self.pid: int | None = None
        self._names = itertools.count(1)

    def _as_postgres(self, *argv: str, timeout: float = 120) -> None:
        run = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(run + list(argv), check=True, timeout=timeout, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def start(self) -> PostgresServer:
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure-postgres.sh")], check=True, timeout=900)
        self.sockets.mkdir()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.sockets, "postgres")
        self._as_postgres(_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                          "-E", "UTF8", "--locale=C", "--no-sync")
        self.start_again()
        return self

    def _options(self) -> str:
        """127.0.0.1 only, our port and socket dir; no fsync unless ``durable``."""
        fast = "" if self.durable else "-c fsync=off -c full_page_writes=off "
        return f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} {fast}-c max_connections=200"

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: the server goes away as in a crash (no clean shutdown)."""
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")
        self.pid = None

    def start_again(self) -> None:
        """Start the same data dir on the same port after ``crash`` (it recovers from its WAL)."""
        self._as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-o", self._options(), "-l", str(self.dir / "log"),
                          "-w", "-t", "60", "start")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.pid is not None:
            try:
                self._as_postgres(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
            except (subprocess.SubprocessError, OSError):
                pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.1)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

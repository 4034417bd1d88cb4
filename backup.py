"""The commands that work on the database files themselves, with no server in between.

* ``backup``: a consistent copy of the SQLite file while the server runs (SQLite's online
  backup API), written private (mode 0600: a backup holds every partner's secret);
* ``restore``: a backup put in place of ``storage.path``, never under a running server, with a
  warning naming the keys and secrets it brings back (from the audit trail);
* ``migrate_store``: the SQLite file copied into a new PostgreSQL database (``storage.copy_store``).

On PostgreSQL ``backup`` and ``restore`` refuse and name the database's own tools. Each
function returns what to print, or raises ``Refused`` with one line saying why and what to do
(``cli.py`` prints it and exits 1).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from config import Config, is_server_url


class Refused(Exception):
    """The command cannot do its job; the message says why and what to do."""


def backup(config: Config, path: str) -> str:
    """A consistent copy of the SQLite file while the server runs: SQLite's online backup API copies
    every page as of one moment (a read transaction; in WAL mode writers go on meanwhile)."""
    import sqlite3

    _refuse_a_server(config, "pg_dump --format=custom --file=webhookd.dump \"$URL\"")
    source, target = Path(config.storage.path), Path(path)
    if not source.exists():
        raise Refused(f"there is no database at {source} (storage.path) to back up")
    if target.exists():
        raise Refused(f"{target} exists already: give a new path (a backup never overwrites)")
    if not target.parent.is_dir():
        raise Refused(f"there is no folder {target.parent} to write the backup in: create it first")
    try:
        with _private_copy(target) as partial, _sqlite(source, readonly=True) as src, _sqlite(partial) as dst:
            src.backup(dst)
            counts = _counts(dst)
    except sqlite3.Error as exc:
        raise Refused(f"the backup failed ({exc}); nothing was written at {target}") from None
    return f"backed up {source} to {target}: {counts}"


def restore(config: Config, path: str, replace: bool) -> tuple[str, str]:
    """Put a backup in place of ``storage.path``; never under a running server, never over an
    existing database unless asked (``--replace``). Warns about the credentials it brings back."""
    import sqlite3

    from housekeeping import ALIVE_S
    from serving import lock_holder, was_ever_locked

    _refuse_a_server(config, "pg_restore --clean --dbname=\"$URL\" webhookd.dump")
    backup_file, target = Path(path), Path(config.storage.path)
    if not backup_file.exists():
        raise Refused(f"there is no backup at {backup_file}")
    with _sqlite(backup_file, readonly=True) as src:
        if not _has_table(src, "schema_migrations"):
            raise Refused(f"{backup_file} is not a webhookd database (no schema_migrations table)")
    holder = lock_holder(config)
    if holder is not None:
        raise Refused(f"a webhookd server ({holder}) is serving {target}: stop it first, then restore")
    if target.exists():
        if not was_ever_locked(config):  # served before the lock existed, if ever: its heartbeat tells
            _refuse_a_recent_heartbeat(target, ALIVE_S)
        if not replace:
            raise Refused(f"{target} (storage.path) exists: add --replace to overwrite it with the backup")
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    warning = _revocations_undone(backup_file, target)
    try:
        with _private_copy(target) as partial:
            with _sqlite(backup_file, readonly=True) as src, _sqlite(partial) as dst:
                src.backup(dst)
                dst.execute("DELETE FROM processes")  # the backed-up server's heartbeats and roles are not ours
                dst.execute("DELETE FROM roles")
                counts = _counts(dst)
    except sqlite3.Error as exc:
        raise Refused(f"the restore failed ({exc}); {target} is as it was") from None
    return f"restored {backup_file} into {target}: {counts}. Start webhookd on it: pending deliveries go out.", warning


def _refuse_a_recent_heartbeat(target: Path, alive_s: float) -> None:
    with _sqlite(target, readonly=True) as live:
        seen = live.execute("SELECT MAX(seen_at) FROM processes").fetchone()[0] \
            if _has_table(live, "processes") else None
    if seen is not None and time.time() - seen < 2 * alive_s:
        raise Refused(f"a webhookd server is using {target} (its last heartbeat was {time.time() - seen:.0f} s "
                      "ago): stop it first, then restore")


@contextmanager
def _private_copy(target: Path) -> Iterator[Path]:
    """A new file beside ``target``, mode 0600 from its first byte (a backup holds every partner's
    secret), renamed onto ``target`` when the block ends well and removed when it fails. Killed
    midway, the copy leaves a ``.<name>.*.partial`` file only its owner can read, never a partial
    file at ``target``."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")  # 0600
    os.close(fd)
    partial = Path(name)
    try:
        yield partial
        _replace_database(partial, target)
    except BaseException:
        for leftover in (partial, *_sidecars(partial)):
            leftover.unlink(missing_ok=True)
        raise


def _replace_database(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``. The old database's WAL must not outlive it (SQLite would
    replay it onto the new file): it is folded into the old file first, so a kill at any step
    leaves one whole database at ``target``, then its side files go, then the rename."""
    if target.exists():
        with _sqlite(target) as old:
            old.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for side_file in _sidecars(target):
        side_file.unlink(missing_ok=True)
    os.replace(new, target)
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def _sidecars(database: Path) -> list[Path]:
    return [database.with_name(database.name + suffix) for suffix in ("-wal", "-shm", "-journal")]


# What a restore gives back that was taken away after its backup was made, by audit action: what
# happened, what the restore undoes, and the command that takes it away again once webhookd runs.
_TAKEN_AWAY = {
    "partner.api_key_reissued": ("API key reissued", "the old key works again", "webhookd partners api-key {id}"),
    "partner.secret_rotated": ("secret rotated", "the secret it replaced is current again",
                               "webhookd partners rotate {id}"),
    "partner.suspended": ("suspended", "it is no longer suspended", "webhookd partners suspend {id} --reason ..."),
    "partner.deleted": ("deleted", "it is back, with its secret, its API key and its pending deliveries (they go "
                                   "out when webhookd starts)", "webhookd partners delete {id} --yes"),
}
_SECRET_REVOKED = ("secret rotated with the old ones revoked", "the revoked secret is current again",
                   "webhookd partners rotate {id} --revoke-old")  # a partner.secret_rotated with revoke_old


def _revocations_undone(backup: Path, target: Path) -> str:
    """A warning naming the partners whose API key reissues, secret rotations, suspensions and
    deletions, recorded in the audit trail of the database being replaced, the backup predates
    (the restore brings those keys and secrets back), with the commands that take them away again.
    Empty when there is nothing to say."""
    with _sqlite(backup, readonly=True) as old:
        made_at = _backup_time(old)
        partners = dict(old.execute("SELECT id, name FROM partners WHERE status <> 'deleted'").fetchall())
        known = {row[0] for row in old.execute("SELECT id FROM audit_log WHERE at >= :at", {"at": made_at})} \
            if _has_table(old, "audit_log") else set()
    when = _local_time(made_at)
    if not target.exists():
        return (f"webhookd: note: the backup is from about {when}. An API key reissued, a secret rotated or a "
                "partner suspended or deleted after that is back as it was then (there was no database at "
                "storage.path to compare with): check, and reissue or rotate with --revoke-old where in doubt.")
    with _sqlite(target, readonly=True) as live:
        if not _has_table(live, "audit_log"):
            return ""
        since = live.execute(
            f"SELECT id, at, action, partner_id, changes FROM audit_log WHERE at >= :at "
            f"AND action IN ({', '.join(repr(a) for a in _TAKEN_AWAY)}) ORDER BY id", {"at": made_at}).fetchall()
    # Entries the backup holds happened before it; partners it lacks come back with nothing.
    undone = [row for row in since if row[0] not in known and row[3] in partners]
    if not undone:
        return ""
    lines = [f"webhookd: warning: the backup is from about {when}. Since then, the database it replaces took "
             "these away, and the restore brings them back:"]
    commands: dict[str, None] = {}  # in order, without repeats
    for _, at, action, partner_id, changes in undone:
        revoked = action == "partner.secret_rotated" and json.loads(changes or "{}").get("revoke_old")
        what, effect, command = _SECRET_REVOKED if revoked else _TAKEN_AWAY[action]
        lines.append(f"  {partner_id} ({partners[partner_id]}): {what} at {_local_time(at)}; {effect}")
        commands[command.format(id=partner_id)] = None
    lines.append("Once webhookd runs on the restored database, take them away again: " + "; ".join(commands))
    return "\n".join(lines)


def _local_time(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _backup_time(db: Any) -> float:
    """About when a backup was made: the latest moment it records (a heartbeat of the server it was
    taken from, an audit entry, an event, a partner's change). Never later than the real moment."""
    latest = [db.execute(f"SELECT MAX({column}) FROM {table}").fetchone()[0]
              for table, column in (("processes", "seen_at"), ("audit_log", "at"), ("events", "created_at"),
                                    ("partners", "updated_at")) if _has_table(db, table)]
    return max((t for t in latest if t is not None), default=0.0)


def _has_table(db: Any, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = :name", {"name": name}).fetchone() \
        is not None


@contextmanager
def _sqlite(path: Path, readonly: bool = False) -> Iterator[Any]:
    """A connection to a SQLite file, committed and closed at the end of the block."""
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True) if readonly else sqlite3.connect(path)
    try:
        with con:
            yield con
    finally:
        con.close()


def _refuse_a_server(config: Config, command: str) -> None:
    """``backup`` and ``restore`` copy one SQLite file; a database server has its own tools."""
    if not config.storage.is_one_file:
        raise Refused(f"storage.url is PostgreSQL: use its own tools, e.g. {command}")


def _counts(db: Any) -> str:
    events = db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    pending = db.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchone()[0]
    partners = db.execute("SELECT COUNT(*) FROM partners WHERE status <> 'deleted'").fetchone()[0]
    return (f"{partners} partner{'s' * (partners != 1)}, {events} event{'s' * (events != 1)}, "
            f"{pending} pending deliver{'y' if pending == 1 else 'ies'}")


def migrate_store(config: Config, to: str, history_days: float) -> str:
    """Copy the SQLite file of ``storage.path`` into a new PostgreSQL database (``docs/postgresql.md``,
    "Moving over"). Run it with the SQLite server stopped; start the processes on the URL afterwards."""
    from storage import copy_store, open_store

    if not is_server_url(to):
        raise Refused("--to must be a PostgreSQL URL, like postgresql://webhookd:secret@db.internal/webhookd")
    if not Path(config.storage.path).exists():
        raise Refused(f"there is no SQLite file at {config.storage.path} (storage.path) to copy from")
    source, target = open_store(config.storage.path), open_store(to)
    try:
        now = time.time()
        copied = copy_store(source, target, since=now - history_days * 86400, now=now)
    except ValueError as exc:
        raise Refused(str(exc)) from None
    finally:
        source.close()
        target.close()
    return (f"copied into {target.engine.describe()}: " + ", ".join(f"{table} {n}" for table, n in copied.items())
            + "\nPartners keep their secrets and API keys. Start webhookd with storage.url set to that database.")

"""The README's curl session is real: each of its commands runs as written, in bash, against
``webhookd serve``, and prints what the README shows.

The session block is parsed into commands (``$ `` lines and their continuations) and the output
shown under each. What cannot be the same from one run to the next is normalised, never skipped:

* ids, secrets and keys (``partner_…``, ``evt_…``, ``dlv_…``, ``sk_live_…``, ``whsec_…``,
  ``pak_…``) match by their shape, and each value the README shows is bound to the value this run
  printed in its place; later commands are run with the bound value (the secret the README copies
  into ``listen``, the delivery id it reads back); a value shown twice must come back twice, and
  two values shown must be two values;
* times (keys ending in ``_at``) and durations (``_ms``) match by type;
* the ports: ``8080`` is the server under test and ``9000`` a free port for ``listen``.

Everything else — every key, in order, every state, count, status and message — must be equal.
Output shown after a command's JSON belongs to the job running in the background (``listen``), and
is looked for in that job's output. A command that only reads (no ``-X``) is run again until its
output matches, within a generous bound, because a delivery may still be on its way.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, free_port, wait_for

README = (ROOT / "README.md").read_text(encoding="utf-8")
SESSION_HEADING = "## A session with curl"
README_SERVER, README_LISTEN_PORT = "127.0.0.1:8080", "9000"

TOKEN_SHAPES = [
    r"partner_[0-9a-z]{21}", r"evt_[0-9a-z]{21}", r"dlv_[0-9a-z]{21}",
    r"sk_live_[A-Za-z0-9_-]{43}", r"whsec_[A-Za-z0-9+/=]+", r"pak_[A-Za-z0-9_-]{43}",
]
TOKEN = re.compile("|".join(f"(?:{shape})" for shape in TOKEN_SHAPES))


@dataclass
class Step:
    command: str
    shown: str                       # the output the README shows under it
    background: bool = False


@dataclass
class Session:
    """What one run has learned: shell variables set, README values bound to real ones."""
    env: dict[str, str]
    cwd: Path
    listen_port: int
    server: str
    bound: dict[str, str] = field(default_factory=dict)
    variables: dict[str, str] = field(default_factory=dict)
    jobs: list[subprocess.Popen] = field(default_factory=list)
    job_output: Path | None = None


# --- reading the README --------------------------------------------------------------------------


def session_block(readme: str) -> str:
    after = readme[readme.index(SESSION_HEADING):]
    match = re.search(r"^```console\n(.*?)^```", after, flags=re.S | re.M)
    assert match, f"no ```console block under {SESSION_HEADING!r}"
    return match.group(1)


def is_complete(command: str) -> bool:
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command)
    except ValueError:               # a quote still open: the command goes on
        return False
    return True


def parse_steps(block: str) -> list[Step]:
    steps: list[Step] = []
    lines = block.splitlines()
    i = 0
    while i < len(lines):
        assert lines[i].startswith("$ "), f"session line {i + 1} is neither a command nor its output: {lines[i]!r}"
        command = lines[i][2:]
        i += 1
        while not is_complete(command):
            command += "\n" + lines[i]
            i += 1
        shown: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            shown.append(lines[i])
            i += 1
        background = command.rstrip().endswith("&")
        steps.append(Step(command.rstrip().rstrip("&").rstrip(), "\n".join(shown).strip("\n"), background))
    return steps


def split_shown(shown: str) -> tuple[Any, list[str]]:
    """The JSON document a command printed (or None), and the lines after it (or all its lines)."""
    if not shown.startswith(("{", "[")):
        return None, [line for line in shown.splitlines() if line.strip()]
    document, end = json.JSONDecoder().raw_decode(shown)
    return document, [line for line in shown[end:].splitlines() if line.strip()]


# --- comparing what the README shows with what a run printed -------------------------------------


class Mismatch(AssertionError):
    pass


def match_text(shown: str, printed: str, bound: dict[str, str], where: str) -> None:
    """``printed`` equals ``shown`` once each id, secret and key in ``shown`` stands for a value of
    its shape; binds them (a value bound already must come back the same)."""
    tokens = TOKEN.findall(shown)
    pattern = "".join(
        f"({TOKEN.pattern})" if part in tokens else re.escape(part)
        for part in re.split(f"({TOKEN.pattern})", shown) if part)
    found = re.fullmatch(pattern, printed)
    if not found:
        raise Mismatch(f"{where}: the README shows {shown!r}, the run printed {printed!r}")
    for readme_value, real_value in zip(tokens, found.groups()):
        if bound.setdefault(readme_value, real_value) != real_value:
            raise Mismatch(f"{where}: {readme_value} stood for {bound[readme_value]} before, now {real_value}")
        others = [shown_as for shown_as, value in bound.items() if value == real_value and shown_as != readme_value]
        if others:
            raise Mismatch(f"{where}: the README shows {readme_value} and {others[0]} for one value, {real_value}")


def match_json(shown: Any, printed: Any, bound: dict[str, str], where: str = "$") -> None:
    if isinstance(shown, dict):
        if not isinstance(printed, dict) or list(shown) != list(printed):
            raise Mismatch(f"{where}: the README shows the keys {list(shown)}, the run printed "
                           f"{list(printed) if isinstance(printed, dict) else printed!r}")
        for key in shown:
            if key.endswith(("_at", "_ms")) and shown[key] is not None:
                if not isinstance(printed[key], type(shown[key])):
                    raise Mismatch(f"{where}.{key}: a {type(shown[key]).__name__} in the README, {printed[key]!r} now")
                continue
            match_json(shown[key], printed[key], bound, f"{where}.{key}")
    elif isinstance(shown, list):
        if not isinstance(printed, list) or len(shown) != len(printed):
            raise Mismatch(f"{where}: the README shows {len(shown)} items, the run printed {printed!r}")
        for n, (s, p) in enumerate(zip(shown, printed)):
            match_json(s, p, bound, f"{where}[{n}]")
    elif isinstance(shown, str) and isinstance(printed, str):
        match_text(shown, printed, bound, where)
    elif shown != printed or type(shown) is not type(printed):
        raise Mismatch(f"{where}: the README shows {shown!r}, the run printed {printed!r}")


# --- running a step as written -------------------------------------------------------------------


def as_run(text: str, session: Session) -> str:
    """The README's text with this run's server, port and bound values in place of the README's."""
    text = text.replace(README_SERVER, session.server)
    text = text.replace(f"127.0.0.1:{README_LISTEN_PORT}", f"127.0.0.1:{session.listen_port}")
    text = text.replace(f"--port {README_LISTEN_PORT}", f"--port {session.listen_port}")
    for readme_value, real_value in session.bound.items():
        text = text.replace(readme_value, real_value)
    return text


def as_shown(printed: str, session: Session) -> str:
    """This run's output with the README's server and port in place of the real ones."""
    return (printed.replace(session.server, README_SERVER)
            .replace(f"127.0.0.1:{session.listen_port}", f"127.0.0.1:{README_LISTEN_PORT}"))


def bash(command: str, session: Session, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=session.cwd, capture_output=True,
                          text=True, env={**session.env, **session.variables}, timeout=timeout)


def run_assignment(step: Step, session: Session) -> None:
    name = step.command.split("=", 1)[0]
    done = bash(f'{as_run(step.command, session)} && printf %s "${name}"', session)
    assert done.returncode == 0 and done.stdout, f"{step.command!r} failed: {done.stderr}"
    session.variables[name] = done.stdout


def start_background(step: Step, session: Session) -> None:
    session.job_output = session.cwd / "background.out"
    out = open(session.job_output, "w")
    session.jobs.append(subprocess.Popen(
        ["bash", "-c", "exec " + as_run(step.command, session)], cwd=session.cwd, stdout=out,
        stderr=subprocess.STDOUT, env={**session.env, **session.variables}, start_new_session=True))
    out.close()


def expect_background_lines(lines: list[str], session: Session, where: str) -> None:
    """Each line the README shows for the background job appears in its output, in order."""
    assert session.job_output is not None, f"{where}: output shown for a background job, but none runs"

    def printed_in_order() -> bool:
        printed = [as_shown(line, session) for line in session.job_output.read_text().splitlines()]
        bound = dict(session.bound)
        at = 0
        for shown in lines:
            for n in range(at, len(printed)):
                try:
                    match_text(shown, printed[n], bound, where)
                except Mismatch:
                    continue
                at = n + 1
                break
            else:
                return False
        session.bound.update(bound)
        return True

    try:
        wait_for(printed_in_order, timeout=30, interval=0.1)
    except AssertionError:
        raise AssertionError(f"{where}: the README shows {lines}, the background job printed:\n"
                             f"{session.job_output.read_text()}") from None


def run_command(step: Step, number: int, session: Session) -> None:
    where = f"README session, command {number} ({step.command.splitlines()[0][:60]}…)"
    document, lines = split_shown(step.shown)
    reads_only = " -X " not in step.command
    last: list[str] = []

    def printed_as_shown() -> bool:
        done = bash(as_run(step.command, session), session)
        assert done.returncode == 0, f"{where} exited {done.returncode}: {done.stderr}"
        printed = as_shown(done.stdout, session)
        last[:] = [printed]
        bound = dict(session.bound)
        try:
            if document is not None:
                match_json(document, json.loads(printed), bound)
            elif lines:
                match_text("\n".join(lines), printed.strip("\n"), bound, where)
        except Mismatch as mismatch:
            if not reads_only:
                raise Mismatch(f"{where}: {mismatch}\nthe run printed:\n{printed}") from None
            last.append(str(mismatch))
            return False
        session.bound.update(bound)
        return True

    if reads_only:
        try:
            wait_for(printed_as_shown, timeout=30, interval=0.2)
        except AssertionError:
            raise AssertionError(f"{where}: {last[-1]}\nthe run printed:\n{last[0]}") from None
    else:
        printed_as_shown()
    if document is not None and lines:
        expect_background_lines(lines, session, where)


# --- the test ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def curl_ready() -> None:
    if shutil.which("curl") is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "apt-install-no-services.sh"), "curl"],
                       check=True, timeout=900)
    if shutil.which("curl") is None:
        pytest.fail("curl is missing after scripts/apt-install-no-services.sh curl")


def venv_webhookd(folder: Path) -> None:
    """``.venv/bin/webhookd``, as ``make run`` installs it, for the interpreter under test."""
    script = folder / ".venv" / "bin" / "webhookd"
    script.parent.mkdir(parents=True)
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(ROOT / "cli.py"))} '
                      f'--config {shlex.quote(str(ROOT / "webhookd.toml"))} "$@"\n')
    script.chmod(0o755)


def test_the_session_parses_into_commands_and_their_output():
    steps = parse_steps(session_block(README))
    commands = [step.command.split()[0] for step in steps]
    assert commands[0].startswith("TOKEN=") and commands.count("curl") >= 3
    assert any(step.background for step in steps), "the session starts `webhookd listen` in the background"
    assert all(step.shown or "=" in step.command.split()[0] for step in steps), "every command shows its output"


def test_the_readme_session_prints_what_the_readme_shows(curl_ready, serve_factory, tmp_path):
    # The bundled config's delivery policy, which the README's answers show (a partner's "retry").
    serve = serve_factory(WEBHOOKD_DELIVERY_TIMEOUT_S="5", WEBHOOKD_DELIVERY_BACKOFF_BASE_S="30",
                          WEBHOOKD_DELIVERY_BACKOFF_MAX_S="3600")
    venv_webhookd(tmp_path)
    session = Session(env={**serve.env, "WEBHOOKD_SERVER_PORT": str(serve.port)}, cwd=tmp_path,
                      listen_port=free_port(), server=f"127.0.0.1:{serve.port}")
    try:
        for number, step in enumerate(parse_steps(session_block(README)), start=1):
            if re.match(r"^[A-Z_]+=", step.command):
                run_assignment(step, session)
            elif step.background:
                start_background(step, session)
                expect_background_lines(step.shown.splitlines(), session, f"README session, command {number}")
            else:
                run_command(step, number, session)
    finally:
        for job in session.jobs:
            if job.poll() is None:
                job.terminate()
                try:
                    job.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.kill()
                    job.wait(timeout=5)

"""A command line that explains itself: every command and argument has help, times read as people
write them, `webhookd init` writes a config that is the defaults, and the exit status says whose
mistake it was (2: the command was given wrong; 1: it was refused)."""

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime

import pytest

import config
import config_template
from cli import plural
from cli_parser import build_parser, when
from conftest import ROOT, free_port


def _cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env={**os.environ, **(env or {})}, timeout=30)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_command_has_a_description_and_every_argument_a_help():
    parser = build_parser()
    missing = []
    summaries = {a.dest: a.help for a in next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction))._choices_actions}
    for name, sub in {"webhookd": parser, **_subcommands(parser)}.items():
        if not (sub.description or "").strip():
            missing.append(f"{name}: no description")
        if name != "webhookd" and not (summaries.get(name) or "").strip():
            missing.append(f"{name}: no one-line summary in webhookd --help")
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, missing
    assert len(_subcommands(parser)) >= 17


@pytest.mark.parametrize("command", sorted(_subcommands(build_parser())))
def test_each_commands_help_says_what_it_does(command):
    shown = _cli(command, "--help")
    assert shown.returncode == 0
    summary = _subcommands(build_parser())[command].description
    assert summary.split()[0] in shown.stdout and "exit status" in shown.stdout


def test_times_are_iso_8601_a_time_ago_or_unix_seconds():
    now = 1_800_000_000
    assert when("1796651937", now) == 1796651937
    assert when("30m", now) == now - 1800
    assert when("2h", now) == now - 7200
    assert when("1d", now) == now - 86400
    assert when(" 1.5h ", now) == now - 5400
    assert when("2026-12-07T08:30Z", now) == int(datetime(2026, 12, 7, 8, 30, tzinfo=UTC).timestamp())
    assert when("2026-12-07T09:30+01:00", now) == when("2026-12-07T08:30Z", now)
    assert when("2026-12-07", now) == int(datetime(2026, 12, 7).timestamp())   # local midnight
    with pytest.raises(argparse.ArgumentTypeError, match="ISO 8601"):
        when("yesterday", now)


def test_a_bad_time_is_a_usage_mistake_naming_the_forms_it_takes():
    bad = _cli("--config", str(ROOT / "webhookd.toml"), "recover", "partner_x", "--since", "last tuesday")
    assert bad.returncode == 2
    assert "argument --since: 'last tuesday' is not a time" in bad.stderr and "30m, 2h, 1d" in bad.stderr


def test_plurals():
    assert [plural(n, "partner") for n in (0, 1, 2)] == ["0 partners", "1 partner", "2 partners"]
    assert plural(1, "delivery", "deliveries") == "1 delivery" and plural(3, "delivery", "deliveries") == "3 deliveries"


def test_usage_mistakes_exit_2_and_refusals_exit_1(tmp_path):
    """No server is running on the port: what is wrong with the command is said first (2); a
    well-formed command that cannot be carried out is refused (1)."""
    down = {"WEBHOOKD_SERVER_PORT": str(free_port()), "WEBHOOKD_STORAGE_PATH": str(tmp_path / "w.db"),
            "WEBHOOKD_ADMIN_TOKEN": "adm_x"}
    config_file = ("--config", str(ROOT / "webhookd.toml"))
    usage = {
        "unknown option": _cli(*config_file, "deliveries", "--colour", "red", env=down),
        "bad --data JSON": _cli(*config_file, "publish", "payment.success", "--data", "{oops", env=down),
        "--data not an object": _cli(*config_file, "publish", "payment.success", "--data", "[1]", env=down),
        "--data @missing file": _cli(*config_file, "publish", "payment.success", "--data", "@/nonexistent.json",
                                     env=down),
        "delete without --yes": _cli(*config_file, "partners", "delete", "partner_x", env=down),
        "no PARTNER_ID": _cli(*config_file, "partners", "show", env=down),
        "suspend without --reason": _cli(*config_file, "partners", "suspend", "partner_x", env=down),
        "--revoke-old alone": _cli(*config_file, "token", "--revoke-old", env=down),
        "bad config value": _cli(*config_file, "partners", "list", env={**down, "WEBHOOKD_SERVER_PORT": "http"}),
        "no such config file": _cli("--config", str(tmp_path / "nope.toml"), "partners", "list", env=down),
        "sign bad JSON": _cli("sign", "--secret", "s", "{oops"),
    }
    for mistake, result in usage.items():
        assert result.returncode == 2, (mistake, result.stderr)
        assert result.stderr.startswith(("webhookd: ", "usage: webhookd")), (mistake, result.stderr)
    unreachable = _cli(*config_file, "partners", "list", env=down)
    assert unreachable.returncode == 1 and "cannot reach webhookd" in unreachable.stderr


def test_listen_on_a_busy_port_names_it_and_the_option(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _cli("listen", "--secret", "s3cret", "--port", str(port), cwd=tmp_path)
    assert busy.returncode == 1
    assert busy.stderr == (f"webhookd: port {port} on 127.0.0.1 is already in use by another program: stop it, "
                           "or choose another port with --port (and register that URL)\n")


def test_init_writes_a_commented_config_whose_every_value_is_the_default(tmp_path):
    written = _cli("init", cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    text = (tmp_path / "webhookd.toml").read_text()
    assert text == config_template.TEXT and text.count("#") > 20
    loaded = config.load_config(tmp_path / "webhookd.toml", environ={})
    defaults = config.Config()
    for section in config.SECTIONS:
        if section == "storage":
            assert loaded.storage.path == str(tmp_path / "data" / "webhookd.db")
            assert dataclasses.replace(loaded.storage, path=defaults.storage.path) == defaults.storage
        else:
            assert getattr(loaded, section) == getattr(defaults, section), section
    assert loaded.events == config.GUIDE_CATALOG

    again = _cli("init", cwd=tmp_path)
    assert again.returncode == 1 and "exists already" in again.stderr and "--force" in again.stderr
    (tmp_path / "webhookd.toml").write_text("# mine\n")
    assert _cli("init", "--force", cwd=tmp_path).returncode == 0
    assert (tmp_path / "webhookd.toml").read_text() == config_template.TEXT

"""The README is the front door: every config key, command and route it promises is real."""

import dataclasses
import re
import tomllib

import cli
import config
from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_config_key_is_in_the_readme_and_the_bundled_file():
    bundled = (ROOT / "webhookd.toml").read_text()
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in README, f"{section}.{f.name} missing from the README"
            if f.name != "admin_token":
                assert re.search(rf"^#?\s*{f.name}\s*=", bundled, re.M), f"{section}.{f.name} missing from webhookd.toml"


def test_every_command_is_in_the_readme_with_help():
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {"serve", "token", "partners", "publish", "deliveries", "retry", "recover", "sign", "listen"}
    for name, sub in commands.items():
        assert f"`webhookd {name}" in README, f"webhookd {name} missing from the README"
        assert sub.format_help().startswith("usage: webhookd")


def test_every_route_is_in_the_readme(hub):
    for r in hub.app.routes:
        path = re.sub(r"\{[^}]+\}", "{id}", r.path)
        assert path in README, f"{path} missing from the README"


def test_the_readme_opens_with_the_two_commands():
    head = README[:600]
    assert "make run" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_module_is_in_the_layout_the_architecture_page_and_the_install():
    """A module added without a row in the README's layout, in docs/architecture.md's table, or in
    pyproject's py-modules (which the installed `webhookd` command imports from) fails here."""
    modules = sorted(p.stem for p in ROOT.glob("*.py"))
    layout = README[README.index("## Layout"):]
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for module in modules:
        assert f"`{module}.py`" in layout, f"{module}.py missing from the README's layout table"
        assert f"`{module}.py`" in architecture, f"{module}.py missing from docs/architecture.md"
    installed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(installed) == modules


def test_the_spanish_partner_guide_is_the_same_guide():
    """docs/partners.es.md is kept in step with docs/partners.md: the same numbered sections and
    every code block — every command a partner runs — the same, line for line."""
    import re

    def blocks(text: str) -> list[str]:
        return re.findall(r"^```\w*\n(.*?)^```", text, flags=re.S | re.M)

    def sections(text: str) -> list[str]:
        return re.findall(r"^## (\d+)\.", text, flags=re.M)

    english = (ROOT / "docs" / "partners.md").read_text()
    spanish = (ROOT / "docs" / "partners.es.md").read_text()
    assert sections(spanish) == sections(english) and len(sections(english)) >= 8
    assert blocks(spanish) == blocks(english), "a code block differs: update docs/partners.es.md with the English"
    assert "partners.es.md" in english and "partners.md" in spanish

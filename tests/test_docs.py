"""The README is the front door and docs/ holds the reference: every config key, command and route
they promise is real, every link between them leads somewhere, and they read as product docs."""

import ast
import dataclasses
import re
import tomllib

from test_imports import imported_modules

import cli
import config
from conftest import ROOT

DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PARTNER_GUIDES = {DOCS / "partners.md", DOCS / "partners.es.md"}


def page(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def test_every_config_key_is_in_the_configuration_page_and_the_bundled_file():
    documented = page("configuration.md")
    bundled = (ROOT / "webhookd.toml").read_text()
    for section, cls in config.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in documented, f"{section}.{f.name} missing from docs/configuration.md"
            if f.name != "admin_token":
                assert re.search(rf"^#?\s*{f.name}\s*=", bundled, re.M), f"{section}.{f.name} missing from webhookd.toml"


def test_every_command_is_in_the_command_line_table_with_help():
    operations = page("operations.md")
    table = operations[operations.index("## Command line"):]
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) >= {"serve", "token", "partners", "publish", "deliveries", "retry", "recover", "sign", "listen"}
    for name, sub in commands.items():
        assert re.search(rf"^\|[^|\n]*`webhookd {re.escape(name)}[ `]", table, re.M), \
            f"webhookd {name} has no row in docs/operations.md's command line table"
        assert sub.format_help().startswith("usage: webhookd")


def test_every_route_is_in_the_api_page(hub):
    """Every route is in docs/api.md, or in the page of its own that docs/api.md has no room for
    (docs/polling.md for a partner's events)."""
    api = page("api.md") + "".join(page(p.name) for p in sorted((ROOT / "docs").glob("*.md")))
    for r in hub.app.routes:
        path = re.sub(r"\{[^}]+\}", "{id}", r.path)
        assert path in api, f"{path} missing from docs/api.md (or a page of its own in docs/)"


def test_the_readme_opens_with_the_two_commands():
    """The first shell block, before any section, is `make run` and `make test`."""
    before_sections = README[:README.index("\n## ")]
    first_block = re.search(r"^```bash\n(.*?)^```", before_sections, flags=re.S | re.M)
    assert first_block, "the README's opening has no ```bash block"
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make run", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readme_is_a_front_door():
    assert len(README.splitlines()) <= 300, "README.md over 300 lines: move the reference into docs/"
    for name in ("configuration.md", "api.md", "operations.md", "postgresql.md", "performance.md",
                 "security.md", "architecture.md", "partners.md", "partners.es.md"):
        assert f"](docs/{name})" in README, f"the README does not link docs/{name}"
    assert "/dashboard" in README and "/portal" in README and "/openapi.json" in README


def test_every_module_is_in_the_architecture_page_and_the_install():
    """A module added without a row in docs/architecture.md's table, or in pyproject's py-modules
    (which the installed `webhookd` command imports from) fails here."""
    modules = sorted(p.stem for p in ROOT.glob("*.py"))
    architecture = page("architecture.md")
    for module in modules:
        assert f"`{module}.py`" in architecture, f"{module}.py missing from docs/architecture.md"
    installed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"]
    assert sorted(installed) == modules


# --- the map: docs/architecture.md names functions and imports that exist ---------------------------

# `store_sqlite.py:SQLiteStore.claim_due`, `web.py:route.guarded`, `delivery.py:decide`: a file, then a
# dotted path through its classes and functions.
REFERENCE = re.compile(r"`([a-z_][a-z0-9_]*\.py):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)`")


def defines(path, dotted: str) -> bool:
    """Whether the file at ``path`` defines the function ``dotted`` names: ``name``, ``Class.method``
    or ``function.inner``, each step a class or function defined directly in the one before."""
    scope = ast.parse(path.read_text(encoding="utf-8")).body
    *outer, last = dotted.split(".")
    for name in outer:
        found = [n for n in scope if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == name]
        if not found:
            return False
        scope = found[0].body
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == last for n in scope)


def wrong_references(text: str) -> list[str]:
    """The ``file.py:function`` references in ``text`` that name no function of that file."""
    return [f"{file}:{dotted}" for file, dotted in REFERENCE.findall(text)
            if not (ROOT / file).is_file() or not defines(ROOT / file, dotted)]


def test_the_reference_check_catches_what_it_should_and_only_that():
    assert wrong_references("`delivery.py:decide`, `store.py:Store.publish`, `web.py:route.guarded`") == []
    assert wrong_references("`delivery.py:Store.publish`, `store.py:Store.decide`, `engines.py:connect`, "
                            "`store.py:Store`, `web.py:guarded`") == [
        "delivery.py:Store.publish", "store.py:Store.decide", "engines.py:connect", "store.py:Store", "web.py:guarded"]


def test_every_function_the_architecture_page_names_exists():
    """Each `file.py:function` or `file.py:Class.method` step in docs/architecture.md is a function
    defined in that file, so a rename or a move that forgets the map fails here."""
    architecture = page("architecture.md")
    assert len(REFERENCE.findall(architecture)) >= 40, "the page lost its path of file:function steps"
    assert not wrong_references(architecture), f"docs/architecture.md names functions that do not exist: " \
                                               f"{wrong_references(architecture)}"


def test_the_module_table_lists_what_each_module_imports():
    """The last column of docs/architecture.md's module table is every module of ours the row's
    modules import (anywhere: at the top, in a function, for type hints), as tests/test_imports.py
    reads them."""
    architecture = page("architecture.md")
    table = architecture[architecture.index("## The modules"):architecture.index("## One outbound event")]
    modules = {path.stem for path in ROOT.glob("*.py")}
    rows = re.findall(r"^\| (`[^|]*\.py`[^|]*) \|[^\n]*\| ([^|\n]*) \|$", table, flags=re.M)
    assert {m for cell, _ in rows for m in re.findall(r"`(\w+)\.py`", cell)} == modules
    for cell, imports in rows:
        named = set(re.findall(r"`(\w+)`", imports)) & modules
        for module in re.findall(r"`(\w+)\.py`", cell):
            actual = imported_modules(ROOT / f"{module}.py") - {module}
            assert named == actual, f"{module}.py imports {sorted(actual)}; docs/architecture.md says {sorted(named)}"


def test_webhookds_map_names_every_module():
    """webhookd.py's docstring, where a reader starts, has the map in short: "Where the rest lives"
    names every other module, as docs/architecture.md's table does."""
    import webhookd

    short_map = webhookd.__doc__[webhookd.__doc__.index("Where the rest lives"):]
    for path in sorted(ROOT.glob("*.py")):
        if path.stem != "webhookd":
            assert f"``{path.name}``" in short_map, f"{path.name} missing from webhookd.py's 'Where the rest lives'"


def test_every_folder_is_in_the_layout():
    development = page("development.md")
    layout = development[development.index("## Layout"):]
    folders = sorted(p.name for p in ROOT.iterdir()
                     if p.is_dir() and not p.name.startswith((".", "_")) and any(p.rglob("*.*"))
                     and p.name not in {"data", "build", "node_modules"} and not p.name.endswith(".egg-info"))
    for folder in folders:
        assert f"`{folder}/`" in layout, f"{folder}/ missing from docs/development.md's layout"


# --- links -------------------------------------------------------------------------------------------


def prose(text: str) -> str:
    """Markdown without its code blocks and inline code (where a link or a word is only an example)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(text: str) -> set[str]:
    """The heading anchors GitHub makes: rendered text, lower case, punctuation dropped, spaces as
    hyphens, a repeated one numbered."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+?)\s*$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M):
        rendered = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", rendered.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def relative_links(text: str) -> list[str]:
    targets = re.findall(r"\]\(([^)\s]+)\)", prose(text))
    return [t for t in targets if not re.match(r"^[a-z]+:", t)]


def test_the_anchors_are_made_as_github_makes_them():
    assert anchors("## Ordered delivery (`\"ordering\": \"fifo\"`)\n## 2. Put it behind a TLS proxy\n"
                   "## A partner's whole life: expiry\n## Watching it\n## Watching it\n") == {
        "ordered-delivery-ordering-fifo", "2-put-it-behind-a-tls-proxy", "a-partners-whole-life-expiry",
        "watching-it", "watching-it-1"}


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    checked = 0
    for source in PAGES:
        for target in relative_links(source.read_text(encoding="utf-8")):
            path, _, anchor = target.partition("#")
            destination = (source.parent / path).resolve() if path else source
            where = f"{source.relative_to(ROOT)} links {target}"
            assert destination.exists(), f"{where}: no such file"
            assert destination.is_relative_to(ROOT), f"{where}: outside the repository"
            if anchor:
                assert destination.suffix == ".md", f"{where}: an anchor into a file that is not Markdown"
                assert anchor in anchors(destination.read_text(encoding="utf-8")), f"{where}: no such heading"
            checked += 1
    assert checked >= 20


# --- product voice -------------------------------------------------------------------------------------

# Development history has no place in product docs: issue numbers, "this session", "the SPEC" (say
# "the contract", or link /openapi.json), and first person. The partner guides speak for the
# operator to its partners ("we send you…"), so only their singular "I" is refused.
HISTORY = {
    "an issue number": re.compile(r"\bissues? #?\d+", re.I),
    "this session": re.compile(r"\bthis session\b", re.I),
    "the SPEC": re.compile(r"\bSPEC\b"),
    "first person (I)": re.compile(r"(?<!\S)I(?:'[a-z]+)?(?!\S)"),
}
WE = re.compile(r"\b[Ww]e\b")


def history_words(text: str, partner_guide: bool = False) -> list[str]:
    text = prose(text)
    found = [f"{name}: {m.group(0)!r}" for name, pattern in HISTORY.items() for m in pattern.finditer(text)]
    if not partner_guide:
        found += [f"first person (we): {m.group(0)!r}" for m in WE.finditer(text)]
    return found


def test_the_history_check_catches_what_it_should_and_only_that():
    assert len(history_words("Decided in issue 10. In this session I could not measure it; the SPEC says we wait.")) == 5
    assert history_words("An I/O error; `issue 3` in code; the spec of a URL; a webhook. Issued keys.") == []
    assert history_words("We send you every event.", partner_guide=True) == []


def test_no_development_history_in_the_readme_and_docs():
    for source in PAGES:
        found = history_words(source.read_text(encoding="utf-8"), partner_guide=source in PARTNER_GUIDES)
        assert not found, f"{source.relative_to(ROOT)}: {found}"


# A comment in a code block: `# ...` or `// ...` at the start of a line or after a space (not the
# `//` of a URL, nor the `#` of `$#`), to the end of the line.
CODE_COMMENT = re.compile(r"(?:^|[ \t])(?:#|//)(?: .*)?$")
# Comments the Spanish guide may keep as they are: a command to run, or an answer shown.
UNTRANSLATED = re.compile(r"^(?:#|//) (?:(?:pip|npm) install \S+|(?:\d{3} )?\{.*\})$")


def code_and_comments(block: str) -> tuple[str, list[str]]:
    """A block's code, each line without its comment and trailing blanks; and its comments."""
    lines = block.splitlines()
    comments = [m.group(0).strip() for line in lines if (m := CODE_COMMENT.search(line))]
    return "\n".join(CODE_COMMENT.sub("", line).rstrip() for line in lines), comments


def test_the_comment_split_keeps_urls_and_finds_comments():
    code, comments = code_and_comments('curl "https://x.example/a"  # en local\n// tras verificar\nx = 1\n')
    assert code == 'curl "https://x.example/a"\n\nx = 1'
    assert comments == ["# en local", "// tras verificar"]


def test_the_spanish_partner_guide_is_the_same_guide():
    """docs/partners.es.md is kept in step with docs/partners.md: the same numbered sections and
    every code block — every command a partner runs — the same, line for line, but for its
    comments, which are in Spanish (a command or an answer shown in a comment may stay as is)."""

    def blocks(text: str) -> list[str]:
        return re.findall(r"^```\w*\n(.*?)^```", text, flags=re.S | re.M)

    def sections(text: str) -> list[str]:
        return re.findall(r"^## (\d+)\.", text, flags=re.M)

    english = page("partners.md")
    spanish = page("partners.es.md")
    assert sections(spanish) == sections(english) and len(sections(english)) >= 8
    assert len(blocks(spanish)) == len(blocks(english))
    for en, es in zip(blocks(english), blocks(spanish)):
        (en_code, en_comments), (es_code, es_comments) = code_and_comments(en), code_and_comments(es)
        assert es_code == en_code, f"a code block differs: update docs/partners.es.md with the English:\n{en}"
        assert len(es_comments) == len(en_comments), f"a comment is missing or extra in the Spanish block:\n{es}"
        kept = [c for c, e in zip(es_comments, en_comments) if c == e and not UNTRANSLATED.match(c)]
        assert not kept, f"comments left in English in docs/partners.es.md: {kept}"
    # The placeholders of the prose, like `<your webhook_url>`, are translated; a field name such
    # as `<next_cursor>` stays what the API calls it.
    placeholders = {p for span in re.findall(r"`[^`\n]+`", re.sub(r"^```.*?^```", "", english, flags=re.S | re.M))
                    for p in re.findall(r"<[a-z][^>`]*>", span)}
    assert "<your webhook_url>" in placeholders
    kept = {p for p in placeholders if p in spanish and not re.fullmatch(r"<[a-z]+(?:_[a-z]+)+>", p)}
    assert not kept, f"placeholders left in English in docs/partners.es.md: {sorted(kept)}"
    assert "partners.es.md" in english and "partners.md" in spanish


def test_pages_are_found_from_the_readme():
    """Every page in docs/ is linked from the README (directly), so none is an orphan."""
    for doc in sorted(DOCS.glob("*.md")):
        assert f"](docs/{doc.name})" in README, f"docs/{doc.name} is not linked from the README"


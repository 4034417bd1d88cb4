"""The partner guides run as written: every code block of docs/partners.md and docs/partners.es.md
is run against a live webhookd on 127.0.0.1, or is marked as an illustration.

A block is one of:

* an illustration: the line ``<!-- illustration -->`` just above it (placeholders, output of a
  long-running command, a message seen elsewhere); not run;
* a catalog example: inside ``<!-- event-types:start -->`` … ``<!-- event-types:end -->``, one
  payload per type, generated from the catalog (``catalog.py``) and compared with it here;
  ``PYTHONPATH=. python tests/test_guide_snippets.py`` rewrites those regions after the catalog changes;
* a receiver: Python, JavaScript or PHP whose paragraph says to save it as ``receiver….py|js|php``
  and how to start it; started so, on a free port instead of the one shown, then sent every
  example of the catalog through webhookd (all must be delivered) and a forged request (401);
* a step: ``bash``, ``python`` or ``console``, run in order as the guide goes, in bash with
  ``set -euo pipefail``; a ``console`` block's ``$`` lines must print what it shows;
* an answer: a ``json`` block, the answer of the step before it; what it shows (its keys, at
  every level) must be in the real answer.

A step sees only the variables the guide's opening block sets "once in your shell" and those named
in the paragraph just above it (``$ADMIN_TOKEN``, ``$DELIVERY_ID``, …); any other is unset, so a
snippet using an undefined name fails. A step that sends an event must add exactly one row to
``GET /inbound``: two examples sharing an id would be taken as one event, silently.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

import catalog
import config
from conftest import ADMIN, ADMIN_TOKEN, GUARD_DIR, ROOT, Receiver, ReceiverProcess, free_port, wait_for

GUIDES = {"en": ROOT / "docs" / "partners.md", "es": ROOT / "docs" / "partners.es.md"}
ILLUSTRATION = "<!-- illustration -->"
CATALOG_START, CATALOG_END = "<!-- event-types:start -->", "<!-- event-types:end -->"
FENCE = re.compile(r"^```(\w*)\s*$")
RECEIVER_FILE = re.compile(r"`(receiver\w*\.(?:py|js|php))`")
RECEIVER_START = re.compile(r"`((?:uvicorn |PORT=\d+ node |php -S )[^`]+)`")
# A port in a start command (`--port 9100`, `PORT=9200`, `127.0.0.1:9300`) or a default in code (`PORT || 9200`).
PORT = re.compile(r"(--port |PORT=|127\.0\.0\.1:|PORT \|\| )(\d+)")
SENDS_AN_EVENT = re.compile(r"/webhooks/partners|send_event\.py")
RUNTIME = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")


@dataclass
class Block:
    lang: str
    code: str
    line: int            # where its fence opens, 1-based
    above: str           # the paragraph just above it
    illustration: bool
    generated: bool      # inside the catalog's examples

    @property
    def kind(self) -> str:
        if self.illustration:
            return "illustration"
        if self.generated:
            return "catalog"
        if self.lang == "json":
            return "answer"
        if self.lang in ("python", "javascript", "php") and RECEIVER_FILE.search(self.above):
            return "receiver"
        if self.lang in ("bash", "python", "console"):
            return "step"
        return "unmarked"


def parse(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, generated, i = [], False, 0
    while i < len(lines):
        line = lines[i]
        if line.strip() in (CATALOG_START, CATALOG_END):
            generated = line.strip() == CATALOG_START
        fence = FENCE.match(line)
        if not fence or not fence.group(1):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        above, k, illustration = [], i - 1, False
        while k >= 0 and (not lines[k].strip() or lines[k].strip() == ILLUSTRATION):
            illustration |= lines[k].strip() == ILLUSTRATION and k == i - 1
            k -= 1
        while k >= 0 and lines[k].strip() and not lines[k].startswith("```"):
            above.insert(0, lines[k])
            k -= 1
        blocks.append(Block(fence.group(1), "\n".join(lines[i + 1:end]) + "\n", i + 1, "\n".join(above),
                            illustration, generated))
        i = end + 1
    return blocks


def guide_blocks(guide: str) -> list[Block]:
    return parse(GUIDES[guide].read_text(encoding="utf-8"))


def shell_wide_names(blocks: list[Block]) -> set[str]:
    """What the opening block sets "once in your shell": every later step may use these."""
    return set(re.findall(r"\b([A-Z][A-Z0-9_]+)=", blocks[0].code))


def named_above(block: Block) -> set[str]:
    """The variables the paragraph above a block names in code style: `$ADMIN_TOKEN`, `DELIVERY_ID`."""
    return {m.group(1) for m in re.finditer(r"`\$?([A-Z][A-Z0-9_]{2,})`", block.above)}


# --- every block is run, compared or marked -------------------------------------------------------


@pytest.mark.parametrize("guide", GUIDES)
def test_every_block_runs_or_is_marked_as_an_illustration(guide):
    blocks = guide_blocks(guide)
    unmarked = [f"line {b.line} ({b.lang})" for b in blocks if b.kind == "unmarked"]
    assert not unmarked, f"{GUIDES[guide].name}: blocks neither run nor marked {ILLUSTRATION}: {unmarked}"
    kinds = [b.kind for b in blocks]
    assert kinds.count("step") >= 12 and kinds.count("receiver") == 5 and kinds.count("catalog") >= 4
    assert kinds.count("illustration") <= 6, "most of the guide must run; mark only what cannot"
    for i, block in enumerate(blocks):
        if block.kind == "answer":
            before = [b for b in blocks[:i] if b.kind != "illustration"]
            assert before and before[-1].kind == "step", f"line {block.line}: an answer with no step before it"
    assert {"WEBHOOKD_URL", "PARTNER_ID", "PARTNER_API_KEY", "PARTNER_SHARED_SECRET",
            "PARTNER_STANDARD_WEBHOOKS_SECRET"} <= shell_wide_names(blocks)


@pytest.mark.parametrize("guide", GUIDES)
def test_every_receiver_says_how_to_start_it_on_a_port_of_its_own(guide):
    for block in (b for b in guide_blocks(guide) if b.kind == "receiver"):
        name = RECEIVER_FILE.search(block.above).group(1)
        start = RECEIVER_START.search(block.above)
        assert start and name.rsplit(".", 1)[0] in start.group(1), f"line {block.line}: how to start {name}?"
        ports = [p for _, p in PORT.findall(start.group(1)) + PORT.findall(block.code)]
        assert ports and not {"8080", "9000"} & set(ports), f"{name}: ports {ports} clash with webhookd or listen"


@pytest.mark.parametrize("guide", GUIDES)
def test_each_sending_example_has_its_own_event_id(guide):
    per_block = [set(re.findall(r"\bmsg_\w+", b.code)) for b in guide_blocks(guide) if b.kind == "step"]
    seen: set[str] = set()
    for found in per_block:
        assert not found & seen, f"{sorted(found & seen)} used by two examples: the second is a duplicate"
        seen |= found
    assert len(seen) >= 2


# --- the catalog's examples ------------------------------------------------------------------------


def catalog_examples() -> str:
    """The region the guides show: one block per type of the bundled catalog, its example."""
    events = config.load_config(ROOT / "webhookd.toml", environ={}).events
    return "\n\n".join(f"```json\n{json.dumps(t['example'], ensure_ascii=False)}\n```"
                       for t in catalog.event_types(events)["event_types"])


def with_catalog_examples(text: str) -> str:
    start, end = text.index(CATALOG_START) + len(CATALOG_START), text.index(CATALOG_END)
    return text[:start] + "\n" + catalog_examples() + "\n" + text[end:]


@pytest.mark.parametrize("guide", GUIDES)
def test_the_guide_shows_one_example_per_type_of_the_catalog(guide):
    text = GUIDES[guide].read_text(encoding="utf-8")
    assert text == with_catalog_examples(text), (
        f"{GUIDES[guide].name}: the examples differ from the catalog; run `PYTHONPATH=. python tests/test_guide_snippets.py`")
    shown = [json.loads(b.code)["event"] for b in guide_blocks(guide) if b.kind == "catalog"]
    assert shown == sorted(config.GUIDE_CATALOG)


# --- the steps, in order, against a live webhookd -----------------------------------------------------


def same_shape(shown, actual, where="answer") -> list[str]:
    """What ``shown`` has that ``actual`` lacks: its keys at every level (each item of a list of
    objects against the first shown)."""
    if isinstance(shown, dict):
        if not isinstance(actual, dict):
            return [f"{where}: an object, not {actual!r}"]
        return [problem for key, value in shown.items()
                for problem in ([f"{where}.{key} missing"] if key not in actual
                                else same_shape(value, actual[key], f"{where}.{key}"))]
    if isinstance(shown, list) and shown and isinstance(shown[0], dict):
        if not isinstance(actual, list):
            return [f"{where}: a list, not {actual!r}"]
        return [problem for item in actual for problem in same_shape(shown[0], item, f"{where}[]")]
    return []


def answers_in(code: str) -> list[dict]:
    """Answers a block shows in a comment, e.g. ``# 202 {"event_id": ...}``."""
    return [json.loads(m.group(1)) for m in re.finditer(r"^# (?:\d{3} )?(\{.*\})$", code, flags=re.M)]


def error_in(output: str) -> str | None:
    for line in [output, *output.splitlines()]:
        try:
            answer = json.loads(line.strip())
        except ValueError:
            continue
        if isinstance(answer, dict) and "error" in answer:
            return line
    return None


class GuideSession:
    """One partner following the guide against ``hub``: the values the guide's variables hold."""

    def __init__(self, hub, tmp_path: Path):
        self.hub = hub
        self.tmp_path = tmp_path
        self.failing = Receiver(default=(500, 0.0)).start()  # so that section 8 has a failed delivery
        partner = hub.register(self.failing.url, ["payment.success"], name="Montaña Tours")
        self.partner = partner
        self.values = {"WEBHOOKD_URL": hub.url, "ADMIN_TOKEN": ADMIN_TOKEN, "PARTNER_ID": partner["partner_id"],
                       "PARTNER_API_KEY": partner["api_key"], "PARTNER_SHARED_SECRET": partner["shared_secret"],
                       "PARTNER_STANDARD_WEBHOOKS_SECRET": partner["standard_webhooks_secret"]}
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        command = bin_dir / "webhookd"  # the installed command, as `make install` provides it
        command.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'cli.py'))} \"$@\"\n")
        command.chmod(0o755)
        self.path = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

    def value(self, name: str) -> str | None:
        if name == "DELIVERY_ID":
            return self.failed_delivery()
        return self.values.get(name)

    def failed_delivery(self) -> str:
        def failed():
            items = self.hub.deliveries(partner_id=self.partner["partner_id"], state="failed")
            return items and items[0]["delivery_id"]
        return wait_for(failed, timeout=30, interval=0.1)

    def env(self, names: set[str]) -> dict[str, str]:
        env = {k: os.environ[k] for k in RUNTIME if k in os.environ}
        env.update(PATH=self.path, PYTHONPATH=str(GUARD_DIR))
        for name in names:
            value = self.value(name)
            if value is not None:
                env[name] = value
        return env

    def inbound_count(self) -> int:
        r = self.hub.http.get("/inbound", headers=ADMIN, params={"limit": 200})
        assert r.status_code == 200, r.text
        return len(r.json()["items"])

    def run(self, block: Block, names: set[str]) -> str:
        env = self.env(names)
        if block.lang == "console":
            return self.run_console(block, env)
        if block.lang == "python":
            script = self.tmp_path / f"step_{block.line}.py"
            script.write_text(block.code)
            command = [sys.executable, str(script)]
        else:
            command = ["bash", "-euo", "pipefail", "-c", block.code]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"line {block.line} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        assert done.stdout.strip(), f"line {block.line} printed nothing:\n{done.stderr}"
        return done.stdout

    def run_console(self, block: Block, env: dict[str, str]) -> str:
        chunks = re.split(r"^\$ ", block.code, flags=re.M)[1:]
        assert chunks, f"line {block.line}: a console block without a $ command"
        for chunk in chunks:
            command, _, shown = chunk.partition("\n")
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"line {block.line}: {command}:\n{done.stderr}"
            assert done.stdout.strip() == shown.strip(), f"line {block.line}: {command} printed {done.stdout!r}"
        return done.stdout

    def stop(self) -> None:
        self.failing.stop()


@pytest.fixture(scope="module")
def shell_tools() -> None:
    """curl and openssl, which the guides' steps call: installed when missing; a failure, never a skip."""
    missing = [tool for tool in ("curl", "openssl") if shutil.which(tool) is None]
    if missing:
        subprocess.run(["bash", str(ROOT / "scripts" / "apt-install-no-services.sh"), *missing],
                       check=True, timeout=900)
    still = [tool for tool in ("curl", "openssl") if shutil.which(tool) is None]
    if still:
        pytest.fail(f"{still} missing after scripts/apt-install-no-services.sh")


@pytest.mark.parametrize("guide", GUIDES)
def test_every_step_runs_as_written_in_order(guide, shell_tools, hub, tmp_path):
    blocks = guide_blocks(guide)
    shell_wide = shell_wide_names(blocks)
    session = GuideSession(hub, tmp_path)
    try:
        ran = 0
        for i, block in enumerate(blocks):
            if block.kind != "step":
                continue
            before = session.inbound_count()
            output = session.run(block, shell_wide | named_above(block))
            assert error_in(output) is None, f"line {block.line} answered an error: {error_in(output)}"
            if SENDS_AN_EVENT.search(block.code):
                assert session.inbound_count() == before + 1, \
                    f"line {block.line}: the event was not stored as a new one (a duplicate id?):\n{output}"
            shown = answers_in(block.code)
            following = next((b for b in blocks[i + 1:] if b.kind != "illustration"), None)
            if following is not None and following.kind == "answer":
                shown.append(json.loads(following.code))
            for answer in shown:
                problems = same_shape(answer, json.loads(output))
                assert not problems, f"line {block.line}: the guide shows what the answer lacks: {problems}"
            ran += 1
        assert ran >= 12
    finally:
        session.stop()


def test_a_step_using_a_variable_nobody_named_fails(shell_tools, hub, tmp_path):
    """The check above has teeth: a snippet using a name neither set nor named is refused."""
    session = GuideSession(hub, tmp_path)
    try:
        block = parse("Send it:\n\n```bash\ncurl -s \"$WEBHOOKD_URL/event-types\" -H \"Authorization: "
                      "Bearer $SOME_KEY\"\n```\n")[0]
        with pytest.raises(AssertionError, match="exited"):
            session.run(block, {"WEBHOOKD_URL"})
        python = parse("It:\n\n```python\nprint(STANDARD_WEBHOOKS_SECRET)\n```\n")[0]
        with pytest.raises(AssertionError, match="exited"):
            session.run(python, {"PARTNER_STANDARD_WEBHOOKS_SECRET"})
    finally:
        session.stop()


# --- the receivers ----------------------------------------------------------------------------------


def receivers(guide: str) -> dict[str, Block]:
    return {RECEIVER_FILE.search(b.above).group(1): b for b in guide_blocks(guide) if b.kind == "receiver"}


RECEIVERS = list(receivers("en"))


class StartedReceiver(ReceiverProcess):
    """A guide's receiver saved under its name and started as the guide says, on ``port``."""

    def __init__(self, block: Block, name: str, port: int, secrets: dict[str, str], tmp_path: Path):
        (tmp_path / name).write_text(block.code)
        command = PORT.sub(rf"\g<1>{port}", RECEIVER_START.search(block.above).group(1))
        env = {k: os.environ[k] for k in RUNTIME if k in os.environ}
        env.update(secrets, PYTHONPATH=str(GUARD_DIR), NODE_PATH=str(ROOT / "examples" / "node" / "node_modules"),
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        self.start(["bash", "-c", command], port=port, cwd=tmp_path, env=env, out_path=tmp_path / f"{name}.out",
                   timeout=30)


@pytest.mark.parametrize("name", RECEIVERS)
@pytest.mark.parametrize("guide", GUIDES)
def test_each_receiver_verifies_what_webhookd_sends_and_refuses_a_forgery(guide, name, example_runtimes,
                                                                          webhookd_factory, tmp_path):
    """On a hub that asks endpoints to prove themselves (section 14): nothing is delivered unless the
    receiver answers the ``webhook.verification`` challenge too."""
    hub = webhookd_factory(security__verify_endpoints=True)
    block = receivers(guide)[name]
    port = free_port()
    url = f"http://127.0.0.1:{port}/webhooks/events"
    partner = hub.register(url, sorted(hub.config.events), name=f"{name} ({guide})")
    secrets = {"PARTNER_SHARED_SECRET": partner["shared_secret"],
               "PARTNER_STANDARD_WEBHOOKS_SECRET": partner["standard_webhooks_secret"]}
    receiver = StartedReceiver(block, name, port, secrets, tmp_path)
    try:
        for entry in catalog.event_types(hub.config.events)["event_types"]:
            assert hub.publish(entry["example"]).status_code == 202
        delivered = wait_for(lambda: (items := hub.deliveries(partner_id=partner["partner_id"]))
                             and all(d["state"] != "pending" for d in items) and items, timeout=30)
        assert {d["state"] for d in delivered} == {"delivered"}, (delivered, receiver.output())
        assert len(delivered) == len(hub.config.events)
        shown = hub.http.get(f"/partners/{partner['partner_id']}", headers=ADMIN).json()["verification"]
        assert shown["state"] == "verified", shown

        forged = {"Content-Type": "application/json", "X-Webhook-Id": "evt_forged", "webhook-id": "evt_forged",
                  "X-Webhook-Signature": "0" * 64, "webhook-timestamp": "1795811341",
                  "webhook-signature": "v1,AAAA"}
        for headers in (forged, {"Content-Type": "application/json"}):
            r = httpx.post(url, content=b'{"event":"payment.success"}', headers=headers, timeout=10)
            assert r.status_code == 401, (r.status_code, r.text, receiver.output())
    finally:
        receiver.stop()


if __name__ == "__main__":  # rewrite the guides' catalog examples from the catalog
    for path in GUIDES.values():
        path.write_text(with_catalog_examples(path.read_text(encoding="utf-8")), encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")

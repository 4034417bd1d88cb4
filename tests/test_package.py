"""The package works wherever it is installed: the wheel ``python -m build`` makes, installed into
a fresh virtualenv (not editable), serves /dashboard and /portal from a directory that is not
the checkout, on the built-in defaults, and ``webhookd init`` writes a config there.

webhookd's own files must come from the wheel: the server runs with its working directory
outside the repository and no checkout on its path, and the test asserts where the modules were
imported from. Its dependencies (starlette, uvicorn) are the test environment's, made visible
to the new virtualenv by a ``.pth`` line, so the test needs no network and stays fast.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import httpx
import pytest

from conftest import GUARD_DIR, ROOT, free_port, wait_for

pytestmark = pytest.mark.slow

NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "data", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "node_modules", "tests", "bench", "examples")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtualenv with the wheel installed in it (``--no-deps``, ``--no-index``): its root."""
    work = tmp_path_factory.mktemp("package")
    source = work / "source"   # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(work / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((work / "dist").glob("webhookd-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()
    with open(os.path.join(site, "zz_test_dependencies.pth"), "w") as pth:   # after the wheel's own files
        pth.write(f"{ours['purelib']}\n{ours['platlib']}\n")
    return {"venv": venv, "wheel": wheel, "site": site}


def _env() -> dict[str, str]:
    """No checkout on the path, no webhookd settings: only the loopback guard of the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEBHOOKD_") and k != "PYTHONPATH"}
    return {**env, "PYTHONPATH": str(GUARD_DIR)}


def test_the_wheel_holds_every_module_and_the_pages(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    modules = {path.name for path in ROOT.glob("*.py")}
    assert modules - names == set(), "py-modules in pyproject.toml misses these"
    assert {"static/dashboard.html", "static/portal.html"} <= names


def test_the_installed_package_serves_the_dashboard_and_the_portal_on_the_built_in_defaults(installed, tmp_path):
    where = subprocess.run([str(installed["venv"] / "bin" / "python"), "-c",
                            "import cli, webhookd; print(cli.__file__); print(webhookd.STATIC)"],
                           capture_output=True, text=True, cwd=tmp_path, env=_env(), check=True).stdout.split()
    assert all(path.startswith(installed["site"]) for path in where), where   # not the checkout

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    server = subprocess.Popen([str(installed["venv"] / "bin" / "webhookd"), "serve", "--port", str(port)],
                              cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        def up() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=30, interval=0.1)
        for page in ("dashboard", "portal"):
            answer = httpx.get(f"http://127.0.0.1:{port}/{page}")
            assert answer.status_code == 200, page
            assert answer.text == (ROOT / "static" / f"{page}.html").read_text(encoding="utf-8")
        wait_for(lambda: "configuration" in (tmp_path / "serve.log").read_text())
        assert "built-in defaults, no webhookd.toml in" in (tmp_path / "serve.log").read_text()
        assert (tmp_path / "data" / "webhookd.db").exists() and (tmp_path / "data" / "admin_token").exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_the_installed_init_writes_a_config_the_installed_server_reads(installed, tmp_path):
    webhookd = str(installed["venv"] / "bin" / "webhookd")
    written = subprocess.run([webhookd, "init"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert written.returncode == 0, written.stderr
    assert "[events.\"payment.success\"]" in (tmp_path / "webhookd.toml").read_text()
    migrated = subprocess.run([webhookd, "migrate"], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert migrated.returncode == 0 and str(tmp_path / "data" / "webhookd.db") in migrated.stdout, migrated.stderr

"""Behind a reverse proxy: the shipped deploy/nginx.conf, run for real (nginx from the OS packages,
TLS with a test CA), in front of a live `webhookd serve` that trusts it (server.trusted_proxies).

Clients are told apart by their own loopback addresses (127.0.0.2, .3, …: all of 127/8 is the
loopback on Linux), so two clients through the proxy get separate rate-limit buckets; a client that
forges X-Forwarded-For, directly or through the proxy, does not pick its bucket; /ws passes through."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

import signing
from conftest import ADMIN, ROOT, free_port, wait_for

WRAPPER = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{site}
}}
"""


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    """nginx from the OS packages, installed the way the benchmark installs it; fail, never skip."""
    subprocess.run(["bash", str(ROOT / "bench" / "ensure-nginx.sh")], check=True, timeout=900)
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(binary, os.X_OK):
        pytest.fail("nginx is missing after bench/ensure-nginx.sh")
    return binary


def shipped_site(port: int, upstream: int, cert: Path, key: Path) -> str:
    """deploy/nginx.conf with only its listen address, certificate and upstream swapped."""
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    for old, new in (("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
                     ("/etc/ssl/certs/webhookd.example.com.pem", str(cert)),
                     ("/etc/ssl/private/webhookd.example.com.key", str(key)),
                     ("proxy_pass http://127.0.0.1:8080;", f"proxy_pass http://127.0.0.1:{upstream};")):
        assert site.count(old) == 1, f"deploy/nginx.conf changed: {old!r} is not there once"
        site = site.replace(old, new)
    return site


@pytest.fixture
def proxy(nginx_binary, serve_factory, tmp_path):
    """A webhookd that trusts 127.0.0.1, behind the shipped nginx on TLS; stopped by PID."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(key)
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    serve = serve_factory(WEBHOOKD_SERVER_TRUSTED_PROXIES="127.0.0.1", WEBHOOKD_SECURITY_OPEN_REGISTRATION="true",
                          WEBHOOKD_SECURITY_REGISTRATION_RATE_PER_MIN="1")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(WRAPPER.format(prefix=prefix, site=shipped_site(port, serve.port, cert, key)))
    proc = subprocess.Popen([nginx_binary, "-e", str(prefix / "error.log"), "-c", str(conf), "-p", f"{prefix}/"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or _listening(port), timeout=15)
        assert proc.poll() is None, f"nginx did not start: {proc.stderr.read()!r}"
        context = ssl.create_default_context()
        ca.configure_trust(context)
        yield serve, f"https://127.0.0.1:{port}", context
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def client_from(address: str, base_url: str, context: ssl.SSLContext | None = None) -> httpx.Client:
    """A client whose connections come from ``address`` (one of the loopback's many)."""
    transport = httpx.HTTPTransport(local_address=address, verify=context or True)
    return httpx.Client(base_url=base_url, transport=transport, timeout=10)


def register(client: httpx.Client, name: str, forged: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": forged} if forged else {}
    return client.post("/partners/register", headers=headers, json={
        "partner_name": name, "webhook_url": "http://127.0.0.1:9/x", "events": ["payment.success"]})


def test_behind_the_shipped_nginx_each_client_has_its_own_bucket_and_forgers_do_not(proxy):
    serve, https_url, context = proxy
    with client_from("127.0.0.2", https_url, context) as ana, client_from("127.0.0.3", https_url, context) as ben, \
            client_from("127.0.0.5", https_url, context) as sly, client_from("127.0.0.4", serve.url) as direct:
        # One open registration a minute per client: the proxy's clients are told apart.
        first = register(ana, "Ana Tours")
        assert first.status_code == 201, first.text
        assert register(ana, "Ana Tours 2").status_code == 429
        assert register(ben, "Ben Tours").status_code == 201
        # A client that forges X-Forwarded-For through nginx: nginx replaces the header.
        assert register(sly, "Sly 1", forged="198.51.100.9").status_code == 201
        assert register(sly, "Sly 2", forged="198.51.100.10").status_code == 429
        # Straight to webhookd, not through the proxy: the header is not believed at all.
        assert register(direct, "Direct 1", forged="198.51.100.1").status_code == 201
        assert register(direct, "Direct 2", forged="198.51.100.2").status_code == 429

        trail = direct.get("/audit", headers=ADMIN, params={"action": "partner.registered"}).json()["items"]
        assert sorted(e["address"] for e in trail) == ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]

        # /ws through the proxy: a promoted offer reaches the user connected over wss://.
        token = ana.post("/realtime/tokens", headers=ADMIN, json={"user_id": "lucia"}).json()["token"]
        url = https_url.replace("https://", "wss://") + "/ws"
        with connect(url, subprotocols=["webhookd", f"token.{token}"], ssl=context, open_timeout=10) as user:
            wait_for(lambda: "webhookd_websocket_clients 1" in direct.get("/metrics", headers=ADMIN).text)
            partner = first.json()
            body = json.dumps({"event": "tour.promoted", "tour_id": "tour_9", "user_id": "lucia",
                               "timestamp": int(time.time())}).encode()
            r = ben.post("/webhooks/partners", content=body, headers={
                "X-Webhook-Signature": signing.sign_hex(partner["shared_secret"], body),
                "X-Webhook-Event": "tour.promoted", "X-Partner-Id": partner["partner_id"],
                "Content-Type": "application/json"})
            assert r.status_code == 200, r.text
            offer = json.loads(user.recv(timeout=10))
            assert offer["type"] == "offer" and offer["tour_id"] == "tour_9"


@pytest.mark.parametrize("peer, headers, seen", [
    ("127.0.0.1", {"x-forwarded-for": "203.0.113.7"}, "203.0.113.7"),
    ("127.0.0.1", {"x-forwarded-for": "6.6.6.6, 203.0.113.7, 10.1.2.3"}, "203.0.113.7"),  # past trusted hops
    ("127.0.0.1", {"x-forwarded-for": "203.0.113.7:5555"}, "203.0.113.7"),
    ("127.0.0.1", {"x-forwarded-for": "2001:db8::1"}, "2001:db8::1"),
    ("127.0.0.1", {"forwarded": "for=192.0.2.60;proto=https;by=203.0.113.43"}, "192.0.2.60"),
    ("127.0.0.1", {"forwarded": 'for="[2001:db8:cafe::17]:4711"'}, "2001:db8:cafe::17"),
    ("127.0.0.1", {"x-forwarded-for": "not-an-address"}, "127.0.0.1"),   # garbage: the proxy's own
    ("127.0.0.1", {"x-forwarded-for": "10.0.0.9"}, "127.0.0.1"),          # only trusted hops: the proxy's
    ("127.0.0.1", {}, "127.0.0.1"),
    ("127.0.0.4", {"x-forwarded-for": "203.0.113.7"}, "127.0.0.4"),      # not a trusted proxy: ignored
])
def test_the_client_address_is_read_only_from_trusted_proxies(peer, headers, seen):
    import asyncio

    from web import RealClient

    got = {}

    async def app(scope, receive, send):
        got["client"] = scope["client"][0]

    middleware = RealClient(app, ("127.0.0.1", "10.0.0.0/8"))
    scope = {"type": "http", "client": (peer, 5000), "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(middleware(scope, None, None))
    assert got["client"] == seen

"""How deliveries leave: a partner's client certificate (mutual TLS) and the egress proxy, end to end.

Everything here runs on 127.0.0.1: a TLS receiver that demands a client certificate from its own CA
(trustme), webhookd trusting the receiver's CA through ``delivery.ca_file``, and an HTTP CONNECT proxy
written below (a real asyncio server) that records every tunnel it is asked for and opens only those
to loopback addresses. Host names resolve through the loopback guard's test resolver (``FAKE_DNS``),
never through a real lookup.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import ssl
import subprocess
import sys

import pytest
import trustme
from test_tls import TlsReceiver

import sitecustomize  # the loopback guard, with its FAKE_DNS resolver
from conftest import ADMIN, ROOT, ShiftedClock, StreamServer, wait_for
from payloads import PAYMENT_SUCCESS

HOST = "hooks.partner.example"
PROXY_PASSWORD = "pr0xy-s3cret-Pa55"


# --- A CONNECT proxy of the test's own ----------------------------------------------------------------


class ConnectProxy(StreamServer):
    """An HTTP CONNECT proxy on 127.0.0.1: records each CONNECT target and the local address of each
    connection it opens onward (what the receiver sees as its peer); tunnels only to loopback
    addresses (502 for anything else); with ``credentials``, answers 407 to a CONNECT without them."""

    def __init__(self, credentials: tuple[str, str] | None = None):
        self.credentials = credentials
        self.targets: list[str] = []
        self.onward: set[tuple[str, int]] = set()
        self.heads: list[bytes] = []
        super().__init__()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            method, target, _version = head.split(b"\r\n")[0].decode().split(" ")
            self.targets.append(target)
            if self.credentials is not None:
                token = base64.b64encode(":".join(self.credentials).encode()).decode()
                if f"proxy-authorization: basic {token}".lower() not in head.decode().lower():
                    writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                    return
            host, _, port = target.rpartition(":")
            if method != "CONNECT" or host.strip("[]") not in ("127.0.0.1", "::1"):
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            self.onward.add(up_writer.get_extra_info("sockname")[:2])
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


# --- Fixtures ------------------------------------------------------------------------------------------


@pytest.fixture
def servers():
    started: list = []

    def start(server):
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()
    sitecustomize.FAKE_DNS.clear()


@pytest.fixture
def pki(tmp_path):
    """The receiver's CA (webhookd trusts it: ca.pem), and the CA that issues partners' client certificates."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return server_ca, client_ca


def mtls_receiver(server_ca: trustme.CA, client_ca: trustme.CA) -> TlsReceiver:
    """A TLS receiver for HOST that demands a client certificate issued by ``client_ca``."""
    receiver = TlsReceiver(server_ca.issue_cert(HOST))
    receiver.context.verify_mode = ssl.CERT_REQUIRED
    client_ca.configure_trust(receiver.context)
    return receiver


def pem_pair(cert: trustme.LeafCert) -> dict[str, str]:
    return {"client_certificate": cert.cert_chain_pems[0].bytes().decode(),
            "client_key": cert.private_key_pem.bytes().decode()}


def register(hub, url: str, **fields) -> dict:
    r = hub.http.post("/partners/register", headers=ADMIN, json={
        "partner_name": "Tours", "webhook_url": url, "events": ["payment.success"], **fields})
    assert r.status_code == 201, r.text
    return r.json()


def deliver_once(hub) -> tuple[dict, list[dict]]:
    """Publish one event; wait for its delivery to end; the delivery and its attempts."""
    hub.publish(PAYMENT_SUCCESS)
    d = wait_for(lambda: (x := hub.deliveries()) and x[0]["state"] not in ("pending",) and x[0], timeout=30)
    return d, hub.delivery(d["delivery_id"])["attempts"]


# --- Client certificates -------------------------------------------------------------------------------


def test_a_receiver_that_demands_a_client_certificate_accepts_ours_and_refuses_a_delivery_without(
        hub_factory, tmp_path, pki, servers):
    """On both engines: the certificate and key are kept by each, and reach the sender."""
    server_ca, client_ca = pki
    receiver = servers(mtls_receiver(server_ca, client_ca))
    sitecustomize.FAKE_DNS[HOST] = ["127.0.0.1"]
    hub = hub_factory(delivery__ca_file=str(tmp_path / "ca.pem"), delivery__max_attempts=1)
    url = f"https://{HOST}:{receiver.port}/in"
    pair = pem_pair(client_ca.issue_cert("webhookd.client.example", common_name="webhookd.client.example"))
    partner = register(hub, url, **pair)
    shown = partner["client_certificate"]
    assert shown["key_set"] is True and shown["problem"] is None
    assert "webhookd.client.example" in shown["subject"] and len(shown["fingerprint_sha256"]) == 95
    d, attempts = deliver_once(hub)
    assert d["state"] == "delivered", attempts
    assert len(receiver.requests) == 1 and receiver.server_names == [HOST]

    # The same receiver, a partner without a certificate: the handshake is refused, nothing arrives.
    hub.http.delete(f"/partners/{partner['partner_id']}", headers=ADMIN)
    assert hub.rows("SELECT client_cert, client_key FROM partners WHERE id = :id",
                    {"id": partner["partner_id"]}) == [(None, None)]      # erased with the secrets
    register(hub, url)
    hub.publish(PAYMENT_SUCCESS)
    failed = wait_for(lambda: [x for x in hub.deliveries() if x["state"] == "failed"], timeout=30)[0]
    attempt = hub.delivery(failed["delivery_id"])["attempts"][0]
    assert attempt["error"] in ("tls_error", "connection_reset"), attempt
    assert len(receiver.requests) == 1


def test_an_expired_client_certificate_fails_the_delivery_at_once_as_a_configuration_error(
        webhookd_factory, tmp_path, pki, servers):
    """Valid when set, expired two days later (the hub's clock moved on): one attempt, no retry, nothing
    sent, and the partner says why."""
    server_ca, client_ca = pki
    receiver = servers(mtls_receiver(server_ca, client_ca))
    sitecustomize.FAKE_DNS[HOST] = ["127.0.0.1"]
    clock = ShiftedClock()
    hub = webhookd_factory(clock=clock, delivery__ca_file=str(tmp_path / "ca.pem"), delivery__max_attempts=5)
    now = datetime.datetime.now(datetime.UTC)
    cert = client_ca.issue_cert("webhookd.client.example", not_after=now + datetime.timedelta(days=1))
    partner = register(hub, f"https://{HOST}:{receiver.port}/in", **pem_pair(cert))
    clock.advance(2 * 86400)
    d, attempts = deliver_once(hub)
    assert d["state"] == "failed" and d["attempt_count"] == 1, (d, attempts)
    assert attempts[0]["error"] == "configuration_error"
    assert attempts[0]["error_detail"].startswith("the partner's client certificate expired on ")
    assert receiver.requests == []
    shown = hub.http.get(f"/partners/{partner['partner_id']}", headers=ADMIN).json()["client_certificate"]
    assert shown["problem"].startswith("expired on ")
    trace = hub.http.get(f"/events/{d['event_id']}/trace", headers=ADMIN)
    assert "not retried" in trace.text, trace.text
    assert "PRIVATE KEY" not in trace.text and "PRIVATE KEY" not in hub.http.get("/audit", headers=ADMIN).text


def test_a_client_certificate_that_no_longer_loads_fails_at_once_and_shows_on_the_partner(
        hub_factory, tmp_path, pki, servers):
    """A key that does not match its certificate, written to the database behind the API's back (a
    restore, a hand edit): the first attempt fails as a configuration error, the partner shows it."""
    server_ca, client_ca = pki
    receiver = servers(mtls_receiver(server_ca, client_ca))
    sitecustomize.FAKE_DNS[HOST] = ["127.0.0.1"]
    hub = hub_factory(delivery__ca_file=str(tmp_path / "ca.pem"), delivery__max_attempts=5)
    partner = register(hub, f"https://{HOST}:{receiver.port}/in")
    pair = pem_pair(client_ca.issue_cert("webhookd.client.example"))
    other_key = client_ca.issue_cert("other.example").private_key_pem.bytes().decode()
    hub.store.update_partner(partner["partner_id"], now=hub.app.state.ctx.clock(),
                             client_cert=pair["client_certificate"], client_key=other_key)
    d, attempts = deliver_once(hub)
    assert d["state"] == "failed" and d["attempt_count"] == 1, (d, attempts)
    assert attempts[0]["error"] == "configuration_error"
    assert "does not load" in attempts[0]["error_detail"] and "client_key" in attempts[0]["error_detail"]
    shown = hub.http.get(f"/partners/{partner['partner_id']}", headers=ADMIN).json()["client_certificate"]
    assert "does not load" in shown["problem"]
    assert receiver.requests == []
    # The admin sets the pair again: the partner shows no problem, and the failed delivery goes out.
    fixed = hub.http.patch(f"/partners/{partner['partner_id']}", headers=ADMIN, json=pair)
    assert fixed.status_code == 200 and fixed.json()["client_certificate"]["problem"] is None, fixed.text
    r = hub.http.post(f"/partners/{partner['partner_id']}/recover", headers=ADMIN, params={"since": 0})
    assert r.status_code in (200, 202), r.text
    wait_for(lambda: hub.deliveries()[0]["state"] == "delivered", timeout=30)
    assert len(receiver.requests) == 1


def test_setting_a_certificate_checks_it_and_never_shows_the_key(hub_factory, pki, caplog):
    _server_ca, client_ca = pki
    hub = hub_factory()
    pair = pem_pair(client_ca.issue_cert("webhookd.client.example"))
    other = pem_pair(client_ca.issue_cert("other.example"))
    now = datetime.datetime.now(datetime.UTC)
    expired = pem_pair(client_ca.issue_cert("old.example", not_before=now - datetime.timedelta(days=30),
                                            not_after=now - datetime.timedelta(days=1)))
    partner = register(hub, "http://127.0.0.1:9/x")
    path = f"/partners/{partner['partner_id']}"
    caplog.set_level(logging.DEBUG)

    def patch(body, headers=ADMIN):
        return hub.http.patch(path, headers=headers, json=body)

    refused = {
        "key of another certificate": ({**pair, "client_key": other["client_key"]}, "client_key"),
        "not a certificate": ({**pair, "client_certificate": "hello"}, "client_certificate"),
        "key in the certificate field": ({**pair, "client_certificate": pair["client_key"]}, "client_certificate"),
        "certificate without a key": ({"client_certificate": pair["client_certificate"]}, "client_key"),
        "expired": (expired, "client_certificate"),
        "key not PEM": ({**pair, "client_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"},
                        "client_key"),
        "key a number": ({**pair, "client_key": 7}, "client_key"),
    }
    for case, (body, field) in refused.items():
        r = patch(body)
        assert r.status_code == 422 and r.json()["error"]["message"].startswith(f"'{field}'"), (case, r.text)
    own_key = {"Authorization": f"Bearer {partner['api_key']}"}
    assert patch(pair, headers=own_key).status_code == 403
    r = patch(pair)
    assert r.status_code == 200, r.text
    assert r.json()["client_certificate"]["key_set"] is True
    # A certificate alone is checked against the key kept (a renewal on the same key).
    assert patch({"client_certificate": pair["client_certificate"]}).status_code == 200
    assert patch({"client_certificate": other["client_certificate"]}).status_code == 422
    removed = patch({"client_certificate": None})
    assert removed.status_code == 200 and removed.json()["client_certificate"] is None

    key_body = pair["client_key"].split("-----")[2].strip().splitlines()[1]
    seen = [hub.http.get(path, headers=ADMIN).text, hub.http.get("/partners", headers=ADMIN).text,
            hub.http.get("/audit", headers=ADMIN).text, caplog.text]
    assert not [text for text in seen if key_body in text]
    audit = hub.http.get("/audit", headers=ADMIN, params={"action": "partner.updated"}).json()["items"]
    assert any(e["changes"].get("client_certificate", {}).get("to") for e in audit)


class KeepAliveTlsReceiver(TlsReceiver):
    """A TLS receiver that keeps connections alive, asks for a client certificate without demanding
    one, and records for each request its path and the certificate's subject (None: none shown)."""

    def __init__(self, cert: trustme.LeafCert, client_ca: trustme.CA):
        super().__init__(cert)
        self.context.verify_mode = ssl.CERT_OPTIONAL
        client_ca.configure_trust(self.context)
        self.seen: list[tuple[str, object]] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                peer = writer.get_extra_info("peercert")
                self.seen.append((head.split(b" ")[1].decode(), peer.get("subject") if peer else None))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError, IndexError):
            pass
        finally:
            writer.close()


def test_a_kept_connection_made_with_one_partners_certificate_never_carries_anothers_request(
        webhookd_factory, tmp_path, pki, servers):
    """Two partners on one origin, one with a certificate and one without, over kept-alive
    connections: each request arrives with its own partner's identity, never the other's."""
    server_ca, client_ca = pki
    receiver = servers(KeepAliveTlsReceiver(server_ca.issue_cert(HOST), client_ca))
    sitecustomize.FAKE_DNS[HOST] = ["127.0.0.1"]
    hub = webhookd_factory(delivery__ca_file=str(tmp_path / "ca.pem"))
    register(hub, f"https://{HOST}:{receiver.port}/with", partner_name="With",
             **pem_pair(client_ca.issue_cert("c.example", common_name="c.example")))
    register(hub, f"https://{HOST}:{receiver.port}/without", partner_name="Without")
    for _ in range(4):
        hub.publish_many(2)
        wait_for(lambda: not hub.deliveries(state="pending"), timeout=30)
    assert len(receiver.seen) == 16
    assert {path for path, subject in receiver.seen if subject} == {"/with"}
    assert {path for path, subject in receiver.seen if not subject} == {"/without"}


# --- The egress proxy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False], ids=["uvloop", "asyncio"])
def test_every_delivery_goes_through_the_proxy_to_the_checked_address(webhookd_factory, tmp_path, pki, servers,
                                                                      receiver_factory, native):
    """https (with a client certificate) and plain http partners, both named: the proxy is asked for
    the address webhookd resolved and checked, never the name; TLS and Host still carry the name; the
    receivers' peers are the proxy's onward connections. On both of the sender's loops (TLS starts
    inside the tunnel: ``start_tls``)."""
    server_ca, client_ca = pki
    proxy = servers(ConnectProxy(credentials=("webhookd", PROXY_PASSWORD)))
    tls = servers(mtls_receiver(server_ca, client_ca))
    plain = receiver_factory()
    sitecustomize.FAKE_DNS.update({HOST: ["127.0.0.1"], "plain.partner.example": ["127.0.0.1"]})
    hub = webhookd_factory(delivery__ca_file=str(tmp_path / "ca.pem"), delivery__native_speedups=native,
                           delivery__proxy_url=f"http://webhookd:{PROXY_PASSWORD}@127.0.0.1:{proxy.port}")
    register(hub, f"https://{HOST}:{tls.port}/in", **pem_pair(client_ca.issue_cert("webhookd.client.example")))
    plain_port = plain.url.split(":")[2].split("/")[0]
    register(hub, f"http://plain.partner.example:{plain_port}/webhooks/events", partner_name="Plain")
    hub.publish_many(3)
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 6, timeout=30)
    assert hub.app.state.ctx.loop.sender._client_certs.loads == 1   # one context, whatever the attempts
    assert set(proxy.targets) == {f"127.0.0.1:{tls.port}", f"127.0.0.1:{plain_port}"}
    assert len(tls.requests) == 3 and set(tls.server_names) == {HOST}
    assert all(f"Host: {HOST}:{tls.port}" in r.decode().split("\r\n") for r in tls.requests)
    assert len(plain.received) == 3 and {r.headers["host"] for r in plain.received} == {
        f"plain.partner.example:{plain_port}"}
    assert plain.connections <= proxy.onward


def test_a_name_that_rebinds_to_a_refused_address_is_refused_before_the_proxy(webhookd_factory, servers, caplog):
    """Public when registered, loopback when delivered to: ``ssrf_blocked``, and the proxy never hears of
    it. A public answer is asked of the proxy as that address, not as the name."""
    proxy = servers(ConnectProxy())
    answers = {"rebind.example": ["93.184.215.14"], "public.example": ["93.184.215.14"]}
    sitecustomize.FAKE_DNS.update({name: (lambda name=name: answers[name]) for name in answers})
    hub = webhookd_factory(security__allow_private_targets=False, delivery__max_attempts=1,
                           delivery__proxy_url=f"http://127.0.0.1:{proxy.port}")
    register(hub, "https://public.example:8443/in", partner_name="Public")
    rebinding = register(hub, "https://rebind.example:8443/in", partner_name="Rebinding")
    answers["rebind.example"] = ["127.0.0.1"]
    hub.publish(PAYMENT_SUCCESS)
    ended = wait_for(lambda: (x := hub.deliveries()) and all(d["state"] == "failed" for d in x) and x, timeout=30)
    errors = {d["partner_id"]: hub.delivery(d["delivery_id"])["attempts"][0] for d in ended}
    assert errors[rebinding["partner_id"]]["error"] == "ssrf_blocked", errors
    assert proxy.targets == ["93.184.215.14:8443"]        # the public one, by address; the rebinding one never
    public = next(a for pid, a in errors.items() if pid != rebinding["partner_id"])
    assert public["error"] == "proxy_error" and "answered 502" in public["error_detail"]


def test_a_proxy_that_wants_credentials_is_a_proxy_error_that_never_shows_them(webhookd_factory, servers,
                                                                              receiver_factory, caplog):
    proxy = servers(ConnectProxy(credentials=("webhookd", PROXY_PASSWORD)))
    receiver = receiver_factory()
    caplog.set_level(logging.DEBUG)
    hub = webhookd_factory(delivery__max_attempts=1,
                           delivery__proxy_url=f"http://webhookd:wrong-{PROXY_PASSWORD}@127.0.0.1:{proxy.port}")
    register(hub, receiver.url)
    d, attempts = deliver_once(hub)
    assert d["state"] == "failed" and attempts[0]["error"] == "proxy_error"
    assert "407" in attempts[0]["error_detail"] and receiver.received == []
    texts = [attempts[0]["error_detail"], hub.http.get("/audit", headers=ADMIN).text, caplog.text]
    assert not [text for text in texts if PROXY_PASSWORD in text]
    assert f"deliveries leave through the egress proxy at 127.0.0.1:{proxy.port}" in caplog.text


def test_the_endpoint_check_goes_through_the_proxy_with_the_client_certificate(webhookd_factory, tmp_path, pki,
                                                                              servers):
    """``POST /partners/{id}/check`` connects as a delivery does: the same tunnel, the same certificate."""
    server_ca, client_ca = pki
    proxy = servers(ConnectProxy())
    receiver = servers(mtls_receiver(server_ca, client_ca))
    sitecustomize.FAKE_DNS[HOST] = ["127.0.0.1"]
    hub = webhookd_factory(delivery__ca_file=str(tmp_path / "ca.pem"),
                           delivery__proxy_url=f"http://127.0.0.1:{proxy.port}")
    partner = register(hub, f"https://{HOST}:{receiver.port}/in", **pem_pair(client_ca.issue_cert("c.example")))
    r = hub.http.post(f"/partners/{partner['partner_id']}/check", headers=ADMIN, timeout=90)
    assert r.status_code == 200, r.text
    checks = {c["name"]: c for c in r.json()["checks"]}
    assert checks["accepts_signed"]["result"] == "pass", checks
    assert receiver.requests and len(proxy.targets) >= len(receiver.requests)
    assert set(proxy.targets) == {f"127.0.0.1:{receiver.port}"}


def test_the_command_line_sets_and_removes_a_client_certificate(serve_factory, tmp_path, pki):
    _server_ca, client_ca = pki
    cert = client_ca.issue_cert("c.example")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    serve = serve_factory()

    def run(*args):
        env = {**serve.env, "WEBHOOKD_SERVER_PORT": str(serve.port)}
        done = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", str(ROOT / "webhookd.toml"),
                               *args, "--json"], capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    added = run("partners", "add", "--name", "CLI mTLS", "--url", "http://127.0.0.1:9/x", "--events",
                "payment.success", "--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key"))
    assert added["client_certificate"]["key_set"] is True
    assert "PRIVATE KEY" not in json.dumps(added)
    pid = added["partner_id"]
    assert run("partners", "client-cert", pid)["client_certificate"] is None
    again = run("partners", "client-cert", pid, "--cert", str(tmp_path / "client.pem"), "--key",
                str(tmp_path / "client.key"))
    assert again["client_certificate"]["fingerprint_sha256"] == added["client_certificate"]["fingerprint_sha256"]


def test_the_key_reaches_ssl_through_files_only_this_process_reads_and_that_are_gone_after(monkeypatch):
    """Linux: anonymous memory files, nothing on disk. Elsewhere (no ``memfd_create``): 0600 files in a
    0700 folder, removed when the block ends."""
    import os
    import stat

    import egress
    with egress._private_files("cert text", "key text") as paths:
        assert all(p.startswith("/proc/self/fd/") for p in paths)
        assert [open(p).read() for p in paths] == ["cert text", "key text"]
    monkeypatch.delattr(os, "memfd_create")
    with egress._private_files("cert text", "key text") as paths:
        folder = os.path.dirname(paths[0])
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert [stat.S_IMODE(os.stat(p).st_mode) for p in paths] == [0o600, 0o600]
        assert [open(p).read() for p in paths] == ["cert text", "key text"]
    assert not os.path.exists(folder)


def test_the_proxy_is_asked_for_an_address_ipv6_in_brackets_and_its_credentials_are_never_shown():
    import egress
    proxy = egress.Proxy.from_url(f"http://web%40hookd:{PROXY_PASSWORD}@127.0.0.1:3128")
    token = base64.b64encode(f"web@hookd:{PROXY_PASSWORD}".encode()).decode()
    assert proxy.connect_request("2001:db8::1", 443) == (
        b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n"
        + f"Proxy-Authorization: Basic {token}\r\n\r\n".encode())
    assert PROXY_PASSWORD not in repr(proxy) and proxy.where == "127.0.0.1:3128"

"""HTTPS deliveries end to end: a certificate authority made by the test (trustme), a TLS receiver
on 127.0.0.1 reached by a host name through the test resolver, and webhookd trusting that CA
through ``delivery.ca_file``.

The certificate is checked against the URL's host name while the connection goes to the address
that was resolved and checked; the host name is sent as SNI. A wrong name, an expired certificate
and one from another CA each end as ``tls_error`` with an ``error_detail`` that says which.
"""

import asyncio
import datetime
import re
import ssl

import pytest
import trustme

import sitecustomize  # the loopback guard, with its FAKE_DNS resolver
from conftest import StreamServer, wait_for
from payloads import PAYMENT_SUCCESS

HOST = "hooks.partner.example"


class TlsReceiver(StreamServer):
    """A minimal HTTPS server on 127.0.0.1 with ``cert``: records the SNI names it was asked for and
    the requests it read, answers each with 200."""

    def __init__(self, cert: trustme.LeafCert):
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.context)
        self.server_names: list[str | None] = []
        self.context.sni_callback = lambda sslobj, name, ctx: self.server_names.append(name)
        self.requests: list[bytes] = []
        super().__init__(self.context)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            self.requests.append(head + await reader.readexactly(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client refused our certificate: nothing to answer
        finally:
            writer.close()



@pytest.fixture
def ca(tmp_path):
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return authority


@pytest.fixture
def tls_receiver():
    started = []

    def make(cert):
        receiver = TlsReceiver(cert).start()
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()
    sitecustomize.FAKE_DNS.clear()


def _deliver_once(webhookd_factory, tmp_path, receiver, **config):
    sitecustomize.FAKE_DNS[HOST] = ["127.0.0.1"]
    config = {"delivery__ca_file": str(tmp_path / "ca.pem"), "delivery__max_attempts": 1, **config}
    hub = webhookd_factory(**config)
    hub.register(f"https://{HOST}:{receiver.port}/in", ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    d = wait_for(lambda: (x := hub.deliveries()) and x[0]["state"] != "pending" and x[0])
    return d, hub.delivery(d["delivery_id"])["attempts"][0]


def test_an_https_delivery_checks_the_name_sends_sni_and_arrives(webhookd_factory, tmp_path, ca, tls_receiver):
    receiver = tls_receiver(ca.issue_cert(HOST))
    d, attempt = _deliver_once(webhookd_factory, tmp_path, receiver)
    assert d["state"] == "delivered", attempt
    assert receiver.server_names == [HOST]                     # SNI: the URL's host, not the address
    head = receiver.requests[0].split(b"\r\n\r\n")[0].decode()
    assert f"Host: {HOST}:{receiver.port}" in head.split("\r\n")


@pytest.mark.parametrize("case, detail", [
    ("wrong name", "certificate verify failed: Hostname mismatch"),
    ("expired", "certificate verify failed: certificate has expired"),
    ("another CA", "certificate verify failed: unable to get local issuer certificate"),
])
def test_a_bad_certificate_is_a_tls_error_that_says_why(webhookd_factory, tmp_path, ca, tls_receiver, case, detail):
    now = datetime.datetime.now(datetime.UTC)
    cert = {
        "wrong name": lambda: ca.issue_cert("other.example"),
        "expired": lambda: ca.issue_cert(HOST, not_before=now - datetime.timedelta(days=30),
                                         not_after=now - datetime.timedelta(days=1)),
        "another CA": lambda: trustme.CA().issue_cert(HOST),
    }[case]()
    receiver = tls_receiver(cert)
    d, attempt = _deliver_once(webhookd_factory, tmp_path, receiver)
    assert d["state"] == "failed"
    assert attempt["error"] == "tls_error", attempt
    assert attempt["error_detail"].startswith(detail), attempt
    assert receiver.requests == []                             # nothing was sent over it


def test_without_ca_file_the_system_store_is_used(webhookd_factory, tmp_path, ca, tls_receiver):
    """The default trusts the system's CAs only: the test's own CA is unknown there."""
    receiver = tls_receiver(ca.issue_cert(HOST))
    d, attempt = _deliver_once(webhookd_factory, tmp_path, receiver, delivery__ca_file="")
    assert attempt["error"] == "tls_error" and "unable to get local issuer" in attempt["error_detail"]

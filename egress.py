"""How a delivery leaves the machine: through the egress proxy, and with a partner's client certificate.

Two things a partner's network may demand, both off unless configured, and neither costing an
attempt anything when it is off:

* **One egress address** (``delivery.proxy_url``): every connection a delivery opens goes through an
  HTTP ``CONNECT`` proxy, so a partner allow-lists the proxy's address and nothing else. The SSRF rule
  still judges the final target: the sender resolves the partner's host itself and checks the address
  (``targets.resolve_target_async``), then asks the proxy for a tunnel to *that address*, never to the
  name (``open_connection``). A name that resolves to a refused address is refused before the proxy
  hears of it, and a name that changes its answer between the check and the connect (DNS rebinding)
  cannot slip a private address in through the proxy's own lookup. TLS still checks, and sends as SNI,
  the partner's host name; ``Host`` stays the name too. Plain ``http://`` targets use a tunnel as well.
* **Client certificates** (mutual TLS), per partner: a certificate and its private key, PEM, that
  the admin sets. ``inspect`` reads a certificate (subject, issuer, validity, fingerprint) with the
  standard library alone; ``check_pair`` is what registration and ``PATCH`` ask (a 422 if they do not
  load or do not match); ``ClientCertificates`` builds one ``ssl.SSLContext`` per certificate (keyed
  by its fingerprint) and refuses, as a ``ConfigurationError``, a certificate that has expired or no
  longer loads: such a delivery fails at once, without retries (``delivery.decide``).

The private key is a secret. It is never logged and never shown: errors name the field and what is
wrong, never the PEM. ``ssl`` loads a key from a file only, so the key goes to an anonymous
in-memory file (``os.memfd_create``; nothing on disk), or where that does not exist to a 0600 file
in a private (0700) temporary folder, removed as soon as it has been read (``_private_files``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import functools
import hashlib
import os
import re
import shutil
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

CERT_MAX_CHARS = 65536   # a certificate and its chain, PEM
KEY_MAX_CHARS = 16384    # a private key, PEM (an RSA 8192-bit key is about 6.5 KiB)
CONTEXTS_KEPT = 1000     # certificates whose context is kept (one per partner that has one)
CONNECT_HEAD_MAX = 16384 # bytes of the proxy's answer to CONNECT, at most


class ConfigurationError(Exception):
    """A delivery that cannot be made until the admin changes something (an expired client certificate,
    one that no longer loads). The delivery fails at once: retrying would fail the same way."""


class ProxyError(Exception):
    """The egress proxy could not be reached or would not open the tunnel (retried like any failure)."""


class CertificateProblem(ValueError):
    """A client certificate or key that cannot be used: ``field`` names which, the message says why."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# --- Reading a certificate (standard library only) ----------------------------------------------------


@dataclass(frozen=True)
class CertificateInfo:
    """What the API shows of a client certificate; never the key."""

    subject: str
    issuer: str
    fingerprint: str    # SHA-256 of the DER, as `openssl x509 -noout -fingerprint -sha256` prints it
    not_before: float
    not_after: float


PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
NAMES = {"2.5.4.3": "CN", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST", "2.5.4.10": "O", "2.5.4.11": "OU",
         "2.5.4.5": "serialNumber", "1.2.840.113549.1.9.1": "emailAddress"}


@functools.lru_cache(maxsize=CONTEXTS_KEPT)  # per certificate text: once per partner, not per attempt
def inspect(cert_pem: str) -> CertificateInfo:
    """The first certificate of ``cert_pem`` (a chain may follow it), or ``CertificateProblem``."""
    match = PEM_CERT.search(cert_pem)
    if match is None:
        raise CertificateProblem("client_certificate", "must be a PEM certificate (-----BEGIN CERTIFICATE----- …).")
    try:
        der = base64.b64decode(re.sub(r"\s+", "", match.group(1)), validate=True)
        tbs = _children(_children(_read(der, 0)[1])[0][1])
        fields = tbs[1:] if tbs[0][0] == 0xA0 else tbs   # [0] version, when present
        _serial, _algorithm, issuer, validity, subject = fields[:5]
        not_before, not_after = (_time(tag, value) for tag, value in _children(validity[1]))
        return CertificateInfo(subject=_name(subject[1]), issuer=_name(issuer[1]),
                               fingerprint=":".join(f"{b:02X}" for b in hashlib.sha256(der).digest()),
                               not_before=not_before, not_after=not_after)
    except (ValueError, IndexError, TypeError):
        raise CertificateProblem("client_certificate", "is not an X.509 certificate webhookd can read: send the "
                                                       "PEM your CA issued (openssl x509 -in cert.pem -noout "
                                                       "-text shows it).") from None


def _read(data: bytes, at: int) -> tuple[int, bytes, int]:
    """One DER element at ``at``: its tag, its content and where the next one starts."""
    tag, length, at = data[at], data[at + 1], at + 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4:
            raise ValueError("bad DER length")
        length, at = int.from_bytes(data[at:at + size], "big"), at + size
    if at + length > len(data):
        raise ValueError("DER element past the end")
    return tag, data[at:at + length], at + length


def _children(content: bytes) -> list[tuple[int, bytes]]:
    children, at = [], 0
    while at < len(content):
        tag, value, at = _read(content, at)
        children.append((tag, value))
    return children


def _oid(value: bytes) -> str:
    parts, n = [value[0] // 40, value[0] % 40], 0
    for byte in value[1:]:
        n = n << 7 | byte & 0x7F
        if not byte & 0x80:
            parts.append(n)
            n = 0
    return ".".join(map(str, parts))


def _name(content: bytes) -> str:
    """An X.501 name as ``C=ES, O=Acme, CN=hooks.acme.example`` (in the certificate's order)."""
    parts = []
    for _set_tag, rdn in _children(content):
        for _seq_tag, pair in _children(rdn):
            (_, oid), (tag, value) = _children(pair)[:2]
            text = value.decode("utf-16-be" if tag == 0x1E else "utf-8", "replace")
            parts.append(f"{NAMES.get(_oid(oid), _oid(oid))}={''.join(c for c in text if c.isprintable())}")
    return ", ".join(parts)[:500]


def _time(tag: int, value: bytes) -> float:
    text = value.decode("ascii")
    form = {0x17: "%y%m%d%H%M%S%z", 0x18: "%Y%m%d%H%M%S%z"}[tag]
    return datetime.datetime.strptime(text.replace("Z", "+0000"), form).timestamp()


def day(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --- Checking a certificate and its key --------------------------------------------------------------


def check_pair(cert_pem: Any, key_pem: Any, now: float) -> CertificateInfo:
    """What registration and ``PATCH`` ask of a client certificate and key: PEM text of sane size, the
    key unencrypted, the two loading together (the key is the certificate's), the certificate valid
    now. ``CertificateProblem`` names the field to fix; no message ever quotes the key."""
    if not isinstance(cert_pem, str) or not 0 < len(cert_pem) <= CERT_MAX_CHARS or "PRIVATE KEY" in cert_pem:
        raise CertificateProblem("client_certificate", "must be the PEM text of a certificate (and its chain, at "
                                                       f"most {CERT_MAX_CHARS // 1024} KiB), without its key: the "
                                                       "key goes in client_key.")
    info = inspect(cert_pem)
    if not isinstance(key_pem, str) or not 0 < len(key_pem) <= KEY_MAX_CHARS or "PRIVATE KEY-----" not in key_pem:
        raise CertificateProblem("client_key", "must be the PEM text of the certificate's private key "
                                               "(-----BEGIN PRIVATE KEY----- …), unencrypted.")
    load_identity(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert_pem, key_pem)
    if now >= info.not_after:
        raise CertificateProblem("client_certificate", f"expired on {day(info.not_after)}: send a current one.")
    _LOAD_PROBLEMS.pop(info.fingerprint, None)  # this pair loads: what the partner showed is fixed
    return info


def load_identity(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """``context.load_cert_chain`` from PEM text, through ``_private_files``; ``CertificateProblem`` if
    they do not load. An encrypted key is refused (``ssl`` would otherwise ask for its password on
    the terminal)."""
    def encrypted() -> bytes:
        raise CertificateProblem("client_key", "is encrypted: send it unencrypted (openssl pkey -in key.pem "
                                               "-out plain.pem); it is kept like the partner's secrets.")
    with _private_files(cert_pem, key_pem) as (cert_path, key_path):
        try:
            context.load_cert_chain(cert_path, key_path, password=encrypted)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise CertificateProblem("client_key", "does not belong to client_certificate (its public key "
                                                       "differs): send the key the certificate was made for.") from None
            why = exc.reason if exc.reason and exc.reason != "PEM lib" else "not a PEM private key"
            raise CertificateProblem("client_key", f"does not load with the certificate ({why}): send the "
                                                   "certificate's own PEM key, unencrypted.") from None


@contextlib.contextmanager
def _private_files(*texts: str) -> Iterator[list[str]]:
    """Paths ``ssl`` can read ``texts`` from, readable by this process alone, gone when the block ends:
    anonymous memory files (Linux), else 0600 files in a 0700 temporary folder, removed at once."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("webhookd-tls", os.MFD_CLOEXEC) for _ in texts]
        try:
            for fd, text in zip(fds, texts, strict=True):
                os.write(fd, text.encode("utf-8"))
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    folder = tempfile.mkdtemp(prefix="webhookd-tls-")  # mode 0700
    try:
        paths = []
        for n, text in enumerate(texts):
            path = os.path.join(folder, str(n))
            with os.fdopen(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600), "w", encoding="utf-8") as fh:
                fh.write(text)
            paths.append(path)
        yield paths
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- One SSL context per client certificate ----------------------------------------------------------


@dataclass
class _Identity:
    key_pem: str = field(repr=False)
    context: ssl.SSLContext | None
    problem: str | None


# Why a certificate failed to load in the sender, by fingerprint: what the partner's JSON shows (the
# API and the sender share a process). Written by ``ClientCertificates``, read by ``describe``.
_LOAD_PROBLEMS: dict[str, str] = {}


class ClientCertificates:
    """One ``ssl.SSLContext`` per client certificate, built on first use and kept (keyed by the
    certificate's fingerprint): the sender's trust (``delivery.ca_file`` or the system's CAs) plus the
    partner's certificate and key. Building one costs about 30 ms (reading the system's CAs), so it is
    built in a thread, once, whatever the attempts waiting for it; an attempt costs a lookup."""

    def __init__(self, ca_file: str = ""):
        self.ca_file = ca_file
        self._identities: dict[str, _Identity] = {}
        self._building: dict[str, asyncio.Future] = {}   # fingerprint -> its context being built
        self._lock = threading.Lock()
        self.loads = 0   # certificates loaded so far: once each, whatever the number of attempts

    async def context(self, cert_pem: str, key_pem: str, now: float) -> ssl.SSLContext:
        """The context to connect with, or ``ConfigurationError`` saying what the admin must change."""
        try:
            info = inspect(cert_pem)
        except CertificateProblem as exc:
            raise ConfigurationError(f"the partner's client certificate {exc}") from None
        identity = self._identities.get(info.fingerprint)
        if identity is None or identity.key_pem != key_pem:
            identity = await self._built(info, cert_pem, key_pem)
        if identity.problem is not None:
            raise ConfigurationError(identity.problem)
        if now >= info.not_after:
            raise ConfigurationError(f"the partner's client certificate expired on {day(info.not_after)}: the admin "
                                     "must set a current one (client_certificate, client_key)")
        if now < info.not_before:
            raise ConfigurationError(f"the partner's client certificate is valid only from {day(info.not_before)}")
        return identity.context  # type: ignore[return-value]

    async def _built(self, info: CertificateInfo, cert_pem: str, key_pem: str) -> _Identity:
        """The identity of a certificate not built yet (or whose key changed): built in a thread,
        off the event loop; attempts that need it meanwhile wait for the same build."""
        building = self._building.get(info.fingerprint)
        if building is None:
            building = asyncio.ensure_future(asyncio.to_thread(self._load, info, cert_pem, key_pem))
            self._building[info.fingerprint] = building
            building.add_done_callback(lambda _: self._building.pop(info.fingerprint, None))
        identity = await asyncio.shield(building)
        return identity if identity.key_pem == key_pem else await asyncio.to_thread(self._load, info, cert_pem, key_pem)

    def _load(self, info: CertificateInfo, cert_pem: str, key_pem: str) -> _Identity:
        with self._lock:
            self.loads += 1
        context = ssl.create_default_context(cafile=self.ca_file or None)
        try:
            load_identity(context, cert_pem, key_pem)
            identity = _Identity(key_pem, context, None)
            _LOAD_PROBLEMS.pop(info.fingerprint, None)
        except CertificateProblem as exc:
            identity = _Identity(key_pem, None, f"the partner's client certificate does not load: {exc.field} {exc} "
                                                "The admin must set it again.")
            if len(_LOAD_PROBLEMS) >= CONTEXTS_KEPT:
                _LOAD_PROBLEMS.clear()
            _LOAD_PROBLEMS[info.fingerprint] = identity.problem  # type: ignore[assignment]
        with self._lock:
            if len(self._identities) >= CONTEXTS_KEPT:
                self._identities.clear()
            self._identities[info.fingerprint] = identity
        return identity


def describe(cert_pem: str | None, key_set: bool, now: float) -> dict[str, Any] | None:
    """A partner's client certificate as the API shows it (``client_certificate``); never the key.
    ``problem`` says why deliveries fail: expired, not yet valid, or it failed to load."""
    if not cert_pem:
        return None
    try:
        info = inspect(cert_pem)
    except CertificateProblem as exc:
        return {"subject": None, "issuer": None, "fingerprint_sha256": None, "not_before": None, "not_after": None,
                "key_set": key_set, "problem": f"client_certificate {exc}"}
    problem = _LOAD_PROBLEMS.get(info.fingerprint)
    if now >= info.not_after:
        problem = f"expired on {day(info.not_after)}: deliveries fail until the admin sets a current certificate"
    elif now < info.not_before:
        problem = f"valid only from {day(info.not_before)}: deliveries fail until then"
    return {"subject": info.subject, "issuer": info.issuer, "fingerprint_sha256": info.fingerprint,
            "not_before": int(info.not_before), "not_after": int(info.not_after), "key_set": key_set,
            "problem": problem}


# --- The egress proxy: an HTTP CONNECT tunnel to the checked address ----------------------------------


@dataclass(frozen=True)
class Proxy:
    """Where ``delivery.proxy_url`` points, and its ``Proxy-Authorization`` (a secret: never shown)."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)

    @property
    def where(self) -> str:
        """How errors and logs name it: host and port, never the credentials."""
        return host_port(self.host, self.port)

    @classmethod
    def from_url(cls, url: str) -> Proxy:
        """``http://[user:password@]host:port`` (``config.check_proxy_url`` has checked its shape)."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError("delivery.proxy_url must look like http://proxy.internal:3128")
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = "Basic " + base64.b64encode(pair).decode("ascii")
        return cls(parts.hostname, parts.port, authorization)

    def connect_request(self, ip: str, port: int) -> bytes:
        """``CONNECT`` to the checked address (an IPv6 one in brackets), never to a name."""
        target = host_port(ip, port)
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if self.authorization:
            lines.append(f"Proxy-Authorization: {self.authorization}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets: ``[2001:db8::1]:443``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_connection(ip: str, port: int, *, tls: ssl.SSLContext | None, server_hostname: str,
                          proxy: Proxy | None, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the checked address ``ip``: straight there, or through ``proxy``'s tunnel; with
    ``tls``, TLS on top, checking and sending ``server_hostname`` (the URL's host) as SNI."""
    if proxy is None:
        extra = {"ssl": tls, "server_hostname": server_hostname} if tls is not None else {}
        return await asyncio.open_connection(ip, port, limit=limit, **extra)
    reader, writer = await _tunnel(proxy, ip, port, limit)
    if tls is not None:
        try:
            await writer.start_tls(tls, server_hostname=server_hostname)
        except BaseException:
            writer.close()
            raise
    return reader, writer


async def _tunnel(proxy: Proxy, ip: str, port: int, limit: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port, limit=limit)
    except OSError as exc:
        raise ProxyError(f"cannot reach the egress proxy at {proxy.where}: "
                         f"{exc.strerror or exc.__class__.__name__}") from None
    try:
        writer.write(proxy.connect_request(ip, port))
        await writer.drain()
        head = await _connect_answer(reader, proxy)
        status = _connect_status(head)
        if status == 407:
            raise ProxyError(f"the egress proxy at {proxy.where} wants credentials (407): put user:password in "
                             "delivery.proxy_url")
        if not 200 <= status < 300:
            raise ProxyError(f"the egress proxy at {proxy.where} did not open a tunnel to {host_port(ip, port)}: "
                             f"it answered {status}")
        if reader._buffer:  # noqa: SLF001 - bytes before we spoke: not a clean tunnel
            raise ProxyError(f"the egress proxy at {proxy.where} sent bytes after its answer to CONNECT")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _connect_answer(reader: asyncio.StreamReader, proxy: Proxy) -> bytes:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        raise ProxyError(f"the egress proxy at {proxy.where} closed the connection instead of answering "
                         "CONNECT") from None
    except asyncio.LimitOverrunError:
        raise ProxyError(f"the egress proxy at {proxy.where} answered CONNECT with too long a head") from None
    if len(head) > CONNECT_HEAD_MAX:
        raise ProxyError(f"the egress proxy at {proxy.where} answered CONNECT with too long a head")
    return head


def _connect_status(head: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] ([1-5][0-9][0-9])[ \r]", head)
    if match is None:
        raise ProxyError("the egress proxy did not answer CONNECT in HTTP/1.x")
    return int(match.group(1))

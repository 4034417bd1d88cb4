"""Test-only guard: this process may connect to loopback addresses and nothing else.

Loaded by tests/conftest.py, and by every subprocess the tests start (they put this
folder on PYTHONPATH, and Python imports ``sitecustomize`` at start-up). A connect to
any other address raises before a packet leaves, so even a bug in webhookd's own SSRF
protection cannot reach a private or public host from a test.
"""

import ipaddress
import socket

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


class NonLoopbackConnectRefused(ConnectionRefusedError):
    """Raised instead of connecting anywhere but 127.0.0.0/8 or ::1 during tests."""


def _check(sock, address):
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # Unix sockets and the like stay on this machine
    host = address[0]
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        raise NonLoopbackConnectRefused(f"test guard: connect to unresolved name {host!r} refused") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not ip.is_loopback:
        raise NonLoopbackConnectRefused(f"test guard: connect to non-loopback address {host} refused")


def _guarded_connect(self, address):
    _check(self, address)
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    _check(self, address)
    return _real_connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
GUARD_INSTALLED = True

# Name resolution is guarded too: a lookup of a real name would send a DNS query off
# this machine. IP literals and "localhost" resolve as usual; any other name resolves
# only through FAKE_DNS, which a test fills in ({"partner.example": ["203.0.113.7"]}, or a
# function returning such a list, to give different answers to successive lookups).
_real_getaddrinfo = socket.getaddrinfo
FAKE_DNS: dict = {}


def _guarded_getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    name = host.decode() if isinstance(host, bytes) else host
    if name is None or name == "localhost":
        return _real_getaddrinfo(host, port, family, type, proto, flags)
    try:
        ipaddress.ip_address(name.split("%")[0])
        return _real_getaddrinfo(host, port, family, type, proto, flags)
    except ValueError:
        pass
    if name not in FAKE_DNS:
        raise socket.gaierror(socket.EAI_NONAME, f"test guard: {name!r} is not in FAKE_DNS")
    answer = FAKE_DNS[name]
    results = []
    for address in (answer() if callable(answer) else answer):
        fam = socket.AF_INET6 if ":" in address else socket.AF_INET
        sockaddr = (address, int(port or 0), 0, 0) if fam == socket.AF_INET6 else (address, int(port or 0))
        results.append((fam, type or socket.SOCK_STREAM, proto or 6, "", sockaddr))
    return results


socket.getaddrinfo = _guarded_getaddrinfo

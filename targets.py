"""Where a webhook may be sent: the URL rule and the address rule (SSRF), in one place.

Both rules run twice: when a partner registers or changes its URL (so a mistake is a
422 the partner can read) and again in the sender before every new connection (so a
DNS answer that changed since registration cannot slip a private address in).

* ``parse_target(url, allowed_ports)``: an ``http(s)`` URL with a host, no
  ``user:password@``, on a port the operator allows; gives scheme, host and port.
* ``resolve_target(host, port, allow_private)``: one DNS lookup, every answer checked,
  and the one address to connect to. The sender connects to exactly that address.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


class BadURL(ValueError):
    """Raised for a URL that is not an ``http(s)`` URL with a host; the message says what to fix."""


class TargetRefused(Exception):
    """Raised when a webhook URL points at a port or an address we must not connect to."""


@dataclass(frozen=True)
class Target:
    scheme: str  # http | https
    host: str
    port: int    # the URL's port, or the scheme's default
    path: str    # what the request line asks for: the path (at least "/") and the query


def parse_target(url: str, allowed_ports: tuple[int, ...] = ()) -> Target:
    """The scheme, host and port of a webhook URL, or ``BadURL`` / ``TargetRefused`` saying why not."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BadURL("is not a valid URL.") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise BadURL("must start with http:// or https://.")
    if not parts.hostname:
        raise BadURL("must name a host, like https://example.com/webhooks.")
    if parts.username is not None or parts.password is not None:
        raise BadURL("must not contain user:password@; authenticate with the signature instead.")
    port = port or DEFAULT_PORTS[parts.scheme]
    if allowed_ports and port not in allowed_ports:
        raise TargetRefused(f"must use one of the ports {', '.join(map(str, allowed_ports))}.")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port, path)


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for globally routable unicast addresses, seen through IPv6 wrappings of IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return is_public_address(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            return is_public_address(ip.sixtofour)
        if ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64: the IPv4 address is the last 32 bits
            return is_public_address(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return ip.is_global and not ip.is_multicast


# Name lookups run here, never in the threads that serve requests or send: a resolver
# that never answers can then hold these threads, and nothing else. The sender shares one
# lookup per host among the attempts that need it at once (``resolve_target_async``), so a
# partner whose name never resolves holds one of them, not all.
_RESOLVERS = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="webhookd-dns")
_LOOKUPS: dict[tuple[int, str, int], asyncio.Future] = {}  # (event loop, host, port) -> lookup under way


def resolve_target(host: str, port: int, allow_private: bool, timeout: float = 5.0) -> str:
    """Resolve ``host`` once, within ``timeout`` seconds, and return the address to connect to.

    The caller connects to exactly this address, so a DNS answer that changes
    between the check and the connect (rebinding) cannot slip a private address in.
    """
    lookup = _RESOLVERS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=max(timeout, 0.001))
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"resolving {host!r} took longer than {timeout:.1f} s") from None
    except (socket.gaierror, UnicodeError, ValueError) as exc:  # IDNA refuses empty or long labels
        raise OSError(f"cannot resolve {host!r}") from exc
    return _checked_address(host, infos, allow_private)


async def resolve_target_async(host: str, port: int, allow_private: bool, timeout: float = 5.0) -> str:
    """``resolve_target`` for an event loop (the sender, registration): waits without holding a
    thread, and joins a lookup of the same host already under way instead of starting another."""
    loop = asyncio.get_running_loop()
    key = (id(loop), host, port)
    lookup = _LOOKUPS.get(key)
    if lookup is None:
        lookup = loop.run_in_executor(_RESOLVERS, functools.partial(socket.getaddrinfo, host, port,
                                                                    type=socket.SOCK_STREAM))
        _LOOKUPS[key] = lookup
        lookup.add_done_callback(functools.partial(_lookup_done, key))
    try:
        infos = await asyncio.wait_for(asyncio.shield(lookup), timeout)  # one waiter's deadline ends only its wait
    except TimeoutError:
        raise TimeoutError(f"resolving {host!r} took longer than {timeout:.1f} s") from None
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise OSError(f"cannot resolve {host!r}") from exc
    return _checked_address(host, infos, allow_private)


def _lookup_done(key: tuple[int, str, int], lookup: asyncio.Future) -> None:
    _LOOKUPS.pop(key, None)
    if not lookup.cancelled():
        lookup.exception()  # retrieved: a failure every waiter gave up on is not logged as unhandled


def _checked_address(host: str, infos: list, allow_private: bool) -> str:
    """The first address of a lookup, after refusing the lot if any one is not public."""
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        for address in addresses:
            if not is_public_address(ipaddress.ip_address(address.split("%")[0])):
                raise TargetRefused(f"{host} resolves to the non-public address {address}")
    return addresses[0]

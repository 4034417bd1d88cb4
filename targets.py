"""Where a webhook may be sent: the URL rule and the address rule (SSRF), in one place.

Both rules run twice: when a partner registers or changes its URL (so a mistake is a
422 the partner can read) and again in the sender before every new connection (so a
DNS answer that changed since registration cannot slip a private address in).

* ``parse_target(url, allowed_ports)``: an ``http(s)`` URL with a host, no
  ``user:password@``, on a port the operator allows; gives scheme, host and port.
* ``resolve_target(host, port, allow_private)``: one DNS lookup, every answer checked,
  and the one address to connect to. The sender connects to exactly that address.
* ``redacted_url(url)``: the URL as a record keeps it (attempts, the audit trail): its
  query, where partners put tokens, shown as ``?…``; ``url_origin(url)``, its scheme and host
  only, once the partner is deleted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=4096)  # every attempt is recorded through it; a partner has one URL at a time
@functools.lru_cache(maxsize=4096)  # once per attempt, on a handful of partners' URLs
def redacted_url(url: str) -> str:
    """``url`` without what may hold a credential — its query (``?token=…``), a fragment, a
    ``user:password@`` — each shown as ``…``: ``https://x/hook?token=s`` -> ``https://x/hook?…``.
    What the attempts and the audit trail keep: where a webhook went, never a partner's token, which
    would outlive the partner there (the audit trail is kept a year)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "…"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, ("…@" if "@" in parts.netloc else "") + host, parts.path,
                       "…" if parts.query else "", "…" if parts.fragment else ""))



def url_origin(url: str) -> str:
    """Where ``url`` pointed, and no more: ``https://x:8443/hook/T0K3N?a=b`` -> ``https://x:8443/…``.
    What the records of a deleted partner keep (a path may hold a token too)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "…"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], "/…", "", ""))


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


# The SSRF rule. A webhook may only go to a globally routable unicast address: every range below
# is refused, and so is anything else the IANA special-purpose registries do not mark global
# (Python's ``is_global``). An IPv6 address that carries an IPv4 address inside is judged by that
# IPv4 address first (an attacker's favourite way round an IPv4 deny-list); the forms that are not
# routable themselves are refused whatever they carry.
REFUSED: list[tuple[str, str]] = [
    # IPv4
    ("0.0.0.0/8", "RFC 791: 'this network'"),
    ("10.0.0.0/8", "RFC 1918: private"),
    ("100.64.0.0/10", "RFC 6598: shared address space (carrier-grade NAT)"),
    ("127.0.0.0/8", "RFC 1122: loopback"),
    ("169.254.0.0/16", "RFC 3927: link-local (cloud metadata at 169.254.169.254)"),
    ("172.16.0.0/12", "RFC 1918: private"),
    ("192.0.0.0/24", "RFC 6890: IETF protocol assignments"),
    ("192.0.2.0/24", "RFC 5737: documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "RFC 7526: 6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "RFC 1918: private"),
    ("198.18.0.0/15", "RFC 2544: benchmarking"),
    ("198.51.100.0/24", "RFC 5737: documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "RFC 5737: documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "RFC 5771: multicast"),
    ("240.0.0.0/4", "RFC 1112: reserved, and RFC 919: broadcast"),
    # IPv6
    ("::/128", "RFC 4291: unspecified"),
    ("::1/128", "RFC 4291: loopback"),
    ("::ffff:0:0:0/96", "RFC 2765: IPv4-translated"),
    ("::/96", "RFC 4291: IPv4-compatible (deprecated)"),
    ("64:ff9b:1::/48", "RFC 8215: local-use NAT64"),
    ("100::/64", "RFC 6666: discard-only"),
    ("2001::/32", "RFC 4380: Teredo"),
    ("2001:10::/28", "RFC 4843: ORCHID"),
    ("2001:20::/28", "RFC 7343: ORCHIDv2"),
    ("2001:db8::/32", "RFC 3849: documentation"),
    ("3fff::/20", "RFC 9637: documentation"),
    ("5f00::/16", "RFC 9602: SRv6 SIDs"),
    ("fc00::/7", "RFC 4193: unique local"),
    ("fe80::/10", "RFC 4291: link-local"),
    ("fec0::/10", "RFC 3879: site-local (deprecated)"),
    ("ff00::/8", "RFC 4291: multicast"),
]
_REFUSED = [(ipaddress.ip_network(network), why) for network, why in REFUSED]


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address carries, and the form that carries it, if any."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped (RFC 4291)", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "6to4 (RFC 3056)", ip.sixtofour
    if ip.teredo is not None:
        return "Teredo (RFC 4380)", ip.teredo[1]  # the client's address (the server's is public)
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    for prefix, form in (("64:ff9b::/96", "NAT64 (RFC 6052)"), ("64:ff9b:1::/48", "local-use NAT64 (RFC 8215)"),
                         ("::ffff:0:0:0/96", "IPv4-translated (RFC 2765)"), ("::/96", "IPv4-compatible (RFC 4291)")):
        if ip in ipaddress.ip_network(prefix) and int(ip) > 1:  # :: and ::1 are themselves, not IPv4
            return form, low32
    return None


def refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``ip`` may not receive a webhook (which rule of ``REFUSED``), or None if it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        inside = embedded_ipv4(ip)
        if inside is not None:
            form, ipv4 = inside
            why = refusal(ipv4)
            if why is not None:
                return f"{form} of {ipv4}: {why}"
    for network, why in _REFUSED:
        if ip in network:
            return why
    if not ip.is_global:
        return "not globally routable (IANA special-purpose registry)"
    return None


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for globally routable unicast addresses (``refusal`` finds nothing against it)."""
    return refusal(ip) is None


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
            why = refusal(ipaddress.ip_address(address.split("%")[0]))
            if why is not None:
                raise TargetRefused(f"{host} resolves to the non-public address {address} ({why})")
    return addresses[0]

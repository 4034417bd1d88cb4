"""Where a webhook may go (targets.py): the URL rule and the SSRF address rule, checked at
registration and again at send time, after DNS."""

import ipaddress
import threading
import time

import pytest

import sitecustomize  # the loopback guard, with its FAKE_DNS resolver
import targets
from conftest import wait_for
from payloads import PAYMENT_SUCCESS

PUBLIC_IP = "93.184.216.34"   # never reached: the guard refuses every non-loopback connect


@pytest.fixture
def fake_dns():
    yield sitecustomize.FAKE_DNS
    sitecustomize.FAKE_DNS.clear()


@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("100.64.0.1", False), ("169.254.169.254", False), ("224.0.0.1", False), ("239.255.255.250", False),
    ("0.0.0.0", False), ("255.255.255.255", False), ("::1", False), ("::", False), ("fd00::1", False),
    ("fe80::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("64:ff9b::a00:1", False), ("2002:a00:1::", False), ("2002:5db8:d822::", True),
])
def test_is_public_address(address, public):
    assert targets.is_public_address(ipaddress.ip_address(address)) is public


# The rows whose addresses carry an IPv4 address: shown with a public one inside (8.8.8.8), so
# that the row itself refuses them, not what they carry.
CARRYING_PUBLIC_IPV4 = {"::/96": "::808:808", "::ffff:0:0:0/96": "::ffff:0:808:808",
                        "64:ff9b:1::/48": "64:ff9b:1::808:808", "2001::/32": "2001:0:4136:e378:8000:63bf:f7f7:f7f7"}


def _inside(network: str) -> str:
    """An address in ``network``, not its first (which for some rows is a row of its own)."""
    net = ipaddress.ip_network(network)
    return CARRYING_PUBLIC_IPV4.get(network) or str(net[1] if net.num_addresses > 2 else net[0])


# One address per row of targets.REFUSED, and the IPv6 forms that carry a private IPv4 address
# inside, which a deny-list of IPv4 ranges alone lets through.
REFUSED_ADDRESSES = [(_inside(network), why) for network, why in targets.REFUSED] + [
    ("::7f00:1", "IPv4-compatible (RFC 4291) of 127.0.0.1"), ("::a00:1", "IPv4-compatible (RFC 4291) of 10.0.0.1"),
    ("::ffff:0:a00:1", "IPv4-translated (RFC 2765) of 10.0.0.1"),
    ("64:ff9b:1::a00:1", "local-use NAT64 (RFC 8215) of 10.0.0.1"), ("64:ff9b::a9fe:a9fe", "NAT64 (RFC 6052)"),
    ("::ffff:169.254.169.254", "IPv4-mapped (RFC 4291)"), ("2002:c0a8:101::1", "6to4 (RFC 3056) of 192.168.1.1"),
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "Teredo (RFC 4380) of 10.0.0.1"),
]


@pytest.mark.parametrize("address, why", REFUSED_ADDRESSES)
def test_every_refused_range_is_refused_with_its_reason(address, why):
    assert targets.refusal(ipaddress.ip_address(address)).startswith(why)


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808",
                                     "2002:808:808::1", "1.1.1.1", "2a00:1450:4001::1"])
def test_public_addresses_and_their_routable_wrappings_are_allowed(address):
    assert targets.refusal(ipaddress.ip_address(address)) is None


def test_every_refused_address_is_refused_at_registration_and_at_patch(webhookd_factory, fake_dns):
    """Row by row: a name that resolves to the address is a 422 naming the rule, both when a
    partner registers with it and when a partner changes its URL to it."""
    hub = webhookd_factory(security__allow_private_targets=False)
    fake_dns["public.example"] = [PUBLIC_IP]
    partner = hub.register("https://public.example/in", ["payment.success"])
    for n, (address, why) in enumerate(REFUSED_ADDRESSES):
        fake_dns[f"h{n}.example"] = [address]
        url = f"https://h{n}.example/in"
        r = hub.http.post("/partners/register", headers=hub.admin, json={
            "partner_name": "P", "webhook_url": url, "events": ["payment.success"]})
        assert r.status_code == 422 and why in r.json()["error"]["message"], (address, r.text)
        r = hub.http.patch(f"/partners/{partner['partner_id']}", headers=hub.admin, json={"webhook_url": url})
        assert r.status_code == 422 and why in r.json()["error"]["message"], (address, r.text)


def test_every_refused_address_is_refused_at_send_time_after_dns(webhookd_factory, fake_dns):
    """Each partner registered while its name pointed at a public address; then every name is
    rebound to one refused address. Each delivery ends ssrf_blocked, and nothing is connected to
    (the guard would refuse a public connect as connection_refused, not ssrf_blocked)."""
    hub = webhookd_factory(security__allow_private_targets=False, delivery__max_attempts=1)
    names = []
    for n, (address, _) in enumerate(REFUSED_ADDRESSES):
        fake_dns[f"s{n}.example"] = [PUBLIC_IP]
        hub.register(f"https://s{n}.example/in", ["payment.success"])
        names.append((f"s{n}.example", address))
    for name, address in names:
        fake_dns[name] = [address]
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: (d := hub.deliveries(limit=100)) and len(d) == len(names)
             and all(x["state"] == "failed" for x in d), timeout=60)
    for d in hub.deliveries(limit=100):
        assert hub.delivery(d["delivery_id"])["attempts"][0]["error"] == "ssrf_blocked", d


def test_a_port_no_longer_allowed_is_refused_at_send_time(webhookd_factory, receiver_factory):
    """A URL stored while its port was allowed (the operator then narrowed allowed_ports): the
    sender checks the port again and sends nothing."""
    receiver = receiver_factory()
    hub = webhookd_factory(security__allowed_ports=(443,), delivery__max_attempts=1)
    partner = hub.register("https://127.0.0.1:443/in", ["payment.success"])
    hub.app.state.ctx.store.update_partner(partner["partner_id"], now=time.time(), webhook_url=receiver.url)
    hub.publish(PAYMENT_SUCCESS)
    d = wait_for(lambda: (x := hub.deliveries()) and x[0]["state"] == "failed" and x[0])
    assert hub.delivery(d["delivery_id"])["attempts"][0]["error"] == "ssrf_blocked"
    assert receiver.received == []


@pytest.mark.parametrize("answer", [["10.0.0.7"], ["169.254.169.254"], ["::ffff:127.0.0.1"], ["fd12::1"],
                                    ["100.64.1.1"], [PUBLIC_IP, "192.168.0.10"]])
def test_registration_refuses_names_that_resolve_to_private_addresses(webhookd_factory, fake_dns, answer):
    hub = webhookd_factory(security__allow_private_targets=False)
    fake_dns["hooks.partner.example"] = answer
    r = hub.http.post("/partners/register", headers=hub.admin, json={
        "partner_name": "P", "webhook_url": "https://hooks.partner.example/in", "events": ["payment.success"]})
    assert r.status_code == 422 and "public address" in r.json()["error"]["message"]


def test_a_name_rebound_to_loopback_after_registration_is_refused_at_send_time(webhookd_factory, fake_dns,
                                                                             receiver_factory):
    hub = webhookd_factory(security__allow_private_targets=False, delivery__max_attempts=1)
    receiver = receiver_factory()
    fake_dns["rebind.example"] = [PUBLIC_IP]
    hub.register(f"http://rebind.example:{receiver.server.port}/hook", ["payment.success"])
    fake_dns["rebind.example"] = ["127.0.0.1"]           # the attacker's DNS now points at us
    hub.publish(PAYMENT_SUCCESS)
    d = wait_for(lambda: (x := hub.deliveries()) and x[0]["state"] == "failed" and x[0])
    assert hub.delivery(d["delivery_id"])["attempts"][0]["error"] == "ssrf_blocked"
    assert receiver.received == []


def test_the_connection_goes_to_the_address_that_was_checked(webhookd_factory, fake_dns, receiver_factory):
    """One lookup, then a connect to that very address: a second lookup (which would answer
    127.0.0.1, where a receiver waits) never happens."""
    hub = webhookd_factory(security__allow_private_targets=False, delivery__max_attempts=1)
    receiver = receiver_factory()
    lookups: list[str] = []

    def answer():
        lookups.append("lookup")
        return [PUBLIC_IP] if len(lookups) % 2 == 1 else ["127.0.0.1"]

    fake_dns["pinned.example"] = [PUBLIC_IP]
    hub.register(f"http://pinned.example:{receiver.server.port}/hook", ["payment.success"])
    fake_dns["pinned.example"] = answer
    hub.publish(PAYMENT_SUCCESS)
    d = wait_for(lambda: (x := hub.deliveries()) and x[0]["state"] == "failed" and x[0])
    attempt = hub.delivery(d["delivery_id"])["attempts"][0]
    assert attempt["error"] == "connection_refused"       # the guard refused the public address
    assert lookups == ["lookup"] and receiver.received == []


def test_ports_outside_the_allowed_set_are_refused(webhookd_factory):
    hub = webhookd_factory(security__allowed_ports=(443, 8443))
    r = hub.http.post("/partners/register", headers=hub.admin, json={
        "partner_name": "P", "webhook_url": "http://127.0.0.1:8080/in", "events": ["payment.success"]})
    assert r.status_code == 422 and "443, 8443" in r.json()["error"]["message"]
    ok = hub.http.post("/partners/register", headers=hub.admin, json={
        "partner_name": "P", "webhook_url": "https://127.0.0.1:8443/in", "events": ["payment.success"]})
    assert ok.status_code == 201


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "a..example"])
def test_hostnames_that_idna_refuses_are_422_not_500(webhookd_factory, host):
    hub = webhookd_factory(security__allow_private_targets=False)
    r = hub.http.post("/partners/register", headers=hub.admin, json={
        "partner_name": "P", "webhook_url": f"http://{host}/x", "events": ["payment.success"]})
    assert r.status_code == 422 and "'webhook_url'" in r.json()["error"]["message"]


def test_a_resolver_that_never_answers_stalls_nothing_else(webhookd_factory):
    """Eight registrations wait on a name whose lookup hangs: the server still answers, while they
    are all still waiting; each then ends as a 422 after the 5 s lookup deadline. The hanging
    lookup is released at the end, so no resolver thread stays asleep for the tests after."""
    hub = webhookd_factory(security__allow_private_targets=False)
    release, looking = threading.Event(), threading.Event()
    sitecustomize.FAKE_DNS["slow.example"] = lambda: looking.set() or release.wait(60) or ["93.184.216.34"]
    results = []

    def register():
        r = hub.http.post("/partners/register", headers=hub.admin, json={
            "partner_name": "P", "webhook_url": "https://slow.example/x", "events": ["payment.success"]}, timeout=30)
        results.append(r.status_code)

    threads = [threading.Thread(target=register) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        assert looking.wait(10)
        assert hub.http.get("/health").status_code == 200
        assert hub.http.get("/partners", headers=hub.admin).status_code == 200
        assert results == []  # answered while every registration was still waiting on DNS
        for t in threads:
            t.join(timeout=30)
        assert results == [422] * 8
    finally:
        release.set()
        sitecustomize.FAKE_DNS.clear()


def test_attempts_to_one_host_share_its_lookup():
    """Many attempts to a partner whose name is slow to resolve hold one resolver thread, not all
    of them: lookups of the same host under way at once are shared (the guard's resolver counts)."""
    import asyncio

    import targets

    lookups, release = [], threading.Event()

    def slow_answer():
        lookups.append(1)
        release.wait(10)
        return ["127.0.0.1"]

    sitecustomize.FAKE_DNS["slow.example"] = slow_answer
    try:
        async def many():
            waits = asyncio.gather(*(targets.resolve_target_async("slow.example", 443, True, timeout=5)
                                     for _ in range(20)))
            await asyncio.sleep(0)  # every waiter has taken its first step: joined or started the lookup
            release.set()
            return await waits

        assert asyncio.run(many()) == ["127.0.0.1"] * 20
        assert len(lookups) == 1
    finally:
        sitecustomize.FAKE_DNS.clear()

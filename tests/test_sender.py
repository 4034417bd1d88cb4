"""One HTTP attempt (sender.py): the request on the wire, the watchdog's deadline, Retry-After."""

import socket
import time

import sender
from conftest import wait_for
from payloads import PAYMENT_SUCCESS


def test_a_non_ascii_path_is_delivered_percent_encoded(hub, receiver_factory):
    receiver = receiver_factory()
    hub.register(receiver.server.url + "/café€", ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: receiver.received)
    assert receiver.received[0].path == "/café€"  # the receiver decodes %C3%A9%E2%82%AC
    wait_for(lambda: hub.deliveries()[0]["state"] == "delivered")


def test_the_deadline_watchdog_survives_a_connection_closed_under_it():
    class ClosingUnderfoot:
        """A connection whose socket disappears between two reads of .sock (the sender closed it)."""

        def __init__(self):
            self.reads = 0

        @property
        def sock(self):
            self.reads += 1
            return socket.socket() if self.reads == 1 else None

    watchdog = sender._Deadlines()
    watchdog.watch(time.monotonic(), ClosingUnderfoot())
    left, right = socket.socketpair()
    conn = type("Conn", (), {"sock": left})()
    entry = watchdog.watch(time.monotonic() + 0.2, conn)
    wait_for(lambda: entry[2] is None, timeout=5)
    assert watchdog._thread.is_alive()
    assert left.recv(1) == b""  # shut down by the watchdog
    left.close()
    right.close()


def test_retry_after_parsing_is_strict_and_clamped():
    parse_retry_after = sender.parse_retry_after
    assert parse_retry_after("120", now=0, max_s=3600) == 120
    assert parse_retry_after("99999999", now=0, max_s=3600) == 3600
    assert parse_retry_after("²", now=0, max_s=3600) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0, max_s=3600) == 10.0
    assert parse_retry_after("soon", now=0, max_s=3600) is None

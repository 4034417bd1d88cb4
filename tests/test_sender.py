"""One HTTP attempt (sender.py): the request on the wire, the attempt's deadline, Retry-After."""

import socket
import threading
import time

import pytest

import partner_terms
import sender
from config import DeliverySettings
from conftest import wait_for
from models import Job
from payloads import PAYMENT_SUCCESS


def test_a_non_ascii_path_is_delivered_percent_encoded(hub, receiver_factory):
    receiver = receiver_factory()
    hub.register(receiver.server.url + "/café€", ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: receiver.received)
    assert receiver.received[0].path == "/café€"  # the receiver decodes %C3%A9%E2%82%AC
    wait_for(lambda: hub.deliveries()[0]["state"] == "delivered")


def test_retry_after_parsing_is_strict_and_clamped():
    parse_retry_after = sender.parse_retry_after
    assert parse_retry_after("120", now=0, max_s=3600) == 120
    assert parse_retry_after("99999999", now=0, max_s=3600) == 3600
    assert parse_retry_after("²", now=0, max_s=3600) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0, max_s=3600) == 10.0
    assert parse_retry_after("soon", now=0, max_s=3600) is None


@pytest.fixture(params=[True, False], ids=["uvloop-llhttp", "stdlib"])
def speedups(request):
    """``delivery.native_speedups``: the sender on uvloop with llhttp reading answers, or on the
    standard library's loop with webhookd's own reader. Every real-HTTP test below runs on both."""
    return request.param


def test_the_sender_runs_on_the_loop_and_reader_the_config_asks_for(webhookd_factory, receiver_factory, speedups):
    import asyncio

    import uvloop

    import sender_http

    hub = webhookd_factory(delivery__native_speedups=speedups)
    receiver = receiver_factory()
    hub.register(receiver.url, ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    wait_for(lambda: hub.deliveries(state="delivered"))
    used = hub.app.state.ctx.loop.sender
    assert isinstance(used.loop, uvloop.Loop) is speedups and isinstance(used.loop, asyncio.AbstractEventLoop)
    assert used._read_answer is (sender_http.read_answer_llhttp if speedups else sender_http.read_answer_python)


def _job(url: str, n: int = 1) -> Job:
    """The n-th job of one partner to ``url``, signed with one secret."""
    return Job(delivery_id=f"dlv_{n}", event_id=f"evt_{n}", event="payment.success", partner_id="partner_1",
               url=url, secrets=("sk_live_s",), body=b"{}", attempt=1, max_attempts=3)


def test_reading_an_answer_leaves_nothing_for_the_garbage_collector(receiver_factory, speedups):
    """Every object of an attempt is freed when it returns, by reference counting alone: a cycle
    per answer (llhttp's parser holding its callbacks' owner, which held the parser) left thousands
    a second for the collector, whose full collections then held the GIL for ~50 ms at a time."""
    import gc

    import sender_http

    receiver = receiver_factory()
    the_sender = sender.Sender(DeliverySettings(allowed_ports=(receiver.server.port,), allow_private_targets=True,
                                                native_speedups=speedups))
    job = _job(receiver.url)
    gc.collect()
    gc.disable()
    try:
        sent = [the_sender.send(job) for _ in range(20)]
        left = [o for o in gc.get_objects() if isinstance(o, (sender_http._Parse, sender_http.Answer))]
    finally:
        gc.enable()
        the_sender.close()
    assert [s.attempt.status_code for s in sent] == [200] * 20
    assert left == []


def test_an_attempt_waiting_for_its_answer_holds_no_parser(receiver_factory):
    """llhttp's parser (and its callbacks, its owner, the answer's reader state) is made once the
    answer begins: thousands of attempts may wait on slow partners at once, and the collector walks
    every object they hold. While the receiver holds the request, no ``_Parse`` exists; then the
    answer is read as usual."""
    import gc

    import sender_http

    gc.collect()  # nothing another test left behind
    receiver = receiver_factory(default=(200, 5.0))
    the_sender = sender.Sender(DeliverySettings(allowed_ports=(receiver.server.port,), allow_private_targets=True,
                                                native_speedups=True, timeout_s=60))
    job = _job(receiver.url)
    try:
        pending = the_sender.submit(the_sender.attempt(job))
        wait_for(lambda: receiver.in_flight == 1)
        parsers = [o for o in gc.get_objects() if isinstance(o, sender_http._Parse)]
        sent = pending.result(timeout=60)
    finally:
        the_sender.close()
    assert parsers == []
    assert sent.attempt.status_code == 200 and sent.attempt.error is None


# --- Kept-alive connections and what a partner may have read ----------------------------------


class RawReceiver:
    """A partner endpoint on a raw socket, to script what HTTP servers do to kept-alive
    connections. ``actions`` are taken one per request, in order (then ``"answer"``):

    * ``"answer"``: 200, and keep the connection open;
    * ``"answer_then_close"``: 200, then close the connection (an idle timeout, at once);
    * ``"read_then_close"``: read the whole request, then close without a byte of answer;
    * ``(bytes, close)``: the bytes written as the whole answer, then the connection closed
      by the receiver if ``close`` (else left open: the sender must decide by itself);
    * ``bytes``: the same, left open;
    * ``"drip"``: an answer one byte every 0.1 s, for at most 30 s (a partner holding a sender).

    It records the ``X-Webhook-Id`` of every complete request it read."""

    def __init__(self, actions):
        self.actions = list(actions)
        self.requests: list[str] = []
        self.closed = 0
        self.connections = 0
        self._open: list[socket.socket] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            self._open.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn):
        conn.settimeout(10)
        buffer = b""
        with conn:
            while not self._stop:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
                length = int(headers.get("Content-Length", "0"))
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                self.requests.append(headers.get("X-Webhook-Id", "?"))
                action = self.actions.pop(0) if self.actions else "answer"
                if isinstance(action, (bytes, tuple)):
                    data, close = action if isinstance(action, tuple) else (action, False)
                    try:
                        conn.sendall(data)
                    except OSError:  # the sender stopped reading a hostile answer and closed
                        return
                    if close:
                        self.closed += 1
                        return
                    continue
                if action == "drip":
                    for byte in b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 300:
                        if self._stop:
                            return
                        conn.sendall(bytes([byte]))
                        time.sleep(0.1)
                    return
                if action == "read_then_close":
                    self.closed += 1
                    return
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
                if action == "answer_then_close":
                    self.closed += 1
                    return

    def stop(self):
        self._stop = True
        self.sock.close()
        for conn in self._open:  # wakes the threads still waiting for a request
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def raw_receiver_factory():
    started = []

    def make(actions):
        receiver = RawReceiver(actions)
        started.append(receiver)
        return receiver

    yield make
    for receiver in started:
        receiver.stop()


def test_a_request_the_partner_read_is_not_written_again_in_the_same_attempt(webhookd_factory,
                                                                               raw_receiver_factory, speedups):
    """The partner reads the second request on a kept-alive connection, then closes it without an
    answer: it may have acted on it, so that attempt fails (connection_reset) and the request is
    sent again only by the next attempt, after a backoff — never twice inside one attempt."""
    hub = webhookd_factory(delivery__concurrency=1, delivery__native_speedups=speedups)
    receiver = raw_receiver_factory(["answer", "read_then_close"])
    hub.register(receiver.url, ["payment.success"])
    first = hub.publish({**PAYMENT_SUCCESS, "transaction_id": "txn_1"}).json()["event_id"]
    wait_for(lambda: hub.deliveries(state="delivered"))
    second = hub.publish({**PAYMENT_SUCCESS, "transaction_id": "txn_2"}).json()["event_id"]
    done = wait_for(lambda: [d for d in hub.deliveries(event_id=second) if d["state"] == "delivered"])
    attempts = hub.delivery(done[0]["delivery_id"])["attempts"]
    assert receiver.requests.count(first) == 1
    assert receiver.requests.count(second) == len(attempts) == 2, (receiver.requests, attempts)
    assert attempts[0]["error"] == "connection_reset" and attempts[1]["status_code"] == 200


def test_a_kept_connection_the_partner_closed_while_idle_is_replaced_before_writing(webhookd_factory,
                                                                                   raw_receiver_factory, speedups):
    """A partner that closes idle connections at once costs no failed attempt: the sender sees the
    closed connection before it writes, and opens a new one."""
    hub = webhookd_factory(delivery__concurrency=1, delivery__native_speedups=speedups)
    receiver = raw_receiver_factory(["answer_then_close"])
    hub.register(receiver.url, ["payment.success"])
    hub.publish({**PAYMENT_SUCCESS, "transaction_id": "txn_1"})
    wait_for(lambda: hub.deliveries(state="delivered") and receiver.closed == 1)
    second = hub.publish({**PAYMENT_SUCCESS, "transaction_id": "txn_2"}).json()["event_id"]
    done = wait_for(lambda: [d for d in hub.deliveries(event_id=second) if d["state"] == "delivered"])
    assert [a["status_code"] for a in hub.delivery(done[0]["delivery_id"])["attempts"]] == [200]
    assert receiver.requests.count(second) == 1


def test_a_partner_that_drips_its_answer_is_cut_off_at_the_attempt_deadline(webhookd_factory,
                                                                             raw_receiver_factory, speedups):
    """A byte every 0.1 s never lets a per-read timeout fire; the attempt's one deadline
    (timeout_s = 1 s in the tests, lookup to last byte) still ends it."""
    hub = webhookd_factory(delivery__max_attempts=1, delivery__native_speedups=speedups)
    receiver = raw_receiver_factory(["drip"])
    hub.register(receiver.url, ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    (failed,) = wait_for(lambda: hub.deliveries(state="failed"))
    (attempt,) = hub.delivery(failed["delivery_id"])["attempts"]
    assert attempt["error"] == "timeout"
    assert attempt["duration_ms"] < 25_000  # the drip goes on for 30 s


@pytest.mark.parametrize("url, error", [
    ("ftp://127.0.0.1:443/x", "invalid_url"),
    ("http://user:pass@127.0.0.1:443/x", "invalid_url"),   # registration refuses these; a row edited by hand too
    ("http://127.0.0.1:8080/x", "ssrf_blocked"),           # not in allowed_ports
    ("http://127.0.0.1:443/a b", "invalid_url"),           # a space in the path
])
def test_the_sender_checks_the_url_again_before_connecting(url, error):
    """targets.parse_target runs at send time too: a URL that registration would refuse never
    gets a connection (the attempt has no status code)."""
    sent = sender.Sender(DeliverySettings(allowed_ports=(443,))).send(_job(url))
    assert (sent.attempt.error, sent.attempt.status_code, sent.attempt.url) == (error, None, url)


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
           b"4;ext=1\r\nreci\r\n5\r\nbido.\r\n0\r\nX-Trailer: t\r\n\r\n")


@pytest.mark.parametrize("answer, status, snippet, kept", [
    (CHUNKED, 200, "recibido.", True),                                                  # chunked, trailers
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok", 201, "ok", True),
    (b"HTTP/1.1 204 No Content\r\nRetry-After: 5\r\n\r\n", 204, "", True),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 4 + b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, "ok", True),                 # 5 interim: allowed
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
     b"Connection: close\r\n\r\nok", 200, "ok", False),                                     # repeats read together
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", 200, "ok", True),       # repeated, agreeing
    # The receiver leaves these open: the sender must not reuse them on its own account.
    (b"HTTP/1.1 503 Busy\r\nConnection: keep-alive, close\r\nContent-Length: 4\r\n\r\nbusy", 503, "busy", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, "ok", False),          # 1.0 without keep-alive
    # The body ends when the receiver closes (no length, or a length not reached).
    ((b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close", True), 200, "until close", False),
    ((b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", True), 200, "short", False),
    ((b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nshort", True), 200, "short", False),
])
def test_answers_in_every_http_1_framing_are_read_whole(webhookd_factory, raw_receiver_factory,
                                                       answer, status, snippet, kept, speedups):
    """The sender's own response reader: status, snippet and whether the connection is kept for
    the next delivery (a second connection appears only when the first could not be kept)."""
    hub = webhookd_factory(delivery__concurrency=1, delivery__max_attempts=1, delivery__native_speedups=speedups)
    receiver = raw_receiver_factory([answer, "answer"])
    hub.register(receiver.url, ["payment.success"])
    first = hub.publish({**PAYMENT_SUCCESS, "transaction_id": "txn_1"}).json()["event_id"]
    done = wait_for(lambda: [d for d in hub.deliveries(event_id=first) if d["state"] != "pending"])
    (attempt,) = hub.delivery(done[0]["delivery_id"])["attempts"]
    assert (attempt["status_code"], attempt["response_snippet"]) == (status, snippet)
    hub.publish({**PAYMENT_SUCCESS, "transaction_id": "txn_2"})
    wait_for(lambda: len(receiver.requests) == 2 and hub.deliveries(state="delivered"))
    assert receiver.connections == (1 if kept else 2)


@pytest.mark.parametrize("answer", [
    b"SMTP ready\r\n\r\n",
    b"HTTP/1.1 2xx OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",    # int(-1, 16) would read to the end
    b"HTTP/1.1 200 OK\r\nContent-Length: \xc2\xb2\r\n\r\n",               # a superscript two is no digit
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 70_000 + b"\r\n\r\n",
])
def test_an_answer_that_is_not_http_is_a_protocol_error(webhookd_factory, raw_receiver_factory, answer, speedups):
    hub = webhookd_factory(delivery__max_attempts=1, delivery__native_speedups=speedups)
    receiver = raw_receiver_factory([answer])
    hub.register(receiver.url, ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    (failed,) = wait_for(lambda: hub.deliveries(state="failed"))
    assert hub.delivery(failed["delivery_id"])["attempts"][0]["error"] == "protocol_error"


def test_a_2xx_whose_body_never_ends_is_delivered_not_sent_again(webhookd_factory, raw_receiver_factory, speedups):
    """The partner said 200, then left its body unfinished (Content-Length 100, 5 bytes, the
    connection open): the attempt's deadline cuts the body, not the answer. The delivery is
    delivered with that status — not retried, which would send the event again."""
    hub = webhookd_factory(delivery__native_speedups=speedups)
    receiver = raw_receiver_factory([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"])
    hub.register(receiver.url, ["payment.success"])
    hub.publish(PAYMENT_SUCCESS)
    (done,) = wait_for(lambda: hub.deliveries(state="delivered"))
    (attempt,) = hub.delivery(done["delivery_id"])["attempts"]
    assert (attempt["status_code"], attempt["error"]) == (200, None)
    assert len(receiver.requests) == 1


def test_every_failed_attempt_says_what_happened_in_words(hub, receiver_factory):
    """error_detail: a refused connection, a partner that never answers (timeout_s is 1 s in the
    tests), a 500 and a redirect, each in words a partner can act on, through the API."""
    import socket

    from conftest import free_port

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers
    try:
        failing, moved = receiver_factory(default=(500, 0)), receiver_factory(default=(302, 0))
        urls = {"connection refused": f"http://127.0.0.1:{free_port()}/x",
                "no answer within 1 s": f"http://127.0.0.1:{silent.getsockname()[1]}/x",
                "the partner answered 500": failing.url,
                "the partner answered 302; redirects are not followed": moved.url}
        partners = {hub.register(url, ["payment.success"], name=f"P{n}")["partner_id"]: detail
                    for n, (detail, url) in enumerate(urls.items())}
        hub.publish(PAYMENT_SUCCESS)
        for partner_id, detail in partners.items():
            d = wait_for(lambda p=partner_id: (x := hub.deliveries(partner_id=p)) and x[0]["attempt_count"] and x[0])
            attempt = hub.delivery(d["delivery_id"])["attempts"][0]
            assert attempt["error_detail"].startswith(detail), attempt
    finally:
        silent.close()


def test_a_connection_idle_longer_than_idle_connection_s_is_not_reused(webhookd_factory, raw_receiver_factory):
    """Servers drop idle keep-alive connections: one idle past ``idle_connection_s`` (0.5 s here) is
    closed by the sender and the next delivery opens a new one, though the partner kept it open.
    (Within it, the same connection serves: test_answers_in_every_http_1_framing_are_read_whole.)"""
    hub = webhookd_factory(delivery__concurrency=1, delivery__idle_connection_s=0.5)
    receiver = raw_receiver_factory(["answer", "answer"])
    hub.register(receiver.url, ["payment.success"])
    hub.publish({**PAYMENT_SUCCESS, "transaction_id": "txn_1"})
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 1)
    time.sleep(0.7)  # idle longer than idle_connection_s (a slower machine only idles longer)
    hub.publish({**PAYMENT_SUCCESS, "transaction_id": "txn_2"})
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 2)
    assert receiver.connections == 2


def test_no_more_connections_are_kept_idle_than_concurrency_all_origins_together(raw_receiver_factory):
    """Each kept connection is an open file: with ``concurrency`` 1, a connection to a second
    partner while one to the first is kept idle is closed after its answer, not kept (so the
    sockets open never pass twice ``concurrency``: serving.fit_open_files). Without the bound,
    the second partner would see one connection, not two."""
    first, second = raw_receiver_factory(["answer"] * 3), raw_receiver_factory(["answer"] * 3)
    the_sender = sender.Sender(DeliverySettings(concurrency=1, allowed_ports=(first.port, second.port),
                                                allow_private_targets=True))
    try:
        statuses = [the_sender.send(_job(url, n)).attempt.status_code
                    for n, url in enumerate([first.url, second.url, first.url, second.url])]
        kept = the_sender._idle_count
    finally:
        the_sender.close()
    assert statuses == [200] * 4
    assert (first.connections, second.connections) == (1, 2)
    assert kept == 1


@pytest.mark.parametrize("attempt", [1, 2, 3, 6, 12])
def test_backoff_doubles_with_equal_jitter_within_its_bounds(attempt):
    """After failed attempt n the wait is in [d/2, d], d = min(max, base·2^(n-1)): never at once,
    never past the cap; over many draws it covers that range (the jitter spreads retries)."""
    import random

    base, cap = 30.0, 3600.0
    d = min(cap, base * 2 ** (attempt - 1))
    waits = [partner_terms.backoff_delay(attempt, base, cap, random.Random(seed)) for seed in range(2000)]
    assert all(d / 2 <= w <= d for w in waits)
    assert min(waits) < d / 2 + d * 0.01 and max(waits) > d - d * 0.01


# --- A hostile partner endpoint -------------------------------------------------------------------


INTERIM_FLOOD = b"HTTP/1.1 100 Continue\r\n\r\n" * 1000 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HUGE_INTERIM = (b"HTTP/1.1 103 Early Hints\r\n" + (b"Link: </" + b"a" * 500 + b".css>; rel=preload\r\n") * 50 + b"\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
REPEATED_HEADERS = (b"HTTP/1.1 200 OK\r\n" + (b"Set-Cookie: " + b"a" * 60_000 + b"\r\n") * 99
                    + b"Content-Length: 2\r\n\r\nok")


@pytest.mark.parametrize("answer, detail", [
    (INTERIM_FLOOD, "too many interim responses: more than 5 1xx answers before the final one"),
    (HUGE_INTERIM, "response head too large: more than 16 KiB of status line and headers"),
    (REPEATED_HEADERS, "response head too large: more than 16 KiB of status line and headers"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 20_000 + b"\r\nContent-Length: 2\r\n\r\nok",
     "response head too large: more than 16 KiB of status line and headers"),
])
def test_a_hostile_answer_is_a_failed_attempt_and_a_healthy_partner_is_still_delivered(
        webhookd_factory, raw_receiver_factory, receiver_factory, answer, detail, speedups):
    """A partner that answers 1xx after 1xx until the deadline, or heads of many large headers,
    ends 2xx in the end, but each of its attempts fails with a detail that says why (so it is
    retried, and its circuit counts it): the sender reads at most 5 interim answers and 16 KiB per
    head. A healthy partner beside it gets its delivery, its signature verified."""
    hub = webhookd_factory(delivery__max_attempts=2, delivery__native_speedups=speedups)
    hostile = raw_receiver_factory([answer, answer])
    hostile_id = hub.register(hostile.url, ["payment.success"], name="Hostile")["partner_id"]
    healthy = receiver_factory()
    healthy.secret = hub.register(healthy.url, ["payment.success"], name="Healthy")["shared_secret"]
    hub.publish(PAYMENT_SUCCESS)
    (failed,) = wait_for(lambda: hub.deliveries(partner_id=hostile_id, state="failed"), timeout=30)
    attempts = hub.delivery(failed["delivery_id"])["attempts"]
    summary = [(a["error"], a["error_detail"], a["status_code"]) for a in attempts]
    assert summary == [("protocol_error", detail, None)] * 2  # retried by the usual rules, failed both times
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 1)
    assert [(r.guide_ok, r.raw_ok) for r in healthy.received] == [(True, True)]

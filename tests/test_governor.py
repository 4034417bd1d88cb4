"""Publishes first (governor.py): the delivery loop's in-flight bound gives way while publishes wait
on deliveries, and comes back when they do not; the loop holds no more than the bound."""

from conftest import wait_for
from governor import EXCESS_TARGET_S, WINDOW_S, PartnerLimits, PublishFirst


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _window(bound, clock, waits, in_flight):
    for w in waits:
        bound.publish_waited(w)
    clock.now += WINDOW_S
    return bound.adjust(in_flight)


def test_the_bound_falls_while_publishes_wait_and_climbs_back_when_they_do_not():
    clock = Clock()
    bound = PublishFirst(1000, clock=clock)
    assert (bound.bound, bound.floor) == (1000, 250)
    _window(bound, clock, [0.002] * 20, in_flight=1000)        # a commit's usual wait: 2 ms
    assert bound.bound == 1000
    slow = [0.002 + 3 * EXCESS_TARGET_S] * 20                  # deliveries in the way: 30 ms more
    assert _window(bound, clock, slow, in_flight=900) == 810   # 90% of what is in flight
    assert _window(bound, clock, slow, in_flight=810) == 729
    for _ in range(20):
        _window(bound, clock, slow, in_flight=bound.bound)
    assert bound.bound == bound.floor == 250                   # never below the floor
    shown = bound.describe()
    assert shown["publish_wait_p90_ms"] == 62.0 and 2.0 < shown["publish_wait_usual_ms"] < 22.0  # rises slowly
    climbed = [_window(bound, clock, [0.002] * 20, in_flight=bound.bound) for _ in range(30)]
    assert climbed[0] > 250 and climbed == sorted(climbed) and climbed[-1] == 1000   # back up, never past it


def test_with_no_publish_the_bound_climbs_only_while_the_loop_uses_it():
    clock = Clock()
    bound = PublishFirst(1000, clock=clock)
    _window(bound, clock, [0.001] * 5, in_flight=1000)
    _window(bound, clock, [0.001 + 2 * EXCESS_TARGET_S] * 5, in_flight=500)
    assert bound.bound == 450
    assert _window(bound, clock, [], in_flight=10) == 450      # idle: nothing to judge it by
    assert _window(bound, clock, [], in_flight=450) == 506     # in use, nobody waiting: more
    clock.now += WINDOW_S / 10
    assert bound.adjust(506) == 506                            # judged once a window


def test_the_loop_holds_no_more_attempts_than_the_bound_and_stats_show_it(webhookd_factory, receiver_factory):
    hub = webhookd_factory(delivery__concurrency=200, delivery__per_partner_concurrency=100)
    stats = hub.http.get("/stats", headers=hub.admin).json()["delivery"]
    assert (stats["in_flight_bound"], stats["in_flight_max"]) == (200, 200)
    bound = hub.app.state.ctx.loop.publish_first
    bound.clock = lambda: float("-inf")   # its window never ends: the bound stays where it is put
    bound.bound = 3
    receiver = receiver_factory(default=(200, 0.3))
    hub.register(receiver.url, ["payment.success"])
    hub.publish_many(12)
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 12, timeout=30)
    assert receiver.max_in_flight == 3
    assert hub.http.get("/stats", headers=hub.admin).json()["delivery"]["in_flight_bound"] == 3
    assert "webhookd_deliveries_in_flight_bound 3.0" in hub.http.get("/metrics", headers=hub.admin).text


# --- Slow but healthy partners keep up (PartnerLimits) ---------------------------------------------


def test_a_partner_s_bound_triples_per_round_trip_of_successes_and_halves_on_load_failures():
    limits = PartnerLimits(ceiling=500)
    assert limits.start == 25 and limits.limit("p") == 25
    for _ in range(25):                       # a round trip of successes with the bound in use
        limits.finished("p", None, 200, busy=limits.limit("p"))
    assert limits.limit("p") == 75 and limits.changed() == {"p": 75}
    limits.finished("p", None, 200, busy=10)  # a success with the bound far from used: no growth
    assert limits.limit("p") == 75
    limits.finished("p", "timeout", None, busy=75)
    assert limits.limit("p") == 37
    limits.finished("p", "http_error", 503, busy=37)
    limits.finished("p", "http_error", 429, busy=18)
    assert limits.limit("p") == 9
    limits.finished("p", "http_error", 404, busy=9)   # a 4xx is no sign of load: the bound stays
    assert limits.limit("p") == 9
    for _ in range(10):
        limits.finished("p", "connection_refused", None, busy=1)
    assert limits.limit("p") == 1                     # never below one
    for _ in range(2000):
        limits.finished("q", None, 200, busy=limits.limit("q"))
    assert limits.limit("q") == 500                   # never past per_partner_concurrency
    assert PartnerLimits(ceiling=4).start == 4


def test_a_slow_healthy_partner_gets_more_than_its_starting_bound_and_stats_show_it(webhookd_factory,
                                                                                   receiver_factory):
    """A partner answering 200 after 0.5 s with 150 deliveries waiting: it starts at 25 in flight
    (what every partner had before, at most) and its bound grows with its successes; the bundled
    per_partner_concurrency (500) is far off."""
    hub = webhookd_factory()
    assert hub.config.delivery.per_partner_concurrency == 500
    receiver = receiver_factory(default=(200, 0.5))
    pid = hub.register(receiver.url, ["payment.success"])["partner_id"]
    hub.publish_many(150)
    wait_for(lambda: len(hub.deliveries(state="delivered", limit=200)) == 150, timeout=60)
    assert receiver.max_in_flight > 25, receiver.max_in_flight
    (row,) = [p for p in hub.http.get("/stats", headers=hub.admin).json()["partners"] if p["partner_id"] == pid]
    assert row["concurrency"] > 25


# --- The GIL: publishes first (GiveWay) -------------------------------------------------------------


def _in_a_thread(fn):
    import threading

    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_a_thread_steps_aside_while_a_publish_waits_and_goes_on_once_it_is_answered():
    from governor import GiveWay

    gate = GiveWay(at_most_s=60)
    turn = gate.turn()
    turn.give_way()                                  # nobody publishing: no wait at all
    assert gate.times == 0
    waiting = gate.waiting()
    waiting.__enter__()                              # a publish waits for its commit
    thread = _in_a_thread(turn.give_way)
    wait_for(lambda: gate._answered._cond._waiters)  # the thread is blocked on it
    assert thread.is_alive()
    waiting.__exit__(None, None, None)               # answered: the thread goes on
    wait_for(lambda: not thread.is_alive())
    assert gate.times == 1 and gate.pending == 0


def test_a_stream_of_publishes_slows_the_threads_down_but_never_stops_them():
    """Each wait is bounded, and after one a thread runs RUN_AT_LEAST_S before stepping aside again."""
    from governor import GiveWay

    clock = Clock()
    gate = GiveWay(clock=clock, at_most_s=0.01, run_s=0.002)
    turn = gate.turn()
    with gate.waiting():                             # a publish that is never answered
        thread = _in_a_thread(turn.give_way)
        wait_for(lambda: not thread.is_alive())      # the wait ran out by itself
        assert gate.times == 1
        clock.now += 0.001
        turn.give_way()                              # within its run: no wait
        assert gate.times == 1
        clock.now += 0.002
        thread = _in_a_thread(turn.give_way)         # its run is over: it steps aside again
        wait_for(lambda: not thread.is_alive())
        assert gate.times == 2


def test_deliveries_go_on_while_publishes_wait_and_stats_show_them_stepping_aside(webhookd_factory,
                                                                                 receiver_factory):
    """A publish that waits for ever (held open by the test) slows the sender and the recorder to
    their turns, yet every delivery is made; /stats and /metrics show the time they gave way."""
    hub = webhookd_factory()
    receiver = receiver_factory()
    hub.register(receiver.url, ["payment.success"])
    gate = hub.app.state.ctx.loop.give_way
    with gate.waiting():
        hub.publish_many(20)
        wait_for(lambda: len(hub.deliveries(state="delivered")) == 20, timeout=60)
    loop = hub.app.state.ctx.loop
    assert loop._sender_turn.times > 0 and loop._recorder_turn.times > 0     # each thread stepped aside
    shown = hub.http.get("/stats", headers=hub.admin).json()["delivery"]
    assert shown["gave_way"] == loop._sender_turn.times + loop._recorder_turn.times and shown["gave_way_ms"] > 0
    assert "webhookd_deliveries_gave_way_seconds_total" in hub.http.get("/metrics", headers=hub.admin).text


def test_on_a_shared_database_nothing_steps_aside():
    """On PostgreSQL (``enabled`` off) a commit waits on the database server, not on this process's
    GIL: publishes mark nothing, and the threads never wait."""
    from governor import GiveWay

    gate = GiveWay(at_most_s=60, enabled=False)
    turn = gate.turn()
    with gate.waiting():
        assert gate.pending == 0
        turn.give_way()        # returns at once: were it waiting, the test would hang for 60 s
    assert gate.times == 0

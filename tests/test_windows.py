"""Time windows (?since=&until=) on GET /deliveries, /inbound and /audit, both engines: rows written
through the store at controlled times, a window's edges ([since, until)), its query plan through
the filters' indexes, and the 422 that names a wrong parameter."""

import pytest

import windows
from conftest import bearer, wait_for
from models import AuditEntry, NewEvent
from storage import open_store
from store_history import AUDIT_FILTERS, INBOUND_FILTERS, windowed_where
from store_rows import write_audit

BOTH_ENGINES = True

DAY = 1_796_601_600.0  # 2026-12-07T00:00:00Z
HOUR = 3600.0
_n = iter(range(10**9))


def id_at(prefix: str, t: float) -> str:
    """An id made at ``t``, as ``web.new_id`` makes one (its time first)."""
    return f"{prefix}{windows.time_digits(t)}{next(_n):012d}"


@pytest.fixture
def sqlite_store(tmp_path):
    s = open_store(str(tmp_path / "w.db"))
    yield s
    s.close()


@pytest.fixture
def store(store_target):
    s = open_store(store_target)
    yield s
    s.close()


def _rows_each_hour(store) -> str:
    """A partner, and one delivery, one inbound event and one audit entry at each of DAY+0h..DAY+5h."""
    partner_id = id_at("partner_", DAY)
    store.add_partner(partner_id=partner_id, name="P", webhook_url="http://127.0.0.1:9/x", events=["payment.success"],
                      secret="sk_live_s", api_key_hash="h" + partner_id, now=DAY)
    for h in range(6):
        t = DAY + h * HOUR
        store.publish(NewEvent(id=id_at("evt_", t), type="payment.success", body=b"{}"), now=t, max_attempts=3,
                      new_delivery_id=lambda t=t: id_at("dlv_", t))
        store.add_inbound(inbound_id=id_at("inb_", t), partner_id=partner_id, event_type="tour.promoted",
                          dedupe_key=f"k{h}", body=b"{}", now=t)
        with store._transaction() as db:
            write_audit(db, AuditEntry(id=id_at("aud_", t), at=t, actor="admin", action="partner.updated",
                                       partner_id=partner_id, changes={}))
    return partner_id


def _hours(items, column) -> list[int]:
    return sorted(round((getattr(item, column) - DAY) / HOUR) for item in items)


def test_a_window_keeps_since_and_drops_until_on_every_list(store):
    partner_id = _rows_each_hour(store)
    window = windows.window_from({"since": "2026-12-07T01:00:00Z", "until": str(int(DAY + 4 * HOUR))})
    for given in ({}, {"partner_id": partner_id}):
        assert _hours(store.list_deliveries(limit=50, window=window, **given).items, "created_at") == [1, 2, 3]
        assert _hours(store.list_inbound(limit=50, window=window, **given).items, "received_at") == [1, 2, 3]
        assert _hours(store.list_audit(limit=50, window=window, **given).items, "at") == [1, 2, 3]
    since_only = windows.window_from({"since": "2026-12-07T04:00+00:00"})
    assert _hours(store.list_deliveries(limit=50, window=since_only).items, "created_at") == [4, 5]
    until_only = windows.window_from({"until": "2026-12-07T00:00:00.001Z"})
    assert _hours(store.list_audit(limit=50, window=until_only).items, "at") == [0]
    page = store.list_deliveries(limit=2, window=window)  # a window pages like any filter
    assert _hours(page.items, "created_at") == [2, 3] and page.next_cursor is not None
    rest = store.list_deliveries(limit=2, window=window, cursor=page.next_cursor)
    assert _hours(rest.items, "created_at") == [1] and rest.next_cursor is None
    assert store.list_deliveries(limit=50, window=windows.Window(DAY + HOUR, DAY + HOUR)).items == []  # empty


def test_a_window_reads_through_the_index_of_the_filters_beside_it(store):
    for given in ({}, {"partner_id": "p"}, {"state": "failed"}, {"event": "payment.success"}):
        plan = store.explain_deliveries(window=windows.Window(DAY, DAY + HOUR), **given)
        if store.shared:
            assert "Seq Scan on deliveries" not in plan, (given, plan)
            assert "id >= " in plan and "id < " in plan, (given, plan)  # the id range bounds the index walk
        else:
            assert "SCAN d" not in plan and "TEMP B-TREE" not in plan, (given, plan)
            assert "id>? AND id<?" in plan, (given, plan)


def test_the_audit_trail_and_inbound_events_read_only_the_window_of_ids(sqlite_store):
    """SQLite's plans (PostgreSQL's planner chooses by the table's size): the window bounds the walk."""
    window = windows.Window(DAY, DAY + HOUR)
    for table, filters, given, index in (("audit_log", AUDIT_FILTERS, {}, "sqlite_autoindex_audit_log_1"),
                                         ("audit_log", AUDIT_FILTERS, {"partner_id": "p"}, "audit_by_partner"),
                                         ("inbound_events", INBOUND_FILTERS, {"event": "x"}, "sqlite_autoindex_inbound")):
        where, params = windowed_where(table, filters, given, window)
        plan = sqlite_store.engine.explain(f"SELECT * FROM {table} {where} ORDER BY id DESC LIMIT 51", params)
        assert f"USING INDEX {index}" in plan and "id>? AND id<?" in plan and "TEMP B-TREE" not in plan, plan


def test_times_in_every_form_and_the_422_that_names_the_parameter(hub):
    partner = hub.register("http://127.0.0.1:9/x", ["payment.success"])
    other = hub.register("http://127.0.0.1:9/y", ["payment.success"])
    hub.publish_many(2)
    wait_for(lambda: len(hub.deliveries()) == 4)
    now = hub.app.state.ctx.clock()
    for path in ("/deliveries", "/inbound", "/audit"):
        for since, until in ((str(int(now) - 60), str(int(now) + 60)), ("2026-01-01", "2099-01-01"),
                             ("2020-01-01T00:00:00Z", "2099-01-01T00:00:00+05:30")):
            r = hub.http.get(path, headers=hub.admin, params={"since": since, "until": until})
            assert r.status_code == 200, (path, r.text)
        assert hub.http.get(path, headers=hub.admin, params={"until": "2020-01-01"}).json()["items"] == []
        for params, name in (({"since": "yesterday"}, "since"), ({"until": "2026-12-07T09:30"}, "until"),
                             ({"since": "2026-12-08", "until": "2026-12-07"}, "until"),
                             ({"since": "2026-02-30"}, "since")):
            r = hub.http.get(path, headers=hub.admin, params=params)
            assert r.status_code == 422, (path, params, r.text)
            assert r.json()["error"]["code"] == "invalid_field"
            assert r.json()["error"]["message"].startswith(f"'{name}' "), r.text
    assert len(hub.deliveries(since=str(int(now) - 60))) == 4
    own = hub.http.get("/deliveries", headers=bearer(partner["api_key"]), params={"since": "2020-01-01"}).json()
    assert {d["partner_id"] for d in own["items"]} == {partner["partner_id"]}  # a key sees itself only
    assert other["partner_id"] not in str(own)


def test_stats_counts_each_partners_outcomes_per_hour(hub, receiver_factory):
    ok, failing = receiver_factory(), receiver_factory()
    failing.script = [(500, 0.0)] * 10
    good = hub.register(ok.url, ["payment.success"], name="Good")
    bad = hub.register(failing.url, ["payment.success"], name="Bad")
    hub.publish_many(2)
    wait_for(lambda: len(hub.deliveries(state="delivered")) == 2 and len(hub.deliveries(state="failed")) == 2,
             timeout=90)
    stats = hub.http.get("/stats", headers=hub.admin).json()
    by_partner = {row["partner_id"]: row["hours"] for row in stats["per_partner_hour"]}
    assert all(h["hour"] % 3600 == 0 for hours in by_partner.values() for h in hours)
    assert sum(h["delivered"] for h in by_partner[good["partner_id"]]) == 2  # (an hour may turn during the test)
    assert sum(h["failed"] for h in by_partner[good["partner_id"]]) == 0
    assert sum(h["failed"] for h in by_partner[bad["partner_id"]]) == 2
    assert sum(h["delivered"] for h in by_partner[bad["partner_id"]]) == 0
    assert hub.http.get("/stats", headers=bearer(good["api_key"])).status_code == 403  # the admin's view only

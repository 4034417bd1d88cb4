"""Housekeeping (housekeeping.py), started and stopped by the app beside the delivery loop.

The sweep it runs is tested through the app in test_lifecycle.py (a paused partner's backlog
ends expired) and pass by pass in test_delivery.py (retention in batches); here, the heartbeat."""

from conftest import wait_for
from storage import open_store


def test_a_running_app_renews_its_process_row_and_removes_it_when_it_stops(hub_factory):
    hub = hub_factory()
    (listed,) = hub.http.get("/stats", headers=hub.admin).json()["processes"]
    assert listed["this"] is True

    def seen_at() -> float:
        return hub.rows("SELECT seen_at FROM processes WHERE id = :id", {"id": listed["id"]})[0][0]

    first = seen_at()
    wait_for(lambda: seen_at() > first, timeout=30)  # a heartbeat every 2 s renews it
    hub.stop()
    store = open_store(hub.config.storage.target)
    try:
        with store._reader() as db:
            left = [tuple(row) for row in db.execute("SELECT id FROM processes")]
    finally:
        store.close()
    assert left == []

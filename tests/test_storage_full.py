"""A full disk: writes are refused with a clear 503, `/health` says so, reads and the process stay
up, nothing accepted is lost, and publishing resumes by itself once there is room again.

The disk is filled with SQLite's own limit, ``max_page_count`` on the writer connection: the same
SQLITE_FULL a full filesystem gives, on any machine and without root (a loop mount would need it).
"""

from conftest import wait_for
from payloads import PAYMENT_SUCCESS


def _set_page_limit(hub, pages: int) -> None:
    engine = hub.store.engine
    with engine._write_lock.held(urgent=True):
        engine._writer.execute(f"PRAGMA max_page_count = {pages}")


def _page_count(hub) -> int:
    engine = hub.store.engine
    with engine._write_lock.held(urgent=True):
        return engine._writer.execute("PRAGMA page_count").fetchone()[0]


def test_a_full_disk_is_a_503_that_says_so_and_publishing_resumes_by_itself(webhookd_factory, receiver_factory):
    receiver = receiver_factory()
    hub = webhookd_factory()
    hub.register(receiver.url, ["payment.success"])
    _set_page_limit(hub, _page_count(hub) + 3)
    accepted, refused = [], None
    for n in range(500):
        r = hub.http.post("/events", headers=hub.admin,
                          json={**PAYMENT_SUCCESS, "transaction_id": f"txn_{n}", "note": "x" * 2000})
        if r.status_code != 202:
            refused = r
            break
        accepted.append(r.json()["event_id"])
    assert refused is not None, "the database never filled up"
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "storage_unavailable" and "full" in refused.json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) > 0

    health = hub.http.get("/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "storage_unavailable"
    assert hub.http.get("/deliveries", headers=hub.admin).status_code == 200   # reads still work
    assert hub.http.get("/stats", headers=hub.admin).status_code == 200
    metrics = hub.http.get("/metrics", headers=hub.admin).text
    assert "webhookd_storage_refusals_total 1" in metrics or "webhookd_storage_refusals_total 1.0" in metrics

    _set_page_limit(hub, 1_000_000_000)  # room again: /health finds out by itself (a probe write)
    wait_for(lambda: hub.http.get("/health").status_code == 200, timeout=30)
    r = hub.http.post("/events", headers=hub.admin, json={**PAYMENT_SUCCESS, "transaction_id": "after"})
    assert r.status_code == 202, r.text
    for event_id in accepted:  # every event answered 202 is there
        assert hub.http.get(f"/events/{event_id}", headers=hub.admin).status_code == 200
    # The delivery loop lived through it: everything accepted, before and after, reaches the partner.
    wait_for(lambda: set(receiver.event_ids) >= {*accepted, r.json()["event_id"]}, timeout=60)

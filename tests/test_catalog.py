"""GET /event-types: every type of the catalog with a JSON Schema of its payload and an example,
for the admin and any partner; each example is one the schema and POST /events both accept."""

import jsonschema_rs
import pytest

from conftest import ADMIN, bearer

# A catalog of the operator's own, with every JSON type, a known field name declared with another
# type than the guide's (amount as an integer), the envelope's timestamp listed too, and a type
# without fields.
OWN_CATALOG = {
    "tour.rated": {"tour_id": "string", "stars": "integer", "amount": "integer", "verified": "boolean",
                   "tags": "array", "details": "object", "score": "number", "timestamp": "integer"},
    "ping.sent": {},
}


def event_types(hub, headers) -> list[dict]:
    r = hub.http.get("/event-types", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["event_types"]


def test_the_admin_and_every_partner_read_the_whole_catalog(hub):
    partner = hub.register("http://127.0.0.1:9/", ["booking.cancelled"])
    as_admin = event_types(hub, ADMIN)
    as_partner = event_types(hub, bearer(partner["api_key"]))
    assert as_admin == as_partner  # a partner sees every type, not only those it subscribes to
    assert [t["type"] for t in as_admin] == sorted(hub.config.events)
    for entry in as_admin:
        assert set(entry) == {"type", "description", "schema", "example"}
        assert entry["description"]


@pytest.mark.parametrize("headers", [{}, bearer("pak_not_a_key"), {"Authorization": "Basic eDp5"}])
def test_without_a_valid_bearer_token_it_is_401(hub, headers):
    r = hub.http.get("/event-types", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] in {"missing_credentials", "invalid_credentials"}


def test_a_schema_requires_the_catalog_fields_and_allows_others(hub):
    entry = next(t for t in event_types(hub, ADMIN) if t["type"] == "payment.success")
    schema = entry["schema"]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["event", "timestamp", *hub.config.events["payment.success"]]
    assert schema["properties"]["amount"] == {"type": "number"}
    validator = jsonschema_rs.Draft202012Validator(schema)
    without_amount = {k: v for k, v in entry["example"].items() if k != "amount"}
    assert not validator.is_valid(without_amount)
    assert not validator.is_valid({**entry["example"], "amount": "150"})
    assert not validator.is_valid({**entry["example"], "event": "payment.failed"})
    assert validator.is_valid({**entry["example"], "provider": "stripe"})


@pytest.mark.parametrize("catalog", ["bundled", "own"])
def test_every_example_fits_its_schema_and_is_published(webhookd_factory, catalog):
    hub = webhookd_factory(**({"events": OWN_CATALOG} if catalog == "own" else {}))
    entries = event_types(hub, ADMIN)
    assert [t["type"] for t in entries] == sorted(hub.config.events)
    for entry in entries:
        assert jsonschema_rs.meta.is_valid(entry["schema"]), entry["schema"]
        jsonschema_rs.Draft202012Validator(entry["schema"]).validate(entry["example"])
        r = hub.publish(entry["example"])
        assert r.status_code == 202, (entry["type"], r.text)


def test_an_own_type_is_described_by_its_fields(webhookd_factory):
    hub = webhookd_factory(events=OWN_CATALOG)
    by_type = {t["type"]: t for t in event_types(hub, ADMIN)}
    assert "stars (integer)" in by_type["tour.rated"]["description"]
    assert by_type["tour.rated"]["example"]["amount"] == 1  # the guide's 150.0 is not an integer
    assert by_type["tour.rated"]["example"]["tour_id"] == "tour_xyz789"
    assert by_type["ping.sent"]["schema"]["required"] == ["event", "timestamp"]
    rated = by_type["tour.rated"]["schema"]
    assert rated["required"][:2] == ["event", "timestamp"] and rated["required"].count("timestamp") == 1
    assert rated["properties"]["timestamp"]["type"] == "integer"

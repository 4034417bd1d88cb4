"""Configuration and the command line: env overrides, one-line errors, the admin token file."""


import pytest

import config
from conftest import ROOT


def test_bundled_config_loads_with_the_guides_catalog():
    cfg = config.load_config(ROOT / "webhookd.toml", environ={})
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8080
    assert cfg.delivery.timeout_s == 5 and cfg.delivery.max_attempts == 3
    assert cfg.events["payment.success"] == {
        "transaction_id": "string", "amount": "number", "currency": "string", "user_id": "string"}
    assert set(cfg.events) == {"payment.success", "payment.failed", "booking.confirmed", "booking.cancelled"}
    assert cfg.storage.path == str(ROOT / "data" / "webhookd.db")


def test_the_codes_defaults_are_the_safe_ones():
    cfg = config.load_config(None, environ={})
    assert cfg.security.allow_private_targets is False
    assert cfg.security.open_registration is False
    assert cfg.server.host == "127.0.0.1"


def test_environment_overrides_every_section():
    cfg = config.load_config(ROOT / "webhookd.toml", environ={
        "WEBHOOKD_SERVER_PORT": "9999", "WEBHOOKD_DELIVERY_TIMEOUT_S": "2.5",
        "WEBHOOKD_SECURITY_OPEN_REGISTRATION": "true", "WEBHOOKD_STORAGE_PATH": "/tmp/x.db",
        "WEBHOOKD_ADMIN_TOKEN": "short-form"})
    assert cfg.server.port == 9999 and cfg.delivery.timeout_s == 2.5
    assert cfg.security.open_registration is True and cfg.storage.path == "/tmp/x.db"
    assert cfg.security.admin_token == "short-form"


@pytest.mark.parametrize("environ, fragment", [
    ({"WEBHOOKD_DELIVERY_TIMEOUT_S": "abc"}, "Config 'delivery.timeout_s' has value 'abc'"),
    ({"WEBHOOKD_DELIVERY_TIMEOUT_S": "0"}, "Config 'delivery.timeout_s' has value 0.0"),
    ({"WEBHOOKD_SERVER_PORT": "70000"}, "Config 'server.port' has value 70000"),
    ({"WEBHOOKD_SECURITY_OPEN_REGISTRATION": "maybe"}, "Config 'security.open_registration'"),
    ({"WEBHOOKD_DELIVERY_TIMEOUT_S": "nan"}, "Config 'delivery.timeout_s' has value nan"),
    ({"WEBHOOKD_DELIVERY_BACKOFF_BASE_S": "inf"}, "Config 'delivery.backoff_base_s' has value inf"),
    ({"WEBHOOKD_STORAGE_PATH": ":memory:"}, "Config 'storage.path' has value ':memory:'"),
    ({"WEBHOOKD_DELIVERY_PROXY_URL": "https://proxy.example:3128"}, "'delivery.proxy_url' must start with http://"),
    ({"WEBHOOKD_DELIVERY_PROXY_URL": "http://proxy.example"}, "'delivery.proxy_url' must name a host and a port"),
    ({"WEBHOOKD_DELIVERY_PROXY_URL": "http://proxy.example:3128/path"}, "'delivery.proxy_url' must name a host"),
    ({"WEBHOOKD_DELIVERY_PROXY_URL": "http://:3128"}, "'delivery.proxy_url' must name a host and a port"),
    ({"WEBHOOKD_DELIVERY_PROXY_URL": "http://u:p@proxy.example:99999"}, "'delivery.proxy_url' is not a valid URL"),
    ({"WEBHOOKD_DELIVERY_PROXY_URL": "socks5://proxy.example:1080"}, "'delivery.proxy_url' must start with http://"),
])
def test_bad_values_name_the_key_and_the_value(environ, fragment):
    with pytest.raises(config.ConfigError) as caught:
        config.load_config(ROOT / "webhookd.toml", environ=environ)
    assert fragment in str(caught.value)


def test_a_proxy_url_error_never_repeats_the_password():
    with pytest.raises(config.ConfigError) as caught:
        config.load_config(ROOT / "webhookd.toml", environ={
            "WEBHOOKD_DELIVERY_PROXY_URL": "https://egress:hunter2-secret@proxy.example:3128"})
    assert "hunter2-secret" not in str(caught.value) and "delivery.proxy_url" in str(caught.value)
    loaded = config.load_config(ROOT / "webhookd.toml", environ={
        "WEBHOOKD_DELIVERY_PROXY_URL": "http://egress:hunter2-secret@proxy.example:3128"})
    assert loaded.delivery.proxy_url.endswith("@proxy.example:3128")


@pytest.mark.parametrize("text, fragment", [
    ("[delivery]\ntimeout_s = 'soon'\n", "Config 'delivery.timeout_s' has value 'soon'"),
    ("[delivery]\ntimeout = 5\n", "Config 'delivery.timeout' is not a known key"),
    ("[deliveries]\n", "unknown section 'deliveries'"),
    ('[events."payment.success"]\namount = "money"\n', "Config 'events.payment.success.amount' has value 'money'"),
    ('[events.payment]\namount = "number"\n', "event type 'payment'"),
    ("[server\n", "not valid TOML"),
])
def test_bad_files_name_the_key(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as caught:
        config.load_config(path, environ={})
    assert fragment in str(caught.value)


def test_without_events_tables_the_catalog_is_the_guides(tmp_path):
    path = tmp_path / "plain.toml"
    path.write_text("[server]\nport = 9999\n")
    cfg = config.load_config(path, environ={})
    assert set(cfg.events) == {"payment.success", "payment.failed", "booking.confirmed", "booking.cancelled"}
    assert cfg.events["booking.cancelled"] == {"booking_id": "string", "user_id": "string"}
    assert config.Config().events == cfg.events


def test_a_postgresql_url_selects_postgresql_and_needs_a_shared_admin_token(tmp_path):
    config_file = tmp_path / "webhookd.toml"
    config_file.write_text('[storage]\nurl = "postgresql://webhookd@127.0.0.1:5432/webhookd"\n')
    with pytest.raises(config.ConfigError, match="security.admin_token"):
        config.load_config(config_file, environ={})
    loaded = config.load_config(config_file, environ={"WEBHOOKD_ADMIN_TOKEN": "adm_shared"})
    assert loaded.storage.target == "postgresql://webhookd@127.0.0.1:5432/webhookd"
    env = {"WEBHOOKD_STORAGE_URL": "mysql://x", "WEBHOOKD_ADMIN_TOKEN": "adm_shared"}
    with pytest.raises(config.ConfigError, match="storage.url"):
        config.load_config(None, environ=env)
    assert config.load_config(None, environ={}).storage.target.endswith("webhookd.db")   # SQLite by default


def test_ca_file_is_relative_to_the_config_and_checked_at_load(tmp_path):
    import trustme

    trustme.CA().cert_pem.write_to_path(str(tmp_path / "partners-ca.pem"))
    (tmp_path / "w.toml").write_text('[delivery]\nca_file = "partners-ca.pem"\n')
    assert config.load_config(tmp_path / "w.toml", environ={}).delivery.ca_file == str(tmp_path / "partners-ca.pem")
    (tmp_path / "bad.pem").write_text("not a certificate")
    for value in ("missing.pem", "bad.pem"):
        (tmp_path / "w.toml").write_text(f'[delivery]\nca_file = "{value}"\n')
        with pytest.raises(config.ConfigError, match="delivery.ca_file"):
            config.load_config(tmp_path / "w.toml", environ={})

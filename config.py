"""Every configuration key webhookd knows, its default, and how a file becomes a ``Config``.

Read this file to answer "what can I set, and what happens if I don't". It imports
nothing of webhookd's own, so it reads on its own:

1. the event catalog (what ``POST /events`` accepts) and the partner guide's default,
2. one frozen dataclass per section of ``webhookd.toml``: field = key, value = default;
   ``DeliverySettings``, what the delivery loop and the housekeeping read of them,
3. ``load_config``: the TOML file, then ``WEBHOOKD_<SECTION>_<KEY>`` variables, then checks
   that stop start-up with one line naming the key and the value,
4. ``admin_token``: the token from the config, or a 0600 file created beside the database.

The defaults are the safe ones: registration closed, private targets refused, metrics
behind the admin token. The bundled ``webhookd.toml`` allows private targets only so a
receiver on the same box works out of the box.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import secrets
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# --- The event catalog ------------------------------------------------------------------

EVENT_TYPE = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")  # word.word, like payment.success
FIELD_TYPES = {
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}

# The outbound catalog when the config has no [events] tables: the partner guide's four events
# and the fields the guide names for each.
GUIDE_CATALOG = {
    "payment.success": {"transaction_id": "string", "amount": "number", "currency": "string", "user_id": "string"},
    "payment.failed": {"transaction_id": "string", "reason": "string", "user_id": "string", "amount": "number"},
    "booking.confirmed": {"booking_id": "string", "tour_id": "string", "user_id": "string",
                          "start_date": "string", "end_date": "string"},
    "booking.cancelled": {"booking_id": "string", "user_id": "string"},
}


VERSION = "0.1.0"  # webhookd's version: the API's, the User-Agent's, and the one that wrote a database


class ConfigError(Exception):
    """Raised when the configuration cannot be used; the message names the key and the value."""


# --- The sections of webhookd.toml ------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    log_level: str = "info"
    log_format: str = "text"   # text | json
    access_log: bool = False   # one line per request; credentials in a query string are redacted
    trusted_proxies: tuple[str, ...] = ()  # addresses (or networks) whose X-Forwarded-For / Forwarded is believed


@dataclass(frozen=True)
class StorageConfig:
    path: str = "data/webhookd.db"   # SQLite, the default
    url: str = ""                    # postgresql://user:password@host/db: PostgreSQL instead (webhookd[postgres])
    lock_timeout_s: float = 2.0      # PostgreSQL: a statement waiting this long for a row lock is cancelled (a 503)
    statement_timeout_s: float = 10.0  # PostgreSQL: a statement running this long is cancelled (a 503)

    @property
    def target(self) -> str:
        """What ``Store`` opens: the PostgreSQL URL when set, else the SQLite file."""
        return self.url or self.path

    @property
    def is_one_file(self) -> bool:
        """The database is the SQLite file at ``path``, which ``webhookd backup`` and ``restore``
        copy; a database server (``url``) is backed up with its own tools."""
        return not self.url


def is_server_url(url: str) -> bool:
    """A ``storage.url`` webhookd can open: a PostgreSQL server's, ``postgresql://user:password@host/db``."""
    return url.startswith(("postgresql://", "postgres://"))


@dataclass(frozen=True)
class SecurityConfig:
    admin_token: str = ""
    open_registration: bool = False
    allow_private_targets: bool = False
    max_body_bytes: int = 262144
    max_json_depth: int = 32
    max_batch_events: int = 500           # events in one POST /events/batch
    inbound_tolerance_s: int = 300
    secret_overlap_s: int = 86400
    admin_token_overlap_s: int = 86400    # after `webhookd token --rotate` the old token works this long; 0: not at all
    admin_token_previous: str = ""        # with admin_token set here: the old one, still accepted while you switch
    allowed_ports: tuple[int, ...] = ()   # empty: any port
    inbound_rate_per_s: float = 50.0      # per partner
    inbound_failures_per_s: float = 5.0   # refused signatures per client address
    registration_rate_per_min: float = 10.0  # per client address, when registration is open
    partner_writes_per_min: float = 30.0     # writes a partner makes with its own key (test events, patches, ...)
    metrics_public: bool = False             # true: GET /metrics without the admin token
    partner_self_delete: bool = False        # true: a partner may DELETE itself with its own key
    verify_endpoints: bool = False           # true: a new webhook URL receives nothing until it echoes a challenge


@dataclass(frozen=True)
class DeliveryConfig:
    timeout_s: float = 5.0
    max_attempts: int = 3
    backoff_base_s: float = 30.0
    backoff_max_s: float = 3600.0
    concurrency: int = 4000                      # attempts in flight at once, all partners together
    per_partner_concurrency: int = 500           # at most; each partner starts at 25 (governor.PartnerLimits)
    breaker_threshold: int = 5
    breaker_span_s: float = 10.0
    breaker_cooldown_s: float | None = None      # unset: the smaller of 30 s and backoff_max_s
    breaker_cooldown_max_s: float | None = None  # unset: the smaller of 600 s and backoff_max_s
    disable_after_s: float = 259200.0
    retry_after_max_s: float = 3600.0
    idle_connection_s: float = 30.0
    max_pending_age_s: float = 604800.0          # a delivery pending longer ends "expired" (7 days)
    ca_file: str = ""                            # PEM file of the CAs partners' certificates chain to; empty: the system's
    native_speedups: bool = True                 # the sender on uvloop, answers parsed by llhttp (httptools), if installed
    proxy_url: str = ""                          # http://[user:password@]host:port: every delivery leaves through this
                                                 # CONNECT proxy (one egress address); empty: straight out


@dataclass(frozen=True)
class RetentionConfig:
    max_age_s: float = 2592000.0
    batch_size: int = 500
    interval_s: float = 300.0
    audit_max_age_s: float = 31536000.0   # audit entries are kept a year


@dataclass(frozen=True)
class RealtimeConfig:
    token_ttl_s: int = 900
    client_queue: int = 100


# What webhookd alerts the operator about ([alerts] events; alerts.py).
ALERT_KINDS = ("circuit_opened", "circuit_closed", "partner_disabled", "partner_enabled", "deliveries_failed",
               "backlog_old")


@dataclass(frozen=True)
class AlertsConfig:
    url: str = ""                            # where webhookd's own signed alerts go; empty: no alerts
    secret: str = ""                         # their signing secret (at least 16 characters); required with url
    events: tuple[str, ...] = ALERT_KINDS    # which alerts to send
    interval_s: float = 300.0                # failed, disabled, enabled: one alert of each per partner per interval
    oldest_pending_s: float = 3600.0         # an alert when an active partner's oldest pending delivery is older


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    events: dict[str, dict[str, str]] = field(default_factory=lambda: dict(GUIDE_CATALOG))  # type -> field -> JSON type
    event_retention_s: dict[str, float] = field(default_factory=dict)  # type -> its own retention (retention_days)


@dataclass(frozen=True)
class DeliverySettings(DeliveryConfig):
    """What the delivery loop, its breakers, its sender and the housekeeping read: the
    ``[delivery]`` keys plus a few keys of other sections, and the values derived from them."""

    retention_s: float = 2592000.0
    purge_batch: int = 500
    purge_interval_s: float = 300.0
    audit_retention_s: float = 31536000.0
    type_retention_s: tuple[tuple[str, float], ...] = ()  # (type, seconds): the catalog's retention_days
    allow_private_targets: bool = False
    allowed_ports: tuple[int, ...] = ()
    user_agent: str = "webhookd"

    @classmethod
    def from_config(cls, config: Config, user_agent: str) -> DeliverySettings:
        return cls(
            **dataclasses.asdict(config.delivery),
            retention_s=config.retention.max_age_s,
            purge_batch=config.retention.batch_size,
            purge_interval_s=config.retention.interval_s,
            audit_retention_s=config.retention.audit_max_age_s,
            type_retention_s=tuple(sorted(config.event_retention_s.items())),
            allow_private_targets=config.security.allow_private_targets,
            allowed_ports=config.security.allowed_ports,
            user_agent=user_agent,
        )

    @property
    def cooldown_s(self) -> float:
        """The first pause of an open circuit: ``breaker_cooldown_s``, or by default the
        smaller of 30 s and ``backoff_max_s`` (no longer than the retry schedule's)."""
        return self.breaker_cooldown_s if self.breaker_cooldown_s is not None else min(30.0, self.backoff_max_s)

    @property
    def cooldown_max_s(self) -> float:
        """The longest pause: ``breaker_cooldown_max_s``, or the smaller of 600 s and ``backoff_max_s``."""
        if self.breaker_cooldown_max_s is not None:
            return self.breaker_cooldown_max_s
        return min(600.0, self.backoff_max_s)

    @property
    def lease_s(self) -> float:
        """How long a claim holds a row. A claimed row starts at once and its attempt lasts at
        most ``timeout_s``, lookup and connect included: twice that and a margin for recording
        the result (a busy disk, a stop's grace period) mean a slow attempt is never taken
        over — and sent twice — while it is still running."""
        return 2 * self.timeout_s + 10


SECTIONS = {"server": ServerConfig, "storage": StorageConfig, "security": SecurityConfig,
            "delivery": DeliveryConfig, "retention": RetentionConfig, "realtime": RealtimeConfig,
            "alerts": AlertsConfig}

# Keys that must be positive numbers; the message says what the number means.
POSITIVE = {
    "server.port": "a TCP port (1-65535)",
    "storage.lock_timeout_s": "a number of seconds",
    "storage.statement_timeout_s": "a number of seconds",
    "security.max_body_bytes": "a size in bytes",
    "security.max_json_depth": "a number of nesting levels",
    "security.max_batch_events": "a number of events",
    "security.inbound_tolerance_s": "a number of seconds",
    "security.secret_overlap_s": "a number of seconds",
    "security.inbound_rate_per_s": "a number of requests per second",
    "security.inbound_failures_per_s": "a number of refused requests per second",
    "security.registration_rate_per_min": "a number of registrations per minute",
    "security.partner_writes_per_min": "a number of requests per minute",
    "delivery.timeout_s": "a number of seconds",
    "delivery.max_attempts": "a number of attempts",
    "delivery.backoff_base_s": "a number of seconds",
    "delivery.backoff_max_s": "a number of seconds",
    "delivery.concurrency": "a number of attempts in flight",
    "delivery.per_partner_concurrency": "a number of requests",
    "delivery.breaker_threshold": "a number of failed attempts",
    "delivery.breaker_span_s": "a number of seconds",
    "delivery.breaker_cooldown_s": "a number of seconds",
    "delivery.breaker_cooldown_max_s": "a number of seconds",
    "delivery.disable_after_s": "a number of seconds",
    "delivery.retry_after_max_s": "a number of seconds",
    "delivery.idle_connection_s": "a number of seconds",
    "delivery.max_pending_age_s": "a number of seconds",
    "retention.max_age_s": "a number of seconds",
    "retention.batch_size": "a number of events",
    "retention.interval_s": "a number of seconds",
    "retention.audit_max_age_s": "a number of seconds",
    "realtime.token_ttl_s": "a number of seconds",
    "realtime.client_queue": "a number of messages",
    "alerts.interval_s": "a number of seconds",
    "alerts.oldest_pending_s": "a number of seconds",
}

# Keys that may also be zero; the message says what zero means.
NOT_NEGATIVE = {
    "security.admin_token_overlap_s": "a number of seconds (0: a rotation revokes the old admin token at once)",
}


# --- Reading a file and the environment --------------------------------------------------


def load_config(path: str | os.PathLike | None, environ: dict[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply ``WEBHOOKD_<SECTION>_<KEY>`` overrides, validate.

    A relative ``storage.path`` (and ``delivery.ca_file``) is taken relative to the config
    file's folder, so the service finds the same files whatever directory it is started from.
    A ``ca_file`` that cannot be read stops the start here, not at the first HTTPS delivery.
    """
    environ = os.environ if environ is None else environ
    raw = _read_toml(path) if path is not None else {}
    unknown = set(raw) - set(SECTIONS) - {"events"}
    if unknown:
        raise ConfigError(f"Config has the unknown section {sorted(unknown)[0]!r}. "
                          f"Expected: {', '.join([*SECTIONS, 'events'])}.")
    sections = {name: _read_section(name, cls, raw.get(name, {}), environ) for name, cls in SECTIONS.items()}
    if "WEBHOOKD_ADMIN_TOKEN" in environ and "WEBHOOKD_SECURITY_ADMIN_TOKEN" not in environ:
        sections["security"] = dataclasses.replace(sections["security"], admin_token=environ["WEBHOOKD_ADMIN_TOKEN"])
    _check_values(sections)
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    if not Path(sections["storage"].path).is_absolute():
        sections["storage"] = dataclasses.replace(sections["storage"], path=str(base_dir / sections["storage"].path))
    ca_file = sections["delivery"].ca_file
    if ca_file:
        ca_path = Path(ca_file) if Path(ca_file).is_absolute() else base_dir / ca_file
        try:
            ssl.create_default_context(cafile=str(ca_path))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"Config 'delivery.ca_file' is {ca_file!r}, which is not a readable PEM file of "
                              f"CA certificates ({exc}). Point it at one, or leave it empty for the system's.") from None
        sections["delivery"] = dataclasses.replace(sections["delivery"], ca_file=str(ca_path))
    catalog, kept = _check_catalog(raw.get("events", GUIDE_CATALOG), sections["retention"].max_age_s)
    return Config(**sections, events=catalog, event_retention_s=kept)


def _read_toml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"Config file {str(path)!r} does not exist. Pass --config PATH to a webhookd.toml.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {str(path)!r} is not valid TOML: {exc}.") from None


# Dataclass fields carry their type as a string (``from __future__ import annotations``).
_KINDS = {"str": str, "int": int, "float": float, "float | None": float, "bool": bool, "tuple[int, ...]": tuple,
          "tuple[str, ...]": list}


def _read_section(name: str, cls: type, table: Any, environ: dict[str, str]) -> Any:
    """One section: its table's keys (none unknown), each overridden by its environment variable."""
    if not isinstance(table, dict):
        raise ConfigError(f"Config '{name}' has value {table!r}. Expected a table [{name}].")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"Config '{name}.{key}' is not a known key. Known keys: {', '.join(known)}.")
    values = {}
    for key, fld in known.items():
        env_name = f"WEBHOOKD_{name.upper()}_{key.upper()}"
        if env_name in environ:
            values[key] = _coerce(f"{name}.{key}", environ[env_name], _KINDS[fld.type], from_env=True)
        elif key in table:
            values[key] = _coerce(f"{name}.{key}", table[key], _KINDS[fld.type], from_env=False)
    return cls(**values)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _coerce(key: str, value: Any, kind: type, from_env: bool) -> Any:
    """Turn a TOML or environment value into ``kind``, or raise a ConfigError naming the key."""
    if kind is tuple:
        return _coerce_ports(key, value, from_env)
    if kind is list:  # a list of words: a TOML array, or comma-separated in the environment
        items = [v.strip() for v in value.split(",") if v.strip()] if from_env else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ConfigError(f"Config '{key}' has value {value!r}. Expected a list of words like [\"a\", \"b\"].")
        return tuple(items)
    expected = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}[kind]
    if from_env and kind is not str:
        text = value.strip().lower()
        if kind is bool and text in _TRUE + _FALSE:
            return text in _TRUE
        if kind is not bool:
            try:
                return kind(text)
            except ValueError:
                pass
    elif from_env or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"Config '{key}' has value {value!r}. Expected {expected}.")


def _coerce_ports(key: str, value: Any, from_env: bool) -> tuple[int, ...]:
    """A list of TCP ports: a TOML array, or comma-separated in the environment."""
    items = [v.strip() for v in value.split(",") if v.strip()] if from_env else value
    try:
        ports = tuple(int(p) for p in items if not isinstance(p, bool))
        if isinstance(items, (str, dict)) or len(ports) != len(items) or not all(0 < p < 65536 for p in ports):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"Config '{key}' has value {value!r}. Expected a list of TCP ports like [443, 8443].") from None
    return ports


def _check_values(sections: dict[str, Any]) -> None:
    """The rules a well-typed value can still break: positive numbers, known words, a file on disk."""
    for key, meaning in POSITIVE.items():
        section, name = key.split(".")
        value = getattr(sections[section], name)
        if value is None:  # unset, and its default follows another key
            continue
        if not math.isfinite(value) or value <= 0 or (key == "server.port" and value > 65535):
            raise ConfigError(f"Config '{key}' has value {value!r}. Expected {meaning}, greater than zero.")
    for key, meaning in NOT_NEGATIVE.items():
        section, name = key.split(".")
        value = getattr(sections[section], name)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"Config '{key}' has value {value!r}. Expected {meaning}, zero or more.")
    for proxy in sections["server"].trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"Config 'server.trusted_proxies' has {proxy!r}. Expected addresses or networks of "
                              "the reverse proxies in front of webhookd, like [\"127.0.0.1\"] or [\"10.0.0.0/24\"].") from None
    if sections["server"].log_format not in ("text", "json"):
        raise ConfigError(f"Config 'server.log_format' has value {sections['server'].log_format!r}. "
                          "Expected 'text' or 'json'.")
    storage_path = sections["storage"].path
    if storage_path == ":memory:" or storage_path.startswith("file:"):
        raise ConfigError(f"Config 'storage.path' has value {storage_path!r}. Expected a file path: "
                          "webhookd's threads each open the file, so it must be on disk.")
    url = sections["storage"].url
    if url and not is_server_url(url):
        raise ConfigError("Config 'storage.url' is not a PostgreSQL URL. Expected postgresql://user:password@host/db "
                          "(or leave it empty for the SQLite file in storage.path).")
    _check_alerts(sections["alerts"])
    _check_proxy_url(sections["delivery"].proxy_url)
    if url and not sections["security"].admin_token:
        # Several processes, maybe on several machines, must agree on one token; a file
        # written beside each one's storage.path would give each its own.
        raise ConfigError("Config 'security.admin_token' is empty while 'storage.url' is set. Expected the admin "
                          "token every webhookd process on that database shares (or WEBHOOKD_ADMIN_TOKEN).")


def _check_alerts(alerts: AlertsConfig) -> None:
    unknown = [e for e in alerts.events if e not in ALERT_KINDS]
    if unknown:
        raise ConfigError(f"Config 'alerts.events' has {unknown[0]!r}. Expected some of: {', '.join(ALERT_KINDS)}.")
    if not alerts.url:
        return
    if not alerts.url.startswith(("http://", "https://")):
        raise ConfigError("Config 'alerts.url' is not an http(s) URL. Expected where the alerts go, like "
                          "https://ops.example.com/webhookd-alerts (or leave it empty for no alerts).")
    if len(alerts.secret) < 16:
        raise ConfigError("Config 'alerts.secret' must be at least 16 characters when 'alerts.url' is set: the "
                          "alerts are signed with it, as partners' webhooks are with theirs (WEBHOOKD_ALERTS_SECRET).")


def _check_proxy_url(url: str) -> None:
    """``delivery.proxy_url``: empty, or ``http://[user:password@]host:port`` and nothing more. The
    message never repeats the URL: it may hold the proxy's password."""
    if not url:
        return
    shape = ("Expected http://host:port of an HTTP CONNECT proxy, with user:password@ if it asks for them "
             "(like http://egress.internal:3128), or empty to send straight out.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ConfigError(f"Config 'delivery.proxy_url' is not a valid URL. {shape}") from None
    if parts.scheme != "http":
        raise ConfigError(f"Config 'delivery.proxy_url' must start with http:// (the tunnel carries TLS itself). "
                          f"{shape}")
    if not parts.hostname or not port or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"Config 'delivery.proxy_url' must name a host and a port, and nothing after them. {shape}")


# In a catalog table, the one key that is not a field: the type's own retention, in days.
RETENTION_KEY = "retention_days"


def _check_catalog(raw: Any, max_age_s: float) -> tuple[dict[str, dict[str, str]], dict[str, float]]:
    """The catalog (type -> field -> JSON type) and the types' own retentions (type -> seconds)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"Config 'events' has value {raw!r}. Expected tables like [events.\"payment.success\"].")
    catalog: dict[str, dict[str, str]] = {}
    kept: dict[str, float] = {}
    for event_type, fields in raw.items():
        if not EVENT_TYPE.match(event_type):
            raise ConfigError(f"Config 'events' has the event type {event_type!r}. Expected the form word.word.")
        if not isinstance(fields, dict):
            raise ConfigError(f"Config 'events.{event_type}' has value {fields!r}. Expected a table of field = type.")
        fields = dict(fields)
        if RETENTION_KEY in fields and not isinstance(fields[RETENTION_KEY], str):
            kept[event_type] = _type_retention(event_type, fields.pop(RETENTION_KEY), max_age_s)
        for name, kind in fields.items():
            if kind not in FIELD_TYPES:
                raise ConfigError(
                    f"Config 'events.{event_type}.{name}' has value {kind!r}. "
                    f"Expected one of: {', '.join(FIELD_TYPES)}.")
        catalog[event_type] = fields
    return catalog, kept


def _type_retention(event_type: str, days: Any, max_age_s: float) -> float:
    """A type's ``retention_days`` in seconds: a positive number of days, shorter than everyone's
    retention (it can only shorten it: the global purge takes every type at ``max_age_s``)."""
    key = f"events.{event_type}.{RETENTION_KEY}"
    if isinstance(days, bool) or not isinstance(days, (int, float)) or not 0 < days < math.inf:
        raise ConfigError(f"Config '{key}' has value {days!r}. Expected a number of days, like 7.")
    if days * 86400 >= max_age_s:
        raise ConfigError(f"Config '{key}' is {days} days, not shorter than retention.max_age_s ({max_age_s:g} s): "
                          "a type's retention can only shorten everyone's. Lower it, or remove it.")
    return days * 86400.0


# --- The admin token -----------------------------------------------------------------------


def admin_token(config: Config) -> str:
    """The admin token: from the config, else from (or newly into) a 0600 file beside the database."""
    if config.security.admin_token:
        return config.security.admin_token
    token_file = _token_folder(config) / "admin_token"
    if token_file.exists():
        return token_file.read_text(encoding="utf-8").strip()
    token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = "adm_" + secrets.token_urlsafe(32)
    fd = os.open(token_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


def admin_tokens(config: Config, now: float) -> list[str]:
    """Every admin token valid at ``now``: the current one first, then, while a rotation's overlap
    runs, the previous one (``admin_token.previous``: the token and until when, unix seconds)."""
    tokens = [admin_token(config)]
    if config.security.admin_token:  # set in the config: the operator keeps the old one beside it, if any
        return tokens + ([config.security.admin_token_previous] if config.security.admin_token_previous else [])
    previous = _previous_token(config)
    if previous is not None and previous[1] > now:
        tokens.append(previous[0])
    return tokens


@dataclass(frozen=True)
class AdminTokenRotation:
    """What ``rotate_admin_token`` did: the new token, until when the old one works (None: it was
    revoked at once), and whether a still-valid token from an earlier rotation was dropped."""

    token: str
    old_valid_until: float | None
    dropped_earlier: bool


def rotate_admin_token(config: Config, now: float, *, revoke_old: bool = False) -> AdminTokenRotation:
    """A new admin token in the file. The old one stays valid ``admin_token_overlap_s`` more, so
    the dashboard and scripts can switch, or not at all with ``revoke_old`` (a leaked token) or an
    overlap of 0. One previous token is kept at most: rotating again during an overlap makes the
    current token the previous one and ends the one before it at once (it is two rotations old,
    and whoever rotated twice has switched away from it). Refused (ValueError) for a token set in
    the config. A running server reads the files again within a second (``web.AdminTokens``)."""
    if config.security.admin_token:
        raise ValueError("the admin token is set in the config (security.admin_token or WEBHOOKD_ADMIN_TOKEN): change "
                         "it there, with the old one in security.admin_token_previous until every process and script "
                         "has switched (leave it out to revoke the old one); --rotate rotates the generated token file")
    current, earlier = admin_token(config), _previous_token(config)
    dropped_earlier = earlier is not None and earlier[1] > now
    folder = _token_folder(config)
    overlap = 0 if revoke_old else config.security.admin_token_overlap_s
    new = "adm_" + secrets.token_urlsafe(32)
    if overlap > 0:
        # The previous file first: a crash between the two writes leaves the current token in both.
        _write_private(folder / "admin_token.previous", f"{current} {now + overlap}\n")
        _write_private(folder / "admin_token", new + "\n")
        return AdminTokenRotation(new, now + overlap, dropped_earlier)
    # Revoked first: a crash between the two steps leaves only the current token, never an old one.
    (folder / "admin_token.previous").unlink(missing_ok=True)
    _write_private(folder / "admin_token", new + "\n")
    return AdminTokenRotation(new, None, dropped_earlier)


def _token_folder(config: Config) -> Path:
    return Path(config.storage.path).resolve().parent


def _previous_token(config: Config) -> tuple[str, float] | None:
    try:
        token, until = (_token_folder(config) / "admin_token.previous").read_text(encoding="utf-8").split()
        return token, float(until)
    except (FileNotFoundError, ValueError):
        return None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all (a temporary file, then a rename), mode 0600."""
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(temporary, path)

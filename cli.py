"""The command line: ``webhookd serve`` and the tools around it.

* ``serve`` runs the HTTP API and the delivery loop (``serving.py``: one server per SQLite file,
  the port, then ``webhookd.create_app`` on uvicorn); ``init`` writes a commented webhookd.toml;
* ``token`` prints the admin token, creating it on first use;
* ``sign`` and ``listen`` are for partners and students: sign a payload the way the
  guide does, or run a local receiver that verifies every webhook three ways;
* ``migrate`` brings the schema up to date; ``backup``, ``restore`` and ``migrate-store`` work
  on the database files themselves (``backup.py``);
* ``partners``, ``publish``, ``deliveries``, ``trace``, ``retry``, ``recover``, ``replay`` and
  ``audit`` talk to the running server's HTTP API with the admin token, and print tables (or
  ``--json``).

``main`` is the console script; ``python cli.py ...`` calls it too. A command that
cannot do its job prints one line saying why and exits 1; a usage or config mistake (an
unknown option, JSON that does not parse, a missing ``--yes``, a bad config) exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import backup
import signing
from cli_parser import build_parser
from config import VERSION, Config, ConfigError, admin_token, load_config, rotate_admin_token

logger = logging.getLogger("webhookd")


class CliError(Exception):
    """Raised by a command to stop with one clear line and exit status 1: it was refused."""


class UsageError(CliError):
    """The command was given wrong: one clear line and exit status 2, as argparse's own mistakes."""


def _read_json_argument(text: str) -> Any:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read {text[1:]} ({exc.strerror})") from None
    try:
        return signing.parse_json(text.encode("utf-8"))
    except signing.BadJSON as exc:
        raise UsageError(f"the JSON given is not valid: {exc}") from None


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 partner``, ``2 partners``, ``0 partners``."""
    return f"{n} {word if n == 1 else many or word + 's'}"


# =====================================================================================
# Running the service
# =====================================================================================


def _cmd_serve(args: argparse.Namespace, config: Config) -> int:
    import serving

    try:
        return serving.serve(config, args.config, args.host or config.server.host, args.port or config.server.port)
    except serving.Refused as exc:
        raise CliError(str(exc)) from None


def _cmd_init(args: argparse.Namespace, config: Config) -> int:
    """Write the commented starting configuration; never over a file that exists."""
    import config_template

    target = Path(args.path)
    if target.exists() and not args.force:
        raise CliError(f"{target} exists already: edit it, or add --force to replace it with the defaults")
    target.write_text(config_template.TEXT, encoding="utf-8")
    serve = "webhookd serve" if args.path == "webhookd.toml" else f"webhookd --config {target} serve"
    print(f"wrote {target}: every value in it is the default, so webhook URLs on this machine or a private "
          f"network are refused (security.allow_private_targets). Edit it, then: {serve}")
    return 0


def _cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    """Apply the migrations the database lacks, and say which (``serve`` applies them too, at start)."""
    import serving

    try:
        where, applied = serving.migrate(config)
    except serving.Refused as exc:
        raise CliError(str(exc)) from None
    if applied:
        print(f"applied {plural(len(applied), 'migration')} to {where}, as webhookd {VERSION}: " + ", ".join(applied))
    else:
        print(f"{where} is up to date for webhookd {VERSION}: nothing to apply")
    return 0


def _cmd_token(args: argparse.Namespace, config: Config) -> int:
    """Print the admin token; ``--rotate``: a new one (printed), the old one valid for the overlap,
    or revoked at once with ``--revoke-old``."""
    if args.revoke_old and not args.rotate:
        raise UsageError("--revoke-old goes with --rotate: webhookd token --rotate --revoke-old")
    if not args.rotate:
        print(admin_token(config))
        return 0
    try:
        rotation = rotate_admin_token(config, time.time(), revoke_old=args.revoke_old)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(rotation.token)
    if rotation.old_valid_until is None:
        print("Every old admin token is revoked: the running server refuses it within a second, and the /ws "
              "tokens it signed too. Give the dashboard and your scripts the new one.", file=sys.stderr)
    else:
        until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rotation.old_valid_until))
        print(f"The old admin token keeps working until {until} (security.admin_token_overlap_s): switch the "
              "dashboard and your scripts before then, or end it now with --rotate --revoke-old.", file=sys.stderr)
        if rotation.dropped_earlier:
            print("The token before it, from the previous rotation, stopped working now.", file=sys.stderr)
    return 0


# =====================================================================================
# For partners and students: sign and listen
# =====================================================================================


def _cmd_sign(args: argparse.Namespace, config: Config) -> int:
    payload = _read_json_argument(args.json)
    print(signing.sign_hex(args.secret, signing.canonical(payload)))
    return 0


def _cmd_catalog(args: argparse.Namespace, config: Config) -> int:
    """The config's event catalog as ``GET /event-types`` answers it: each type's required fields
    and description, or with --json its JSON Schema and example too."""
    from catalog import event_types  # the server's own code, so the two cannot drift apart

    answer = event_types(config.events)
    if args.json:
        return _show(args, answer)
    rows = [{"type": t["type"], "description": t["description"],
             "required": [f"{name}:{t['schema']['properties'][name]['type']}" for name in t["schema"]["required"]
                          if name not in ("event", "timestamp")]} for t in answer["event_types"]]
    _print_table(rows, ["type", "required", "description"])
    return 0


def _listen_verdicts(secrets_held: list[str], headers: Any, body: bytes, now: float) -> dict[str, bool]:
    """How a receiver holding these secrets judges one webhook, each way a partner might check it."""
    verdicts = [_verdicts_for(s, headers, body, now) for s in secrets_held]
    return {check: any(v[check] for v in verdicts) for check in ("raw", "canonical", "standard")}


def _verdicts_for(secret: str, headers: Any, body: bytes, now: float) -> dict[str, bool]:
    signature = headers.get("X-Webhook-Signature") or ""
    try:
        canonical_ok = signing.signature_matches(secret, signing.canonical(signing.parse_json(body)), signature)
    except signing.BadJSON:
        canonical_ok = False
    standard_ok = signing.standard_signature_matches(
        secret, headers.get("webhook-id") or "", headers.get("webhook-timestamp") or "", body,
        headers.get("webhook-signature") or "", now)
    return {"raw": signing.signature_matches(secret, body, signature), "canonical": canonical_ok,
            "standard": standard_ok}


def _cmd_listen(args: argparse.Namespace, config: Config) -> int:
    """A local receiver that verifies every webhook and prints what it got."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    held = [s.strip() for s in args.secret.split(",") if s.strip()]  # new,old during a rotation

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(min(length, 1 << 20))
            verdicts = _listen_verdicts(held, self.headers, body, time.time())
            ok = verdicts["raw"] or verdicts["canonical"]
            print(f"{self.headers.get('X-Webhook-Event', '?'):<20} {self.headers.get('X-Webhook-Id', '?')}  "
                  + "  ".join(f"{k}={'ok' if v else 'BAD'}" for k, v in verdicts.items()), flush=True)
            if args.verbose:
                print("  " + body.decode("utf-8", "replace"), flush=True)
            answer = {"status": "received"} if ok else {"error": {"code": "invalid_signature",
                                                                  "message": "The signature does not verify."}}
            data = json.dumps(answer).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *log_args: Any) -> None:
            pass  # one line per webhook is printed above

    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as exc:
        import serving

        raise CliError(serving.busy_port_line(args.host, args.port, exc, "--port (and register that URL)")) from None
    print(f"listening on http://{args.host}:{args.port}/ — register this URL; Ctrl+C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# =====================================================================================
# Talking to the running server (every operator command)
# =====================================================================================


def _api(config: Config, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> Any:
    """Call the running server's API with the admin token; its JSON answer, or CliError."""
    import urllib.error
    import urllib.parse
    import urllib.request

    host = "127.0.0.1" if config.server.host in ("0.0.0.0", "::") else config.server.host
    base = f"http://{host}:{config.server.port}"
    params = {k: v for k, v in (query or {}).items() if v is not None}
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={
        "Authorization": f"Bearer {admin_token(config)}", "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            raise CliError(f"{error['message']} ({exc.code} {error['code']})") from None
        except (ValueError, KeyError, TypeError):
            raise CliError(f"the server answered {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise CliError(f"cannot reach webhookd at {base} ({exc.reason}); start it with 'webhookd serve' "
                       f"or pass the --config it runs with") from None


def _cell(column: str, value: Any) -> str:
    """One value as a person reads it: times as dates, lists joined, nothing as '-'."""
    if column == "circuit" and isinstance(value, dict):  # closed | open | half_open
        return str(value.get("state"))
    if (column == "at" or column.endswith(("_at", "_since"))) and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
    if isinstance(value, list) and all(isinstance(v, (str, int)) for v in value):
        return ",".join(map(str, value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return "-" if value is None else str(value)


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Rows as an aligned plain-text table; times as ISO dates."""
    cells = [[_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if not rows:
        print("(none)")


def _show(args: argparse.Namespace, answer: Any, columns: list[str] | None = None) -> int:
    """Print ``answer`` as JSON (--json), as a table (lists), or as key: value lines."""
    if args.json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    elif isinstance(answer, dict) and "items" in answer:
        _print_table(answer["items"], columns or [])
    elif isinstance(answer, dict):
        width = max(map(len, answer), default=0)
        for key, value in answer.items():
            print(f"{key.ljust(width)}  {_cell(key, value)}")
    else:
        print(answer)
    return 0


PARTNER_COLUMNS = ["partner_id", "partner_name", "status", "circuit", "max_rate_per_s", "events_subscribed",
                   "webhook_url"]
DELIVERY_COLUMNS = ["delivery_id", "event", "partner_id", "state", "attempt_count", "updated_at"]
PULLED_COLUMNS = ["delivery_id", "event_id", "event", "published_at", "delivery_state"]
ATTEMPT_COLUMNS = ["attempt", "started_at", "duration_ms", "status_code", "error", "error_detail"]


def _cmd_partners(args: argparse.Namespace, config: Config) -> int:
    action = args.action
    if action == "list":
        return _show(args, _api(config, "GET", "/partners", query={"limit": args.limit}), PARTNER_COLUMNS)
    if action == "add":
        events = _names(args.events)
        answer = _api(config, "POST", "/partners/register",
                      {"partner_name": args.name, "events": events,
                       **({"delivery": "pull"} if args.pull else {"webhook_url": args.url}),
                       "max_rate_per_s": args.max_rate, "contact_email": args.email,
                       "channels": _names(args.channels or ""), "ordering": args.ordering or "concurrent",
                       "filter": _read_json_argument(args.filter) if args.filter else None,
                       **({"retry": _read_json_argument(args.retry)} if args.retry else {}),
                       **({"extra_headers": _read_json_argument(args.headers)} if args.headers else {}),
                       **_client_certificate(args, removing=False)})
        if not args.json:
            print("Save shared_secret and api_key now: they are not shown again.", file=sys.stderr)
        return _show(args, answer)
    if not args.partner_id:
        raise UsageError(f"'partners {action}' needs a PARTNER_ID")
    path = f"/partners/{args.partner_id}"
    if action == "show":
        return _show(args, _api(config, "GET", path))
    if action == "events":  # the admin reads: it changes nothing (docs/polling.md)
        answer = _api(config, "GET", path + "/events", query={"cursor": args.cursor, "limit": args.limit})
        _show(args, answer, PULLED_COLUMNS)
        if not args.json:
            print(f"next_cursor: {answer['next_cursor']}" + ("  (more waiting)" if answer["has_more"] else ""))
        return 0
    if action in ("pause", "resume"):
        status = "paused" if action == "pause" else "active"
        return _show(args, _api(config, "PATCH", path, {"status": status}))
    if action == "api-key":
        return _show(args, _api(config, "POST", path + "/api-key"))
    if action == "delete":
        if not args.yes:
            raise UsageError(f"'partners delete' erases {args.partner_id}'s secrets and API key and cancels its "
                           "pending deliveries, at once and for good: add --yes to do it")
        return _show(args, _api(config, "DELETE", path))
    if action == "portal-link":
        fields = {"read_only": args.read_only, **({"lifetime_s": args.lifetime} if args.lifetime else {})}
        return _show(args, _api(config, "POST", path + "/portal-link", fields))
    if action == "channels":
        return _show(args, _api(config, "PATCH", path, {"channels": _names(args.channels or "")}))
    if action == "filter":
        return _show(args, _api(config, "PATCH", path,
                                {"filter": _read_json_argument(args.filter) if args.filter else None}))
    if action == "ordering":
        if args.ordering is None:
            raise UsageError("'partners ordering' needs --ordering concurrent or --ordering fifo")
        return _show(args, _api(config, "PATCH", path, {"ordering": args.ordering}))
    if action == "contact":
        return _show(args, _api(config, "PATCH", path, {"contact_email": args.email or None}))
    if action == "retry":
        return _show(args, _api(config, "PATCH", path, {"retry": _read_json_argument(args.retry) if args.retry else None}))
    if action == "headers":
        return _show(args, _api(config, "PATCH", path,
                                {"extra_headers": _read_json_argument(args.headers) if args.headers else None}))
    if action == "client-cert":
        return _show(args, _api(config, "PATCH", path, _client_certificate(args, removing=True)))
    if action == "cancel-pending":
        return _show(args, _api(config, "POST", path + "/cancel-pending"))
    if action == "suspend":
        if not args.reason:
            raise UsageError("'partners suspend' needs --reason: the partner is shown why")
        return _show(args, _api(config, "PATCH", path, {"status": "suspended", "reason": args.reason}))
    if action == "rotate":
        return _show(args, _api(config, "POST", path + "/rotate-secret",
                                query={"revoke_old": "true"} if args.revoke_old else None))
    if action == "pace":
        rate = args.max_rate or None  # 0 (or none given) removes the pace
        return _show(args, _api(config, "PATCH", path, {"max_rate_per_s": rate}))
    raise CliError(f"unknown action {action!r}")


def _client_certificate(args: argparse.Namespace, removing: bool) -> dict[str, Any]:
    """``--cert`` and ``--key`` as the API takes them (read from their files); neither given: nothing
    for ``add``, the removal for ``client-cert``. ``--key`` may be left out for a renewal on the same key."""
    if args.cert is None:
        if args.key is not None:
            raise UsageError("--key goes with --cert (the certificate the key belongs to)")
        return {"client_certificate": None} if removing else {}
    fields = {"client_certificate": _read_file(args.cert)}
    if args.key is not None:
        fields["client_key"] = _read_file(args.key)
    return fields


def _read_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc.__class__.__name__})") from None


def _names(text: str) -> list[str]:
    """A comma-separated list, as the options take them."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _cmd_publish(args: argparse.Namespace, config: Config) -> int:
    payload = _read_json_argument(args.data)
    if not isinstance(payload, dict):
        raise UsageError("--data must be a JSON object of the event's fields")
    if args.partners:
        payload["partners"] = _names(args.partners)
    if args.channels:
        payload["channels"] = _names(args.channels)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    answer = _api(config, "POST", "/events", {**payload, "event": args.type}, headers=headers)
    if args.json or "note" not in answer:
        return _show(args, answer)
    _show(args, {k: v for k, v in answer.items() if k != "note"})
    print(f"webhookd: reached no partner: {answer['note']['message']}", file=sys.stderr)
    return 0


def _cmd_deliveries(args: argparse.Namespace, config: Config) -> int:
    if args.delivery_id:  # one delivery, then its attempts as a table
        answer = _api(config, "GET", f"/deliveries/{args.delivery_id}")
        if args.json:
            return _show(args, answer)
        _show(args, {k: v for k, v in answer.items() if k != "attempts"})
        print()
        _print_table(answer.get("attempts", []), ATTEMPT_COLUMNS)
        return 0
    query = {"state": args.status, "partner_id": args.partner, "event": args.event, "limit": args.limit,
             "since": args.since, "until": args.until}
    return _show(args, _api(config, "GET", "/deliveries", query=query), DELIVERY_COLUMNS)


def _cmd_events(args: argparse.Namespace, config: Config) -> int:
    if not args.yes:
        raise UsageError(f"'events erase' drops {args.event_id}'s payload, signatures and answers for good and "
                         "cancels its pending deliveries: add --yes to do it")
    return _show(args, _api(config, "DELETE", f"/events/{args.event_id}/content"))


def _cmd_retry(args: argparse.Namespace, config: Config) -> int:
    return _show(args, _api(config, "POST", f"/deliveries/{args.delivery_id}/retry"))


def _cmd_recover(args: argparse.Namespace, config: Config) -> int:
    return _show(args, _api(config, "POST", f"/partners/{args.partner_id}/recover", query={"since": args.since}))


def _cmd_check(args: argparse.Namespace, config: Config) -> int:
    """Probe a partner's endpoint (``POST /partners/{id}/check``); exit 1 when a check fails."""
    report = _api(config, "POST", f"/partners/{args.partner_id}/check", query={"lang": args.lang})
    if args.json:
        _show(args, report)
    for check in [] if args.json else report["checks"]:
        print(f"{check['result'].upper():<5} {check['name']}: {check['detail']}")
        if check["fix"]:
            print(f"      {check['fix']}")
    return 1 if report["result"] == "fail" else 0


AUDIT_COLUMNS = ["at", "actor", "action", "partner_id", "target", "changes"]


def _cmd_audit(args: argparse.Namespace, config: Config) -> int:
    query = {"partner_id": args.partner, "action": args.action, "limit": args.limit, "since": args.since,
             "until": args.until}
    return _show(args, _api(config, "GET", "/audit", query=query), AUDIT_COLUMNS)


def _cmd_trace(args: argparse.Namespace, config: Config) -> int:
    """An event's story, as lines a person reads (``--json``: the API's answer)."""
    story = _api(config, "GET", f"/events/{args.event_id}/trace")
    if args.json:
        return _show(args, story)
    print(f"{story['event_id']}  {story['event']}  published {_cell('at', int(story['published_at']))}"
          f"  to {plural(story['fanout'], 'partner')}" + (f"  trace {story['trace_id']}" if story.get("trace_id") else ""))
    for d in story["deliveries"]:
        print(f"\n{d['partner_id']}  {d['delivery_id']}  now {d['state']}")
        for step in d["steps"]:
            print(f"  {_cell('at', int(step['at']))}  {step['step']:<9} {_step_line(step)}")
    return 0


def _step_line(step: dict[str, Any]) -> str:
    if step["step"] != "attempt":
        return step.get("detail") or ""
    answer = f"HTTP {step['status_code']}" if step["status_code"] else step["error"] or "no answer"
    line = f"#{step['attempt']} {answer} in {step['duration_ms']} ms"
    if step.get("error_detail"):
        line += f" ({step['error_detail']})"
    if step.get("next"):
        line += f" -> {step['next']['state']}: {step['next']['why']}"
    return line


def _cmd_replay(args: argparse.Namespace, config: Config) -> int:
    """Every call replays at most 1,000 events; go on with the cursor until the window is done."""
    query: dict[str, Any] = {"since": args.since, "until": args.until, "event": args.event, "limit": 1000,
                             "include_cancelled": "true" if args.include_cancelled else None}
    total = 0
    while True:
        answer = _api(config, "POST", f"/partners/{args.partner_id}/replay", query=query)
        total += answer["replayed"]
        if not answer["next_cursor"]:
            return _show(args, {"replayed": total})
        query["cursor"] = answer["next_cursor"]


def _cmd_backup(args: argparse.Namespace, config: Config) -> int:
    print(backup.backup(config, args.path))
    return 0


def _cmd_restore(args: argparse.Namespace, config: Config) -> int:
    done, warning = backup.restore(config, args.path, args.replace)
    print(done)
    if warning:
        print(warning, file=sys.stderr)
    return 0


def _cmd_migrate_store(args: argparse.Namespace, config: Config) -> int:
    print(backup.migrate_store(config, args.to, args.history_days))
    return 0


# =====================================================================================
# The parser, logging and main
# =====================================================================================


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the record's structured fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        line.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


COMMANDS = {
    "serve": _cmd_serve, "init": _cmd_init, "token": _cmd_token, "migrate": _cmd_migrate,
    "partners": _cmd_partners, "recover": _cmd_recover, "replay": _cmd_replay, "check": _cmd_check,
    "publish": _cmd_publish, "deliveries": _cmd_deliveries, "retry": _cmd_retry, "events": _cmd_events, "trace": _cmd_trace,
    "audit": _cmd_audit, "catalog": _cmd_catalog, "backup": _cmd_backup, "restore": _cmd_restore,
    "migrate-store": _cmd_migrate_store, "sign": _cmd_sign, "listen": _cmd_listen,
}


def config_path(given: str | None) -> str | None:
    """The config file to read: --config (or $WEBHOOKD_CONFIG), else ./webhookd.toml if there is one;
    None: the built-in defaults (``webhookd init`` writes a file to start from)."""
    if given:
        return given
    return "webhookd.toml" if os.path.exists("webhookd.toml") else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = Config()
    args.config = config_path(args.config)
    if args.needs_config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"webhookd: {exc}", file=sys.stderr)
            return 2
    configure_logging(config.server.log_format)
    try:
        return COMMANDS[args.command](args, config)
    except UsageError as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return 2
    except (CliError, backup.Refused, signing.BadJSON, OSError) as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The command line: ``webhookd serve`` and the tools around it.

* ``serve`` runs the HTTP API and the delivery loop (``webhookd.create_app`` on uvicorn);
* ``token`` prints the admin token, creating it on first use;
* ``sign`` and ``listen`` are for partners and students: sign a payload the way the
  guide does, or run a local receiver that verifies every webhook three ways;
* ``migrate`` brings the schema up to date; ``backup``, ``restore`` and ``migrate-store`` work
  on the database files themselves (``backup.py``);
* ``partners``, ``publish``, ``deliveries``, ``trace``, ``retry``, ``recover``, ``replay`` and
  ``audit`` talk to the running server's HTTP API with the admin token, and print tables (or
  ``--json``).

``main`` is the console script; ``python cli.py ...`` calls it too. A command that
cannot do its job prints one line saying why and exits 1 (2 for a bad config).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import backup
import signing
from config import VERSION, Config, ConfigError, admin_token, load_config, rotate_admin_token

logger = logging.getLogger("webhookd")


class CliError(Exception):
    """Raised by a command to stop with one clear line and exit status 1."""


def _read_json_argument(text: str) -> Any:
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    try:
        return signing.parse_json(text.encode("utf-8"))
    except signing.BadJSON as exc:
        raise CliError(f"the JSON given is not valid: {exc}") from None


# =====================================================================================
# Running the service
# =====================================================================================


def _cmd_serve(args: argparse.Namespace, config: Config) -> int:
    import uvicorn

    from webhookd import create_app

    host = args.host or config.server.host
    port = args.port or config.server.port
    _migrate(config)  # a database newer than this code: one line that says which version to run, not a traceback
    admin_token(config)  # created now, so `webhookd token` works at once
    if not _is_loopback(host) and config.security.allow_private_targets:
        logger.warning("listening on %s with allow_private_targets = true: partners could reach your "
                       "internal network. Set [security] allow_private_targets = false.", host)
    # proxy_headers off: uvicorn would otherwise believe X-Forwarded-For from 127.0.0.1 by default.
    # Whom to believe is server.trusted_proxies' to say (web.RealClient), and by default nobody.
    uvicorn.run(create_app(config), host=host, port=port, log_level=config.server.log_level, log_config=None,
                access_log=config.server.access_log, proxy_headers=False,
                timeout_graceful_shutdown=int(config.delivery.timeout_s) + 2)
    return 0


def _cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    """Apply the migrations the database lacks, and say which (``serve`` applies them too, at start)."""
    where, applied = _migrate(config)
    if applied:
        print(f"applied {len(applied)} migrations to {where}, as webhookd {VERSION}: " + ", ".join(applied))
    else:
        print(f"{where} is up to date for webhookd {VERSION}: nothing to apply")
    return 0


def _migrate(config: Config) -> tuple[str, list[str]]:
    """Open the store once (which applies what is pending); where it is, and what was applied."""
    from storage import open_store
    from store import SchemaTooNew

    try:
        store = open_store(config.storage.target, lock_timeout_s=config.storage.lock_timeout_s,
                           statement_timeout_s=config.storage.statement_timeout_s)
    except SchemaTooNew as exc:
        raise CliError(str(exc)) from None
    try:
        return store.engine.describe(), store.migrated
    finally:
        store.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _cmd_token(args: argparse.Namespace, config: Config) -> int:
    """Print the admin token; ``--rotate``: a new one (printed), the old one valid for the overlap,
    or revoked at once with ``--revoke-old``."""
    if args.revoke_old and not args.rotate:
        raise CliError("--revoke-old goes with --rotate: webhookd token --rotate --revoke-old")
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

    server = ThreadingHTTPServer((args.host, args.port), Handler)
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
ATTEMPT_COLUMNS = ["attempt", "started_at", "duration_ms", "status_code", "error", "error_detail"]


def _cmd_partners(args: argparse.Namespace, config: Config) -> int:
    action = args.action
    if action == "list":
        return _show(args, _api(config, "GET", "/partners", query={"limit": args.limit}), PARTNER_COLUMNS)
    if action == "add":
        events = _names(args.events)
        answer = _api(config, "POST", "/partners/register",
                      {"partner_name": args.name, "webhook_url": args.url, "events": events,
                       "max_rate_per_s": args.max_rate, "contact_email": args.email,
                       "channels": _names(args.channels or ""), "ordering": args.ordering or "concurrent",
                       "filter": _read_json_argument(args.filter) if args.filter else None})
        if not args.json:
            print("Save shared_secret and api_key now: they are not shown again.", file=sys.stderr)
        return _show(args, answer)
    if not args.partner_id:
        raise CliError(f"'partners {action}' needs a PARTNER_ID")
    path = f"/partners/{args.partner_id}"
    if action == "show":
        return _show(args, _api(config, "GET", path))
    if action in ("pause", "resume"):
        status = "paused" if action == "pause" else "active"
        return _show(args, _api(config, "PATCH", path, {"status": status}))
    if action == "api-key":
        return _show(args, _api(config, "POST", path + "/api-key"))
    if action == "delete":
        if not args.yes:
            raise CliError(f"'partners delete' erases {args.partner_id}'s secrets and API key and cancels its "
                           "pending deliveries, at once and for good: add --yes to do it")
        return _show(args, _api(config, "DELETE", path))
    if action == "channels":
        return _show(args, _api(config, "PATCH", path, {"channels": _names(args.channels or "")}))
    if action == "filter":
        return _show(args, _api(config, "PATCH", path,
                                {"filter": _read_json_argument(args.filter) if args.filter else None}))
    if action == "ordering":
        if args.ordering is None:
            raise CliError("'partners ordering' needs --ordering concurrent or --ordering fifo")
        return _show(args, _api(config, "PATCH", path, {"ordering": args.ordering}))
    if action == "contact":
        return _show(args, _api(config, "PATCH", path, {"contact_email": args.email or None}))
    if action == "cancel-pending":
        return _show(args, _api(config, "POST", path + "/cancel-pending"))
    if action == "suspend":
        if not args.reason:
            raise CliError("'partners suspend' needs --reason: the partner is shown why")
        return _show(args, _api(config, "PATCH", path, {"status": "suspended", "reason": args.reason}))
    if action == "rotate":
        return _show(args, _api(config, "POST", path + "/rotate-secret",
                                query={"revoke_old": "true"} if args.revoke_old else None))
    if action == "pace":
        rate = args.max_rate or None  # 0 (or none given) removes the pace
        return _show(args, _api(config, "PATCH", path, {"max_rate_per_s": rate}))
    raise CliError(f"unknown action {action!r}")


def _names(text: str) -> list[str]:
    """A comma-separated list, as the options take them."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _cmd_publish(args: argparse.Namespace, config: Config) -> int:
    payload = _read_json_argument(args.data)
    if not isinstance(payload, dict):
        raise CliError("--data must be a JSON object of the event's fields")
    if args.partners:
        payload["partners"] = _names(args.partners)
    if args.channels:
        payload["channels"] = _names(args.channels)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else None
    return _show(args, _api(config, "POST", "/events", {**payload, "event": args.type}, headers=headers))


def _cmd_deliveries(args: argparse.Namespace, config: Config) -> int:
    if args.delivery_id:  # one delivery, then its attempts as a table
        answer = _api(config, "GET", f"/deliveries/{args.delivery_id}")
        if args.json:
            return _show(args, answer)
        _show(args, {k: v for k, v in answer.items() if k != "attempts"})
        print()
        _print_table(answer.get("attempts", []), ATTEMPT_COLUMNS)
        return 0
    query = {"state": args.status, "partner_id": args.partner, "event": args.event, "limit": args.limit}
    return _show(args, _api(config, "GET", "/deliveries", query=query), DELIVERY_COLUMNS)


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
    query = {"partner_id": args.partner, "action": args.action, "limit": args.limit}
    return _show(args, _api(config, "GET", "/audit", query=query), AUDIT_COLUMNS)


def _cmd_trace(args: argparse.Namespace, config: Config) -> int:
    """An event's story, as lines a person reads (``--json``: the API's answer)."""
    story = _api(config, "GET", f"/events/{args.event_id}/trace")
    if args.json:
        return _show(args, story)
    print(f"{story['event_id']}  {story['event']}  published {_cell('at', int(story['published_at']))}"
          f"  to {story['fanout']} partners")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="webhookd", description="A small, auditable webhook hub.")
    config_help = "path to webhookd.toml (default: ./webhookd.toml, or $WEBHOOKD_CONFIG)"
    parser.add_argument("--config", default=os.environ.get("WEBHOOKD_CONFIG", "webhookd.toml"), help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `webhookd serve --config X` works as well as `webhookd --config X serve`.
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")

    serve = commands.add_parser("serve", parents=[with_config], help="run the HTTP API and the delivery loop")
    serve.add_argument("--host", help="listen address (default: [server] host)")
    serve.add_argument("--port", type=int, help="listen port (default: [server] port)")
    serve.set_defaults(handler=_cmd_serve)

    migrate_now = commands.add_parser("migrate", parents=[with_config],
                                      help="apply the database's pending migrations and say which")
    migrate_now.set_defaults(handler=_cmd_migrate)

    token = commands.add_parser("token", parents=[with_config], help="print the admin token (creating it on first use)")
    token.add_argument("--rotate", action="store_true",
                       help="issue a new admin token; the old one works for security.admin_token_overlap_s more")
    token.add_argument("--revoke-old", action="store_true",
                       help="with --rotate: revoke every old admin token at once, no overlap (a leaked token)")
    token.set_defaults(handler=_cmd_token)

    partners = commands.add_parser("partners", parents=[with_config, as_json],
                                   help="list, show, add, pause, resume, suspend, rotate, api-key, pace, "
                                        "channels, filter, ordering, contact, cancel-pending, delete")
    partners.add_argument("action", choices=["list", "show", "add", "pause", "resume", "suspend", "rotate",
                                             "api-key", "pace", "channels", "filter", "ordering", "contact",
                                             "cancel-pending", "delete"])
    partners.add_argument("--ordering", choices=["concurrent", "fifo"],
                          help="add, ordering: fifo sends one at a time, in publish order (default concurrent)")
    partners.add_argument("--channels", help="comma-separated channels it listens on (add, channels; "
                                             "channels without it: none). The admin's to set: a partner's "
                                             "own key cannot")
    partners.add_argument("--filter", help='a payload filter as JSON or @file, e.g. \'{"currency": ["EUR"]}\' '
                                           "(add, filter; filter without it removes it). The admin's to set: a "
                                           "partner's own key cannot")
    partners.add_argument("--email", help="contact email (add, contact; contact without it removes it)")
    partners.add_argument("partner_id", nargs="?", help="the partner (every action but list and add)")
    partners.add_argument("--yes", action="store_true", help="delete: yes, delete it (it cannot be undone)")
    partners.add_argument("--reason", help="suspend: why (shown to the partner; only the admin can lift it)")
    partners.add_argument("--max-rate", type=float, help="requests per second at most (add, pace; 0 removes)")
    partners.add_argument("--name", help="partner name (add)")
    partners.add_argument("--url", help="webhook URL (add)")
    partners.add_argument("--events", default="", help="comma-separated event types (add)")
    partners.add_argument("--limit", type=int, default=50, help="how many to list (default 50)")
    partners.add_argument("--revoke-old", action="store_true",
                          help="rotate: revoke every old secret at once, no overlap (a leaked secret)")
    partners.set_defaults(handler=_cmd_partners)

    publish = commands.add_parser("publish", parents=[with_config, as_json], help="publish an event to its subscribers")
    publish.add_argument("type", help="the event type, e.g. payment.success (fills 'event')")
    publish.add_argument("--data", default="{}", help="the payload fields as JSON, or @file")
    publish.add_argument("--idempotency-key", help="publishing twice with the same key fans out once")
    publish.add_argument("--partners", help="comma-separated partner ids: only these (among its subscribers)")
    publish.add_argument("--channels", help="comma-separated channels: only partners listening on one of them")
    publish.set_defaults(handler=_cmd_publish)

    deliveries = commands.add_parser("deliveries", parents=[with_config, as_json],
                                     help="list deliveries, newest first; or one, with its attempts")
    deliveries.add_argument("delivery_id", nargs="?", help="show this delivery and its attempts")
    deliveries.add_argument("--status", choices=["pending", "delivered", "failed", "expired", "cancelled"],
                            help="only this state")
    deliveries.add_argument("--partner", help="only this partner id")
    deliveries.add_argument("--event", help="only this event type")
    deliveries.add_argument("--limit", type=int, default=50, help="how many (default 50, at most 200)")
    deliveries.set_defaults(handler=_cmd_deliveries)

    retry = commands.add_parser("retry", parents=[with_config, as_json], help="one more attempt of a failed delivery")
    retry.add_argument("delivery_id")
    retry.set_defaults(handler=_cmd_retry)

    recover = commands.add_parser("recover", parents=[with_config, as_json], help="re-queue a partner's failed deliveries")
    recover.add_argument("partner_id")
    recover.add_argument("--since", type=int, required=True, help="unix seconds: failed deliveries created since")
    recover.set_defaults(handler=_cmd_recover)

    check = commands.add_parser("check", parents=[with_config, as_json],
                                help="probe a partner's endpoint: does it verify signatures, over the raw body? "
                                     "(exit 1 when a check fails)")
    check.add_argument("partner_id")
    check.add_argument("--lang", choices=["en", "es"], help="the report's language (default: en)")
    check.set_defaults(handler=_cmd_check)

    audit = commands.add_parser("audit", parents=[with_config, as_json],
                                help="the audit trail: who changed what, newest first")
    audit.add_argument("--partner", help="only this partner id")
    audit.add_argument("--action", help="only this action, e.g. partner.suspended")
    audit.add_argument("--limit", type=int, default=50, help="how many (default 50, at most 200)")
    audit.set_defaults(handler=_cmd_audit)

    trace = commands.add_parser("trace", parents=[with_config, as_json],
                                help="one event's whole story: every attempt, its signatures, what came next and why")
    trace.add_argument("event_id")
    trace.set_defaults(handler=_cmd_trace)

    replay = commands.add_parser("replay", parents=[with_config, as_json],
                                 help="send a partner every event of a time window again, delivered ones too "
                                      "(not those still pending for it, nor those cancelled unless asked)")
    replay.add_argument("partner_id")
    replay.add_argument("--since", type=int, required=True, help="unix seconds: events published since")
    replay.add_argument("--until", type=int, help="unix seconds: ...and before (default: now)")
    replay.add_argument("--event", help="only this event type")
    replay.add_argument("--include-cancelled", action="store_true",
                        help="also the events whose delivery was cancelled (cancel-pending): left out otherwise")
    replay.set_defaults(handler=_cmd_replay)

    backup = commands.add_parser("backup", parents=[with_config],
                                 help="a consistent copy of the SQLite database, while the server runs")
    backup.add_argument("path", help="where to write the copy (a new file)")
    backup.set_defaults(handler=_cmd_backup)

    restore = commands.add_parser("restore", parents=[with_config],
                                  help="put a backup in place of storage.path (the server stopped)")
    restore.add_argument("path", help="the backup to restore")
    restore.add_argument("--replace", action="store_true", help="overwrite an existing database at storage.path")
    restore.set_defaults(handler=_cmd_restore)

    migrate = commands.add_parser("migrate-store", parents=[with_config],
                                  help="copy the SQLite file into a new PostgreSQL database")
    migrate.add_argument("--to", required=True, metavar="URL", help="postgresql://user:password@host/db (empty)")
    migrate.add_argument("--history-days", type=float, default=30, metavar="DAYS",
                         help="delivered events and inbound events this recent go too (default 30); "
                              "pending and failed deliveries always do")
    migrate.set_defaults(handler=_cmd_migrate_store)

    catalog = commands.add_parser("catalog", parents=[with_config, as_json],
                                  help="print the event catalog: each type's fields (--json: as GET /event-types)")
    catalog.set_defaults(handler=_cmd_catalog)

    sign = commands.add_parser("sign", parents=[with_config], help="print the X-Webhook-Signature of a JSON payload")
    sign.add_argument("--secret", required=True, help="the partner's shared secret")
    sign.add_argument("json", nargs="?", default="{}", help="the payload, or @file to read it from a file")
    sign.set_defaults(handler=_cmd_sign, needs_config=False)

    listen = commands.add_parser("listen", parents=[with_config], help="run a local receiver that verifies and prints webhooks")
    listen.add_argument("--secret", required=True,
                        help="the shared secret registration gave you (during a rotation: NEW,OLD)")
    listen.add_argument("--port", type=int, default=9000, help="port to listen on (default: 9000)")
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    listen.add_argument("--verbose", "-v", action="store_true", help="print each body too")
    listen.set_defaults(handler=_cmd_listen, needs_config=False)
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = Config()
    if getattr(args, "needs_config", True):
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"webhookd: {exc}", file=sys.stderr)
            return 2
    configure_logging(config.server.log_format)
    try:
        return args.handler(args, config)
    except (CliError, backup.Refused, signing.BadJSON, OSError) as exc:
        print(f"webhookd: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

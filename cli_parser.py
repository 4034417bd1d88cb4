"""The command line's grammar: every command, what it does in one line, and every option's help.

``build_parser`` is what ``webhookd --help`` and ``webhookd COMMAND --help`` print; ``cli.py``
runs the command it parsed (``COMMANDS``). A test walks this parser and fails on a command
without a description or an argument without help. ``when`` reads the times ``--since`` and
``--until`` take.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from datetime import datetime

RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def when(text: str, now: float | None = None) -> int:
    """A time an option takes, as Unix seconds: ISO 8601 (``2026-12-07T09:30``, local time unless
    it says ``Z`` or ``+01:00``), a time ago (``30m``, ``2h``, ``1d``, ``1w``), or Unix seconds."""
    text = text.strip()
    now = time.time() if now is None else now
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return int(float(text))
    ago = RELATIVE.match(text.lower())
    if ago:
        return int(now - float(ago.group(1)) * UNIT_S[ago.group(2)])
    try:
        return int(datetime.fromisoformat(text).timestamp())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give ISO 8601 (2026-12-07T09:30, or 2026-12-07T08:30Z), a time ago "
            "(30m, 2h, 1d) or Unix seconds") from None


TIMES = "ISO 8601 (2026-12-07T09:30), a time ago (30m, 2h, 1d) or Unix seconds"

EXIT_CODES = """exit status: 0 done; 1 refused (by the API, the server cannot be reached, another server holds
the database, the port is busy); 2 a usage or config mistake (an unknown option, JSON that does not
parse, a missing --yes, a bad webhookd.toml); 3 the server failed while starting."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="webhookd", description="A small, auditable webhook hub.",
                                     epilog=EXIT_CODES)
    config_help = ("path to webhookd.toml (default: $WEBHOOKD_CONFIG, else ./webhookd.toml if there is one, "
                   "else the built-in defaults)")
    parser.add_argument("--config", default=os.environ.get("WEBHOOKD_CONFIG"), help=config_help)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # `webhookd serve --config X` works as well as `webhookd --config X serve`.
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print the API's JSON instead of a table")

    def command(name: str, summary: str, *parents: argparse.ArgumentParser, needs_config: bool = True):
        """A subcommand whose one-line summary is both its entry in ``webhookd --help`` and its description."""
        sub = commands.add_parser(name, parents=[with_config, *parents], help=summary,
                                  description=summary[0].upper() + summary[1:] + ".",
                                  epilog=EXIT_CODES)
        sub.set_defaults(needs_config=needs_config)
        return sub

    _service_commands(command)
    _partner_commands(command, as_json)
    _delivery_commands(command, as_json)
    _database_commands(command)
    _tools_for_partners(command, as_json)
    return parser


def _service_commands(command) -> None:
    serve = command("serve", "run the HTTP API and the delivery loop (one server per SQLite file)")
    serve.add_argument("--host", help="listen address (default: [server] host)")
    serve.add_argument("--port", type=int, help="listen port (default: [server] port)")

    init = command("init", "write a commented webhookd.toml with the defaults, to edit", needs_config=False)
    init.add_argument("path", nargs="?", default="webhookd.toml", help="where to write it (default: ./webhookd.toml)")
    init.add_argument("--force", action="store_true", help="replace a file that is already there")

    token = command("token", "print the admin token (creating it on first use), or rotate it")
    token.add_argument("--rotate", action="store_true",
                       help="issue a new admin token; the old one works for security.admin_token_overlap_s more")
    token.add_argument("--revoke-old", action="store_true",
                       help="with --rotate: revoke every old admin token at once, no overlap (a leaked token)")


def _partner_commands(command, as_json: argparse.ArgumentParser) -> None:
    partners = command("partners", "manage partners: list, show, add, pause, resume, suspend, rotate, api-key, "
                                   "pace, channels, filter, ordering, contact, retry, headers, client-cert, "
                                   "cancel-pending, delete, events, portal-link", as_json)
    partners.add_argument("action", choices=["list", "show", "add", "pause", "resume", "suspend", "rotate",
                                             "api-key", "pace", "channels", "filter", "ordering", "contact",
                                             "retry", "headers", "client-cert", "cancel-pending", "delete", "events",
                                             "portal-link"], help="what to do (see above)")
    partners.add_argument("--ordering", choices=["concurrent", "fifo"],
                          help="add, ordering: fifo sends one at a time, in publish order (default concurrent)")
    partners.add_argument("--channels", help="comma-separated channels it listens on (add, channels; "
                                             "channels without it: none). The admin's to set: a partner's "
                                             "own key cannot")
    partners.add_argument("--filter", help='a payload filter as JSON or @file, e.g. \'{"currency": ["EUR"]}\' '
                                           "(add, filter; filter without it removes it). The admin's to set: a "
                                           "partner's own key cannot")
    partners.add_argument("--email", help="contact email (add, contact; contact without it removes it)")
    partners.add_argument("--retry", help='its own retry policy as JSON or @file, e.g. \'{"timeout_s": 10, '
                                          '"schedule": [5, 30, 300, 3600]}\' (add, retry; retry without it: the '
                                          "server's policy again). The admin's to set")
    partners.add_argument("--headers", help='extra headers as JSON or @file, e.g. @headers.json holding '
                                            '{"Authorization": "Bearer ..."}; a name set to null is removed (add, '
                                            "headers; headers without it removes them all). Values are secrets: "
                                            "a file keeps them out of the shell's history. The admin's to set")
    partners.add_argument("--cert", metavar="PEM_FILE", help="add, client-cert: the TLS client certificate its "
                                                             "endpoint demands (client-cert without it removes it)")
    partners.add_argument("--key", metavar="PEM_FILE", help="add, client-cert: that certificate's private key, "
                                                            "unencrypted (never shown again)")
    partners.add_argument("partner_id", nargs="?", help="the partner (every action but list and add)")
    partners.add_argument("--yes", action="store_true", help="delete: yes, delete it (it cannot be undone)")
    partners.add_argument("--reason", help="suspend: why (shown to the partner; only the admin can lift it)")
    partners.add_argument("--max-rate", type=float, help="requests per second at most (add, pace; 0 removes)")
    partners.add_argument("--name", help="partner name (add)")
    partners.add_argument("--url", help="webhook URL (add)")
    partners.add_argument("--pull", action="store_true",
                          help="add: pull-only, no --url: the partner reads GET /partners/{id}/events")
    partners.add_argument("--cursor", help="events: read on from this next_cursor (default: the oldest kept)")
    partners.add_argument("--events", default="", help="comma-separated event types (add)")
    partners.add_argument("--limit", type=int, default=50, help="how many to list (list, events; default 50)")
    partners.add_argument("--lifetime", type=int, metavar="SECONDS",
                          help="portal-link: how long the link works, 60 to 604800 (default 3600)")
    partners.add_argument("--read-only", action="store_true", help="portal-link: the link may read, never change")
    partners.add_argument("--revoke-old", action="store_true",
                          help="rotate: revoke every old secret at once, no overlap (a leaked secret)")

    recover = command("recover", "re-queue a partner's failed and expired deliveries (after an outage it has fixed)", as_json)
    recover.add_argument("partner_id", help="the partner whose failed deliveries go again")
    recover.add_argument("--since", type=when, required=True, metavar="TIME", help=f"failed deliveries created since: {TIMES}")

    replay = command("replay", "send a partner every event of a time window again, delivered ones too "
                               "(not those still pending for it, nor those cancelled unless asked)", as_json)
    replay.add_argument("partner_id", help="the partner to send the events to")
    replay.add_argument("--since", type=when, required=True, metavar="TIME", help=f"events published since: {TIMES}")
    replay.add_argument("--until", type=when, metavar="TIME", help=f"...and before (default: now): {TIMES}")
    replay.add_argument("--event", help="only this event type")
    replay.add_argument("--include-cancelled", action="store_true",
                        help="also the events whose delivery was cancelled (cancel-pending): left out otherwise")


def _delivery_commands(command, as_json: argparse.ArgumentParser) -> None:
    publish = command("publish", "publish an event to its subscribers, and say how many it reached", as_json)
    publish.add_argument("type", help="the event type, e.g. payment.success (fills 'event')")
    publish.add_argument("--data", default="{}", help="the payload fields as a JSON object, or @file")
    publish.add_argument("--idempotency-key", help="publishing twice with the same key fans out once")
    publish.add_argument("--partners", help="comma-separated partner ids: only these (among its subscribers)")
    publish.add_argument("--channels", help="comma-separated channels: only partners listening on one of them")

    deliveries = command("deliveries", "list deliveries, newest first; or one, with its attempts", as_json)
    deliveries.add_argument("delivery_id", nargs="?", help="show this delivery and its attempts")
    deliveries.add_argument("--status", choices=["pending", "delivered", "failed", "expired", "cancelled"],
                            help="only this state")
    deliveries.add_argument("--partner", help="only this partner id")
    deliveries.add_argument("--event", help="only this event type")
    deliveries.add_argument("--limit", type=int, default=50, help="how many (default 50, at most 200)")
    deliveries.add_argument("--since", type=when, metavar="TIME", help=f"only those created at or after: {TIMES}")
    deliveries.add_argument("--until", type=when, metavar="TIME", help=f"...and before: {TIMES}")

    events = command("events", "erase an event's content: its payload, signatures and answers go, its "
                               "metadata stays, its pending deliveries are cancelled", as_json)
    events.add_argument("action", choices=["erase"], help="what to do (see above)")
    events.add_argument("event_id", help="the event (evt_...)")
    events.add_argument("--yes", action="store_true", help="erase: yes, erase it (it cannot be undone)")

    retry = command("retry", "give a failed or expired delivery one more attempt, now", as_json)
    retry.add_argument("delivery_id", help="the delivery (dlv_...), from 'webhookd deliveries'")

    trace = command("trace", "one event's whole story: every attempt, its signatures, what came next and why",
                    as_json)
    trace.add_argument("event_id", help="the event (evt_...), as POST /events or 'webhookd publish' answered it")

    check = command("check", "probe a partner's endpoint: does it verify signatures, over the raw body? "
                             "(exit 1 when a check fails)", as_json)
    check.add_argument("partner_id", help="the partner whose endpoint to probe")
    check.add_argument("--lang", choices=["en", "es"], help="the report's language (default: en)")

    audit = command("audit", "the audit trail: who changed what, newest first", as_json)
    audit.add_argument("--partner", help="only this partner id")
    audit.add_argument("--action", help="only this action, e.g. partner.suspended")
    audit.add_argument("--limit", type=int, default=50, help="how many (default 50, at most 200)")
    audit.add_argument("--since", type=when, metavar="TIME", help=f"only entries written at or after: {TIMES}")
    audit.add_argument("--until", type=when, metavar="TIME", help=f"...and before: {TIMES}")


def _database_commands(command) -> None:
    command("migrate", "apply the database's pending migrations and say which (serve does it too)")

    backup = command("backup", "write a consistent copy of the SQLite database, while the server runs")
    backup.add_argument("path", help="where to write the copy (a new file)")

    restore = command("restore", "put a backup in place of storage.path (with the server stopped)")
    restore.add_argument("path", help="the backup to restore")
    restore.add_argument("--replace", action="store_true", help="overwrite an existing database at storage.path")

    migrate = command("migrate-store", "copy the SQLite file into a new PostgreSQL database")
    migrate.add_argument("--to", required=True, metavar="URL", help="postgresql://user:password@host/db (empty)")
    migrate.add_argument("--history-days", type=float, default=30, metavar="DAYS",
                         help="delivered events and inbound events this recent go too (default 30); "
                              "pending and failed deliveries always do")


def _tools_for_partners(command, as_json: argparse.ArgumentParser) -> None:
    command("catalog", "print the event catalog: each type's fields (--json: as GET /event-types)", as_json)

    sign = command("sign", "print the X-Webhook-Signature of a JSON payload, as a partner computes it",
                   needs_config=False)
    sign.add_argument("--secret", required=True, help="the partner's shared secret")
    sign.add_argument("json", nargs="?", default="{}", help="the payload, or @file to read it from a file")

    listen = command("listen", "run a local receiver that verifies and prints every webhook it gets",
                     needs_config=False)
    listen.add_argument("--secret", required=True,
                        help="the shared secret registration gave you (during a rotation: NEW,OLD)")
    listen.add_argument("--port", type=int, default=9000, help="port to listen on (default: 9000)")
    listen.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    listen.add_argument("--verbose", "-v", action="store_true", help="print each body too")

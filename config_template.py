"""What ``webhookd init`` writes: a commented ``webhookd.toml`` whose every value is the default.

It holds the keys people change first and the event catalog; every other key keeps its default
(``config.py``) and is described in docs/configuration.md. Its values are the safe defaults, for
a server that faces a network: private webhook targets refused, registration closed. A test
reads it back and checks each value against ``config.py``, so the two cannot drift apart.
"""

TEXT = '''\
# webhookd — written by `webhookd init`. Every value below is the built-in default: change what
# you need. Every key, with its meaning, is in docs/configuration.md; any key can also be set by
# an environment variable WEBHOOKD_<SECTION>_<KEY>, e.g. WEBHOOKD_SERVER_PORT=8081.
# Relative paths are relative to this file.

[server]
host = "127.0.0.1"                   # "0.0.0.0" for every address (put a TLS proxy in front)
port = 8080
log_format = "text"                  # or "json": one JSON object per log line
trusted_proxies = []                 # e.g. ["127.0.0.1"] behind nginx or Caddy on this machine

[storage]
path = "data/webhookd.db"            # SQLite: one server per file; the admin token file goes beside it
# url = "postgresql://webhookd:secret@127.0.0.1/webhookd"   # PostgreSQL instead (pip install '.[postgres]'):
#                                    # several processes may share it; set security.admin_token then

[security]
# admin_token = ""                   # unset: generated into data/admin_token (0600); `webhookd token` prints it
open_registration = false            # true lets anyone call POST /partners/register
allow_private_targets = false        # true only to try webhookd with receivers on this machine (webhookd listen):
#                                    # it lets partners' URLs reach loopback and private networks
allowed_ports = []                   # e.g. [443, 8443]; empty: any port
verify_endpoints = false             # true: a new webhook URL gets nothing until it echoes a signed challenge

[delivery]
timeout_s = 5                        # per attempt: lookup, connect and answer together
max_attempts = 3
backoff_base_s = 30                  # waits 15-30 s, then 30-60 s, ... (exponential, with jitter)
# proxy_url = "http://egress.internal:3128"  # every delivery leaves through this CONNECT proxy: partners
#                                    # allow-list its address (docs/egress.md); unset: straight out

[retention]
max_age_s = 2592000                  # delivered events and inbound events older than 30 days are purged

[alerts]
url = ""                             # where webhookd's own signed alerts go; "": none
secret = ""                          # their signing secret, at least 16 characters (or WEBHOOKD_ALERTS_SECRET)

# The event catalog: what POST /events accepts. Each table is an event type; each key a
# required field and its JSON type (string, number, integer, boolean, object, array).
# Fields not listed are allowed and delivered as sent.
# retention_days = 7 in a table keeps that type's events 7 days instead of retention.max_age_s
# (shorter only; docs/privacy.md): older ones are deleted, or their content erased if still kept.
[events."payment.success"]
transaction_id = "string"
amount = "number"
currency = "string"
user_id = "string"

[events."payment.failed"]
transaction_id = "string"
reason = "string"
user_id = "string"
amount = "number"

[events."booking.confirmed"]
booking_id = "string"
tour_id = "string"
user_id = "string"
start_date = "string"
end_date = "string"

[events."booking.cancelled"]
booking_id = "string"
user_id = "string"
'''

"""Webhooks in the engine: subscriptions, the transactional outbox, and inbound hooks.

Outbound. `enqueue_webhooks` is called by `record_event` and `emit_ephemeral`,
the two choke points every fact passes through, inside the command's own
transaction (DESIGN.md, invariant 9): the outbox row commits with the fact
or not at all. It is ONE `INSERT ... SELECT` from the workspace's active
subscriptions, matching in SQL (event type or `*`, channel filter, mentions
filter), so a fact nobody subscribed to costs one index probe and writes
nothing (measured: about 3 us a fact with no subscription). The matching
uses `instr` on the JSON text rather than `json_each`: a table-valued
function in that statement cost about 90 us a fact even with no
subscription at all. The rows' ids come from a block reserved from the
writer's id allocator (the first id plus the subscription's rank in its
workspace), so an outbox id is unique and never reused: receivers
deduplicate on it (`webhook-id`, `X-Relay-Delivery`).

Each row is the delivery state of one (event, subscription) pair:
`pending` -> `delivered`, or -> `dead` (dead letter) after a final answer or
the last allowed attempt; `attempts`, `next_attempt_at`, `last_status` and
`last_error` say where it stands. The dispatcher (broker.webhooks) reads
pending rows through the reader pool and reports each attempt with
`RecordDeliveryAttempt`, a writer command; `ReplayDeadLetters` puts dead
rows back to pending. Nothing here performs I/O.

Inbound. `CreateInboundWebhook` binds a hook to a channel, creates the
hook's system agent (type `system`, a member of no channel, so it never
receives deliveries) and returns a `wh_live_` token, stored only as its
SHA-256 digest. `TriggerInboundWebhook` checks the token and posts into the
channel through the same path as a channel send (`post_message`,
recipients read at commit time), atomically.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets as _random
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import apsw
import msgspec

from broker.engine import secrets, validation
from broker.engine.errors import BrokerError
from broker.engine.lookups import require_channel, require_workspace
from broker.engine.writer import Tx
from protocol.objects import SubscriptionFilter, iso

# -- limits and vocabularies ---------------------------------------------------------

# Event types a subscription may name (the Relaycast `SubscribableEventType`
# list plus the facts this broker emits beyond it); "*" means every event.
# Relaycast's `message.updated` is left out: messages cannot be edited here,
# so a subscription to it would be accepted and never called.
RELAYCAST_EVENT_TYPES: frozenset[str] = frozenset({
    "message.created", "thread.reply", "message.reacted", "dm.received",
    "group_dm.received", "agent.status.active", "agent.status.idle", "agent.status.blocked",
    "agent.status.waiting", "agent.status.offline", "agent.status.changed", "channel.created",
    "channel.updated", "channel.archived", "member.joined", "member.left", "message.read",
    "file.uploaded", "webhook.received", "action.invoked", "action.completed",
    "action.failed", "action.denied", "delivery.accepted", "delivery.delivered",
    "delivery.deferred", "delivery.failed",
})
BROKER_EVENT_TYPES: frozenset[str] = frozenset({
    "agent.updated", "agent.deactivated", "group_dm.created", "group_dm.participant_added",
    "group_dm.participant_removed", "workspace.updated",
})
ALL_EVENTS = "*"
SUBSCRIBABLE_EVENTS: frozenset[str] = RELAYCAST_EVENT_TYPES | BROKER_EVENT_TYPES | {ALL_EVENTS}

# The commit signal (`Tx.signal`) of a command that made outbox rows due:
# the dispatcher waits on it instead of polling the table.
OUTBOX_WRITTEN = "outbox_written"

# Subscriptions per workspace at most: every fact of the workspace is matched
# against them inside the writer's transaction.
MAX_SUBSCRIPTIONS = 100
MAX_URL_CHARS = 2048
MAX_HEADERS = 20
MAX_HEADER_NAME_CHARS = 128
MAX_HEADER_VALUE_CHARS = 2048
# Names plus values, in bytes: what one delivery carries besides our own headers.
MAX_HEADERS_BYTES = 8 * 1024
MIN_SECRET_CHARS = 8
MAX_SECRET_CHARS = 256
# A Standard Webhooks secret is `whsec_` + base64 of 24-64 random bytes.
STANDARD_SECRET_PREFIX = "whsec_"
MIN_STANDARD_KEY_BYTES = 16
MAX_STANDARD_KEY_BYTES = 64
GENERATED_KEY_BYTES = 32

# Headers a subscription may not set: the ones that frame the request, and
# the ones that carry the event type, timestamp and signatures.
RESERVED_HEADERS: frozenset[str] = frozenset({
    "content-type", "content-length", "content-encoding", "transfer-encoding", "host",
    "connection", "keep-alive", "te", "trailer", "upgrade", "expect", "user-agent",
})
RESERVED_HEADER_PREFIXES: tuple[str, ...] = ("x-relay-", "webhook-", "proxy-")
HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Visible ASCII, space and tab: no CR/LF (header injection), no controls.
HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")

INBOUND_TOKEN_PREFIX = "wh_live_"
MAX_HOOK_NAME_CHARS = 80
DEFAULT_HOOK_NAME = "webhook"
# Agent names derived from hook names keep this many characters of the slug.
HOOK_AGENT_SLUG_CHARS = 40
# A generated message text (from a bare payload) is cut to this many characters.
GENERATED_TEXT_CHARS = 2000

DeliveryOutcome = Literal["delivered", "retry", "dead"]

_encoder = msgspec.json.Encoder()
_events_decoder = msgspec.json.Decoder(list[str])
_headers_decoder = msgspec.json.Decoder(dict[str, str])


# -- wire objects ------------------------------------------------------------------


class EventSubscription(msgspec.Struct, kw_only=True):
    """A subscription as GET returns it (Relaycast `EventSubscription`); never its secret.

    pending and dead_letters count its outbox rows in those states.
    """

    id: str
    events: list[str]
    filter: SubscriptionFilter | None
    url: str
    headers: dict[str, str] | None
    is_active: bool
    created_at: str
    pending: int = 0
    dead_letters: int = 0


class SubscriptionCreated(EventSubscription, kw_only=True):
    """The create response: the only time the signing secret is shown."""

    secret: str


class DeadLetter(msgspec.Struct, kw_only=True):
    """An event that a subscription could not take; `event` is `{"type", "data"}`."""

    id: str
    subscription_id: str
    type: str
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: str
    failed_at: str | None
    event: msgspec.Raw


class ReplayResult(msgspec.Struct, kw_only=True):
    subscription_id: str
    replayed: int


class InboundWebhook(msgspec.Struct, kw_only=True):
    """Relaycast `Webhook` (the token is never shown again)."""

    id: str
    name: str
    channel: str
    url: str
    agent_name: str
    is_active: bool
    created_at: str


class InboundWebhookCreated(msgspec.Struct, kw_only=True):
    """Relaycast `CreateWebhookResponse`: the only time the token is shown."""

    webhook_id: str
    name: str
    channel: str
    url: str
    token: str
    agent_name: str
    is_active: bool
    created_at: str


class HookTriggered(msgspec.Struct, kw_only=True):
    """Relaycast `WebhookTriggerResponse`."""

    message_id: str
    channel: str
    text: str
    source: str | None
    author: str | None
    created_at: str


# -- the outbox enqueue (hot path: runs for every fact) ------------------------------

# ?1 first id of the reserved block, ?2 workspace, ?3 log id, ?4 event type,
# ?5 payload ({"type", "data"} JSON), ?6 now, ?7 channel id.
# Event types and agent names never contain '"', so looking for '"name"' in
# the JSON text of a list is exact. The payload is bound as a BLOB, which
# SQLite's JSON functions would read as JSONB, hence the CAST. The
# subqueries run only for subscriptions of the workspace that are active.
ENQUEUE_SQL = (
    "INSERT INTO outbox(id, workspace_id, subscription_id, log_id, type, payload,"
    " next_attempt_at, created_at)"
    " SELECT ?1 + (SELECT count(*) FROM webhook_subscriptions p WHERE p.workspace_id = ?2"
    " AND p.active AND p.id < s.id), ?2, s.id, ?3, ?4, ?5, ?6, ?6"
    " FROM webhook_subscriptions s WHERE s.workspace_id = ?2 AND s.active"
    " AND (instr(s.events, '\"' || ?4 || '\"') OR instr(s.events, '\"*\"'))"
    " AND (json_extract(s.filters, '$.channel') IS NULL"
    " OR json_extract(s.filters, '$.channel') = (SELECT c.name FROM channels c WHERE c.id = ?7))"
    " AND (json_extract(s.filters, '$.mentions') IS NULL"
    " OR instr(json_extract(CAST(?5 AS TEXT), '$.data.mentions'),"
    " '\"' || json_extract(s.filters, '$.mentions') || '\"'))"
)


def enqueue_webhooks(
    tx: Tx, *, workspace_id: int, event_type: str, payload: bytes,
    channel_id: int | None = None, log_id: int | None = None,
) -> int:
    """Write one outbox row per matching active subscription; returns how many.

    Called inside the fact's command, so the rows commit with the fact.
    """
    first = tx.new_id()
    tx.conn.execute(
        ENQUEUE_SQL, (first, workspace_id, log_id, event_type, payload, tx.now_ms, channel_id)
    )
    written = tx.conn.changes()
    if written:
        tx.signal(OUTBOX_WRITTEN)
        # Ids first .. first + (rank of the last match) are taken: move past them.
        row = tx.conn.execute("SELECT max(id) FROM outbox").fetchone()
        last = int(row[0]) if row is not None and row[0] is not None else first
        while tx.ids.last < last:
            tx.new_id()
    return written


# -- input rules -------------------------------------------------------------------


def webhook_url(url: str) -> str:
    """An absolute http(s) URL with a host and no credentials; raises invalid_url.

    Whether the destination may be called at all is the SSRF guard's
    question (broker.webhooks.destinations), asked by the caller.
    """
    if not url or len(url) > MAX_URL_CHARS:
        raise BrokerError("invalid_url", f"url must be 1-{MAX_URL_CHARS} characters")
    if not url.isascii() or any(ch.isspace() or ord(ch) < 0x20 or ch == "\x7f" for ch in url):
        raise BrokerError("invalid_url", "url must be ASCII without spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BrokerError("invalid_url", f"url is malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise BrokerError("invalid_url", "url must start with http:// or https://")
    if not parts.hostname:
        raise BrokerError("invalid_url", "url must name a host")
    if parts.username is not None or parts.password is not None:
        raise BrokerError("invalid_url", "url must not carry credentials; use headers instead")
    if port == 0:
        raise BrokerError("invalid_url", "url must not use port 0")
    return url


def event_types(events: list[str]) -> list[str]:
    """The subscribed event types, deduplicated in order; raises invalid_events/_event_type."""
    if not events:
        raise BrokerError("invalid_events", "events must name at least one event type")
    unknown = [e for e in events if e not in SUBSCRIBABLE_EVENTS]
    if unknown:
        raise BrokerError(
            "invalid_event_type",
            f"unknown event type(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(sorted(SUBSCRIBABLE_EVENTS))}",
        )
    return list(dict.fromkeys(events))


def subscription_filter(value: SubscriptionFilter | None, tx: Tx) -> SubscriptionFilter | None:
    """The filter with a leading '#' dropped from the channel; None when it filters nothing."""
    if value is None:
        return None
    channel, mentions = value.channel, value.mentions
    if channel is not None:
        channel = channel.removeprefix("#")
        try:
            validation.channel_name(channel)
        except BrokerError:
            raise BrokerError("invalid_filter", f"filter.channel {value.channel!r} is not a "
                              "channel name") from None
    if mentions is not None:
        mentions = mentions.removeprefix("@")
        try:
            validation.agent_name(mentions, tx.limits)
        except BrokerError:
            raise BrokerError("invalid_filter", f"filter.mentions {value.mentions!r} is not an "
                              "agent name") from None
    if channel is None and mentions is None:
        return None
    return SubscriptionFilter(channel=channel, mentions=mentions)


def extra_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """Headers to send with every delivery; raises invalid_headers or headers_too_large."""
    if not headers:
        return {}
    if len(headers) > MAX_HEADERS:
        raise BrokerError("headers_too_large", f"at most {MAX_HEADERS} headers")
    seen: set[str] = set()
    size = 0
    for name, value in headers.items():
        lower = name.lower()
        if not HEADER_NAME.fullmatch(name):
            raise BrokerError("invalid_headers", f"header name {name!r} is not an HTTP token")
        if not isinstance(value, str) or not HEADER_VALUE.fullmatch(value):
            raise BrokerError(
                "invalid_headers",
                f"header {name!r}: a value is visible ASCII, spaces and tabs (no line breaks)",
            )
        if len(name) > MAX_HEADER_NAME_CHARS or len(value) > MAX_HEADER_VALUE_CHARS:
            raise BrokerError(
                "headers_too_large",
                f"header {name[:64]!r}: names are at most {MAX_HEADER_NAME_CHARS} and values "
                f"at most {MAX_HEADER_VALUE_CHARS} characters",
            )
        if lower in RESERVED_HEADERS or lower.startswith(RESERVED_HEADER_PREFIXES):
            raise BrokerError(
                "invalid_headers",
                f"header {name!r} is set by the broker (content type, framing, event and "
                "signature headers cannot be overridden)",
            )
        if lower in seen:
            raise BrokerError("invalid_headers", f"header {name!r} is given twice")
        seen.add(lower)
        size += len(name) + len(value)
    if size > MAX_HEADERS_BYTES:
        raise BrokerError("headers_too_large",
                          f"headers are {size} bytes; the limit is {MAX_HEADERS_BYTES}")
    return dict(headers)


def signing_secret(secret: str | None) -> str:
    """The secret to sign with: the caller's (checked), or a new `whsec_` one.

    Raises invalid_secret.
    """
    if secret is None:
        return STANDARD_SECRET_PREFIX + base64.b64encode(
            _random.token_bytes(GENERATED_KEY_BYTES)).decode()
    if not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_CHARS or not secret.isascii() \
            or not secret.isprintable():
        raise BrokerError(
            "invalid_secret",
            f"a secret is {MIN_SECRET_CHARS}-{MAX_SECRET_CHARS} printable ASCII characters",
        )
    if secret.startswith(STANDARD_SECRET_PREFIX):
        standard_key(secret)
    return secret


def standard_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; raises invalid_secret."""
    try:
        key = base64.b64decode(secret.removeprefix(STANDARD_SECRET_PREFIX), validate=True)
    except ValueError:
        raise BrokerError("invalid_secret", "a whsec_ secret must be whsec_ + base64") from None
    if not MIN_STANDARD_KEY_BYTES <= len(key) <= MAX_STANDARD_KEY_BYTES:
        raise BrokerError(
            "invalid_secret",
            f"a whsec_ secret holds {MIN_STANDARD_KEY_BYTES}-{MAX_STANDARD_KEY_BYTES} bytes",
        )
    return key


def _subscription_id(value: str) -> int:
    return validation.parse_id(value, "subscription_not_found", "subscription")


# -- subscription commands -----------------------------------------------------------


class CreateSubscription(msgspec.Struct, frozen=True, kw_only=True):
    """Subscribe `url` to `events` of the workspace, optionally filtered.

    The destination check (SSRF guard) is the caller's: it needs DNS, and a
    command does no I/O. Raises invalid_url, invalid_events,
    invalid_event_type, invalid_filter, invalid_headers, headers_too_large,
    invalid_secret, too_many_subscriptions, workspace_not_found.
    """

    workspace_id: int
    url: str
    events: list[str]
    filter: SubscriptionFilter | None = None
    headers: dict[str, str] | None = None
    secret: str | None = None

    def apply(self, tx: Tx) -> SubscriptionCreated:
        conn = tx.conn
        url = webhook_url(self.url)
        events = event_types(self.events)
        filters = subscription_filter(self.filter, tx)
        headers = extra_headers(self.headers)
        secret = signing_secret(self.secret)
        require_workspace(conn, self.workspace_id)
        row = conn.execute(
            "SELECT count(*) FROM webhook_subscriptions WHERE workspace_id = ? AND active",
            (self.workspace_id,),
        ).fetchone()
        if row is not None and int(row[0]) >= MAX_SUBSCRIPTIONS:
            raise BrokerError("too_many_subscriptions",
                              f"a workspace has at most {MAX_SUBSCRIPTIONS} subscriptions")
        subscription_id = tx.new_id()
        conn.execute(
            "INSERT INTO webhook_subscriptions(id, workspace_id, url, events, filters, headers,"
            " secret, created_at) VALUES (?,?,?,?,?,?,?,?)",
            (subscription_id, self.workspace_id, url, _encoder.encode(events).decode(),
             _encoder.encode(filters or {}).decode(), _encoder.encode(headers).decode(),
             secret, tx.now_ms),
        )
        return SubscriptionCreated(
            id=str(subscription_id), events=events, filter=filters, url=url,
            headers=headers or None, is_active=True, created_at=tx.now_iso, secret=secret,
        )


class DeleteSubscription(msgspec.Struct, frozen=True, kw_only=True):
    """Delete a subscription and its outbox rows (pending and dead). Raises subscription_not_found.

    A delivery already in flight finishes; recording its outcome then changes nothing.
    """

    workspace_id: int
    subscription_id: str

    def apply(self, tx: Tx) -> None:
        deleted = tx.conn.execute(
            "DELETE FROM webhook_subscriptions WHERE id = ? AND workspace_id = ? RETURNING id",
            (_subscription_id(self.subscription_id), self.workspace_id),
        ).fetchall()
        if not deleted:
            raise BrokerError("subscription_not_found",
                              f"subscription {self.subscription_id!r} not found")


class RecordDeliveryAttempt(msgspec.Struct, frozen=True, kw_only=True):
    """The dispatcher's report of one attempt at an outbox row.

    outcome: delivered (final), retry (pending again after retry_delay_ms),
    dead (dead letter). attempts: the row's attempt count when the dispatcher
    read it; if it changed since (a replay, a deletion), nothing is written.
    Returns the row's new state, or None when nothing was written.
    """

    outbox_id: int
    attempts: int
    outcome: DeliveryOutcome
    status: int | None = None
    error: str | None = None
    retry_delay_ms: int = 0

    def apply(self, tx: Tx) -> str | None:
        state = "pending" if self.outcome == "retry" else self.outcome
        changed = tx.conn.execute(
            "UPDATE outbox SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
            " last_status = ?, last_error = ?, updated_at = ?"
            " WHERE id = ? AND state = 'pending' AND attempts = ? RETURNING state",
            (state, tx.now_ms + max(0, self.retry_delay_ms), self.status,
             None if self.error is None else self.error[:1000], tx.now_ms,
             self.outbox_id, self.attempts),
        ).fetchall()
        return state if changed else None


class ReplayDeadLetters(msgspec.Struct, frozen=True, kw_only=True):
    """Put a subscription's dead letters (all, or those named) back to pending, attempts 0.

    Raises subscription_not_found, invalid_request (an id list of more than
    MAX_REPLAY_IDS).
    """

    workspace_id: int
    subscription_id: str
    ids: list[str] | None = None

    def apply(self, tx: Tx) -> ReplayResult:
        conn = tx.conn
        subscription_id = require_subscription(conn, self.workspace_id, self.subscription_id)
        if self.ids is None:
            rows = conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                " updated_at = ? WHERE subscription_id = ? AND state = 'dead' RETURNING id",
                (tx.now_ms, tx.now_ms, subscription_id),
            ).fetchall()
        else:
            if len(self.ids) > MAX_REPLAY_IDS:
                raise BrokerError("invalid_request",
                                  f"at most {MAX_REPLAY_IDS} ids per replay")
            wanted = [i for i in (_outbox_id(v) for v in self.ids) if i is not None]
            rows = conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?,"
                " updated_at = ? WHERE subscription_id = ? AND state = 'dead'"
                " AND id IN (SELECT value FROM json_each(?)) RETURNING id",
                (tx.now_ms, tx.now_ms, subscription_id, _encoder.encode(wanted).decode()),
            ).fetchall()
        if rows:
            tx.signal(OUTBOX_WRITTEN)
        return ReplayResult(subscription_id=str(subscription_id), replayed=len(rows))


MAX_REPLAY_IDS = 1000


def _outbox_id(value: str) -> int | None:
    if value.isascii() and value.isdigit() and len(value) <= 19 and int(value) <= validation.MAX_ID:
        return int(value)
    return None


class PruneDeliveredWebhooks(msgspec.Struct, frozen=True, kw_only=True):
    """Delete up to `limit` delivered outbox rows settled before `before_ms`; returns how many."""

    before_ms: int
    limit: int = 1000

    def apply(self, tx: Tx) -> int:
        rows = tx.conn.execute(
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE state = 'delivered'"
            " AND updated_at < ? LIMIT ?) RETURNING id",
            (self.before_ms, self.limit),
        ).fetchall()
        return len(rows)


# -- subscription queries (reader pool) -----------------------------------------------

_SUBSCRIPTION_COLUMNS = (
    "SELECT s.id, s.events, s.filters, s.url, s.headers, s.active, s.created_at,"
    " (SELECT count(*) FROM outbox o WHERE o.subscription_id = s.id AND o.state = 'pending'),"
    " (SELECT count(*) FROM outbox o WHERE o.subscription_id = s.id AND o.state = 'dead')"
    " FROM webhook_subscriptions s"
)


def _subscription(row: apsw.SQLiteValues) -> EventSubscription:
    sid, events, filters, url, headers, active, created_at, pending, dead = row
    decoded_filter = msgspec.json.decode(cast(str, filters), type=SubscriptionFilter)
    decoded_headers = _headers_decoder.decode(cast(str, headers))
    return EventSubscription(
        id=str(sid), events=_events_decoder.decode(cast(str, events)),
        filter=None if decoded_filter == SubscriptionFilter() else decoded_filter,
        url=cast(str, url), headers=decoded_headers or None, is_active=bool(active),
        created_at=iso(cast(int, created_at)) or "", pending=cast(int, pending),
        dead_letters=cast(int, dead),
    )


def require_subscription(conn: apsw.Connection, workspace_id: int, subscription_id: str) -> int:
    """The id of this workspace's subscription; raises subscription_not_found."""
    sid = _subscription_id(subscription_id)
    row = conn.execute(
        "SELECT id FROM webhook_subscriptions WHERE id = ? AND workspace_id = ?",
        (sid, workspace_id),
    ).fetchone()
    if row is None:
        raise BrokerError("subscription_not_found", f"subscription {subscription_id!r} not found")
    return sid


def list_subscriptions(conn: apsw.Connection, workspace_id: int) -> list[EventSubscription]:
    """The workspace's subscriptions, oldest first."""
    rows = conn.execute(
        _SUBSCRIPTION_COLUMNS + " WHERE s.workspace_id = ? ORDER BY s.id", (workspace_id,)
    ).fetchall()
    return [_subscription(r) for r in rows]


def get_subscription(
    conn: apsw.Connection, workspace_id: int, subscription_id: str
) -> EventSubscription:
    """One subscription of the workspace; raises subscription_not_found."""
    row = conn.execute(
        _SUBSCRIPTION_COLUMNS + " WHERE s.id = ? AND s.workspace_id = ?",
        (_subscription_id(subscription_id), workspace_id),
    ).fetchone()
    if row is None:
        raise BrokerError("subscription_not_found", f"subscription {subscription_id!r} not found")
    return _subscription(row)


def list_dead_letters(
    conn: apsw.Connection, workspace_id: int, subscription_id: str, limit: int,
    before: str | None = None,
) -> list[DeadLetter]:
    """A subscription's dead letters, newest first, `limit` at most, older than id `before`.

    Raises subscription_not_found, invalid_cursor (`before` is not a dead letter id).
    """
    sid = require_subscription(conn, workspace_id, subscription_id)
    before_id = _outbox_id(before) if before is not None else None
    if before is not None and before_id is None:
        raise BrokerError("invalid_cursor", "before must be a dead letter id")
    rows = conn.execute(
        "SELECT id, type, attempts, last_status, last_error, created_at, updated_at, payload"
        " FROM outbox WHERE subscription_id = ? AND state = 'dead' AND id < ?"
        " ORDER BY id DESC LIMIT ?",
        (sid, before_id if before_id is not None else 2**63 - 1, limit),
    ).fetchall()
    return [
        DeadLetter(
            id=str(r[0]), subscription_id=str(sid), type=cast(str, r[1]), attempts=cast(int, r[2]),
            last_status=cast("int | None", r[3]), last_error=cast("str | None", r[4]),
            created_at=iso(cast(int, r[5])) or "", failed_at=iso(cast("int | None", r[6])),
            event=msgspec.Raw(cast(bytes, r[7])),
        )
        for r in rows
    ]


# -- what the dispatcher reads --------------------------------------------------------


class DueDelivery(msgspec.Struct, frozen=True, kw_only=True):
    """A pending outbox row that is due, with what it takes to send it."""

    id: int
    subscription_id: int
    workspace_id: int
    type: str
    payload: bytes
    attempts: int
    created_at: int
    url: str
    headers: dict[str, str]
    secret: str | None


class DueBatch(msgspec.Struct, frozen=True):
    """Due rows (oldest due first), and when the next not-yet-due row falls due (ms)."""

    rows: list[DueDelivery]
    next_due_ms: int | None


def due_deliveries(
    conn: apsw.Connection, now_ms: int, busy_ids: list[int], busy_subscriptions: list[int],
    limit: int,
) -> DueBatch:
    """Pending rows due at `now_ms`, except those in flight and those of saturated subscriptions.

    Skipping saturated subscriptions in SQL is what keeps one endpoint's
    backlog from filling every batch and starving the other subscriptions.
    """
    rows = conn.execute(
        "SELECT o.id, o.subscription_id, o.workspace_id, o.type, o.payload, o.attempts,"
        " o.created_at, s.url, s.headers, s.secret"
        " FROM outbox o JOIN webhook_subscriptions s ON s.id = o.subscription_id"
        # A deleted workspace's rows wait for its purge, never for delivery.
        " JOIN workspaces w ON w.id = o.workspace_id AND w.deleted_at IS NULL"
        " WHERE o.state = 'pending' AND o.next_attempt_at <= ? AND s.active"
        " AND o.id NOT IN (SELECT value FROM json_each(?))"
        " AND o.subscription_id NOT IN (SELECT value FROM json_each(?))"
        " ORDER BY o.next_attempt_at, o.id LIMIT ?",
        (now_ms, _encoder.encode(busy_ids).decode(),
         _encoder.encode(busy_subscriptions).decode(), limit),
    ).fetchall()
    upcoming = conn.execute(
        "SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending' AND next_attempt_at > ?",
        (now_ms,),
    ).fetchone()
    return DueBatch(
        [
            DueDelivery(
                id=cast(int, r[0]), subscription_id=cast(int, r[1]), workspace_id=cast(int, r[2]),
                type=cast(str, r[3]), payload=bytes(cast(bytes, r[4])), attempts=cast(int, r[5]),
                created_at=cast(int, r[6]), url=cast(str, r[7]),
                headers=_headers_decoder.decode(cast(str, r[8])),
                secret=cast("str | None", r[9]),
            )
            for r in rows
        ],
        None if upcoming is None or upcoming[0] is None else int(cast(int, upcoming[0])),
    )


class OutboxBacklog(msgspec.Struct, frozen=True):
    """Pending outbox rows over every workspace, and when the oldest was written (ms)."""

    pending: int
    oldest_created_at: int | None


def outbox_backlog(conn: apsw.Connection) -> OutboxBacklog:
    """The dispatcher's queue as the table holds it (for metrics)."""
    row = conn.execute(
        "SELECT count(*), min(created_at) FROM outbox WHERE state = 'pending'"
    ).fetchone()
    assert row is not None
    return OutboxBacklog(int(cast(int, row[0])), cast("int | None", row[1]))


def outbox_counts(conn: apsw.Connection) -> dict[str, int]:
    """Outbox rows by state, over every workspace (for metrics)."""
    counts = {"pending": 0, "delivered": 0, "dead": 0}
    for state, count in conn.execute("SELECT state, count(*) FROM outbox GROUP BY state"):
        counts[cast(str, state)] = cast(int, count)
    return counts


# -- inbound hooks ------------------------------------------------------------------


def _hook_name(name: str | None) -> str:
    name = DEFAULT_HOOK_NAME if name is None else name.strip()
    if not name or len(name) > MAX_HOOK_NAME_CHARS or not name.isprintable():
        raise BrokerError("invalid_name",
                          f"a webhook name is 1-{MAX_HOOK_NAME_CHARS} printable characters")
    return name


def _hook_agent_name(conn: apsw.Connection, workspace_id: int, name: str, hook_id: int) -> str:
    """`hook.<slug of the name>`, or with the hook id appended when that name is taken."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-._")[:HOOK_AGENT_SLUG_CHARS]
    candidate = f"hook.{slug or DEFAULT_HOOK_NAME}"
    taken = conn.execute(
        "SELECT 1 FROM agents WHERE workspace_id = ? AND name = ?", (workspace_id, candidate)
    ).fetchone()
    return f"{candidate}.{hook_id}" if taken else candidate


class CreateInboundWebhook(msgspec.Struct, frozen=True, kw_only=True):
    """Bind a new inbound hook to a channel; returns its `wh_live_` token (shown once).

    Raises invalid_name, channel_not_found, channel_archived, workspace_not_found.
    """

    workspace_id: int
    channel: str
    name: str | None = None

    def apply(self, tx: Tx) -> InboundWebhookCreated:
        conn, now = tx.conn, tx.now_ms
        name = _hook_name(self.name)
        require_workspace(conn, self.workspace_id)
        channel = require_channel(conn, self.workspace_id, self.channel.removeprefix("#"))
        if channel.archived:
            raise BrokerError("channel_archived", f"channel {channel.name!r} is archived")
        # The hook's id first, then its agent's: the agents table seeds the
        # writer's id floor at start, so the hook id is covered by it.
        hook_id = tx.new_id()
        agent_id = tx.new_id()
        agent_name = _hook_agent_name(conn, self.workspace_id, name, hook_id)
        # A random token nobody knows: the hook's agent cannot log in.
        conn.execute(
            "INSERT INTO agents(id, workspace_id, name, type, metadata, token_hash, created_at)"
            " VALUES (?,?,?,'system',?,?,?)",
            (agent_id, self.workspace_id, agent_name,
             _encoder.encode({"webhook_id": str(hook_id)}).decode(),
             secrets.digest(secrets.mint(secrets.AGENT_TOKEN_PREFIX)), now),
        )
        token = secrets.mint(INBOUND_TOKEN_PREFIX)
        conn.execute(
            "INSERT INTO inbound_webhooks(id, workspace_id, channel_id, agent_id, name,"
            " token_hash, created_at) VALUES (?,?,?,?,?,?,?)",
            (hook_id, self.workspace_id, channel.id, agent_id, name, secrets.digest(token), now),
        )
        return InboundWebhookCreated(
            webhook_id=str(hook_id), name=name, channel=channel.name, url=hook_path(hook_id),
            token=token, agent_name=agent_name, is_active=True, created_at=iso(now) or "",
        )


def hook_path(hook_id: int) -> str:
    return f"/v1/hooks/{hook_id}"


class DeleteInboundWebhook(msgspec.Struct, frozen=True, kw_only=True):
    """Delete an inbound hook (its token stops working) and deactivate its agent.

    The agent's messages stay. Raises webhook_not_found.
    """

    workspace_id: int
    webhook_id: str

    def apply(self, tx: Tx) -> None:
        hook_id = validation.parse_id(self.webhook_id, "webhook_not_found", "webhook")
        deleted = tx.conn.execute(
            "DELETE FROM inbound_webhooks WHERE id = ? AND workspace_id = ? RETURNING agent_id",
            (hook_id, self.workspace_id),
        ).fetchall()
        if not deleted:
            raise BrokerError("webhook_not_found", f"webhook {self.webhook_id!r} not found")
        tx.conn.execute(
            "UPDATE agents SET deactivated_at = ?, status = 'offline' WHERE id = ?",
            (tx.now_ms, deleted[0][0]),
        )


def list_inbound_webhooks(conn: apsw.Connection, workspace_id: int) -> list[InboundWebhook]:
    """The workspace's inbound hooks, oldest first."""
    rows = conn.execute(
        "SELECT h.id, h.name, c.name, a.name, h.created_at FROM inbound_webhooks h"
        " JOIN channels c ON c.id = h.channel_id JOIN agents a ON a.id = h.agent_id"
        " WHERE h.workspace_id = ? ORDER BY h.id",
        (workspace_id,),
    ).fetchall()
    return [
        InboundWebhook(
            id=str(r[0]), name=cast(str, r[1]), channel=cast(str, r[2]), url=hook_path(
                cast(int, r[0])), agent_name=cast(str, r[3]), is_active=True,
            created_at=iso(cast(int, r[4])) or "",
        )
        for r in rows
    ]


class _Hook(msgspec.Struct, frozen=True):
    id: int
    workspace_id: int
    channel_id: int
    agent_id: int
    name: str
    token_hash: bytes


def _authenticated_hook(conn: apsw.Connection, webhook_id: str, token: str | None) -> _Hook:
    """The hook `webhook_id` if `token` is its token; invalid_token (401) otherwise.

    An unknown id and a wrong token get the same answer, so the answer says
    nothing about which hooks exist.
    """
    refused = BrokerError("invalid_token", "the webhook id or its token is not valid")
    if token is None:
        raise BrokerError("unauthorized", "this route needs 'Authorization: Bearer wh_live_...'")
    if not token.startswith(INBOUND_TOKEN_PREFIX) or len(token) > 512:
        raise refused
    try:
        hook_id = validation.parse_id(webhook_id, "invalid_token", "webhook")
    except BrokerError:
        raise refused from None
    row = conn.execute(
        "SELECT h.id, h.workspace_id, h.channel_id, h.agent_id, h.name, h.token_hash"
        " FROM inbound_webhooks h JOIN workspaces w ON w.id = h.workspace_id"
        " WHERE h.id = ? AND w.deleted_at IS NULL",
        (hook_id,),
    ).fetchone()
    if row is None:
        raise refused
    hook = _Hook(*row)
    if not hmac.compare_digest(bytes(hook.token_hash), secrets.digest(token)):
        raise refused
    return hook


def _hook_text(name: str, text: str | None, message: str | None, source: str | None,
               payload: dict[str, Any] | None) -> str:
    """Relaycast's rule: text, else message, else a line made from the payload or the source."""
    if text:
        return text
    if message:
        return message
    if payload is not None:
        generated = f"Webhook {name}: {_encoder.encode(payload).decode()}"
    else:
        generated = f"Webhook event from {source or 'external'}"
    if len(generated) > GENERATED_TEXT_CHARS:
        generated = generated[: GENERATED_TEXT_CHARS - 1] + "\u2026"
    return generated


class TriggerInboundWebhook(msgspec.Struct, frozen=True, kw_only=True):
    """Post into the hook's channel as the hook's agent, atomically like any channel send.

    Writes the message, one delivery per member (muted members only when
    mentioned), the message-log row, outbox rows, and the idempotency record
    with a key; emits `webhook.received` too. Raises unauthorized,
    invalid_token, channel_archived, invalid_text, text_too_long,
    data_too_large, idempotency_key_reused.
    """

    webhook_id: str
    token: str | None
    text: str | None = None
    message: str | None = None
    source: str | None = None
    author: str | None = None
    payload: dict[str, Any] | None = None
    blocks: list[Any] | None = None
    idempotency_key: str | None = None

    def apply(self, tx: Tx) -> HookTriggered:
        # Imported here: events imports this module (for the enqueue), and
        # messages imports events.
        from broker.engine.events import emit_ephemeral
        from broker.engine.idempotency import once
        from broker.engine.lookups import AgentRow
        from broker.engine.messages import channel_recipients, post_message

        conn, limits = tx.conn, tx.limits
        hook = _authenticated_hook(conn, self.webhook_id, self.token)
        text = validation.text(
            _hook_text(hook.name, self.text, self.message, self.source, self.payload), limits
        )
        extra = {k: v for k, v in (("webhook_id", str(hook.id)), ("source", self.source),
                                   ("author", self.author), ("payload", self.payload),
                                   ("blocks", self.blocks)) if v is not None}
        data = validation.data(extra, limits)

        def post() -> HookTriggered:
            channel = conn.execute(
                "SELECT name, archived_at IS NOT NULL FROM channels WHERE id = ?",
                (hook.channel_id,),
            ).fetchone()
            agent = conn.execute(
                "SELECT id, name, type, workspace_id FROM agents WHERE id = ?", (hook.agent_id,)
            ).fetchone()
            assert channel is not None and agent is not None  # both cascade with the hook
            channel_name = cast(str, channel[0])
            if channel[1]:
                raise BrokerError("channel_archived", f"channel {channel_name!r} is archived")
            author = AgentRow(*agent)
            message = post_message(
                tx, event_type="message.created", workspace_id=hook.workspace_id,
                author=author, text=text, mode="wait",
                data=msgspec.json.decode(data) if data is not None else None, stored_data=data,
                attachments=[],
                recipients=lambda mentions: channel_recipients(conn, hook.channel_id, author.id,
                                                               mentions),
                channel_id=hook.channel_id, channel_name=channel_name,
            )
            emit_ephemeral(
                tx, workspace_id=hook.workspace_id, event_type="webhook.received",
                data={"webhook_id": str(hook.id), "channel": channel_name,
                      "message": {"id": message.id, "text": text, "source": self.source,
                                  "author": self.author}},
                channel_id=hook.channel_id,
            )
            return HookTriggered(
                message_id=message.id, channel=channel_name, text=text,
                source=self.source, author=self.author, created_at=tx.now_iso,
            )

        # The key is looked up before the channel is checked: a retry after
        # the channel was archived still gets the first result.
        return once(
            tx, agent_id=hook.agent_id, key=self.idempotency_key, operation="webhook.trigger",
            request=self, result_type=HookTriggered, run=post,
        )

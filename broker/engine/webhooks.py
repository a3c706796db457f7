"""Webhook subscriptions: who wants which events, where, signed how; and their dead letters.

A subscription names event types (or `*`), an optional channel and
mentions filter, an http(s) URL (the SSRF guard is the caller's, it needs
DNS), extra headers and a signing secret. Its events become outbox rows in
the fact's own transaction (broker.engine.outbox); the dispatcher's side of
those rows is broker.engine.webhook_deliveries. Here: the subscription
commands and queries, the input rules, and the dead letters of a
subscription (`list_dead_letters`, and `ReplayDeadLetters`, which puts dead
rows back to pending). Nothing here performs I/O. Inbound hooks are
broker.engine.inbound_hooks.
"""

from __future__ import annotations

import base64
import re
import secrets as _random
from typing import cast
from urllib.parse import urlsplit

import apsw
import msgspec

from broker.engine import validation
from broker.engine.errors import BrokerError
from broker.engine.lookups import require_workspace
from broker.engine.outbox import OUTBOX_WRITTEN
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

"""Inbound hooks: an outside system posts into a channel with a `wh_live_` token.

`CreateInboundWebhook` binds a hook to a channel, creates the hook's system
agent (type `system`, a member of no channel, so it never receives
deliveries) and returns a `wh_live_` token, stored only as its SHA-256
digest. `TriggerInboundWebhook` checks the token and posts into the channel
through the same path as a channel send (`post_message`, recipients read at
commit time), atomically.
"""

from __future__ import annotations

import hmac
import re
from typing import Any, cast

import apsw
import msgspec

from broker.engine import secrets, validation
from broker.engine.errors import BrokerError
from broker.engine.events import emit_ephemeral
from broker.engine.idempotency import once
from broker.engine.lookups import AgentRow, require_channel, require_workspace
from broker.engine.messages import channel_recipients, post_message
from broker.engine.writer import Tx
from protocol.objects import iso

INBOUND_TOKEN_PREFIX = "wh_live_"
MAX_HOOK_NAME_CHARS = 80
DEFAULT_HOOK_NAME = "webhook"
# Agent names derived from hook names keep this many characters of the slug.
HOOK_AGENT_SLUG_CHARS = 40
# A generated message text (from a bare payload) is cut to this many characters.
GENERATED_TEXT_CHARS = 2000

_encoder = msgspec.json.Encoder()


# -- wire objects ------------------------------------------------------------------


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


class HookCaller(msgspec.Struct, frozen=True, kw_only=True):
    """Whom a hook's request is counted against (`hook_caller`)."""

    workspace_id: int
    agent_id: int  # the hook's own agent: its bucket is the hook's


def hook_caller(conn: apsw.Connection, webhook_id: str, token: str | None) -> HookCaller:
    """The workspace and agent of hook `webhook_id` if `token` is its token (a query).

    Lets the trigger's route count a request against the hook's workspace
    before the body is read; the trigger checks the token again in its
    transaction. Raises unauthorized, invalid_token (also for an unknown id).
    """
    hook = _authenticated_hook(conn, webhook_id, token)
    return HookCaller(workspace_id=hook.workspace_id, agent_id=hook.agent_id)


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

"""Thread replies: one command writes the reply, its deliveries and the root's counters.

Threads are one level deep, as in Relaycast: a reply to a reply joins the
root's thread (thread_id is always the root's id), so a thread reads as one
list. The reply lives where its root lives (the same channel or the same
DM / group DM conversation), which is why the visibility rule of the root
applies to it unchanged.

Recipients are read inside the transaction, like every send: in a channel,
every member except the sender (a muted member only when mentioned); in a
conversation, every active participant except the sender. The reply, its
attachment links, the deliveries, the message-log row, the root's
reply_count / last_reply_at and the idempotency record commit together.
"""

from __future__ import annotations

from typing import Any, cast

import msgspec

from broker.engine import validation
from broker.engine.channel_queries import refuse_archived, require_visible_message
from broker.engine.events import record_event
from broker.engine.idempotency import once
from broker.engine.lookups import require_agent
from broker.engine.messages import insert_message, names_of, resolve_attachments, resolve_mentions
from broker.engine.writer import Tx
from protocol.objects import Message, Mode, iso

_encoder = msgspec.json.Encoder()


class ReplyToThread(msgspec.Struct, frozen=True, kw_only=True):
    """Reply in the thread of `message_id` (a root or a reply; the root's thread is used).

    Raises invalid_text, text_too_long, invalid_mode, invalid_data,
    data_too_large, agent_not_found, message_not_found (unknown, of another
    workspace, or not visible to the agent), channel_archived,
    file_not_found, file_not_complete, idempotency_key_reused.
    """

    workspace_id: int
    agent_id: int
    message_id: str
    text: str
    mode: Mode = "wait"
    data: dict[str, Any] | None = None
    attachments: list[str] = msgspec.field(default_factory=list)
    idempotency_key: str | None = None

    def apply(self, tx: Tx) -> Message:
        limits, conn = tx.limits, tx.conn
        text = validation.text(self.text, limits)
        mode = validation.mode(self.mode)
        data = validation.data(self.data, limits)
        author = require_agent(conn, self.workspace_id, self.agent_id)
        parent = require_visible_message(conn, self.workspace_id, author.id, self.message_id)
        refuse_archived(parent)
        root = parent.root_id

        def reply() -> Message:
            attachments = resolve_attachments(conn, self.workspace_id, self.attachments)
            mentions = resolve_mentions(conn, self.workspace_id, text)
            message_id = insert_message(
                tx, workspace_id=self.workspace_id, author=author, text=text, mode=mode,
                data=data, mentions=mentions, attachments=attachments,
                channel_id=parent.channel_id, conversation_id=parent.conversation_id,
                thread_id=root,
            )
            conn.execute(
                "UPDATE messages SET reply_count = reply_count + 1, last_reply_at = ?"
                " WHERE id = ?",
                (tx.now_ms, root),
            )
            if parent.channel_id is not None:
                recipients = conn.execute(
                    "SELECT m.agent_id FROM channel_members m JOIN agents a ON a.id = m.agent_id"
                    " WHERE m.channel_id = ? AND m.agent_id <> ? AND a.deactivated_at IS NULL"
                    " AND (m.muted = 0 OR a.name IN (SELECT value FROM json_each(?)))",
                    (parent.channel_id, author.id, _encoder.encode(mentions).decode()),
                ).fetchall()
            else:
                recipients = conn.execute(
                    "SELECT p.agent_id FROM conversation_participants p"
                    " JOIN agents a ON a.id = p.agent_id"
                    " WHERE p.conversation_id = ? AND p.agent_id <> ? AND p.left_at IS NULL"
                    " AND a.deactivated_at IS NULL",
                    (parent.conversation_id, author.id),
                ).fetchall()
            message = Message(
                id=str(message_id),
                channel_id=None if parent.channel_id is None else str(parent.channel_id),
                channel_name=parent.channel_name,
                conversation_id=(
                    None if parent.conversation_id is None else str(parent.conversation_id)
                ),
                agent_id=str(author.id), agent_name=author.name, text=text, data=self.data,
                thread_id=str(root), attachments=[a for _, a in attachments],
                has_attachments=bool(attachments), mentions=mentions,
                injection_mode=mode,  # type: ignore[arg-type]
                created_at=iso(tx.now_ms) or "",
            )
            recorded = record_event(
                tx, workspace_id=self.workspace_id, event_type="thread.reply", data=message,
                recipients=[cast(int, r[0]) for r in recipients],
                message_id=message_id, channel_id=parent.channel_id,
                conversation_id=parent.conversation_id, agent_id=author.id,
            )
            message.mailbox_full = names_of(conn, recorded.mailbox_full)
            return message

        return once(
            tx, agent_id=author.id, key=self.idempotency_key, operation="thread.reply",
            request=self, result_type=Message, run=reply,
        )

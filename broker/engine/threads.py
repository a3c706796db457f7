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

from collections.abc import Iterable

from broker.engine.channel_queries import refuse_archived, require_visible_message
from broker.engine.idempotency import once
from broker.engine.messages import (
    Checked,
    Send,
    conversation_recipients,
    members_to_deliver,
    post_message,
    resolve_attachments,
    sender,
)
from broker.engine.writer import Tx
from protocol.objects import Message


class ReplyToThread(Send, frozen=True, kw_only=True):
    """Reply in the thread of `message_id` (a root or a reply; the root's thread is used).

    A retry with the idempotency key of an earlier reply returns that reply
    even if the channel was archived or the sender lost access since.
    Raises invalid_text, text_too_long, invalid_mode, invalid_data,
    data_too_large, invalid_idempotency_key, idempotency_key_reused,
    agent_not_found, message_not_found (unknown, of another workspace, or
    not visible to the agent), channel_archived, file_not_found,
    file_not_complete.
    """

    message_id: str

    def apply_checked(self, tx: Tx, checked: Checked) -> Message:
        conn = tx.conn
        text, mode, data = checked

        def reply() -> Message:
            author = sender(tx, self.workspace_id, self.agent_id)
            parent = require_visible_message(conn, self.workspace_id, author.id,
                                             self.message_id)
            refuse_archived(parent)
            root = parent.root_id
            channel_id, conversation_id = parent.channel_id, parent.conversation_id

            def recipients(mentions: list[str]) -> Iterable[int]:
                if channel_id is not None:
                    return members_to_deliver(tx, channel_id, author.id, mentions)
                assert conversation_id is not None  # a message lives in one or the other
                return conversation_recipients(conn, conversation_id, author.id)

            message = post_message(
                tx, event_type="thread.reply", workspace_id=self.workspace_id, author=author,
                text=text, mode=mode, data=self.data, stored_data=data,
                attachments=resolve_attachments(conn, self.workspace_id, self.attachments),
                recipients=recipients, channel_id=channel_id, channel_name=parent.channel_name,
                conversation_id=conversation_id, thread_id=root,
            )
            conn.execute(
                "UPDATE messages SET reply_count = reply_count + 1, last_reply_at = ?"
                " WHERE id = ?",
                (tx.now_ms, root),
            )
            return message

        return once(
            tx, agent_id=self.agent_id, key=self.idempotency_key, operation="thread.reply",
            request=self, result_type=Message, run=reply,
        )

"""Mark read: receipt, delivery ack and last-read pointer in one command; and who read what.

`MarkRead` is one of the five atomic write paths. In one transaction it
writes the read receipt (INSERT OR IGNORE: the first read time stays),
moves the reader's own deliveries of that message to `acked` (decrementing
the reader's pending_count by exactly the rows it changed), and moves the
reader's last-read pointer of the channel or conversation forward, never
back: reading an older message after a newer one leaves the pointer on the
newer. The first read by someone other than the author also records a
durable `message.read` event for the author; a repeated mark read writes
nothing at all.

Which deliveries are "of that message": the ones whose event carries the
message itself (`message.created`, `thread.reply`, `dm.received`,
`group_dm.received`). Notices about the message (`message.reacted`,
`message.read`) point at it too, but reading a message is not reading the
news that someone reacted to it, so they stay in the mailbox.

Only top-level messages move the pointer. A thread reply is newer than the
top-level messages around it, so moving the pointer to a reply would mark
unread top-level messages as read; the reply still gets its receipt and its
delivery acked.
"""

from __future__ import annotations

from typing import cast

import apsw
import msgspec

from broker.engine.channel_queries import OWNER, require_readable_channel, require_visible_message
from broker.engine.events import record_event
from broker.engine.lookups import require_agent
from broker.engine.writer import Tx
from protocol.objects import (
    MESSAGE_EVENTS,
    ChannelReadStatus,
    ReaderInfo,
    ReadNotice,
    ReadReceipt,
    iso,
)

# The deliveries a read acks: those of the events whose payload is the message.
_MESSAGE_EVENTS_JSON = msgspec.json.encode(MESSAGE_EVENTS).decode()


class MarkRead(msgspec.Struct, frozen=True, kw_only=True):
    """Mark a message the agent can see as read (idempotent; already_read on a repeat).

    Raises agent_not_found, message_not_found. Reading a message of an
    archived channel is allowed: it changes nothing in the channel.
    """

    workspace_id: int
    agent_id: int
    message_id: str

    def apply(self, tx: Tx) -> ReadReceipt:
        conn, now = tx.conn, tx.now_ms
        reader = require_agent(conn, self.workspace_id, self.agent_id)
        message = require_visible_message(conn, self.workspace_id, reader.id, self.message_id)
        first = conn.execute(
            "INSERT OR IGNORE INTO read_receipts(message_id, agent_id, read_at) VALUES (?,?,?)"
            " RETURNING read_at",
            (message.id, reader.id, now),
        ).fetchall()
        if first:
            read_at = now
        else:
            row = conn.execute(
                "SELECT read_at FROM read_receipts WHERE message_id = ? AND agent_id = ?",
                (message.id, reader.id),
            ).fetchone()
            assert row is not None
            read_at = cast(int, row[0])
        acked = conn.execute(
            "UPDATE deliveries SET state = 'acked', acked_at = ?, updated_at = ?"
            " WHERE message_id = ? AND agent_id = ?"
            " AND state IN ('queued', 'delivered', 'failed')"
            " AND (SELECT l.type FROM message_log l WHERE l.id = deliveries.log_id)"
            " IN (SELECT value FROM json_each(?)) RETURNING seq",
            (now, now, message.id, reader.id, _MESSAGE_EVENTS_JSON),
        ).fetchall()
        if acked:
            conn.execute(
                "UPDATE mailboxes SET pending_count = pending_count - ? WHERE agent_id = ?",
                (len(acked), reader.id),
            )
        if message.thread_id is None:
            # "last_read_id < ?" is what keeps the pointer from moving back.
            if message.channel_id is not None:
                conn.execute(
                    "UPDATE channel_members SET last_read_id = ?, last_read_at = ?"
                    " WHERE channel_id = ? AND agent_id = ?"
                    " AND (last_read_id IS NULL OR last_read_id < ?)",
                    (message.id, now, message.channel_id, reader.id, message.id),
                )
            else:
                conn.execute(
                    "UPDATE conversation_participants SET last_read_id = ?, last_read_at = ?"
                    " WHERE conversation_id = ? AND agent_id = ?"
                    " AND (last_read_id IS NULL OR last_read_id < ?)",
                    (message.id, now, message.conversation_id, reader.id, message.id),
                )
        if first:
            author = message.author_id
            tell = (
                [author]
                if author is not None and author != reader.id and message.author_active
                else []
            )
            record_event(
                tx, workspace_id=self.workspace_id, event_type="message.read",
                data=ReadNotice(
                    message_id=str(message.id), agent_id=str(reader.id), agent_name=reader.name,
                    read_at=iso(now) or "", channel=message.channel_name,
                    conversation_id=(
                        None if message.conversation_id is None else str(message.conversation_id)
                    ),
                ),
                recipients=tell, message_id=message.id, channel_id=message.channel_id,
                conversation_id=message.conversation_id, agent_id=reader.id,
            )
        return ReadReceipt(
            message_id=str(message.id), agent_id=str(reader.id), read_at=iso(read_at) or "",
            already_read=not first,
        )


def readers(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, message_id: str
) -> list[ReaderInfo]:
    """Who has read a message the agent (or OWNER) can see, first reader first.

    Raises agent_not_found, message_not_found.
    """
    if agent_id is not OWNER:
        require_agent(conn, workspace_id, agent_id)
    message = require_visible_message(conn, workspace_id, agent_id, message_id)
    rows = conn.execute(
        "SELECT r.agent_id, a.name, r.read_at FROM read_receipts r"
        " JOIN agents a ON a.id = r.agent_id WHERE r.message_id = ? ORDER BY r.read_at, a.name",
        (message.id,),
    ).fetchall()
    return [
        ReaderInfo(agent_id=str(r[0]), agent_name=cast(str, r[1]),
                   read_at=iso(cast(int, r[2])) or "")
        for r in rows
    ]


def channel_read_status(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, channel: str
) -> list[ChannelReadStatus]:
    """Each member's last-read pointer in a channel the agent is a member of (OWNER: any), by name.

    Raises agent_not_found, channel_not_found, not_a_member.
    """
    found = require_readable_channel(conn, workspace_id, agent_id, channel)
    rows = conn.execute(
        "SELECT a.name, m.last_read_id, m.last_read_at FROM channel_members m"
        " JOIN agents a ON a.id = m.agent_id WHERE m.channel_id = ? ORDER BY a.name",
        (found.id,),
    ).fetchall()
    return [
        ChannelReadStatus(
            agent_name=cast(str, r[0]), last_read_id=None if r[1] is None else str(r[1]),
            last_read_at=iso(cast("int | None", r[2])),
        )
        for r in rows
    ]

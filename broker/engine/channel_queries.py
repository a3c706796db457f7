"""Reads of channels, channel history, single messages and threads (run on the reader pool).

Who may see a message is decided in one place, `require_visible_message`:
a message of a channel is visible to the channel's current members, a
message of a DM or group DM conversation to its active participants (not
those who left). Everything else, including a message of another workspace,
is `message_not_found`, so an error never tells an outsider that the id
exists. The write commands (thread reply, reactions, mark read) use the
same function inside the writer's transaction. The workspace's owner (its
key: `OWNER`, no agent, in the reads) sees every message of its workspace,
and still nothing of another.

Channel history is for members only (`not_a_member` otherwise), although
channels are public and anyone in the workspace may join: reading is what
membership is for, and the same rule keeps search, history and the thread
reads consistent (an agent reads what it could be delivered). An agent that
wants the history joins first; `get_channel` and `list_channels` describe a
channel to any agent of the workspace without its messages. The owner (the
workspace key) reads every channel's history, archived ones too.

Pages: cursors are message ids (exclusive bounds; they need not exist).
Channel history comes newest first; with `after` the page is the `limit`
messages right after that cursor (below `before`, if given too), still
returned newest first, so a client can page forward to catch up. Thread
replies come oldest first.
"""

from __future__ import annotations

from typing import Any, cast

import apsw
import msgspec

from broker.engine import validation
from broker.engine.errors import BrokerError
from broker.engine.history import cursor, load_messages, page_limit, top_level_page
from broker.engine.lookups import ChannelRow, require_agent, require_channel
from protocol.objects import Channel, ChannelMember, Message, Thread, iso

_metadata_decoder = msgspec.json.Decoder(dict[str, Any])


class MessageRow(msgspec.Struct, frozen=True):
    """A message as the write paths need it: where it lives, who wrote it."""

    id: int
    channel_id: int | None
    channel_name: str | None
    channel_archived: bool
    conversation_id: int | None
    thread_id: int | None
    author_id: int | None
    author_active: bool

    @property
    def root_id(self) -> int:
        """The thread root: the message itself unless it is a reply."""
        return self.id if self.thread_id is None else self.thread_id


# The reader of a query that is the workspace's owner (its key), not an agent.
OWNER = None


def require_visible_message(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, message_id: str | int
) -> MessageRow:
    """The message `message_id` of this workspace, if `agent_id` may see it (OWNER: any).

    Raises BrokerError("message_not_found") for a malformed or unknown id, a
    message of another workspace, or one the agent may not see.
    """
    mid = validation.parse_id(message_id, "message_not_found", "message")
    row = conn.execute(
        "SELECT m.id, m.channel_id, c.name, c.archived_at IS NOT NULL, m.conversation_id,"
        " m.thread_id, m.agent_id, a.id IS NOT NULL AND a.deactivated_at IS NULL"
        " FROM messages m LEFT JOIN channels c ON c.id = m.channel_id"
        " LEFT JOIN agents a ON a.id = m.agent_id"
        " WHERE m.id = ?1 AND m.workspace_id = ?2 AND (?3 IS NULL"
        "  OR EXISTS (SELECT 1 FROM channel_members cm"
        "          WHERE cm.channel_id = m.channel_id AND cm.agent_id = ?3)"
        "  OR EXISTS (SELECT 1 FROM conversation_participants p"
        "          WHERE p.conversation_id = m.conversation_id AND p.agent_id = ?3"
        "          AND p.left_at IS NULL))",
        (mid, workspace_id, agent_id),
    ).fetchone()
    if row is None:
        raise BrokerError("message_not_found", f"message {message_id!r} not found")
    return MessageRow(
        id=int(row[0]),
        channel_id=cast("int | None", row[1]),
        channel_name=cast("str | None", row[2]),
        channel_archived=bool(row[3]),
        conversation_id=cast("int | None", row[4]),
        thread_id=cast("int | None", row[5]),
        author_id=cast("int | None", row[6]),
        author_active=bool(row[7]),
    )


def refuse_archived(message: MessageRow) -> None:
    """Raise channel_archived if the message lives in an archived channel (writes only)."""
    if message.channel_archived:
        raise BrokerError("channel_archived", f"channel {message.channel_name!r} is archived")


# -- channels ------------------------------------------------------------------------

_CHANNEL_COLUMNS = (
    "SELECT c.id, c.name, c.topic, c.metadata, c.created_by, c.created_at,"
    " c.archived_at IS NOT NULL,"
    " (SELECT count(*) FROM channel_members m WHERE m.channel_id = c.id)"
    " FROM channels c"
)


def _channel(row: apsw.SQLiteValues) -> Channel:
    (channel_id, name, topic, metadata, created_by, created_at, archived, members) = row
    return Channel(
        id=str(channel_id), name=cast(str, name), topic=cast("str | None", topic),
        metadata=_metadata_decoder.decode(cast(str, metadata)),
        created_by=None if created_by is None else str(created_by),
        created_at=iso(cast(int, created_at)) or "", is_archived=bool(archived),
        member_count=cast(int, members),
    )


def channel_by_id(conn: apsw.Connection, channel_id: int) -> Channel:
    """The wire Channel for a channel id the caller already resolved (no members list)."""
    row = conn.execute(_CHANNEL_COLUMNS + " WHERE c.id = ?", (channel_id,)).fetchone()
    if row is None:
        raise BrokerError("channel_not_found", f"channel {channel_id} not found")
    return _channel(row)


def list_channels(
    conn: apsw.Connection, workspace_id: int, include_archived: bool = False
) -> list[Channel]:
    """The workspace's channels by name, with member_count; archived ones only on request."""
    rows = conn.execute(
        _CHANNEL_COLUMNS + " WHERE c.workspace_id = ? AND (? OR c.archived_at IS NULL)"
        " ORDER BY c.name",
        (workspace_id, include_archived),
    ).fetchall()
    return [_channel(r) for r in rows]


def channel_members(conn: apsw.Connection, workspace_id: int, name: str) -> list[ChannelMember]:
    """The members of channel `name`, by join time. Raises channel_not_found."""
    channel = require_channel(conn, workspace_id, name)
    rows = conn.execute(
        "SELECT m.agent_id, a.name, m.role, m.joined_at, m.muted"
        " FROM channel_members m JOIN agents a ON a.id = m.agent_id"
        " WHERE m.channel_id = ? ORDER BY m.joined_at, a.name",
        (channel.id,),
    ).fetchall()
    return [
        ChannelMember(agent_id=str(r[0]), agent_name=cast(str, r[1]), role=cast(str, r[2]),
                      joined_at=iso(cast(int, r[3])) or "", is_muted=bool(r[4]))
        for r in rows
    ]


def get_channel(conn: apsw.Connection, workspace_id: int, name: str) -> Channel:
    """Channel `name` with its members. Raises channel_not_found."""
    channel = require_channel(conn, workspace_id, name)
    result = channel_by_id(conn, channel.id)
    result.members = channel_members(conn, workspace_id, name)
    return result


# -- messages ------------------------------------------------------------------------


def require_readable_channel(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, channel: str
) -> ChannelRow:
    """Channel `channel`, if the reader may read its messages (a member; OWNER: any).

    Raises agent_not_found, channel_not_found, not_a_member.
    """
    if agent_id is OWNER:
        return require_channel(conn, workspace_id, channel)
    require_agent(conn, workspace_id, agent_id)
    found = require_channel(conn, workspace_id, channel, agent_id)
    if not found.is_member:
        raise BrokerError("not_a_member", f"you are not a member of channel {found.name!r}")
    return found


def channel_messages(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, channel: str,
    before: str | None = None, after: str | None = None, limit: int | None = None,
) -> list[Message]:
    """A page of a channel's top-level messages, newest first (replies are in threads).

    agent_id: the reader, or OWNER (any channel of the workspace, archived too).
    Raises agent_not_found, channel_not_found, not_a_member, invalid_limit,
    invalid_cursor (a cursor that is not an id).
    """
    size = page_limit(limit)
    low, high = cursor(after), cursor(before)
    found = require_readable_channel(conn, workspace_id, agent_id, channel)
    return top_level_page(conn, "channel_id", found.id, low, high, size)


def get_message(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, message_id: str
) -> Message:
    """One message the agent (or OWNER) may see. Raises message_not_found."""
    found = require_visible_message(conn, workspace_id, agent_id, message_id)
    (message,) = load_messages(conn, [found.id])
    return message


def get_thread(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, message_id: str,
    before: str | None = None, after: str | None = None, limit: int | None = None,
) -> Thread:
    """The thread of `message_id` (a root or any reply): the root and a page of replies.

    Replies come oldest first: the first `limit` after `after` (or from the
    start), or with only `before`, the `limit` replies just before it.
    Raises message_not_found, invalid_limit, invalid_cursor.
    """
    size = page_limit(limit)
    low, high = cursor(after), cursor(before)
    found = require_visible_message(conn, workspace_id, agent_id, message_id)
    root = found.root_id
    sql = "SELECT id FROM messages WHERE thread_id = ? AND id > ? AND id < ?"
    bounds = (root, -1 if low is None else low, 2**63 - 1 if high is None else high)
    if high is not None and low is None:
        ids = [r[0] for r in conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*bounds, size))]
        ids.reverse()
    else:
        ids = [r[0] for r in conn.execute(sql + " ORDER BY id LIMIT ?", (*bounds, size))]
    parent, *replies = load_messages(conn, [root, *cast("list[int]", ids)])
    return Thread(parent=parent, replies=replies)

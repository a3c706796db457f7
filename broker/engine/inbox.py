"""The inbox of an agent: what needs its attention, in one read.

- unread_channels: per channel the agent is a member of (archived ones
  left out: nothing new can arrive there), the messages newer than its
  last-read pointer and than its joining, not written by itself. Thread
  replies count as well as top-level messages: the pointer is per channel,
  and a reply that arrived after it has not been read either.
- unread_dms: the same count per 1:1 and group conversation it is an
  active participant of (`conversations.unread_conversations`), with the
  newest unread message and its author.
- mentions: the newest unread messages of its channels whose resolved
  mentions (the `mentions` JSON list of names written at send time) contain
  the agent's name. Unread is what makes it an inbox: a mention the agent
  has read (its pointer moved past it) is no longer news.
- recent_reactions: the newest reactions by other agents to messages the
  agent wrote, read or not (reactions have no read pointer).

Joining is the floor for unread: messages from before an agent joined are
history, not news, and without the floor a newcomer to a busy channel would
start with its whole past as unread. The floor has the resolution of
`joined_at`, a millisecond: a message of the joining millisecond counts as
unread (so does the first DM, written in the transaction that creates its
conversation), which errs on the side of showing news.
"""

from __future__ import annotations

from typing import cast

import apsw

from broker.engine.conversations import last_message, unread_conversations, unread_floor_sql
from broker.engine.history import load_messages, page_limit
from broker.engine.lookups import require_agent
from protocol.objects import (
    Inbox,
    InboxMention,
    InboxReaction,
    UnreadChannel,
    UnreadDm,
    iso,
)

# Mentions and reactions listed: the default and the most a caller may ask for.
DEFAULT_RECENT = 20
MAX_RECENT = 100

# CROSS JOIN pins the plan: from the agent's memberships to each channel's
# range of new messages (messages_channel_all). With statistics from
# `PRAGMA optimize`, the planner may otherwise scan all messages outermost.
_MY_UNREAD_CHANNEL_MESSAGES = (
    " FROM channel_members cm"
    " CROSS JOIN channels c ON c.id = cm.channel_id AND c.archived_at IS NULL"
    " CROSS JOIN messages m ON m.channel_id = cm.channel_id"
    f" AND m.id >= {unread_floor_sql('cm.last_read_id', 'cm.joined_at')}"
    " AND m.agent_id IS NOT cm.agent_id"
    " WHERE cm.agent_id = ?"
)


def inbox(
    conn: apsw.Connection, workspace_id: int, agent_id: int, limit: int | None = None
) -> Inbox:
    """Unread counts per channel and conversation, unread mentions, recent reactions.

    limit: how many mentions and how many reactions (default DEFAULT_RECENT,
    at most MAX_RECENT). Raises agent_not_found, invalid_limit.
    """
    size = page_limit(limit, DEFAULT_RECENT, MAX_RECENT)
    agent = require_agent(conn, workspace_id, agent_id)
    return Inbox(
        unread_channels=_unread_channels(conn, agent.id),
        mentions=_mentions(conn, agent.id, agent.name, size),
        unread_dms=_unread_dms(conn, workspace_id, agent.id),
        recent_reactions=_reactions(conn, workspace_id, agent.id, size),
    )


def _unread_channels(conn: apsw.Connection, agent_id: int) -> list[UnreadChannel]:
    rows = conn.execute(
        "SELECT c.id, c.name, count(m.id)" + _MY_UNREAD_CHANNEL_MESSAGES
        + " GROUP BY c.id ORDER BY c.name",
        (agent_id,),
    ).fetchall()
    return [
        UnreadChannel(channel_id=str(r[0]), channel_name=cast(str, r[1]),
                      unread_count=cast(int, r[2]))
        for r in rows
    ]


def _mentions(
    conn: apsw.Connection, agent_id: int, name: str, size: int
) -> list[InboxMention]:
    ids = [
        cast(int, r[0])
        for r in conn.execute(
            "SELECT m.id" + _MY_UNREAD_CHANNEL_MESSAGES
            + " AND m.mentions IS NOT NULL"
            " AND EXISTS (SELECT 1 FROM json_each(m.mentions) j WHERE j.value = ?)"
            " ORDER BY m.id DESC LIMIT ?",
            (agent_id, name, size),
        )
    ]
    return [
        InboxMention(id=m.id, channel_name=m.channel_name or "", agent_name=m.agent_name,
                     text=m.text, created_at=m.created_at)
        for m in load_messages(conn, ids)
    ]


def _unread_dms(conn: apsw.Connection, workspace_id: int, agent_id: int) -> list[UnreadDm]:
    unread = unread_conversations(conn, workspace_id, agent_id)
    if not unread:
        return []
    newest = {
        int(m.id): m
        for m in load_messages(
            conn, [u.newest_unread_id for u in unread.values() if u.newest_unread_id is not None]
        )
    }
    result: list[UnreadDm] = []
    for u in sorted(unread.values(), key=lambda u: u.newest_unread_id or 0, reverse=True):
        message = None if u.newest_unread_id is None else newest.get(u.newest_unread_id)
        result.append(UnreadDm(
            conversation_id=str(u.conversation_id), type=u.type, name=u.name,
            from_=None if message is None else message.agent_name,
            unread_count=u.count,
            last_message=None if message is None else last_message(message),
        ))
    return result


def _reactions(
    conn: apsw.Connection, workspace_id: int, agent_id: int, size: int
) -> list[InboxReaction]:
    rows = conn.execute(
        "SELECT r.message_id, c.name, m.conversation_id, r.emoji, a.name, r.created_at"
        " FROM messages m JOIN reactions r ON r.message_id = m.id"
        " JOIN agents a ON a.id = r.agent_id LEFT JOIN channels c ON c.id = m.channel_id"
        " WHERE m.agent_id = ? AND m.workspace_id = ? AND r.agent_id <> ?"
        " ORDER BY r.id DESC LIMIT ?",
        (agent_id, workspace_id, agent_id, size),
    ).fetchall()
    return [
        InboxReaction(
            message_id=str(r[0]), channel_name=cast("str | None", r[1]),
            conversation_id=None if r[2] is None else str(r[2]), emoji=cast(str, r[3]),
            agent_name=cast(str, r[4]), created_at=iso(cast(int, r[5])) or "",
        )
        for r in rows
    ]

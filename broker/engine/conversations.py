"""1:1 DMs and group DMs: the send paths, group membership, and the conversation reads.

A 1:1 conversation is created by the first message between two agents,
inside that message's command: the pair is stored sorted (`agent_lo <
agent_hi`) under a unique index, so two first messages racing each other
cannot make two conversations (the writer applies them one after the other,
and the second finds the first's row). The conversation row, both
participant rows, the message, the recipient's delivery, the message-log row
and the idempotency record commit together or not at all.

A group DM is created explicitly (conversation + participants in one
command). Its creator is always a participant; at least MIN_GROUP_OTHERS
other agents are required (with one other agent, a 1:1 DM is the right
tool), and at most MAX_GROUP_PARTICIPANTS in all. Leaving is soft
(`left_at`): the row stays for history, but an agent that left receives no
more deliveries and loses read access, like a channel member who left. Any
active participant may add or remove participants (groups are flat, like
channels); removing oneself is leaving.

Conversation ids are checked against the caller's workspace and its
participation: an id of another workspace is `conversation_not_found`; a
conversation of the workspace the caller is not (or no longer) in is
`not_a_participant`. Membership operations on a 1:1 conversation, and
group sends to one, are `not_a_group_dm`.

Unread counts (here and in the inbox) count every message of the
conversation, top-level and thread replies, that is newer than the
participant's last-read pointer and than its joining, and not written by
the participant itself: the pointer is per conversation, so a reply that
arrived after it is as unread as a new top-level message.
"""

from __future__ import annotations

from typing import Literal, cast

import apsw
import msgspec

from broker.engine import validation
from broker.engine.errors import BrokerError
from broker.engine.events import emit_ephemeral
from broker.engine.history import MAX_LIMIT, cursor, load_messages, page_limit, top_level_page
from broker.engine.idempotency import once
from broker.engine.ids import COUNTER_BITS
from broker.engine.lookups import AgentRow, agent_by_name, require_agent
from broker.engine.messages import (
    Checked,
    Send,
    conversation_recipients,
    post_message,
    resolve_attachments,
    sender,
)
from broker.engine.writer import Tx
from protocol.objects import (
    ConversationParticipant,
    DmConversationSummary,
    DmLastMessage,
    GroupDm,
    Message,
    ParticipantAdded,
    ParticipantRemoved,
    iso,
)

# A group DM: the creator and at least this many others.
MIN_GROUP_OTHERS = 2
# Participants of a group DM at most, the creator included (every send
# writes one delivery per participant, so the bound is on the fan-out).
MAX_GROUP_PARTICIPANTS = 100
GROUP_NAME_MAX_CHARS = 80

ConversationType = Literal["1:1", "group"]
CONVERSATION_TYPES: dict[str, ConversationType] = {"dm": "1:1", "group": "group"}

_encoder = msgspec.json.Encoder()


class ConversationRow(msgspec.Struct, frozen=True):
    """A conversation as the commands need it, with the caller's participation."""

    id: int
    kind: str
    name: str | None
    created_at: int
    is_participant: bool


def require_conversation(
    conn: apsw.Connection, workspace_id: int, conversation_id: str | int, agent_id: int | None
) -> ConversationRow:
    """The conversation `conversation_id` of this workspace, with `agent_id`'s participation.

    Raises conversation_not_found (malformed id, unknown, or another workspace's).
    """
    cid = validation.parse_id(conversation_id, "conversation_not_found", "conversation")
    row = conn.execute(
        "SELECT c.id, c.kind, c.name, c.created_at, p.agent_id IS NOT NULL"
        " FROM conversations c LEFT JOIN conversation_participants p"
        " ON p.conversation_id = c.id AND p.agent_id = ? AND p.left_at IS NULL"
        " WHERE c.id = ? AND c.workspace_id = ?",
        (agent_id, cid, workspace_id),
    ).fetchone()
    if row is None:
        raise BrokerError("conversation_not_found", f"conversation {conversation_id!r} not found")
    return ConversationRow(int(row[0]), cast(str, row[1]), cast("str | None", row[2]),
                           int(row[3]), bool(row[4]))


def require_participant(
    conn: apsw.Connection, workspace_id: int, conversation_id: str | int, agent_id: int
) -> ConversationRow:
    """As require_conversation, and the agent must be an active participant (not_a_participant)."""
    return _participating(require_conversation(conn, workspace_id, conversation_id, agent_id))


def _participating(conversation: ConversationRow) -> ConversationRow:
    if not conversation.is_participant:
        raise BrokerError(
            "not_a_participant", f"you are not a participant of conversation {conversation.id}"
        )
    return conversation


def _require_group(
    conn: apsw.Connection, workspace_id: int, conversation_id: str, agent_id: int
) -> ConversationRow:
    """A group DM the agent is an active participant of.

    Raises conversation_not_found, not_a_group_dm, not_a_participant.
    """
    conversation = require_conversation(conn, workspace_id, conversation_id, agent_id)
    if conversation.kind != "group":
        raise BrokerError(
            "not_a_group_dm", f"conversation {conversation.id} is a 1:1 DM, not a group DM"
        )
    return _participating(conversation)


def _group_name(name: str | None) -> str | None:
    if name is not None and (not name.strip() or len(name) > GROUP_NAME_MAX_CHARS):
        raise BrokerError(
            "invalid_conversation_name",
            f"a group DM name is 1-{GROUP_NAME_MAX_CHARS} characters and not blank",
        )
    return name


def _active_participants(conn: apsw.Connection, conversation_id: int) -> list[AgentRow]:
    rows = conn.execute(
        "SELECT a.id, a.name, a.type, a.workspace_id FROM conversation_participants p"
        " JOIN agents a ON a.id = p.agent_id"
        " WHERE p.conversation_id = ? AND p.left_at IS NULL ORDER BY p.joined_at, a.name",
        (conversation_id,),
    ).fetchall()
    return [AgentRow(cast(int, r[0]), cast(str, r[1]), cast(str, r[2]), cast(int, r[3]))
            for r in rows]


# -- 1:1 DMs -------------------------------------------------------------------------


class SendDm(Send, frozen=True, kw_only=True):
    """Send a direct message to the agent called `to`; the conversation is made on first use.

    The recipient gets one `dm.received` delivery (none if its mailbox is
    full: it is then named in the result's `mailbox_full`). A retry with
    the idempotency key of an earlier send returns that send's result even
    if the recipient was deactivated since.
    Raises invalid_text, text_too_long, invalid_mode, invalid_data,
    data_too_large, invalid_idempotency_key, idempotency_key_reused,
    agent_not_found (sender or recipient), cannot_dm_self, file_not_found,
    file_not_complete.
    """

    to: str

    def apply_checked(self, tx: Tx, checked: Checked) -> Message:
        conn = tx.conn
        text, mode, data = checked

        def send() -> Message:
            author = sender(tx, self.workspace_id, self.agent_id)
            recipient = agent_by_name(conn, self.workspace_id, self.to)
            if recipient.id == author.id:
                raise BrokerError("cannot_dm_self", "you cannot send a direct message to yourself")
            # Reads first: a missing file fails before anything is written.
            attachments = resolve_attachments(conn, self.workspace_id, self.attachments)
            return post_message(
                tx, event_type="dm.received", workspace_id=self.workspace_id, author=author,
                text=text, mode=mode, data=self.data, stored_data=data, attachments=attachments,
                recipients=lambda _: [recipient.id],
                conversation_id=_dm_conversation(tx, self.workspace_id, author.id, recipient.id),
            )

        return once(
            tx, agent_id=self.agent_id, key=self.idempotency_key, operation="dm.send",
            request=self, result_type=Message, run=send,
        )


def _dm_conversation(tx: Tx, workspace_id: int, sender: int, recipient: int) -> int:
    """The 1:1 conversation of the pair, created (with both participants) if it is new."""
    conn, now = tx.conn, tx.now_ms
    lo, hi = sorted((sender, recipient))
    row = conn.execute(
        "SELECT id FROM conversations"
        " WHERE workspace_id = ? AND kind = 'dm' AND agent_lo = ? AND agent_hi = ?",
        (workspace_id, lo, hi),
    ).fetchone()
    if row is not None:
        return int(row[0])
    conversation_id = tx.new_id()
    conn.execute(
        "INSERT INTO conversations(id, workspace_id, kind, agent_lo, agent_hi, created_by,"
        " created_at) VALUES (?,?,'dm',?,?,?,?)",
        (conversation_id, workspace_id, lo, hi, sender, now),
    )
    conn.executemany(
        "INSERT INTO conversation_participants(conversation_id, agent_id, joined_at)"
        " VALUES (?,?,?)",
        [(conversation_id, lo, now), (conversation_id, hi, now)],
    )
    return conversation_id


# -- group DMs -----------------------------------------------------------------------


class CreateGroupDm(msgspec.Struct, frozen=True, kw_only=True):
    """Create a group DM of the caller and the agents named in `participants`.

    Names are de-duplicated and the caller's own name is ignored; at least
    MIN_GROUP_OTHERS others, at most MAX_GROUP_PARTICIPANTS in all.
    Raises agent_not_found, invalid_conversation_name, too_few_participants,
    too_many_participants.
    """

    workspace_id: int
    agent_id: int
    participants: list[str]
    name: str | None = None

    def apply(self, tx: Tx) -> GroupDm:
        conn, now = tx.conn, tx.now_ms
        name = _group_name(self.name)
        creator = require_agent(conn, self.workspace_id, self.agent_id)
        wanted = list(dict.fromkeys(n for n in self.participants if n != creator.name))
        if len(wanted) + 1 > MAX_GROUP_PARTICIPANTS:
            raise BrokerError("too_many_participants",
                              f"a group DM has at most {MAX_GROUP_PARTICIPANTS} participants")
        if len(wanted) < MIN_GROUP_OTHERS:
            raise BrokerError(
                "too_few_participants",
                f"a group DM needs at least {MIN_GROUP_OTHERS} other agents; "
                "send a DM to talk to one",
            )
        members = [creator, *(agent_by_name(conn, self.workspace_id, n) for n in wanted)]
        conversation_id = tx.new_id()
        conn.execute(
            "INSERT INTO conversations(id, workspace_id, kind, name, created_by, created_at)"
            " VALUES (?,?,'group',?,?,?)",
            (conversation_id, self.workspace_id, name, creator.id, now),
        )
        conn.executemany(
            "INSERT INTO conversation_participants(conversation_id, agent_id, joined_at)"
            " VALUES (?,?,?)",
            [(conversation_id, m.id, now) for m in members],
        )
        group = GroupDm(
            id=str(conversation_id), name=name,
            participants=[ConversationParticipant(agent_id=str(m.id), agent_name=m.name)
                          for m in members],
            created_by=str(creator.id), created_at=iso(now) or "",
        )
        emit_ephemeral(tx, workspace_id=self.workspace_id, event_type="group_dm.created",
                       data=group, audience=[m.id for m in members])
        return group


class SendGroupDm(Send, frozen=True, kw_only=True):
    """Post to a group DM the caller is an active participant of.

    Every other active participant (deactivated agents excepted) gets one
    `group_dm.received` delivery; those with a full mailbox get none and
    are named in `mailbox_full`. A retry with the idempotency key of an
    earlier send returns that send's result even if the caller left since.
    Raises the validation codes of SendDm, conversation_not_found,
    not_a_group_dm, not_a_participant.
    """

    conversation_id: str

    def apply_checked(self, tx: Tx, checked: Checked) -> Message:
        conn = tx.conn
        text, mode, data = checked

        def send() -> Message:
            author = sender(tx, self.workspace_id, self.agent_id)
            conversation = _require_group(conn, self.workspace_id, self.conversation_id,
                                          author.id)
            return post_message(
                tx, event_type="group_dm.received", workspace_id=self.workspace_id,
                author=author, text=text, mode=mode, data=self.data, stored_data=data,
                attachments=resolve_attachments(conn, self.workspace_id, self.attachments),
                recipients=lambda _: conversation_recipients(conn, conversation.id, author.id),
                conversation_id=conversation.id,
            )

        return once(
            tx, agent_id=self.agent_id, key=self.idempotency_key, operation="group_dm.send",
            request=self, result_type=Message, run=send,
        )


class AddParticipant(msgspec.Struct, frozen=True, kw_only=True):
    """Add the agent called `agent` to a group DM (an agent that left rejoins).

    Adding an active participant changes nothing (already_member=True).
    Raises agent_not_found, conversation_not_found, not_a_group_dm,
    not_a_participant (the caller), too_many_participants.
    """

    workspace_id: int
    agent_id: int
    conversation_id: str
    agent: str

    def apply(self, tx: Tx) -> ParticipantAdded:
        conn, now = tx.conn, tx.now_ms
        caller = require_agent(conn, self.workspace_id, self.agent_id)
        conversation = _require_group(conn, self.workspace_id, self.conversation_id, caller.id)
        target = agent_by_name(conn, self.workspace_id, self.agent)
        active = _active_participants(conn, conversation.id)
        if any(p.id == target.id for p in active):
            return ParticipantAdded(conversation_id=str(conversation.id), agent=target.name,
                                    already_member=True)
        if len(active) >= MAX_GROUP_PARTICIPANTS:
            raise BrokerError("too_many_participants",
                              f"a group DM has at most {MAX_GROUP_PARTICIPANTS} participants")
        # A rejoining agent keeps its row (and read pointer); joined_at moves
        # so that what it missed while away is not counted as unread.
        conn.execute(
            "INSERT INTO conversation_participants(conversation_id, agent_id, joined_at)"
            " VALUES (?,?,?) ON CONFLICT (conversation_id, agent_id)"
            " DO UPDATE SET left_at = NULL, joined_at = excluded.joined_at",
            (conversation.id, target.id, now),
        )
        emit_ephemeral(
            tx, workspace_id=self.workspace_id, event_type="group_dm.participant_added",
            data={"conversation_id": str(conversation.id), "agent_id": str(target.id),
                  "agent_name": target.name, "added_by": caller.name},
            audience=[*(p.id for p in active), target.id],
        )
        return ParticipantAdded(conversation_id=str(conversation.id), agent=target.name,
                                already_member=False)


class RemoveParticipant(msgspec.Struct, frozen=True, kw_only=True):
    """Remove the agent called `agent` from a group DM (soft: `left_at` is set).

    Removing an agent that is not an active participant changes nothing
    (removed=False). Raises agent_not_found, conversation_not_found,
    not_a_group_dm, not_a_participant (the caller).
    """

    workspace_id: int
    agent_id: int
    conversation_id: str
    agent: str

    def apply(self, tx: Tx) -> ParticipantRemoved:
        conn, now = tx.conn, tx.now_ms
        caller = require_agent(conn, self.workspace_id, self.agent_id)
        conversation = _require_group(conn, self.workspace_id, self.conversation_id, caller.id)
        target = agent_by_name(conn, self.workspace_id, self.agent)
        active = _active_participants(conn, conversation.id)
        if not any(p.id == target.id for p in active):
            return ParticipantRemoved(conversation_id=str(conversation.id), agent=target.name,
                                      removed=False)
        conn.execute(
            "UPDATE conversation_participants SET left_at = ?"
            " WHERE conversation_id = ? AND agent_id = ?",
            (now, conversation.id, target.id),
        )
        emit_ephemeral(
            tx, workspace_id=self.workspace_id, event_type="group_dm.participant_removed",
            data={"conversation_id": str(conversation.id), "agent_id": str(target.id),
                  "agent_name": target.name, "removed_by": caller.name},
            audience=[p.id for p in active],
        )
        return ParticipantRemoved(conversation_id=str(conversation.id), agent=target.name,
                                  removed=True)


# -- queries (run on the reader pool) ---------------------------------------------


class UnreadConversation(msgspec.Struct, frozen=True):
    """Unread state of one conversation for one participant (shared with the inbox)."""

    conversation_id: int
    type: ConversationType
    name: str | None
    count: int
    newest_unread_id: int | None


def unread_floor_sql(last_read: str, joined_at: str) -> str:
    """SQL for the smallest message id that can be unread for a member or participant.

    Newer than the last-read pointer, and created at or after joining: ids
    are time-ordered (`ms << COUNTER_BITS | counter`), so `joined_at <<
    COUNTER_BITS` is the first id of the joining millisecond, and a message
    written in the joining transaction itself is counted.
    """
    return f"max(coalesce({last_read}, 0) + 1, {joined_at} << {COUNTER_BITS})"


def unread_conversations(
    conn: apsw.Connection, workspace_id: int, agent_id: int
) -> dict[int, UnreadConversation]:
    """Per active conversation of the agent: unread messages and the newest unread one.

    CROSS JOIN pins the plan (participations, then each conversation's
    range of new messages in messages_conversation_all) whatever the
    planner's statistics say.
    """
    rows = conn.execute(
        "SELECT p.conversation_id, c.kind, c.name, count(m.id), max(m.id)"
        " FROM conversation_participants p"
        " CROSS JOIN conversations c ON c.id = p.conversation_id AND c.workspace_id = ?"
        " CROSS JOIN messages m ON m.conversation_id = p.conversation_id"
        f" AND m.id >= {unread_floor_sql('p.last_read_id', 'p.joined_at')}"
        " AND m.agent_id IS NOT p.agent_id"
        " WHERE p.agent_id = ? AND p.left_at IS NULL GROUP BY p.conversation_id",
        (workspace_id, agent_id),
    ).fetchall()
    return {
        cast(int, r[0]): UnreadConversation(
            cast(int, r[0]), CONVERSATION_TYPES[cast(str, r[1])], cast("str | None", r[2]),
            cast(int, r[3]), cast("int | None", r[4]))
        for r in rows
    }


def last_message(message: Message) -> DmLastMessage:
    """The summary of a message shown in conversation lists and the inbox."""
    return DmLastMessage(id=message.id, text=message.text, agent_id=message.agent_id,
                         agent_name=message.agent_name, created_at=message.created_at)


def dm_conversations(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, member: str | None = None,
    before: str | None = None, limit: int | None = None,
) -> list[DmConversationSummary]:
    """The reader's 1:1 and group conversations, most recent activity first.

    agent_id: the reader, or None for the workspace's owner, who sees every
    conversation of the workspace (or, with `member`, those the agent of that
    name is an active participant of) with an unread count of 0.
    A conversation's activity is the id of its newest top-level message, or
    its own id while it has none (both are time-ordered ids). before: only
    conversations whose activity is below it (a page's last activity);
    limit: at most this many (1..MAX_LIMIT; None: all of them).
    Each has its active participants, its newest top-level message and the
    agent's unread count. Raises agent_not_found, invalid_cursor, invalid_limit.
    """
    size = None if limit is None else page_limit(limit, maximum=MAX_LIMIT)
    below = cursor(before)
    if agent_id is not None:
        require_agent(conn, workspace_id, agent_id)
        participant: int | None = agent_id
    elif member is not None:
        participant = agent_by_name(conn, workspace_id, member).id
    else:
        participant = None
    # Every conversation of the workspace (conversations_workspace), or one
    # agent's participations (conversation_participants_agent).
    source = (
        "FROM conversations c WHERE c.workspace_id = ?1"
        if participant is None else
        "FROM conversation_participants p JOIN conversations c ON c.id = p.conversation_id"
        " WHERE p.agent_id = ?2 AND p.left_at IS NULL AND c.workspace_id = ?1"
    )
    rows = conn.execute(
        "SELECT id, kind, name, created_at, last FROM ("
        " SELECT c.id, c.kind, c.name, c.created_at,"
        " (SELECT max(m.id) FROM messages m"
        "  WHERE m.conversation_id = c.id AND m.thread_id IS NULL) AS last "
        + source + ") WHERE max(id, coalesce(last, 0)) < ?3"
        " ORDER BY max(id, coalesce(last, 0)) DESC LIMIT ?4",
        (workspace_id, participant, 2**63 - 1 if below is None else below,
         -1 if size is None else size),
    ).fetchall()
    if not rows:
        return []
    ids = [cast(int, r[0]) for r in rows]
    participants: dict[int, list[ConversationParticipant]] = {}
    for cid, pid, pname in conn.execute(
        "SELECT p.conversation_id, a.id, a.name FROM conversation_participants p"
        " JOIN agents a ON a.id = p.agent_id"
        " WHERE p.conversation_id IN (SELECT value FROM json_each(?)) AND p.left_at IS NULL"
        " ORDER BY p.conversation_id, p.joined_at, a.name",
        (_encoder.encode(ids).decode(),),
    ):
        participants.setdefault(cast(int, cid), []).append(
            ConversationParticipant(agent_id=str(pid), agent_name=cast(str, pname)))
    last_ids = [cast(int, r[4]) for r in rows if r[4] is not None]
    last = {int(m.id): last_message(m) for m in load_messages(conn, last_ids)}
    unread = {} if agent_id is None else unread_conversations(conn, workspace_id, agent_id)
    return [
        DmConversationSummary(
            id=str(r[0]), type=CONVERSATION_TYPES[cast(str, r[1])], name=cast("str | None", r[2]),
            participants=participants.get(cast(int, r[0]), []),
            last_message=None if r[4] is None else last.get(cast(int, r[4])),
            unread_count=unread[cast(int, r[0])].count if cast(int, r[0]) in unread else 0,
            created_at=iso(cast(int, r[3])) or "",
        )
        for r in rows
    ]


def dm_messages(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, conversation_id: str,
    before: str | None = None, after: str | None = None, limit: int | None = None,
) -> list[Message]:
    """A page of a 1:1 or group conversation's top-level messages, newest first.

    agent_id: the reader (an active participant), or None for the
    workspace's owner (any conversation of the workspace).
    Cursors are message ids (exclusive, need not exist); with `after`, the
    page is the `limit` messages right after it, still newest first (as
    channel history). Raises agent_not_found, conversation_not_found,
    not_a_participant, invalid_limit, invalid_cursor.
    """
    size = page_limit(limit)
    low, high = cursor(after), cursor(before)
    if agent_id is None:
        conversation = require_conversation(conn, workspace_id, conversation_id, None)
    else:
        require_agent(conn, workspace_id, agent_id)
        conversation = require_participant(conn, workspace_id, conversation_id, agent_id)
    return top_level_page(conn, "conversation_id", conversation.id, low, high, size)

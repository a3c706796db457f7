"""Channel messages: the send path and the pieces every send path shares.

A send is one command: the message, its attachment links, one delivery per
recipient, the message-log row and (with a key) the idempotency record
commit together or not at all. Recipients are read inside the transaction,
so membership is as it is at commit time.

Every send path (channel, thread reply, DM, group DM, inbound webhook) has
the same shape: validate the input; look the idempotency key up (`once`);
only then check the domain rules (membership, archived channel, active
recipient) and `post_message`. The key comes before the domain checks so
that a retry returns the first result even when the state has changed
since (the channel archived, the sender gone from it, the recipient
deactivated): the first send did happen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, cast

import apsw
import msgspec

from broker.engine import validation
from broker.engine.config import Limits
from broker.engine.errors import BrokerError
from broker.engine.events import record_event
from broker.engine.idempotency import once
from broker.engine.lookups import AgentRow, require_agent, require_channel
from broker.engine.writer import Tx
from protocol.objects import Attachment, Message, Mode

_encoder = msgspec.json.Encoder()
_id_list = msgspec.json.Decoder(list[int])


def resolve_attachments(
    conn: apsw.Connection, workspace_id: int, file_ids: list[str]
) -> list[tuple[int, Attachment]]:
    """The complete files of this workspace named by `file_ids`, in the order given."""
    resolved: list[tuple[int, Attachment]] = []
    seen: set[int] = set()
    for raw in file_ids:
        file_id = validation.parse_id(raw, "file_not_found", "file")
        if file_id in seen:
            continue
        seen.add(file_id)
        row = conn.execute(
            "SELECT filename, content_type, size_bytes, state FROM files"
            " WHERE id = ? AND workspace_id = ?",
            (file_id, workspace_id),
        ).fetchone()
        if row is None or row[3] == "deleted":
            raise BrokerError("file_not_found", f"file {raw!r} not found")
        if row[3] != "complete":
            raise BrokerError("file_not_complete", f"file {raw!r} has not finished uploading")
        resolved.append(
            (file_id, Attachment(file_id=str(file_id), filename=row[0], content_type=row[1],
                                 size_bytes=int(row[2])))
        )
    return resolved


def resolve_mentions(conn: apsw.Connection, workspace_id: int, text: str) -> list[str]:
    """Names of this workspace's active agents that `text` mentions as `@name`."""
    candidates = validation.mention_candidates(text)
    if not candidates:
        return []
    rows = conn.execute(
        "SELECT name FROM agents WHERE workspace_id = ? AND deactivated_at IS NULL"
        " AND name IN (SELECT value FROM json_each(?))",
        (workspace_id, _encoder.encode(candidates).decode()),
    ).fetchall()
    found = {r[0] for r in rows}
    ordered: list[str] = []
    for name in candidates:
        if name in found and name not in ordered:
            ordered.append(name)
    return ordered


def insert_message(
    tx: Tx,
    *,
    workspace_id: int,
    author: AgentRow,
    text: str,
    mode: str,
    data: str | None,
    mentions: list[str],
    attachments: list[tuple[int, Attachment]],
    channel_id: int | None = None,
    conversation_id: int | None = None,
    thread_id: int | None = None,
) -> int:
    """Insert the message row and its attachment links; returns the new message id."""
    conn = tx.conn
    message_id = tx.new_id()
    conn.execute(
        "INSERT INTO messages(id, workspace_id, channel_id, conversation_id, agent_id, thread_id,"
        " text, data, mode, mentions, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (message_id, workspace_id, channel_id, conversation_id, author.id, thread_id, text,
         data, mode, _encoder.encode(mentions).decode() if mentions else None, tx.now_ms),
    )
    if attachments:
        conn.executemany(
            "INSERT INTO message_attachments(message_id, file_id, position) VALUES (?,?,?)",
            [(message_id, file_id, i) for i, (file_id, _) in enumerate(attachments)],
        )
    return message_id


def names_of(conn: apsw.Connection, agent_ids: tuple[int, ...]) -> list[str]:
    if not agent_ids:
        return []
    rows = conn.execute(
        "SELECT name FROM agents WHERE id IN (SELECT value FROM json_each(?)) ORDER BY name",
        (_encoder.encode(list(agent_ids)).decode(),),
    ).fetchall()
    return [str(r[0]) for r in rows]


def channel_recipients(
    conn: apsw.Connection, channel_id: int, author_id: int, mentions: list[str]
) -> list[int]:
    """Who gets a channel message: every active member but the author; a muted one if mentioned.

    (One JSON row rather than a row per member: each row fetched is a
    step, and every step hands the GIL over; see record_event.)
    """
    return _ids(conn.execute(
        "SELECT json_group_array(m.agent_id) FROM channel_members m"
        " JOIN agents a ON a.id = m.agent_id"
        " WHERE m.channel_id = ? AND m.agent_id <> ? AND a.deactivated_at IS NULL"
        " AND (m.muted = 0 OR a.name IN (SELECT value FROM json_each(?)))",
        (channel_id, author_id, _encoder.encode(mentions).decode()),
    ).fetchone())


def sender(tx: Tx, workspace_id: int, agent_id: int) -> AgentRow:
    """require_agent, read once per batch of sends (Tx.read_once)."""
    return tx.read_once(("agent", workspace_id, agent_id),
                        lambda: require_agent(tx.conn, workspace_id, agent_id))


def members_to_deliver(
    tx: Tx, channel_id: int, author_id: int, mentions: list[str]
) -> tuple[int, ...]:
    """channel_recipients, read once per batch of sends (Tx.read_once)."""
    return tx.read_once(
        ("recipients", channel_id, author_id, tuple(mentions)),
        lambda: tuple(channel_recipients(tx.conn, channel_id, author_id, mentions)))


def conversation_recipients(
    conn: apsw.Connection, conversation_id: int, author_id: int
) -> list[int]:
    """Who gets a DM or group DM message: every active participant but the author."""
    return _ids(conn.execute(
        "SELECT json_group_array(p.agent_id) FROM conversation_participants p"
        " JOIN agents a ON a.id = p.agent_id"
        " WHERE p.conversation_id = ? AND p.agent_id <> ? AND p.left_at IS NULL"
        " AND a.deactivated_at IS NULL",
        (conversation_id, author_id),
    ).fetchone())


def _ids(row: Any) -> list[int]:
    """The ids of a `json_group_array` row (an aggregate always yields one row)."""
    return _id_list.decode(row[0]) if row is not None else []


def post_message(
    tx: Tx,
    *,
    event_type: str,
    workspace_id: int,
    author: AgentRow,
    text: str,
    mode: str,
    data: dict[str, Any] | None,
    stored_data: str | None,
    attachments: list[tuple[int, Attachment]],
    recipients: Callable[[list[str]], Iterable[int]],
    channel_id: int | None = None,
    channel_name: str | None = None,
    conversation_id: int | None = None,
    thread_id: int | None = None,
) -> Message:
    """The write half of every send: message row, deliveries, log row, outbox rows; the Message.

    The caller has validated the input (`stored_data` is `data` as
    validation.data encoded it), checked the domain rules and resolved the
    attachments; `recipients(mentions)` is read here, inside the
    transaction, so membership is as it is at commit time. A recipient whose
    mailbox is full gets no delivery and is named in `mailbox_full`.
    """
    conn = tx.conn
    mentions = resolve_mentions(conn, workspace_id, text)
    message_id = insert_message(
        tx, workspace_id=workspace_id, author=author, text=text, mode=mode, data=stored_data,
        mentions=mentions, attachments=attachments, channel_id=channel_id,
        conversation_id=conversation_id, thread_id=thread_id,
    )
    message = Message(
        id=str(message_id), channel_id=None if channel_id is None else str(channel_id),
        channel_name=channel_name,
        conversation_id=None if conversation_id is None else str(conversation_id),
        agent_id=str(author.id), agent_name=author.name, text=text, data=data,
        thread_id=None if thread_id is None else str(thread_id),
        attachments=[a for _, a in attachments], has_attachments=bool(attachments),
        mentions=mentions, injection_mode=cast(Mode, mode), created_at=tx.now_iso,
    )
    recorded = record_event(
        tx, workspace_id=workspace_id, event_type=event_type, data=message,
        recipients=recipients(mentions), message_id=message_id, channel_id=channel_id,
        conversation_id=conversation_id, agent_id=author.id,
    )
    message.mailbox_full = names_of(conn, recorded.mailbox_full)
    return message


class Send(msgspec.Struct, frozen=True, kw_only=True):
    """What every send path takes besides where the message goes."""

    workspace_id: int
    agent_id: int
    text: str
    mode: Mode = "wait"
    data: dict[str, Any] | None = None
    attachments: list[str] = msgspec.field(default_factory=list)
    idempotency_key: str | None = None

    # A send writes messages, deliveries, marks and outbox rows, never
    # agents, channels, memberships or subscriptions: what the batch's
    # earlier sends read stays valid (Tx.read_once).
    keeps_topology: ClassVar[bool] = True

    def checked(self, limits: Limits) -> Checked:
        """The text, mode and data as stored; raises invalid_text, text_too_long,
        invalid_mode, invalid_data, data_too_large."""
        return (validation.text(self.text, limits), validation.mode(self.mode),
                validation.data(self.data, limits))

    def prepare(self, limits: Limits) -> CheckedSend:
        """The send with its input checked, before it reaches the writer.

        `WriterActor.submit` calls it in the submitting task, so the checks
        (pure functions of the command and the limits) cost the writer
        thread nothing, and refused input never enters the queue. Raises
        what `checked` raises.
        """
        return CheckedSend(self, self.checked(limits))

    def apply(self, tx: Tx) -> Message:
        return self.apply_checked(tx, self.checked(tx.limits))

    def apply_checked(self, tx: Tx, checked: Checked) -> Message:
        """The send, its input already checked (`checked` as `self.checked` returned it)."""
        raise NotImplementedError


# The text, mode and data of a send as stored (Send.checked).
Checked = tuple[str, str, "str | None"]


class CheckedSend:
    """A send whose input was checked before the writer took it (Send.prepare)."""

    __slots__ = ("send", "checked")

    def __init__(self, send: Send, checked: Checked) -> None:
        self.send = send
        self.checked = checked

    @property
    def keeps_topology(self) -> bool:
        """As the send it wraps (Tx.read_once)."""
        return self.send.keeps_topology

    def apply(self, tx: Tx) -> Message:
        return self.send.apply_checked(tx, self.checked)


class SendChannelMessage(Send, frozen=True, kw_only=True):
    """Post `text` to a channel the agent is a member of.

    Recipients: every member except the sender; a muted member only when the
    text mentions it. A recipient whose mailbox is full gets no delivery and
    is named in the result's `mailbox_full`. A retry with the idempotency key
    of an earlier send returns that send's result even if the channel was
    archived or the sender left since.
    Raises invalid_text, text_too_long, invalid_mode, invalid_data,
    data_too_large, invalid_idempotency_key, idempotency_key_reused,
    agent_not_found, channel_not_found, channel_archived, not_a_member,
    file_not_found, file_not_complete.
    """

    channel: str

    def apply_checked(self, tx: Tx, checked: Checked) -> Message:
        conn = tx.conn
        text, mode, data = checked

        def send() -> Message:
            author = sender(tx, self.workspace_id, self.agent_id)
            channel = tx.read_once(
                ("channel", self.workspace_id, self.channel, self.agent_id),
                lambda: require_channel(conn, self.workspace_id, self.channel, self.agent_id))
            if channel.archived:
                raise BrokerError("channel_archived", f"channel {channel.name!r} is archived")
            if not channel.is_member:
                raise BrokerError("not_a_member",
                                  f"you are not a member of channel {channel.name!r}")
            return post_message(
                tx, event_type="message.created", workspace_id=self.workspace_id,
                author=author, text=text, mode=mode, data=self.data, stored_data=data,
                attachments=resolve_attachments(conn, self.workspace_id, self.attachments),
                recipients=lambda mentions: members_to_deliver(tx, channel.id, author.id,
                                                               mentions),
                channel_id=channel.id, channel_name=channel.name,
            )

        return once(
            tx, agent_id=self.agent_id, key=self.idempotency_key, operation="message.send",
            request=self, result_type=Message, run=send,
        )

"""Reactions: add (idempotent), remove, list grouped by emoji.

A reaction is unique per (message, agent, emoji), enforced by the table's
UNIQUE constraint and checked first, so adding the same reaction twice
returns the first one and writes nothing: no second row, no second notice.

The message's author is told durably: adding a reaction records a
`message.reacted` event (action "added") through `record_event`, with a
delivery for the author unless the author reacted to their own message.
Removing one is only announced ephemerally to the author (action
"removed"): an agent should not have to acknowledge that something it was
told about went away, and a missed removal is visible in the next read.

Reacting writes to the message's channel, so an archived channel refuses
it (`channel_archived`), as it refuses posts.
"""

from __future__ import annotations

from typing import Literal, cast

import apsw
import msgspec

from broker.engine import validation
from broker.engine.channel_queries import (
    MessageRow,
    get_message,
    refuse_archived,
    require_visible_message,
)
from broker.engine.errors import BrokerError
from broker.engine.events import emit_ephemeral, record_event
from broker.engine.lookups import AgentRow, require_agent
from broker.engine.writer import Tx
from protocol.objects import AddedReaction, ReactionGroup, ReactionNotice, iso


def _notice(
    message: MessageRow, agent: AgentRow, emoji: str, action: Literal["added", "removed"]
) -> ReactionNotice:
    return ReactionNotice(
        message_id=str(message.id), emoji=emoji, agent_id=str(agent.id), agent_name=agent.name,
        action=action, channel=message.channel_name,
        conversation_id=None if message.conversation_id is None else str(message.conversation_id),
    )


def _tell_author(message: MessageRow, agent: AgentRow) -> list[int]:
    """The author, if they are someone else and still active: who hears of a reaction."""
    if message.author_id is None or message.author_id == agent.id or not message.author_active:
        return []
    return [message.author_id]


class _Reaction(msgspec.Struct, frozen=True, kw_only=True):
    """What adding and removing a reaction share: who, which message, which emoji."""

    workspace_id: int
    agent_id: int
    message_id: str
    emoji: str

    def target(self, tx: Tx) -> tuple[str, AgentRow, MessageRow]:
        """The valid emoji, the reacting agent and the message, which must be visible to
        it and not in an archived channel."""
        emoji = validation.emoji(self.emoji, tx.limits)
        agent = require_agent(tx.conn, self.workspace_id, self.agent_id)
        message = require_visible_message(tx.conn, self.workspace_id, agent.id,
                                          self.message_id)
        refuse_archived(message)
        return emoji, agent, message


class AddReaction(_Reaction, frozen=True, kw_only=True):
    """React to a message the agent can see; idempotent (created=False on a repeat).

    Raises invalid_emoji, agent_not_found, message_not_found, channel_archived.
    """

    def apply(self, tx: Tx) -> AddedReaction:
        conn = tx.conn
        if "/" in self.emoji:
            # REST removes a reaction by its emoji in the path, where a '/' cannot be
            # (reactions made before this check can still be removed over the socket)
            raise BrokerError("invalid_emoji", "an emoji may not contain '/'")
        emoji, agent, message = self.target(tx)
        existing = conn.execute(
            "SELECT id, created_at FROM reactions WHERE message_id = ? AND agent_id = ?"
            " AND emoji = ?",
            (message.id, agent.id, emoji),
        ).fetchone()
        if existing is not None:
            return AddedReaction(
                id=str(existing[0]), message_id=str(message.id), agent_name=agent.name,
                emoji=emoji, created_at=iso(cast(int, existing[1])) or "", created=False,
            )
        reaction_id = tx.new_id()
        conn.execute(
            "INSERT INTO reactions(id, message_id, agent_id, emoji, created_at)"
            " VALUES (?,?,?,?,?)",
            (reaction_id, message.id, agent.id, emoji, tx.now_ms),
        )
        record_event(
            tx, workspace_id=self.workspace_id, event_type="message.reacted",
            data=_notice(message, agent, emoji, "added"),
            recipients=_tell_author(message, agent), message_id=message.id,
            channel_id=message.channel_id, conversation_id=message.conversation_id,
            agent_id=agent.id,
        )
        return AddedReaction(
            id=str(reaction_id), message_id=str(message.id), agent_name=agent.name, emoji=emoji,
            created_at=iso(tx.now_ms) or "", created=True,
        )


class RemoveReaction(_Reaction, frozen=True, kw_only=True):
    """Remove the caller's reaction `emoji` from a message.

    Raises invalid_emoji, agent_not_found, message_not_found, channel_archived,
    reaction_not_found.
    """

    def apply(self, tx: Tx) -> None:
        conn = tx.conn
        emoji, agent, message = self.target(tx)
        removed = conn.execute(
            "DELETE FROM reactions WHERE message_id = ? AND agent_id = ? AND emoji = ?"
            " RETURNING id",
            (message.id, agent.id, emoji),
        ).fetchall()
        if not removed:
            raise BrokerError("reaction_not_found", f"you have not reacted {emoji!r} to it")
        author = _tell_author(message, agent)
        if author:
            # the reactor is the author: nothing to report
            emit_ephemeral(
                tx, workspace_id=self.workspace_id, event_type="message.reacted",
                data=_notice(message, agent, emoji, "removed"), audience=author,
                channel_id=message.channel_id,
            )


def list_reactions(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, message_id: str
) -> list[ReactionGroup]:
    """The reactions of a message the agent (or OWNER) can see, by emoji in order of first use.

    Raises message_not_found.
    """
    # Through get_message, so the grouping is the one every message read shows.
    return get_message(conn, workspace_id, agent_id, message_id).reactions

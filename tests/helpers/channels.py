"""Channel-side helpers: a snapshot of every table a channel-side command may write (to
prove "wrote nothing"), reads on the reader pool, and test-only commands that create DM /
group DM conversation rows directly (the real DM commands live elsewhere; these only need
the rows to exist)."""

from __future__ import annotations

from typing import Any

import apsw
import msgspec
import pytest

from broker.engine.channels import CreateChannel, JoinChannel
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.events import record_event
from broker.engine.lookups import require_agent
from broker.engine.messages import SendChannelMessage, insert_message
from broker.engine.writer import Tx
from tests.helpers.engine import World

# Every table a channel-side command may write, with an order that makes the
# dump deterministic. messages_fts is the FTS index kept by triggers.
SNAPSHOT_TABLES = {
    "channels": "id",
    "channel_members": "channel_id, agent_id",
    "conversations": "id",
    "conversation_participants": "conversation_id, agent_id",
    "messages": "id",
    "messages_fts": "rowid",
    "message_attachments": "message_id, file_id",
    "message_log": "id",
    "deliveries": "agent_id, seq",
    "read_receipts": "message_id, agent_id",
    "reactions": "id",
    "idempotency_keys": "agent_id, key",
    "agents": "id",
    "outbox": "id",
}


def snapshot(conn: apsw.Connection) -> dict[str, list[Any]]:
    """Every row of every table a channel-side command may write."""
    return {
        table: conn.execute(f"SELECT rowid, * FROM {table} ORDER BY {order}").fetchall()
        if table == "messages_fts"
        else conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
        for table, order in SNAPSHOT_TABLES.items()
    }


async def rows(engine: Engine, sql: str, *args: object) -> list[Any]:
    """Run one SELECT on the reader pool."""
    return await engine.read(lambda c: c.execute(sql, args).fetchall())


async def deliveries_of(engine: Engine, message_id: str | int) -> list[tuple[int, str, str]]:
    """(agent_id, event type, state) of every delivery pointing at a message."""
    return [
        (int(a), str(t), str(s))
        for a, t, s in await rows(
            engine,
            "SELECT d.agent_id, l.type, d.state FROM deliveries d"
            " JOIN message_log l ON l.id = d.log_id WHERE d.message_id = ?"
            " ORDER BY d.agent_id, d.seq",
            int(message_id),
        )
    ]


async def expect_refused(engine: Engine, code: str, command: Any) -> BrokerError:
    """Submit `command`; it must fail with `code` and change no row of any table."""
    before = await engine.read(snapshot)
    with pytest.raises(BrokerError) as caught:
        await engine.submit(command)
    assert caught.value.code == code, caught.value
    assert await engine.read(snapshot) == before
    return caught.value


async def expect_query_refused(engine: Engine, code: str, fn: Any, *args: object) -> None:
    with pytest.raises(BrokerError) as caught:
        await engine.read(fn, *args)
    assert caught.value.code == code, caught.value


class OpenConversation(msgspec.Struct, frozen=True):
    """Test-only: the rows of a DM (two agents) or group DM conversation."""

    workspace_id: int
    kind: str
    agent_ids: tuple[int, ...]

    def apply(self, tx: Tx) -> int:
        conversation_id = tx.new_id()
        lo, hi = sorted(self.agent_ids) if self.kind == "dm" else (None, None)
        tx.conn.execute(
            "INSERT INTO conversations(id, workspace_id, kind, agent_lo, agent_hi, created_at)"
            " VALUES (?,?,?,?,?,?)",
            (conversation_id, self.workspace_id, self.kind, lo, hi, tx.now_ms),
        )
        tx.conn.executemany(
            "INSERT INTO conversation_participants(conversation_id, agent_id, joined_at)"
            " VALUES (?,?,?)",
            [(conversation_id, a, tx.now_ms) for a in self.agent_ids],
        )
        return conversation_id


class PostInConversation(msgspec.Struct, frozen=True):
    """Test-only: a conversation message with a delivery per other active participant."""

    workspace_id: int
    agent_id: int
    conversation_id: int
    text: str

    def apply(self, tx: Tx) -> int:
        author = require_agent(tx.conn, self.workspace_id, self.agent_id)
        message_id = insert_message(
            tx, workspace_id=self.workspace_id, author=author, text=self.text, mode="wait",
            data=None, mentions=[], attachments=[], conversation_id=self.conversation_id,
        )
        others = [
            r[0] for r in tx.conn.execute(
                "SELECT agent_id FROM conversation_participants WHERE conversation_id = ?"
                " AND agent_id <> ? AND left_at IS NULL", (self.conversation_id, author.id))
        ]
        record_event(
            tx, workspace_id=self.workspace_id, event_type="dm.received",
            data={"id": str(message_id), "text": self.text}, recipients=others,
            message_id=message_id, conversation_id=self.conversation_id, agent_id=author.id,
        )
        return message_id


class LeaveConversation(msgspec.Struct, frozen=True):
    """Test-only: a participant's soft leave (left_at set)."""

    conversation_id: int
    agent_id: int

    def apply(self, tx: Tx) -> None:
        tx.conn.execute(
            "UPDATE conversation_participants SET left_at = ? WHERE conversation_id = ?"
            " AND agent_id = ?", (tx.now_ms, self.conversation_id, self.agent_id))


async def send(engine: Engine, world: World, who: str, channel: str, text: str) -> str:
    message = await engine.submit(SendChannelMessage(
        workspace_id=world.workspace_id, agent_id=world.agents[who], channel=channel, text=text))
    return message.id


async def new_channel(engine: Engine, world: World, owner: str, name: str,
                      members: tuple[str, ...] = ()) -> None:
    await engine.submit(CreateChannel(
        workspace_id=world.workspace_id, agent_id=world.agents[owner], name=name))
    for member in members:
        await engine.submit(JoinChannel(
            workspace_id=world.workspace_id, agent_id=world.agents[member], channel=name))

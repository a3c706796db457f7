"""Atomicity by fault injection: DM send (creating the conversation), group DM send and creation.

For each command, the statements it runs are counted once with a tracer
that lets everything through; then, for every N, a tracer refuses the Nth
statement (apsw raises ExecTraceAbort there), and the database must hold
exactly what it held before: no conversation, participant, message,
delivery, log row or idempotency record, and no moved seq or pending
count. A retry without the fault must then succeed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import apsw
import pytest

from broker.engine.conversations import CreateGroupDm, SendDm, SendGroupDm
from broker.engine.engine import Engine
from broker.engine.workspaces import RegisterAgent
from tests.helpers.engine import World, snapshot

_FRAME = ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")


async def statements_of(engine: Engine, command: Any) -> list[str]:
    """The SQL statements `command` runs (transaction framing left out)."""
    seen: list[str] = []

    def record(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        if sql not in _FRAME:
            seen.append(sql)
        return True

    conn = engine.writer.connection
    conn.exec_trace = record
    try:
        await engine.submit(command)
    finally:
        conn.exec_trace = None
    return seen


async def fail_each_statement(
    engine: Engine, count: int, make: Callable[[int], Awaitable[Any]],
    check: Callable[[Any], Awaitable[None]],
) -> None:
    """For N in 0..count-1: the Nth statement of make(N)'s command fails; nothing persists."""
    conn = engine.writer.connection
    for failing in range(count):
        command = await make(failing)
        before = await snapshot(engine)
        seen = 0

        def fail_nth(cursor: apsw.Cursor, sql: str, bindings: Any, n: int = failing) -> bool:
            nonlocal seen
            if sql in _FRAME:
                return True
            seen += 1
            return seen != n + 1

        conn.exec_trace = fail_nth
        try:
            with pytest.raises(apsw.ExecTraceAbort):
                await engine.submit(command)
        finally:
            conn.exec_trace = None
        assert seen == failing + 1, f"statement {failing} was never reached"
        assert await snapshot(engine) == before, f"failing statement {failing} left rows"
        await check(await engine.submit(command))


async def test_dm_send_creating_the_conversation_is_atomic(engine: Engine, world: World) -> None:
    wid = world.workspace_id

    async def fresh_pair(n: int) -> SendDm:
        sender = await engine.submit(RegisterAgent(workspace_id=wid, name=f"s{n}"))
        await engine.submit(RegisterAgent(workspace_id=wid, name=f"r{n}"))
        return SendDm(workspace_id=wid, agent_id=int(sender.id), to=f"r{n}",
                      text=f"first words {n} @r{n}", data={"n": n}, idempotency_key=f"k{n}")

    body = await statements_of(engine, await fresh_pair(-1))
    joined = "\n".join(body)
    for table in ("INSERT INTO conversations", "INSERT INTO conversation_participants",
                  "INSERT INTO messages", "INSERT INTO message_log", "UPDATE mailboxes",
                  "INSERT INTO deliveries", "idempotency_keys"):
        assert table in joined, table

    async def check(sent: Any) -> None:
        row = await engine.read(lambda c: c.execute(
            "SELECT (SELECT count(*) FROM conversation_participants WHERE conversation_id = ?1),"
            " (SELECT count(*) FROM deliveries WHERE message_id = ?2),"
            " (SELECT count(*) FROM message_log WHERE message_id = ?2)",
            (int(sent.conversation_id), int(sent.id))).fetchone())
        assert row == (2, 1, 1)

    await fail_each_statement(engine, len(body), fresh_pair, check)


async def test_group_dm_send_is_atomic(engine: Engine, world: World) -> None:
    wid, a = world.workspace_id, world.agents
    group = await engine.submit(CreateGroupDm(workspace_id=wid, agent_id=a["alice"],
                                              participants=["bob", "carol", "dave"]))

    async def send(n: int) -> SendGroupDm:
        return SendGroupDm(workspace_id=wid, agent_id=a["bob"], conversation_id=group.id,
                           text=f"to the group {n} @carol", idempotency_key=f"g{n}")

    body = await statements_of(engine, await send(-1))
    assert any("INSERT INTO deliveries" in s for s in body)

    async def check(sent: Any) -> None:
        got = await engine.read(lambda c: c.execute(
            "SELECT agent_id FROM deliveries WHERE message_id = ? ORDER BY agent_id",
            (int(sent.id),)).fetchall())
        assert got == sorted([(a["alice"],), (a["carol"],), (a["dave"],)])

    await fail_each_statement(engine, len(body), send, check)


async def test_group_dm_creation_is_atomic(engine: Engine, world: World) -> None:
    wid, a = world.workspace_id, world.agents

    async def create(n: int) -> CreateGroupDm:
        return CreateGroupDm(workspace_id=wid, agent_id=a["alice"],
                             participants=["bob", "carol", "dave"], name=f"g{n}")

    body = await statements_of(engine, await create(-1))
    assert any("INSERT INTO conversation_participants" in s for s in body)

    async def check(created: Any) -> None:
        count = await engine.read(lambda c: c.execute(
            "SELECT count(*) FROM conversation_participants WHERE conversation_id = ?",
            (int(created.id),)).fetchone())
        assert count == (4,)

    await fail_each_statement(engine, len(body), create, check)

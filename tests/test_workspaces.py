"""Workspaces: get, look up, update, delete with everything in it; workspace isolation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import apsw
import msgspec
import pytest

from broker.engine import agents, conversations, inbox, mailbox, search
from broker.engine.channels import CreateChannel
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.maintenance import PURGED_TABLES, PurgeWorkspace
from broker.engine.messages import SendChannelMessage
from broker.engine.reactions import AddReaction
from broker.engine.reads import MarkRead
from broker.engine.threads import ReplyToThread
from broker.engine.workspaces import (
    SYSTEM_PROMPT_MAX_BYTES,
    CreateWorkspace,
    DeleteWorkspace,
    UpdateWorkspace,
    agent_by_token,
    get_workspace,
    workspace_by_key,
    workspace_by_name,
)
from tests.helpers.engine import NewIds, Sql, World, make_world, query_refused, refused, snapshot

# -- helpers shared by the domain tests of this part ---------------------------------


# -- get / lookup / update ---------------------------------------------------------------


async def test_get_workspace_and_lookup_by_name(engine: Engine, world: World) -> None:
    ws = await engine.read(get_workspace, world.workspace_id)
    assert (ws.id, ws.name, ws.system_prompt, ws.plan, ws.metadata) == (
        str(world.workspace_id), "acme", None, "free", {})
    assert ws.created_at.endswith("Z")
    assert await engine.read(workspace_by_name, "acme") == ws
    await query_refused(engine, "workspace_not_found", workspace_by_name, "nope")
    await query_refused(engine, "workspace_not_found", get_workspace, world.workspace_id + 1)


async def test_update_workspace_renames_and_sets_the_prompt(engine: Engine, world: World) -> None:
    ws = await engine.submit(UpdateWorkspace(
        workspace_id=world.workspace_id, name="acme-2", system_prompt="be brief"))
    assert (ws.name, ws.system_prompt) == ("acme-2", "be brief")
    # Unset fields stay; None clears the prompt; its own name is not a clash.
    ws = await engine.submit(UpdateWorkspace(workspace_id=world.workspace_id, name="acme-2"))
    assert ws.system_prompt == "be brief"
    ws = await engine.submit(UpdateWorkspace(workspace_id=world.workspace_id, system_prompt=None))
    assert (ws.name, ws.system_prompt) == ("acme-2", None)
    row = await engine.read(lambda c: c.execute(
        "SELECT name, system_prompt, updated_at IS NOT NULL FROM workspaces WHERE id = ?",
        (world.workspace_id,)).fetchone())
    assert row == ("acme-2", None, 1)
    assert (await engine.read(workspace_by_name, "acme-2")).id == str(world.workspace_id)
    await query_refused(engine, "workspace_not_found", workspace_by_name, "acme")


async def test_update_workspace_refusals_write_nothing(engine: Engine, world: World) -> None:
    await engine.submit(CreateWorkspace("taken"))
    wid = world.workspace_id
    await refused(engine, UpdateWorkspace(workspace_id=wid, name="taken"),
                  "workspace_already_exists")
    await refused(engine, UpdateWorkspace(workspace_id=wid, name="  "), "invalid_workspace_name")
    # a path segment of /v1/workspaces/by-name/, and no control or surrounding spaces
    # (" acme" could stand beside "acme"; "team/alpha" could not be looked up)
    for bad in ("team/alpha", " acme", "acme ", "a\x00", "a\tb", "a\u200bb"):
        await refused(engine, UpdateWorkspace(workspace_id=wid, name=bad),
                      "invalid_workspace_name")
        await refused(engine, CreateWorkspace(bad), "invalid_workspace_name")
    assert (await engine.submit(CreateWorkspace("Team Alpha 2"))).name == "Team Alpha 2"
    await refused(engine, UpdateWorkspace(workspace_id=wid, name="x" * 129),
                  "invalid_workspace_name")
    await refused(engine, UpdateWorkspace(
        workspace_id=wid, system_prompt="é" * (SYSTEM_PROMPT_MAX_BYTES // 2 + 1)),
        "invalid_system_prompt")
    await refused(engine, UpdateWorkspace(workspace_id=wid + 1, name="zzz"), "workspace_not_found")
    # A prompt of exactly the limit is accepted.
    ws = await engine.submit(UpdateWorkspace(
        workspace_id=wid, system_prompt="a" * SYSTEM_PROMPT_MAX_BYTES))
    assert ws.system_prompt is not None and len(ws.system_prompt) == SYSTEM_PROMPT_MAX_BYTES


# -- delete ---------------------------------------------------------------------------------


async def populate(engine: Engine, world: World, word: str) -> None:
    """Give a workspace a row in every table a command of the engine can fill, and more."""
    wid, a = world.workspace_id, world.agents
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=a["alice"], name="ops"))
    sent = await engine.submit(SendChannelMessage(
        workspace_id=wid, agent_id=a["alice"], channel="general", text=f"{word} hi @bob",
        idempotency_key="k1"))
    await engine.submit(ReplyToThread(workspace_id=wid, agent_id=a["bob"], message_id=sent.id,
                                      text=f"{word} reply"))
    await engine.submit(AddReaction(workspace_id=wid, agent_id=a["bob"], message_id=sent.id,
                                    emoji="eyes"))
    await engine.submit(MarkRead(workspace_id=wid, agent_id=a["bob"], message_id=sent.id))
    dm = await engine.submit(conversations.SendDm(
        workspace_id=wid, agent_id=a["alice"], to="bob", text=f"{word} dm"))
    group = await engine.submit(conversations.CreateGroupDm(
        workspace_id=wid, agent_id=a["alice"], participants=["bob", "carol"]))
    await engine.submit(conversations.SendGroupDm(
        workspace_id=wid, agent_id=a["carol"], conversation_id=group.id, text=f"{word} group"))
    await engine.submit(mailbox.AckUpTo(workspace_id=wid, agent_id=a["bob"], up_to_seq=1))
    await engine.submit(agents.RotateToken(workspace_id=wid, agent_id=a["dave"]))
    # Rows no command of this part writes yet: a file attached to the DM, a
    # webhook subscription with an outbox row.
    file_id, sub_id, out_id = await engine.submit(NewIds(3))
    await engine.submit(Sql(
        "INSERT INTO files(id, workspace_id, uploader_id, filename, content_type, size_bytes,"
        " state, created_at) VALUES (?,?,?,'f.txt','text/plain',1,'complete',0)",
        (file_id, wid, a["alice"])))
    await engine.submit(Sql(
        "INSERT INTO message_attachments(message_id, file_id, position) VALUES (?,?,0)",
        (int(dm.id), file_id)))
    await engine.submit(Sql(
        "INSERT INTO webhook_subscriptions(id, workspace_id, url, events, created_at)"
        " VALUES (?,?,'http://x','[]',0)", (sub_id, wid)))
    await engine.submit(Sql(
        "INSERT INTO outbox(id, workspace_id, subscription_id, type, payload, next_attempt_at,"
        " created_at) VALUES (?,?,?,'t',x'00',0,0)", (out_id, wid, sub_id)))


def _integers(dump: dict[str, list[tuple[Any, ...]]]) -> dict[str, set[int]]:
    return {t: {v for row in rows for v in row if isinstance(v, int)} for t, rows in dump.items()}


async def test_delete_workspace_leaves_no_row_of_it(engine: Engine) -> None:
    a = await make_world(engine, "a")
    b = await make_world(engine, "b")
    await populate(engine, a, "alphaword")
    await populate(engine, b, "betaword")
    before = await snapshot(engine)
    every_table_has_rows = [t for t, rows in before.items() if not rows]
    # node_tokens etc. belong to other parts; the domain tables must all be filled.
    for table in ("workspaces", "agents", "channels", "channel_members", "conversations",
                  "conversation_participants", "messages", "message_attachments", "files",
                  "message_log", "deliveries", "read_receipts", "reactions",
                  "idempotency_keys", "webhook_subscriptions", "outbox"):
        assert table not in every_table_has_rows, table
    # Ids are unique across tables and far larger than any seq, count or
    # time, so any integer of a row that equals one of A's ids is A's.
    a_ids = await engine.read(lambda c: {r[0] for r in c.execute(
        "SELECT id FROM workspaces WHERE id = ?1"
        " UNION SELECT id FROM agents WHERE workspace_id = ?1"
        " UNION SELECT id FROM channels WHERE workspace_id = ?1"
        " UNION SELECT id FROM conversations WHERE workspace_id = ?1"
        " UNION SELECT id FROM messages WHERE workspace_id = ?1"
        " UNION SELECT id FROM message_log WHERE workspace_id = ?1"
        " UNION SELECT id FROM files WHERE workspace_id = ?1"
        " UNION SELECT id FROM webhook_subscriptions WHERE workspace_id = ?1"
        " UNION SELECT id FROM outbox WHERE workspace_id = ?1", (a.workspace_id,))})
    assert len(a_ids) > 20

    deleted = await engine.submit(DeleteWorkspace(workspace_id=a.workspace_id))
    assert (deleted.workspace_id, deleted.name) == (str(a.workspace_id), "a")
    # The delete only marks: its key and tokens are refused at once, while
    # every row is still there; its name is free, the workspace not found.
    assert await engine.read(workspace_by_key, a.key) is None
    assert await engine.read(agent_by_token, a.tokens["alice"], 0) is None
    marked = await snapshot(engine)
    assert {t: len(r) for t, r in marked.items()} == {t: len(r) for t, r in before.items()}
    await query_refused(engine, "workspace_not_found", workspace_by_name, "a")
    await refused(engine, DeleteWorkspace(workspace_id=a.workspace_id), "workspace_not_found")

    # The purge, in steps of at most STEP rows (counted in the tables it
    # purges), children first, the workspace row in the last step.
    step_rows = 7

    def rows_left(conn: apsw.Connection) -> int:
        return sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                   for t in (*PURGED_TABLES, "workspaces"))

    left = await engine.read(rows_left)
    steps: list[int] = []
    while True:
        step = await engine.submit(PurgeWorkspace(a.workspace_id, step_rows))
        now_left = await engine.read(rows_left)
        assert step.rows == left - now_left <= step_rows
        steps.append(step.rows)
        left = now_left
        if step.done:
            break
    assert len(steps) >= 4 and sum(steps) > 3 * step_rows, steps
    assert steps[:-1] == [step_rows] * (len(steps) - 1)

    after = await snapshot(engine)
    for table, values in _integers(after).items():
        assert not values & a_ids, f"{table} keeps rows of the deleted workspace"
    # B is untouched: every row that held none of A's ids is still there, as it was.
    for table, rows in before.items():
        kept = [r for r in rows if not {v for v in r if isinstance(v, int)} & a_ids]
        if table.startswith("messages_fts"):
            continue  # FTS shadow tables hold segment blobs; checked by MATCH below
        assert after[table] == kept, table
    # The full-text index forgot A's messages and still knows B's.
    found = await engine.read(lambda c: [r[0] for r in c.execute(
        "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?", ("alphaword",))])
    assert found == []
    found = await engine.read(lambda c: [r[0] for r in c.execute(
        "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?", ("betaword",))])
    assert len(found) == 4
    await engine.submit(Sql("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')"))
    assert await engine.read(lambda c: c.execute("PRAGMA foreign_key_check").fetchall()) == []
    # Its key and tokens are dead; B's still work.
    assert await engine.read(workspace_by_key, a.key) is None
    assert await engine.read(agent_by_token, a.tokens["alice"], 0) is None
    assert await engine.read(workspace_by_key, b.key) is not None
    assert await engine.read(agent_by_token, b.tokens["alice"], 0) is not None
    await refused(engine, DeleteWorkspace(workspace_id=a.workspace_id), "workspace_not_found")
    # A step for a workspace that is gone (or was never deleted) touches nothing.
    assert (await engine.submit(PurgeWorkspace(b.workspace_id, step_rows))).rows == 0
    assert await engine.read(workspace_by_key, b.key) is not None


# -- workspace isolation, table-driven -------------------------------------------------


class Two(msgspec.Struct):
    """Workspace A (alice, bob, carol, dave) and B (zed, yan, xi), with B's ids at hand."""

    a: World
    b: World
    b_dm: str
    b_group: str
    b_delivery: str


@pytest.fixture
async def two(engine: Engine) -> Two:
    a = await make_world(engine, "a")
    b = await make_world(engine, "b", agents=("zed", "yan", "xi"))
    await engine.submit(CreateChannel(workspace_id=b.workspace_id, agent_id=b.agents["zed"],
                                      name="b-only"))
    dm = await engine.submit(conversations.SendDm(
        workspace_id=b.workspace_id, agent_id=b.agents["zed"], to="yan", text="secret b text"))
    group = await engine.submit(conversations.CreateGroupDm(
        workspace_id=b.workspace_id, agent_id=b.agents["zed"], participants=["yan", "xi"]))
    await engine.submit(conversations.SendGroupDm(
        workspace_id=b.workspace_id, agent_id=b.agents["zed"], conversation_id=group.id,
        text="secret b group text"))
    assert dm.conversation_id is not None
    return Two(a, b, dm.conversation_id, group.id, mailbox.delivery_id(b.agents["yan"], 1))


def _commands(t: Two) -> list[tuple[str, Any, str]]:
    wa, alice = t.a.workspace_id, t.a.agents["alice"]
    zed = t.b.agents["zed"]
    return [
        ("rotate B's agent", agents.RotateToken(workspace_id=wa, agent_id=zed), "agent_not_found"),
        ("status of B's agent", agents.SetAgentStatus(workspace_id=wa, agent_id=zed,
                                                      status="online"), "agent_not_found"),
        ("update B's agent", agents.UpdateAgent(workspace_id=wa, agent_id=zed, persona="x"),
         "agent_not_found"),
        ("deactivate B's agent", agents.DeactivateAgent(workspace_id=wa, agent_id=zed),
         "agent_not_found"),
        ("B's agent as sender", conversations.SendDm(workspace_id=wa, agent_id=zed, to="bob",
                                                     text="x"), "agent_not_found"),
        ("DM to B's agent", conversations.SendDm(workspace_id=wa, agent_id=alice, to="zed",
                                                 text="x"), "agent_not_found"),
        ("group with B's agents", conversations.CreateGroupDm(
            workspace_id=wa, agent_id=alice, participants=["bob", "zed"]), "agent_not_found"),
        ("send to B's group", conversations.SendGroupDm(
            workspace_id=wa, agent_id=alice, conversation_id=t.b_group, text="x"),
         "conversation_not_found"),
        ("send to B's DM", conversations.SendGroupDm(
            workspace_id=wa, agent_id=alice, conversation_id=t.b_dm, text="x"),
         "conversation_not_found"),
        ("add to B's group", conversations.AddParticipant(
            workspace_id=wa, agent_id=alice, conversation_id=t.b_group, agent="bob"),
         "conversation_not_found"),
        ("remove from B's group", conversations.RemoveParticipant(
            workspace_id=wa, agent_id=alice, conversation_id=t.b_group, agent="zed"),
         "conversation_not_found"),
        ("ack up to as B's agent", mailbox.AckUpTo(workspace_id=wa, agent_id=zed, up_to_seq=5),
         "agent_not_found"),
        ("ack B's delivery", mailbox.AckDelivery(workspace_id=wa, agent_id=alice,
                                                 delivery_id=t.b_delivery), "delivery_not_found"),
        ("fail B's delivery", mailbox.FailDelivery(workspace_id=wa, agent_id=alice,
                                                   delivery_id=t.b_delivery),
         "delivery_not_found"),
        ("defer B's delivery", mailbox.DeferDelivery(workspace_id=wa, agent_id=alice,
                                                     delivery_id=t.b_delivery, until_ms=1),
         "delivery_not_found"),
        ("mark delivered as B's agent", mailbox.MarkDelivered(workspace_id=wa, agent_id=zed,
                                                              seqs=[1], pushed_at=0),
         "agent_not_found"),
        # Workspace names are global, so a clash is all A learns of B.
        ("rename A to B's name", UpdateWorkspace(workspace_id=wa, name="b"),
         "workspace_already_exists"),
    ]


def _queries(t: Two) -> list[tuple[str, Callable[..., Any], tuple[Any, ...], str]]:
    wa, alice = t.a.workspace_id, t.a.agents["alice"]
    zed = t.b.agents["zed"]
    return [
        ("get B's agent", agents.get_agent, (wa, "zed"), "agent_not_found"),
        ("self as B's agent", agents.get_self, (wa, zed), "agent_not_found"),
        ("conversations of B's agent", conversations.dm_conversations, (wa, zed),
         "agent_not_found"),
        ("B's DM history", conversations.dm_messages, (wa, alice, t.b_dm),
         "conversation_not_found"),
        ("B's group history", conversations.dm_messages, (wa, alice, t.b_group),
         "conversation_not_found"),
        ("B's agent's mailbox", mailbox.list_pending, (wa, zed), "agent_not_found"),
        ("B's agent's inbox", inbox.inbox, (wa, zed), "agent_not_found"),
        ("search as B's agent", search.search_messages, (wa, zed, "secret"), "agent_not_found"),
        ("search B's channel", search.search_messages, (wa, alice, "secret", "b-only"),
         "channel_not_found"),
        ("search by B's author", search.search_messages, (wa, alice, "secret", None, "zed"),
         "agent_not_found"),
    ]


async def test_workspace_isolation_commands(engine: Engine, two: Two) -> None:
    """Isolation: commands."""
    for label, command, code in _commands(two):
        error = await refused(engine, command, code)
        assert "secret" not in error.message, label


async def test_workspace_isolation_queries(engine: Engine, two: Two) -> None:
    """Isolation: queries."""
    for label, fn, args, code in _queries(two):
        with pytest.raises(BrokerError) as caught:
            await engine.read(fn, *args)
        assert caught.value.code == code, label


async def test_workspace_isolation_reads_never_return_b_data(engine: Engine, two: Two) -> None:
    """Isolation: reads never return B data."""
    wa, alice = two.a.workspace_id, two.a.agents["alice"]
    await engine.submit(SendChannelMessage(workspace_id=wa, agent_id=alice, channel="general",
                                           text="secret a text"))
    found = await engine.read(search.search_messages, wa, alice, "secret")
    assert [m.text for m in found] == ["secret a text"]
    assert [a.name for a in await engine.read(agents.list_agents, wa, None)] == [
        "alice", "bob", "carol", "dave"]
    assert await engine.read(conversations.dm_conversations, wa, alice) == []
    assert await engine.read(mailbox.list_pending, wa, alice) == []
    box = await engine.read(inbox.inbox, wa, alice)
    assert (box.unread_channels, box.unread_dms, box.mentions, box.recent_reactions) == (
        [], [], [], [])


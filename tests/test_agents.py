"""Agents after registration: list, get, token rotation, presence, profile, deactivation."""

from __future__ import annotations

import pytest

from broker.engine import conversations, mailbox
from broker.engine.agents import (
    DeactivateAgent,
    RotateToken,
    SetAgentStatus,
    UpdateAgent,
    get_agent,
    get_self,
    list_agents,
)
from broker.engine.channels import CreateChannel
from broker.engine.config import EngineConfig, Limits
from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from broker.engine.validation import METADATA_MAX_BYTES, PERSONA_MAX_BYTES
from broker.engine.workspaces import RegisterAgent, agent_by_token
from tests.helpers.engine import World, query_refused, refused


async def test_list_agents_with_status_filter(engine: Engine, world: World) -> None:
    wid = world.workspace_id
    listed = await engine.read(list_agents, wid, None)
    assert [a.name for a in listed] == ["alice", "bob", "carol", "dave"]
    assert {a.status for a in listed} == {"offline"}
    await engine.submit(SetAgentStatus(workspace_id=wid, agent_id=world.agents["bob"],
                                       status="online"))
    await engine.submit(SetAgentStatus(workspace_id=wid, agent_id=world.agents["carol"],
                                       status="away"))
    assert [a.name for a in await engine.read(list_agents, wid, "online")] == ["bob"]
    assert [a.name for a in await engine.read(list_agents, wid, "away")] == ["carol"]
    assert [a.name for a in await engine.read(list_agents, wid, "offline")] == ["alice", "dave"]
    assert len(await engine.read(list_agents, wid, "all")) == 4
    await query_refused(engine, "invalid_status", list_agents, wid, "busy")


async def test_get_agent_lists_its_channels(engine: Engine, world: World) -> None:
    wid = world.workspace_id
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=world.agents["alice"],
                                      name="ops"))
    alice = await engine.read(get_agent, wid, "alice")
    assert alice.id == str(world.agents["alice"])
    assert alice.channels is not None
    assert [(c.name, c.role) for c in alice.channels] == [("general", "member"), ("ops", "owner")]
    assert alice.persona is None and alice.metadata == {} and alice.last_seen is None
    assert await engine.read(get_self, wid, world.agents["alice"]) == alice
    await query_refused(engine, "agent_not_found", get_agent, wid, "nobody")
    await query_refused(engine, "agent_not_found", get_self, wid, world.agents["alice"] + 999)


async def _prev_expiry(engine: Engine, agent_id: int) -> int:
    row = await engine.read(lambda c: c.execute(
        "SELECT prev_token_expires_at FROM agents WHERE id = ?", (agent_id,)).fetchone())
    assert row is not None and row[0] is not None
    return int(row[0])


async def test_rotate_token_keeps_the_old_one_for_the_grace(engine: Engine, world: World) -> None:
    wid, alice = world.workspace_id, world.agents["alice"]
    old = world.tokens["alice"]
    rotated = await engine.submit(RotateToken(workspace_id=wid, agent_id=alice))
    assert rotated.name == "alice" and rotated.token.startswith("at_live_")
    assert rotated.token != old
    expires = await _prev_expiry(engine, alice)
    rotated_at = expires - engine.limits.token_grace_seconds * 1000
    for token in (old, rotated.token):
        found = await engine.read(agent_by_token, token, rotated_at)
        assert found is not None and found.agent_id == alice
    assert await engine.read(agent_by_token, old, expires - 1) is not None
    assert await engine.read(agent_by_token, old, expires) is None
    assert await engine.read(agent_by_token, rotated.token, expires + 10**9) is not None
    # Only the stored digests: the token itself is nowhere in the database.
    hits = await engine.read(lambda c: c.execute(
        "SELECT count(*) FROM agents WHERE token_hash = ? OR prev_token_hash = ?",
        (rotated.token.encode(), rotated.token.encode())).fetchone())
    assert hits == (0,)

    # A second rotation ends the first token's grace at once.
    again = await engine.submit(RotateToken(workspace_id=wid, agent_id=alice))
    assert await engine.read(agent_by_token, old, rotated_at) is None
    assert await engine.read(agent_by_token, rotated.token, rotated_at) is not None
    assert await engine.read(agent_by_token, again.token, rotated_at) is not None


class TestNoGrace:
    @pytest.fixture
    def engine_config(self) -> EngineConfig:
        return EngineConfig(synchronous="NORMAL", limits=Limits(token_grace_seconds=0))

    async def test_rotate_token_zero_grace_ends_old_at_once(
        self, engine: Engine, world: World
    ) -> None:
        """Zero grace ends the old token at once."""
        alice = world.agents["alice"]
        await engine.submit(RotateToken(workspace_id=world.workspace_id, agent_id=alice))
        expires = await _prev_expiry(engine, alice)
        assert await engine.read(agent_by_token, world.tokens["alice"], expires) is None


async def test_set_status_reports_change_and_moves_last_seen(
    engine: Engine, world: World
) -> None:
    wid, bob = world.workspace_id, world.agents["bob"]
    first = await engine.submit(SetAgentStatus(workspace_id=wid, agent_id=bob, status="online"))
    assert (first.status, first.changed) == ("online", True) and first.last_seen is not None
    again = await engine.submit(SetAgentStatus(workspace_id=wid, agent_id=bob, status="online"))
    assert again.changed is False
    row = await engine.read(lambda c: c.execute(
        "SELECT status, last_seen FROM agents WHERE id = ?", (bob,)).fetchone())
    assert row is not None and row[0] == "online" and row[1] is not None
    await refused(engine, SetAgentStatus(workspace_id=wid, agent_id=bob, status="busy"),
                  "invalid_status")


async def test_update_agent_persona_and_metadata(engine: Engine, world: World) -> None:
    wid, bob = world.workspace_id, world.agents["bob"]
    updated = await engine.submit(UpdateAgent(workspace_id=wid, agent_id=bob,
                                              persona="a tester", metadata={"team": "qa"}))
    assert (updated.persona, updated.metadata) == ("a tester", {"team": "qa"})
    kept = await engine.submit(UpdateAgent(workspace_id=wid, agent_id=bob, metadata={}))
    assert (kept.persona, kept.metadata) == ("a tester", {})
    cleared = await engine.submit(UpdateAgent(workspace_id=wid, agent_id=bob, persona=None))
    assert cleared.persona is None
    assert (await engine.read(get_agent, wid, "bob")).persona is None
    await refused(engine, UpdateAgent(workspace_id=wid, agent_id=bob,
                                      persona="x" * (PERSONA_MAX_BYTES + 1)), "invalid_persona")
    await refused(engine, UpdateAgent(workspace_id=wid, agent_id=bob,
                                      metadata={"k": "x" * METADATA_MAX_BYTES}),
                  "invalid_metadata")
    await refused(engine, UpdateAgent(workspace_id=wid, agent_id=bob,
                                      metadata=["not", "an", "object"]),  # type: ignore[arg-type]
                  "invalid_metadata")


async def test_update_agent_sets_the_status(engine: Engine, world: World) -> None:
    """PATCH /v1/agents/{name} with a status: it was checked, then silently ignored."""
    wid, bob = world.workspace_id, world.agents["bob"]
    away = await engine.submit(UpdateAgent(workspace_id=wid, agent_id=bob, status="away",
                                           persona="p"))
    assert (away.status, away.persona) == ("away", "p")
    assert (await engine.read(get_agent, wid, "bob")).status == "away"
    # a refused status refuses the whole update
    await refused(engine, UpdateAgent(workspace_id=wid, agent_id=bob, status="busy",
                                      persona="other"), "invalid_status")
    agent = await engine.read(get_agent, wid, "bob")
    assert (agent.status, agent.persona) == ("away", "p")


async def test_register_agent_has_the_bounds_of_an_update(engine: Engine, world: World) -> None:
    """Before, a create took a persona or metadata of any size (900 KB was 201)."""
    wid = world.workspace_id
    await refused(engine, RegisterAgent(workspace_id=wid, name="big",
                                        persona="x" * (PERSONA_MAX_BYTES + 1)), "invalid_persona")
    await refused(engine, RegisterAgent(workspace_id=wid, name="big",
                                        metadata={"k": "x" * METADATA_MAX_BYTES}),
                  "invalid_metadata")
    assert await engine.read(lambda conn: conn.execute(
        "SELECT count(*) FROM agents WHERE name = 'big'").fetchone()[0]) == 0
    await engine.submit(RegisterAgent(workspace_id=wid, name="big", persona="x" * PERSONA_MAX_BYTES,
                                      metadata={"team": "qa"}))
    agent = await engine.read(get_agent, wid, "big")
    assert (len(agent.persona or ""), agent.metadata) == (PERSONA_MAX_BYTES, {"team": "qa"})


async def test_deactivate_agent_gets_nothing_token_dies(
    engine: Engine, world: World
) -> None:
    """A deactivated agent gets nothing, and its token dies."""
    wid, a = world.workspace_id, world.agents
    group = await engine.submit(conversations.CreateGroupDm(
        workspace_id=wid, agent_id=a["alice"], participants=["bob", "carol"]))
    await engine.submit(conversations.SendDm(workspace_id=wid, agent_id=a["alice"], to="bob",
                                             text="before"))
    done = await engine.submit(DeactivateAgent(workspace_id=wid, agent_id=a["bob"]))
    assert (done.name, done.dead_lettered) == ("bob", 1)
    row = await engine.read(lambda c: c.execute(
        "SELECT deactivated_at IS NOT NULL, pending_count, status FROM agents"
        " JOIN mailboxes ON agent_id = id WHERE id = ?",
        (a["bob"],)).fetchone())
    assert row == (1, 0, "offline")
    states = await engine.read(lambda c: c.execute(
        "SELECT state, error FROM deliveries WHERE agent_id = ?", (a["bob"],)).fetchall())
    assert states == [("dead_lettered", "agent deactivated")]

    assert await engine.read(agent_by_token, world.tokens["bob"], 0) is None
    assert "bob" not in [x.name for x in await engine.read(list_agents, wid, None)]
    await query_refused(engine, "agent_not_found", get_agent, wid, "bob")
    await query_refused(engine, "agent_not_found", mailbox.list_pending, wid, a["bob"])

    # No more deliveries: not from its channel, not from its group, and no DM.
    await engine.submit(SendChannelMessage(workspace_id=wid, agent_id=a["alice"],
                                           channel="general", text="after"))
    await engine.submit(conversations.SendGroupDm(workspace_id=wid, agent_id=a["alice"],
                                                  conversation_id=group.id, text="after"))
    count = await engine.read(lambda c: c.execute(
        "SELECT count(*), (SELECT last_seq FROM mailboxes WHERE agent_id = ?1) FROM deliveries"
        " WHERE agent_id = ?1", (a["bob"],)).fetchone())
    assert count == (1, 1)
    carol = await engine.read(lambda c: c.execute(
        "SELECT count(*) FROM deliveries WHERE agent_id = ?", (a["carol"],)).fetchone())
    assert carol == (2,)
    await refused(engine, conversations.SendDm(workspace_id=wid, agent_id=a["alice"], to="bob",
                                               text="x"), "agent_not_found")
    await refused(engine, DeactivateAgent(workspace_id=wid, agent_id=a["bob"]), "agent_not_found")
    await refused(engine, RotateToken(workspace_id=wid, agent_id=a["bob"]), "agent_not_found")

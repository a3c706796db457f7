"""Search: FTS5 over what the agent may read, filters, ranking, and lenient query syntax."""

from __future__ import annotations

from broker.engine.channels import CreateChannel
from broker.engine.conversations import CreateGroupDm, RemoveParticipant, SendDm, SendGroupDm
from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from broker.engine.search import MAX_QUERY_CHARS, search_messages
from tests.helpers.engine import World, make_world, query_refused


def post(world: World, sender: str, text: str, channel: str = "general") -> SendChannelMessage:
    return SendChannelMessage(workspace_id=world.workspace_id, agent_id=world.agents[sender],
                              channel=channel, text=text)


async def texts(engine: Engine, world: World, agent: str, query: str, *args: object) -> list[str]:
    found = await engine.read(search_messages, world.workspace_id, world.agents[agent], query,
                              *args)
    return [m.text for m in found]


async def test_search_finds_only_readable(engine: Engine, world: World) -> None:
    """Search finds only what the agent may read."""
    wid, a = world.workspace_id, world.agents
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=a["alice"], name="secret"))
    await engine.submit(post(world, "alice", "deploy in general"))
    await engine.submit(post(world, "alice", "deploy in secret", "secret"))
    await engine.submit(SendDm(workspace_id=wid, agent_id=a["alice"], to="bob",
                               text="deploy between alice and bob"))
    await engine.submit(SendDm(workspace_id=wid, agent_id=a["alice"], to="carol",
                               text="deploy between alice and carol"))
    group = await engine.submit(CreateGroupDm(workspace_id=wid, agent_id=a["alice"],
                                              participants=["bob", "dave"]))
    await engine.submit(SendGroupDm(workspace_id=wid, agent_id=a["dave"],
                                    conversation_id=group.id, text="deploy in the group"))
    other = await make_world(engine, "other", agents=("zed",))
    await engine.submit(post(other, "zed", "deploy elsewhere"))

    assert sorted(await texts(engine, world, "bob", "deploy")) == [
        "deploy between alice and bob", "deploy in general", "deploy in the group"]
    assert len(await texts(engine, world, "alice", "deploy")) == 5
    # Leaving the group takes its messages out of bob's results.
    await engine.submit(RemoveParticipant(workspace_id=wid, agent_id=a["bob"],
                                          conversation_id=group.id, agent="bob"))
    assert "deploy in the group" not in await texts(engine, world, "bob", "deploy")


async def test_search_filters_ranking_and_limit(engine: Engine, world: World) -> None:
    """Filters, ranking and limit."""
    wid, a = world.workspace_id, world.agents
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=a["alice"], name="ops"))
    await engine.submit(post(world, "alice", "rollback the release, then rollback again"))
    await engine.submit(post(world, "bob", "a rollback happened during a long, busy, noisy day"))
    await engine.submit(post(world, "alice", "rollback in ops", "ops"))

    found = await engine.read(search_messages, wid, a["alice"], "rollback")
    assert [m.text for m in found][0] != "a rollback happened during a long, busy, noisy day"
    scores = [m.relevance_score for m in found]
    assert scores == sorted(scores, reverse=True) and len(found) == 3
    assert await texts(engine, world, "alice", "rollback", "ops") == ["rollback in ops"]
    assert await texts(engine, world, "alice", "rollback", None, "bob") == [
        "a rollback happened during a long, busy, noisy day"]
    assert await texts(engine, world, "alice", "rollback", "general", "bob") == [
        "a rollback happened during a long, busy, noisy day"]
    assert len(await texts(engine, world, "alice", "rollback", None, None, 2)) == 2
    # The result is the whole message, as every read returns it.
    assert found[0].channel_name in ("general", "ops") and found[0].agent_name == "alice"

    await query_refused(engine, "not_a_member", search_messages, wid, a["bob"], "x", "ops")
    await query_refused(engine, "channel_not_found", search_messages, wid, a["bob"], "x", "nope")
    await query_refused(engine, "agent_not_found", search_messages, wid, a["bob"], "x", None,
                        "nobody")
    await query_refused(engine, "invalid_limit", search_messages, wid, a["bob"], "x", None, None,
                        0)
    await query_refused(engine, "invalid_limit", search_messages, wid, a["bob"], "x", None, None,
                        101)


async def test_search_query_syntax(engine: Engine, world: World) -> None:
    """Query syntax."""
    wid, a = world.workspace_id, world.agents
    await engine.submit(post(world, "alice", "see foo:bar and C++ notes"))
    await engine.submit(post(world, "alice", "deployment finished"))
    await engine.submit(post(world, "alice", "a well-known path /etc/hosts"))
    # FTS5 syntax works for those who know it ...
    assert await texts(engine, world, "bob", "deploy*") == ["deployment finished"]
    assert len(await texts(engine, world, "bob", "deployment OR notes")) == 2
    assert await texts(engine, world, "bob", '"finished"') == ["deployment finished"]
    # ... and what FTS5 refuses is searched as plain words instead of failing.
    assert await texts(engine, world, "bob", "foo:bar") == ["see foo:bar and C++ notes"]
    assert await texts(engine, world, "bob", "C++ notes") == ["see foo:bar and C++ notes"]
    assert await texts(engine, world, "bob", "well-known") == ["a well-known path /etc/hosts"]
    assert await texts(engine, world, "bob", "/etc/hosts") == ["a well-known path /etc/hosts"]
    assert await texts(engine, world, "bob", '"') == []
    assert await texts(engine, world, "bob", "AND") == ["see foo:bar and C++ notes"]
    assert await texts(engine, world, "bob", "(deployment") == ["deployment finished"]
    # A NUL: FTS5 stops reading there (a 500 from the plain-words fallback, before).
    for bad in ("", "   ", "x" * (MAX_QUERY_CHARS + 1), "\x00", '"\x00"', "a\x00b"):
        await query_refused(engine, "invalid_query", search_messages, wid, a["bob"], bad)
    await query_refused(engine, "agent_not_found", search_messages, wid, a["bob"] + 999, "x")

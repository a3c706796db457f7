"""Reactions: unique per (message, agent, emoji), the author's durable notice, grouping."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from broker.engine.channels import ArchiveChannel
from broker.engine.engine import Engine
from broker.engine.reactions import AddReaction, RemoveReaction, list_reactions
from tests.helpers.channels import (
    OpenConversation,
    PostInConversation,
    expect_query_refused,
    expect_refused,
    new_channel,
    rows,
    send,
    snapshot,
)
from tests.helpers.engine import World, make_world


def react(world: World, who: str, message_id: str, emoji: str = "👍") -> AddReaction:
    return AddReaction(workspace_id=world.workspace_id, agent_id=world.agents[who],
                       message_id=message_id, emoji=emoji)


def unreact(world: World, who: str, message_id: str, emoji: str = "👍") -> RemoveReaction:
    return RemoveReaction(workspace_id=world.workspace_id, agent_id=world.agents[who],
                          message_id=message_id, emoji=emoji)


async def notices(engine: Engine, message_id: str) -> list[tuple[int, dict[str, Any]]]:
    """(recipient, event data) of every message.reacted delivery about a message."""
    return [
        (int(agent), msgspec.json.decode(payload)["data"])
        for agent, payload in await rows(
            engine,
            "SELECT d.agent_id, l.payload FROM deliveries d JOIN message_log l ON l.id = d.log_id"
            " WHERE d.message_id = ? AND l.type = 'message.reacted' ORDER BY d.seq",
            int(message_id),
        )
    ]


async def test_add_reaction_stores_and_tells_author_durably(
    engine: Engine, world: World
) -> None:
    """A reaction is stored and the author is told durably."""
    message = await send(engine, world, "alice", "general", "ship it?")
    added = await engine.submit(react(world, "bob", message))
    assert (added.message_id, added.agent_name, added.emoji, added.created) == (
        message, "bob", "👍", True)
    assert await rows(engine, "SELECT id, agent_id, emoji FROM reactions") == [
        (int(added.id), world.agents["bob"], "👍")]
    ((recipient, data),) = await notices(engine, message)
    assert recipient == world.agents["alice"]
    assert data == {"message_id": message, "emoji": "👍", "agent_id": str(world.agents["bob"]),
                    "agent_name": "bob", "action": "added", "channel": "general",
                    "conversation_id": None}


async def test_add_reaction_twice_idempotent_notifies_once(engine: Engine, world: World) -> None:
    """Adding twice is idempotent and notifies once."""
    message = await send(engine, world, "alice", "general", "ship it?")
    first = await engine.submit(react(world, "bob", message))
    before = await engine.read(snapshot)
    again = await engine.submit(react(world, "bob", message))
    assert (again.id, again.created, again.created_at) == (first.id, False, first.created_at)
    assert await engine.read(snapshot) == before
    assert len(await notices(engine, message)) == 1


async def test_add_reaction_to_own_message_tells_nobody(engine: Engine, world: World) -> None:
    """Reacting to one's own message tells nobody."""
    message = await send(engine, world, "alice", "general", "mine")
    await engine.submit(react(world, "alice", message))
    assert await notices(engine, message) == []
    assert await rows(engine, "SELECT count(*) FROM reactions") == [(1,)]


async def test_remove_reaction_deletes_row_second_refused(
    engine: Engine, world: World
) -> None:
    """Remove deletes the row, and a second remove is refused."""
    message = await send(engine, world, "alice", "general", "hm")
    await engine.submit(react(world, "bob", message, "🎉"))
    await engine.submit(react(world, "carol", message, "🎉"))
    await engine.submit(unreact(world, "bob", message, "🎉"))
    assert await rows(engine, "SELECT agent_id FROM reactions") == [(world.agents["carol"],)]
    await expect_refused(engine, "reaction_not_found", unreact(world, "bob", message, "🎉"))
    await expect_refused(engine, "reaction_not_found", unreact(world, "carol", message, "👍"))
    # The notice of the added reaction stays in the author's mailbox.
    assert len(await notices(engine, message)) == 2


async def test_reactions_are_listed_grouped_by_emoji_in_order_of_first_use(
    engine: Engine, world: World
) -> None:
    message = await send(engine, world, "alice", "general", "vote")
    for who, emoji in (("bob", "👍"), ("carol", "🎉"), ("dave", "👍"), ("bob", "🎉")):
        await engine.submit(react(world, who, message, emoji))
    groups = await engine.read(list_reactions, world.workspace_id, world.agents["alice"], message)
    assert [(g.emoji, g.count, sorted(g.agents)) for g in groups] == [
        ("👍", 2, ["bob", "dave"]), ("🎉", 2, ["bob", "carol"])]


async def test_reactions_in_a_dm_are_for_its_participants(engine: Engine, world: World) -> None:
    ws, alice, bob = world.workspace_id, world.agents["alice"], world.agents["bob"]
    dm = await engine.submit(OpenConversation(ws, "dm", (alice, bob)))
    message = str(await engine.submit(PostInConversation(ws, alice, dm, "psst")))
    await engine.submit(react(world, "bob", message, "👀"))
    ((recipient, data),) = await notices(engine, message)
    assert (recipient, data["conversation_id"], data["channel"]) == (alice, str(dm), None)
    await expect_refused(engine, "message_not_found", react(world, "carol", message))
    await expect_query_refused(engine, "message_not_found", list_reactions, ws,
                               world.agents["carol"], message)


async def test_reaction_validation_refuses_and_writes_nothing(
    engine: Engine, world: World
) -> None:
    message = await send(engine, world, "alice", "general", "hm")
    for bad in ("", " 👍", "👍 ", "x" * 65):
        await expect_refused(engine, "invalid_emoji", react(world, "bob", message, bad))
        await expect_refused(engine, "invalid_emoji", unreact(world, "bob", message, bad))
    assert (await engine.submit(react(world, "bob", message, "x" * 64))).created
    # REST removes a reaction by the emoji in its path: a '/' could not be removed there
    await expect_refused(engine, "invalid_emoji", react(world, "bob", message, "a/b"))
    for missing in ("999", "nope"):
        await expect_refused(engine, "message_not_found", react(world, "bob", missing))
        await expect_refused(engine, "message_not_found", unreact(world, "bob", missing))
    await new_channel(engine, world, "alice", "ops", ("carol",))
    hidden = await send(engine, world, "alice", "ops", "members only")
    await expect_refused(engine, "message_not_found", react(world, "bob", hidden))
    await engine.submit(react(world, "carol", hidden))
    await engine.submit(ArchiveChannel(workspace_id=world.workspace_id, agent_id=None,
                                       channel="ops"))
    await expect_refused(engine, "channel_archived", react(world, "carol", hidden, "🎉"))
    await expect_refused(engine, "channel_archived", unreact(world, "carol", hidden))


@pytest.mark.parametrize("bad", [
    "\u0000", "ok\u0000", "\u0007", "a\nb", "\u202e", "\u200b", "\ufeff", "x\u2028y",
    "\ufffe", "\U0010ffff", "\ud800",
])
async def test_reaction_emoji_with_control_or_format_characters_is_refused(
    engine: Engine, world: World, bad: str
) -> None:
    """Controls, surrogates, separators, bidi overrides, zero-width spaces and noncharacters."""
    message = await send(engine, world, "alice", "general", "hm")
    await expect_refused(engine, "invalid_emoji", react(world, "bob", message, bad))
    await expect_refused(engine, "invalid_emoji", unreact(world, "bob", message, bad))


async def test_reaction_emoji_sequences_stay_accepted(engine: Engine, world: World) -> None:
    """A ZWJ family, a skin tone, a keycap, a subdivision flag (tag characters), a name."""
    message = await send(engine, world, "alice", "general", "hm")
    for good in ("\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f44d\U0001f3fd",
                 "1\ufe0f\u20e3",
                 "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f",
                 "white check mark", "+1"):
        assert (await engine.submit(react(world, "bob", message, good))).created


async def test_reactions_never_reach_another_workspace(engine: Engine, world: World) -> None:
    other = await make_world(engine, "other", ("zed", "yan"))
    theirs = await send(engine, other, "zed", "general", "theirs")
    await engine.submit(react(other, "yan", theirs))
    ws, alice = world.workspace_id, world.agents["alice"]
    await expect_refused(engine, "message_not_found", react(world, "alice", theirs))
    await expect_refused(engine, "message_not_found", unreact(world, "alice", theirs))
    await expect_refused(engine, "agent_not_found", AddReaction(
        workspace_id=other.workspace_id, agent_id=alice, message_id=theirs, emoji="👍"))
    await expect_query_refused(engine, "message_not_found", list_reactions, ws, alice, theirs)

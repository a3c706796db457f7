"""Channels: membership commands, channel reads, history pages, and the rules they enforce.

Also home of the helpers the other channel-side tests share: a snapshot of
every table a command could touch (to prove "wrote nothing"), and test-only
commands that create DM / group DM conversation rows directly (the real DM
commands live elsewhere; these only need the rows to exist).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import trio

from broker.engine.channel_queries import (
    channel_members,
    channel_messages,
    get_channel,
    get_message,
    list_channels,
)
from broker.engine.channels import (
    TOPIC_MAX_CHARS,
    ArchiveChannel,
    CreateChannel,
    InviteToChannel,
    JoinChannel,
    LeaveChannel,
    MuteChannel,
    UnmuteChannel,
    UpdateChannel,
)
from broker.engine.config import EngineConfig
from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from broker.engine.writer import Tx
from tests.helpers.channels import (
    deliveries_of,
    expect_query_refused,
    expect_refused,
    new_channel,
    rows,
    send,
    snapshot,
)
from tests.helpers.engine import TEST_DEADLINE_S, World, make_world

# -- shared helpers ----------------------------------------------------------------------


async def members_of(engine: Engine, world: World, channel: str) -> list[str]:
    return sorted(m.agent_name for m in await engine.read(
        channel_members, world.workspace_id, channel))


# -- leave, invite -----------------------------------------------------------------------


async def test_leave_removes_the_membership_and_later_sends_skip_the_leaver(
    engine: Engine, world: World
) -> None:
    await new_channel(engine, world, "alice", "ops", ("bob", "carol"))
    result = await engine.submit(LeaveChannel(
        workspace_id=world.workspace_id, agent_id=world.agents["bob"], channel="ops"))
    assert (result.channel, result.agent_id) == ("ops", str(world.agents["bob"]))
    assert await members_of(engine, world, "ops") == ["alice", "carol"]
    sent = await send(engine, world, "alice", "ops", "after bob left")
    assert [a for a, _, _ in await deliveries_of(engine, sent)] == [world.agents["carol"]]
    await expect_refused(engine, "not_a_member", LeaveChannel(
        workspace_id=world.workspace_id, agent_id=world.agents["bob"], channel="ops"))


async def test_invite_makes_the_agent_a_member_once(engine: Engine, world: World) -> None:
    await new_channel(engine, world, "alice", "ops")
    invited = await engine.submit(InviteToChannel(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"], channel="ops",
        agent_name="dave"))
    assert (invited.channel, invited.agent, invited.already_member) == ("ops", "dave", False)
    assert await members_of(engine, world, "ops") == ["alice", "dave"]
    sent = await send(engine, world, "alice", "ops", "welcome")
    assert [a for a, _, _ in await deliveries_of(engine, sent)] == [world.agents["dave"]]
    before = await engine.read(snapshot)
    again = await engine.submit(InviteToChannel(
        workspace_id=world.workspace_id, agent_id=None, channel="ops", agent_name="dave"))
    assert again.already_member is True
    assert await engine.read(snapshot) == before


async def test_invite_refusals(engine: Engine, world: World) -> None:
    await new_channel(engine, world, "alice", "ops")
    ws = world.workspace_id
    await expect_refused(engine, "agent_not_found", InviteToChannel(
        workspace_id=ws, agent_id=world.agents["alice"], channel="ops", agent_name="nobody"))
    await expect_refused(engine, "not_a_member", InviteToChannel(
        workspace_id=ws, agent_id=world.agents["bob"], channel="ops", agent_name="carol"))
    await expect_refused(engine, "channel_not_found", InviteToChannel(
        workspace_id=ws, agent_id=world.agents["alice"], channel="nope", agent_name="carol"))
    await engine.submit(ArchiveChannel(workspace_id=ws, agent_id=None, channel="ops"))
    await expect_refused(engine, "channel_archived", InviteToChannel(
        workspace_id=ws, agent_id=world.agents["alice"], channel="ops", agent_name="carol"))


# -- update, archive, mute -----------------------------------------------------------


async def test_update_sets_topic_and_metadata_and_keeps_unset_fields(
    engine: Engine, world: World
) -> None:
    ws, alice = world.workspace_id, world.agents["alice"]
    await new_channel(engine, world, "alice", "ops")
    updated = await engine.submit(UpdateChannel(
        workspace_id=ws, agent_id=alice, channel="ops", topic="deploys", metadata={"k": 1}))
    assert (updated.topic, updated.metadata) == ("deploys", {"k": 1})
    kept = await engine.submit(UpdateChannel(
        workspace_id=ws, agent_id=alice, channel="ops", metadata={"k": 2}))
    assert (kept.topic, kept.metadata) == ("deploys", {"k": 2})
    cleared = await engine.submit(UpdateChannel(
        workspace_id=ws, agent_id=None, channel="ops", topic=None))
    assert cleared.topic is None
    assert await rows(engine, "SELECT topic, metadata FROM channels WHERE name = 'ops'") == [
        (None, '{"k":2}')]


async def test_update_refusals(engine: Engine, world: World) -> None:
    ws, alice = world.workspace_id, world.agents["alice"]
    await new_channel(engine, world, "alice", "ops")
    await expect_refused(engine, "invalid_topic", UpdateChannel(
        workspace_id=ws, agent_id=alice, channel="ops", topic="x" * (TOPIC_MAX_CHARS + 1)))
    await expect_refused(engine, "invalid_data", UpdateChannel(
        workspace_id=ws, agent_id=alice, channel="ops", metadata=[1]))  # type: ignore[arg-type]
    await expect_refused(engine, "data_too_large", UpdateChannel(
        workspace_id=ws, agent_id=alice, channel="ops", metadata={"k": "x" * 70_000}))
    await expect_refused(engine, "not_a_member", UpdateChannel(
        workspace_id=ws, agent_id=world.agents["bob"], channel="ops", topic="mine"))
    await engine.submit(ArchiveChannel(workspace_id=ws, agent_id=alice, channel="ops"))
    await expect_refused(engine, "channel_archived", UpdateChannel(
        workspace_id=ws, agent_id=alice, channel="ops", topic="late"))


async def test_create_has_the_metadata_bound_of_an_update(engine: Engine, world: World) -> None:
    """Before, a create took metadata of any size, sent again in every channel list."""
    ws, alice = world.workspace_id, world.agents["alice"]
    await expect_refused(engine, "data_too_large", CreateChannel(
        workspace_id=ws, agent_id=alice, name="big", metadata={"k": "x" * 70_000}))
    await expect_refused(engine, "invalid_data", CreateChannel(
        workspace_id=ws, agent_id=alice, name="big", metadata=[1]))  # type: ignore[arg-type]
    assert await engine.read(lambda conn: conn.execute(
        "SELECT count(*) FROM channels WHERE name = 'big'").fetchone()[0]) == 0
    made = await engine.submit(CreateChannel(workspace_id=ws, agent_id=alice, name="big",
                                             metadata={"k": "v"}))
    assert made.metadata == {"k": "v"}


async def test_create_refusals(engine: Engine, world: World) -> None:
    ws, alice = world.workspace_id, world.agents["alice"]
    await new_channel(engine, world, "alice", "ops")
    await expect_refused(engine, "channel_already_exists", CreateChannel(
        workspace_id=ws, agent_id=alice, name="ops"))
    for bad in ("Ops", "-ops", "", "a b", "x" * 81):
        await expect_refused(engine, "invalid_channel_name", CreateChannel(
            workspace_id=ws, agent_id=alice, name=bad))
    await expect_refused(engine, "invalid_topic", CreateChannel(
        workspace_id=ws, agent_id=alice, name="long", topic="x" * (TOPIC_MAX_CHARS + 1)))


async def test_archive_hides_the_channel_from_lists_and_refuses_writes(
    engine: Engine, world: World
) -> None:
    ws, alice = world.workspace_id, world.agents["alice"]
    await new_channel(engine, world, "alice", "ops", ("bob",))
    first = await send(engine, world, "alice", "ops", "before the archive")
    archived = await engine.submit(ArchiveChannel(workspace_id=ws, agent_id=alice, channel="ops"))
    assert archived.is_archived
    assert [c.name for c in await engine.read(list_channels, ws)] == ["general"]
    listed = await engine.read(list_channels, ws, True)
    assert [(c.name, c.is_archived) for c in listed] == [("general", False), ("ops", True)]
    await expect_refused(engine, "channel_archived", SendChannelMessage(
        workspace_id=ws, agent_id=alice, channel="ops", text="after"))
    await expect_refused(engine, "channel_archived", JoinChannel(
        workspace_id=ws, agent_id=world.agents["carol"], channel="ops"))
    # The history stays readable by its members.
    history = await engine.read(channel_messages, ws, world.agents["bob"], "ops")
    assert [m.id for m in history] == [first]
    # Archiving again changes nothing.
    before = await engine.read(snapshot)
    again = await engine.submit(ArchiveChannel(workspace_id=ws, agent_id=None, channel="ops"))
    assert again.is_archived
    assert await engine.read(snapshot) == before


async def test_archive_refuses_general(engine: Engine, world: World) -> None:
    """General cannot be archived."""
    for agent_id in (world.agents["alice"], None):
        await expect_refused(engine, "cannot_archive_general", ArchiveChannel(
            workspace_id=world.workspace_id, agent_id=agent_id, channel="general"))


async def test_archive_by_a_non_member_is_refused(engine: Engine, world: World) -> None:
    await new_channel(engine, world, "alice", "ops")
    await expect_refused(engine, "not_a_member", ArchiveChannel(
        workspace_id=world.workspace_id, agent_id=world.agents["bob"], channel="ops"))


async def test_mute_and_unmute_are_the_callers_own_setting(engine: Engine, world: World) -> None:
    ws, bob = world.workspace_id, world.agents["bob"]
    muted = await engine.submit(MuteChannel(workspace_id=ws, agent_id=bob, channel="general"))
    assert (muted.muted, muted.changed) == (True, True)
    assert (await engine.submit(MuteChannel(
        workspace_id=ws, agent_id=bob, channel="general"))).changed is False
    flags = {m.agent_name: m.is_muted for m in await engine.read(channel_members, ws, "general")}
    assert flags == {"alice": False, "bob": True, "carol": False, "dave": False}
    unmuted = await engine.submit(UnmuteChannel(workspace_id=ws, agent_id=bob, channel="general"))
    assert (unmuted.muted, unmuted.changed) == (False, True)
    assert await rows(engine, "SELECT muted FROM channel_members WHERE agent_id = ?", bob) == [(0,)]
    await new_channel(engine, world, "alice", "ops")
    await expect_refused(engine, "not_a_member", MuteChannel(
        workspace_id=ws, agent_id=bob, channel="ops"))
    await expect_refused(engine, "not_a_member", UnmuteChannel(
        workspace_id=ws, agent_id=bob, channel="ops"))


async def test_send_reaches_muted_members_only_when_mentioned(
    engine: Engine, world: World
) -> None:
    """Muted members get a message only when mentioned."""
    ws = world.workspace_id
    await engine.submit(MuteChannel(workspace_id=ws, agent_id=world.agents["dave"],
                                    channel="general"))
    plain = await send(engine, world, "alice", "general", "status update")
    mentioned = await send(engine, world, "alice", "general", "@dave please look")
    others = sorted(world.agents[n] for n in ("bob", "carol"))
    assert [a for a, _, _ in await deliveries_of(engine, plain)] == others
    assert [a for a, _, _ in await deliveries_of(engine, mentioned)] == sorted(
        [*others, world.agents["dave"]])


# -- recipients decided at commit time ------------------------------------------------------


class Gate:
    """A command that holds the writer's thread until released, so others queue behind it."""

    def __init__(self) -> None:
        import threading

        self.entered = threading.Event()
        self.release = threading.Event()

    def apply(self, tx: Tx) -> None:
        self.entered.set()
        self.release.wait(TEST_DEADLINE_S)


async def _in_one_batch(engine: Engine, first: Any, second: Any) -> list[Any]:
    """Queue `first` then `second` behind a gate so the writer takes them in one batch."""
    import trio.testing

    gate = Gate()
    results: list[Any] = [None, None]

    async def submit(index: int, command: Any) -> None:
        results[index] = await engine.submit(command)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.submit, gate)
        await trio.to_thread.run_sync(gate.entered.wait)
        nursery.start_soon(submit, 0, first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(submit, 1, second)
        await trio.testing.wait_all_tasks_blocked()
        batches = engine.writer.batches
        gate.release.set()
    # The gate's batch, then exactly one more holding both commands.
    assert engine.writer.batches == batches + 2
    return results


async def test_send_after_leave_in_same_batch_skips_leaver(
    engine: Engine, world: World
) -> None:
    """A member who leaves in the same batch before the send gets nothing."""
    ws = world.workspace_id
    _, sent = await _in_one_batch(
        engine,
        LeaveChannel(workspace_id=ws, agent_id=world.agents["bob"], channel="general"),
        SendChannelMessage(workspace_id=ws, agent_id=world.agents["alice"], channel="general",
                           text="who is here?"),
    )
    recipients = [a for a, _, _ in await deliveries_of(engine, sent.id)]
    assert recipients == sorted(world.agents[n] for n in ("carol", "dave"))


async def test_send_after_join_in_same_batch_reaches_joiner(
    engine: Engine, world: World
) -> None:
    """An agent who joins in the same batch before the send gets it."""
    ws = world.workspace_id
    await new_channel(engine, world, "alice", "ops")
    _, sent = await _in_one_batch(
        engine,
        JoinChannel(workspace_id=ws, agent_id=world.agents["carol"], channel="ops"),
        SendChannelMessage(workspace_id=ws, agent_id=world.agents["alice"], channel="ops",
                           text="hello carol"),
    )
    assert [a for a, _, _ in await deliveries_of(engine, sent.id)] == [world.agents["carol"]]


async def test_leave_after_send_keeps_the_delivery(
    engine: Engine, world: World
) -> None:
    """A leave queued after the send does not take the delivery back."""
    ws = world.workspace_id
    sent, _ = await _in_one_batch(
        engine,
        SendChannelMessage(workspace_id=ws, agent_id=world.agents["alice"], channel="general",
                           text="before bob leaves"),
        LeaveChannel(workspace_id=ws, agent_id=world.agents["bob"], channel="general"),
    )
    assert world.agents["bob"] in [a for a, _, _ in await deliveries_of(engine, sent.id)]


# -- channel reads -------------------------------------------------------------------------


async def test_get_channel_lists_members_and_list_counts_them(engine: Engine, world: World) -> None:
    ws = world.workspace_id
    await new_channel(engine, world, "alice", "ops", ("bob",))
    await engine.submit(UpdateChannel(workspace_id=ws, agent_id=None, channel="ops", topic="t"))
    channel = await engine.read(get_channel, ws, "ops")
    assert (channel.name, channel.topic, channel.member_count) == ("ops", "t", 2)
    assert channel.created_by == str(world.agents["alice"])
    assert channel.members is not None
    assert [(m.agent_name, m.role) for m in channel.members] == [
        ("alice", "owner"), ("bob", "member")]
    counts = {c.name: c.member_count for c in await engine.read(list_channels, ws)}
    assert counts == {"general": 4, "ops": 2}
    await expect_query_refused(engine, "channel_not_found", get_channel, ws, "nope")
    await expect_query_refused(engine, "channel_not_found", channel_members, ws, "nope")


async def test_channel_history_pages_newest_first_and_leaves_replies_out(
    engine: Engine, world: World
) -> None:
    from broker.engine.threads import ReplyToThread

    ws, alice = world.workspace_id, world.agents["alice"]
    ids = [await send(engine, world, "alice", "general", f"m{i}") for i in range(7)]
    await engine.submit(ReplyToThread(workspace_id=ws, agent_id=alice, message_id=ids[2],
                                      text="a reply"))

    async def page(**kw: Any) -> list[str]:
        got = await engine.read(channel_messages, ws, world.agents["bob"], "general",
                                kw.get("before"), kw.get("after"), kw.get("limit"))
        return [m.id for m in got]

    newest_first = ids[::-1]
    assert await page() == newest_first
    assert await page(limit=3) == newest_first[:3]
    assert await page(before=ids[4], limit=2) == [ids[3], ids[2]]
    assert await page(after=ids[1], limit=2) == [ids[3], ids[2]]
    assert await page(after=ids[1], before=ids[4]) == [ids[3], ids[2]]
    assert await page(after=ids[6]) == []
    (root,) = [m for m in await engine.read(
        channel_messages, ws, alice, "general", None, None, None) if m.id == ids[2]]
    assert root.reply_count == 1


async def test_channel_history_refusals(engine: Engine, world: World) -> None:
    ws, bob = world.workspace_id, world.agents["bob"]
    await new_channel(engine, world, "alice", "ops")
    await send(engine, world, "alice", "ops", "members only")
    await expect_query_refused(engine, "not_a_member", channel_messages, ws, bob, "ops",
                               None, None, None)
    await expect_query_refused(engine, "channel_not_found", channel_messages, ws, bob, "nope",
                               None, None, None)
    for limit in (0, 101, -1):
        await expect_query_refused(engine, "invalid_limit", channel_messages, ws, bob,
                                   "general", None, None, limit)
    await expect_query_refused(engine, "invalid_cursor", channel_messages, ws, bob, "general",
                               "abc", None, None)
    assert len(await engine.read(channel_messages, ws, bob, "general", None, None, 100)) == 0


async def test_get_message_only_for_those_who_can_see_it(engine: Engine, world: World) -> None:
    ws = world.workspace_id
    await new_channel(engine, world, "alice", "ops", ("bob",))
    sent = await send(engine, world, "alice", "ops", "private-ish")
    got = await engine.read(get_message, ws, world.agents["bob"], sent)
    assert (got.id, got.text, got.channel_name) == (sent, "private-ish", "ops")
    for bad in (sent, "12345", "not-an-id", ""):
        await expect_query_refused(engine, "message_not_found", get_message, ws,
                                   world.agents["carol"], bad)


# -- ephemeral events --------------------------------------------------------------------


async def test_ephemeral_events_for_membership_and_channel_changes(
    tmp_path: Path, engine_config: EngineConfig
) -> None:
    """Membership and channel changes emit ephemeral events."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with Engine.open(tmp_path, engine_config, with_facts=True) as eng:
            assert eng.facts is not None
            world = await make_world(eng)
            ws, alice = world.workspace_id, world.agents["alice"]
            await eng.submit(CreateChannel(workspace_id=ws, agent_id=alice, name="ops"))
            while True:  # drop what the setup emitted
                try:
                    eng.facts.receive_nowait()
                except trio.WouldBlock:
                    break
            await eng.submit(InviteToChannel(workspace_id=ws, agent_id=alice, channel="ops",
                                             agent_name="bob"))
            await eng.submit(MuteChannel(workspace_id=ws, agent_id=world.agents["bob"],
                                         channel="ops"))
            await eng.submit(LeaveChannel(workspace_id=ws, agent_id=world.agents["bob"],
                                          channel="ops"))
            await eng.submit(UpdateChannel(workspace_id=ws, agent_id=alice, channel="ops",
                                           topic="t"))
            await eng.submit(ArchiveChannel(workspace_id=ws, agent_id=alice, channel="ops"))
            facts = [f for _ in range(5) for f in eng.facts.receive_nowait()]
    assert [f.type for f in facts] == [
        "member.joined", "member.channel_muted", "member.left", "channel.updated",
        "channel.archived"]
    assert all(f.deliveries == () and f.log_id is None for f in facts)
    joined = msgspec.json.decode(facts[0].payload)
    assert joined["data"]["agent_name"] == "bob" and joined["data"]["channel"] == "ops"
    assert facts[1].audience == (world.agents["bob"],)
    assert msgspec.json.decode(facts[3].payload)["data"]["topic"] == "t"


# -- workspace isolation -------------------------------------------------------------------


async def test_channel_commands_and_queries_never_reach_another_workspace(
    engine: Engine, world: World
) -> None:
    other = await make_world(engine, "other", ("zed", "yan"))
    await engine.submit(CreateChannel(workspace_id=other.workspace_id,
                                      agent_id=other.agents["zed"], name="b-only"))
    ws, alice = world.workspace_id, world.agents["alice"]
    commands: list[tuple[str, Any]] = [
        ("channel_not_found", LeaveChannel(workspace_id=ws, agent_id=alice, channel="b-only")),
        ("channel_not_found", JoinChannel(workspace_id=ws, agent_id=alice, channel="b-only")),
        ("channel_not_found", InviteToChannel(workspace_id=ws, agent_id=alice, channel="b-only",
                                              agent_name="bob")),
        ("agent_not_found", InviteToChannel(workspace_id=ws, agent_id=alice, channel="general",
                                            agent_name="zed")),
        ("channel_not_found", UpdateChannel(workspace_id=ws, agent_id=alice, channel="b-only",
                                            topic="x")),
        ("channel_not_found", ArchiveChannel(workspace_id=ws, agent_id=None, channel="b-only")),
        ("channel_not_found", MuteChannel(workspace_id=ws, agent_id=alice, channel="b-only")),
        ("channel_not_found", UnmuteChannel(workspace_id=ws, agent_id=alice, channel="b-only")),
        # An agent id of workspace A presented with workspace B's id.
        ("agent_not_found", LeaveChannel(workspace_id=other.workspace_id, agent_id=alice,
                                         channel="general")),
        ("agent_not_found", MuteChannel(workspace_id=other.workspace_id, agent_id=alice,
                                        channel="general")),
        ("agent_not_found", InviteToChannel(workspace_id=other.workspace_id, agent_id=alice,
                                            channel="b-only", agent_name="yan")),
    ]
    for code, command in commands:
        await expect_refused(engine, code, command)
    queries: list[tuple[str, Any, tuple[object, ...]]] = [
        ("channel_not_found", get_channel, (ws, "b-only")),
        ("channel_not_found", channel_members, (ws, "b-only")),
        ("channel_not_found", channel_messages, (ws, alice, "b-only", None, None, None)),
        ("agent_not_found", channel_messages,
         (other.workspace_id, alice, "general", None, None, None)),
    ]
    for code, fn, args in queries:
        await expect_query_refused(engine, code, fn, *args)
    assert [c.name for c in await engine.read(list_channels, ws, True)] == ["general"]

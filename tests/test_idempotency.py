"""Idempotency keys on the send paths: replay, reuse, concurrency, retries after a change."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from broker.engine import inbound_hooks as hooks
from broker.engine.agents import DeactivateAgent
from broker.engine.channels import ArchiveChannel, CreateChannel, JoinChannel, LeaveChannel
from broker.engine.conversations import CreateGroupDm, RemoveParticipant, SendDm, SendGroupDm
from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from broker.engine.threads import ReplyToThread
from protocol.objects import Message
from tests.helpers.engine import Gate, World, refused, snapshot


async def _group(engine: Engine, world: World) -> str:
    created = await engine.submit(CreateGroupDm(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"],
        participants=["bob", "carol"]))
    return created.id


def _senders(world: World, group_id: str) -> dict[str, Any]:
    wid, alice = world.workspace_id, world.agents["alice"]
    return {
        "dm": lambda text, key: SendDm(workspace_id=wid, agent_id=alice, to="bob", text=text,
                                       idempotency_key=key),
        "group": lambda text, key: SendGroupDm(workspace_id=wid, agent_id=alice,
                                               conversation_id=group_id, text=text,
                                               idempotency_key=key),
    }


async def test_idempotency_replay_returns_first_result(
    engine: Engine, world: World
) -> None:
    """Replay returns the first result and writes nothing."""
    senders = _senders(world, await _group(engine, world))
    for kind, make in senders.items():
        first = await engine.submit(make("hello", f"{kind}-1"))
        before = await snapshot(engine)
        replay = await engine.submit(make("hello", f"{kind}-1"))
        assert replay.id == first.id and replay == first, kind
        assert await snapshot(engine) == before, f"{kind} replay wrote rows"
        # Another payload under the same key is refused, and writes nothing.
        await refused(engine, make("something else", f"{kind}-1"), "idempotency_key_reused")
        # A new key is a new message.
        other = await engine.submit(make("hello", f"{kind}-2"))
        assert other.id != first.id


async def test_idempotency_key_per_operation_and_agent(engine: Engine, world: World) -> None:
    """A key belongs to one operation and one agent."""
    wid, a = world.workspace_id, world.agents
    await engine.submit(SendDm(workspace_id=wid, agent_id=a["alice"], to="bob", text="x",
                               idempotency_key="k"))
    # The same key for a channel send by the same agent is another request.
    await refused(engine, SendChannelMessage(workspace_id=wid, agent_id=a["alice"],
                                             channel="general", text="x", idempotency_key="k"),
                  "idempotency_key_reused")
    # Another agent's "k" is its own.
    theirs = await engine.submit(SendDm(workspace_id=wid, agent_id=a["carol"], to="bob",
                                        text="x", idempotency_key="k"))
    assert theirs.agent_name == "carol"
    await refused(engine, SendDm(workspace_id=wid, agent_id=a["alice"], to="bob", text="x",
                                 idempotency_key="x" * 256), "invalid_idempotency_key")


async def race(engine: Engine, command: Any) -> list[Message]:
    """Submit `command` from two tasks at once, both in one batch (one transaction)."""
    results: list[Message] = []

    async def send() -> None:
        results.append(await engine.submit(command))

    # Hold the writer so that both land in the same batch: the second must
    # see the first's still uncommitted idempotency record.
    entered, release = threading.Event(), threading.Event()
    batches = engine.writer.statistics().batches
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.submit, Gate(entered, release))
        await trio.to_thread.run_sync(entered.wait, 30)
        for _ in range(2):
            nursery.start_soon(send)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert engine.writer.statistics().batches == batches + 2  # the gate, then both sends
    return results


async def test_idempotency_concurrent_sends_one_message(
    engine: Engine, world: World
) -> None:
    """Concurrent sends with one key make one message."""
    senders = _senders(world, await _group(engine, world))
    for kind, make in senders.items():
        first, second = await race(engine, make("race", f"{kind}-race"))
        assert first.id == second.id, kind
        rows = await engine.read(lambda c, cid=int(first.conversation_id or 0): c.execute(
            "SELECT count(*) FROM messages WHERE text = 'race' AND conversation_id = ?",
            (cid,)).fetchone())
        assert rows == (1,), kind
        deliveries = await engine.read(lambda c, mid=int(first.id): c.execute(
            "SELECT count(*) FROM deliveries WHERE message_id = ?", (mid,)).fetchone())
        assert deliveries == ((1,) if kind == "dm" else (2,))


# -- a retry after the state changed: the key is looked up before the domain checks ------


class Case(msgspec.Struct, frozen=True):
    """A send path, a change that makes a new send fail with `code`, and the result's id."""

    make: Callable[[str, str], Any]
    change: Any
    code: str
    sent_id: Callable[[Any], str] = lambda result: str(result.id)


async def _cases(engine: Engine, world: World) -> dict[str, Case]:
    wid, a = world.workspace_id, world.agents
    alice = a["alice"]
    for name in ("ops-archived", "ops-left", "thread-archived", "thread-left", "hooked"):
        await engine.submit(CreateChannel(workspace_id=wid, agent_id=alice, name=name))
        await engine.submit(JoinChannel(workspace_id=wid, agent_id=a["bob"], channel=name))
    roots = {
        name: (await engine.submit(SendChannelMessage(
            workspace_id=wid, agent_id=a["bob"], channel=name, text="root"))).id
        for name in ("thread-archived", "thread-left")
    }
    group_id = await _group(engine, world)
    hook = await engine.submit(hooks.CreateInboundWebhook(workspace_id=wid, channel="hooked"))

    def channel(name: str) -> Callable[[str, str], Any]:
        return lambda text, key: SendChannelMessage(
            workspace_id=wid, agent_id=alice, channel=name, text=text, idempotency_key=key)

    def reply(name: str) -> Callable[[str, str], Any]:
        return lambda text, key: ReplyToThread(
            workspace_id=wid, agent_id=alice, message_id=roots[name], text=text,
            idempotency_key=key)

    return {
        "channel, archived": Case(
            channel("ops-archived"),
            ArchiveChannel(workspace_id=wid, agent_id=alice, channel="ops-archived"),
            "channel_archived"),
        "channel, sender left": Case(
            channel("ops-left"),
            LeaveChannel(workspace_id=wid, agent_id=alice, channel="ops-left"), "not_a_member"),
        "thread, archived": Case(
            reply("thread-archived"),
            ArchiveChannel(workspace_id=wid, agent_id=alice, channel="thread-archived"),
            "channel_archived"),
        "thread, sender left": Case(
            reply("thread-left"),
            LeaveChannel(workspace_id=wid, agent_id=alice, channel="thread-left"),
            "message_not_found"),
        "dm, recipient deactivated": Case(
            lambda text, key: SendDm(workspace_id=wid, agent_id=alice, to="dave", text=text,
                                     idempotency_key=key),
            DeactivateAgent(workspace_id=wid, agent_id=a["dave"]), "agent_not_found"),
        "group dm, sender left": Case(
            lambda text, key: SendGroupDm(workspace_id=wid, agent_id=alice,
                                          conversation_id=group_id, text=text,
                                          idempotency_key=key),
            RemoveParticipant(workspace_id=wid, agent_id=alice, conversation_id=group_id,
                              agent="alice"),
            "not_a_participant"),
        "inbound webhook, archived": Case(
            lambda text, key: hooks.TriggerInboundWebhook(
                webhook_id=hook.webhook_id, token=hook.token, text=text, idempotency_key=key),
            ArchiveChannel(workspace_id=wid, agent_id=alice, channel="hooked"),
            "channel_archived", lambda result: str(result.message_id)),
    }


PATHS = ("channel, archived", "channel, sender left", "thread, archived", "thread, sender left",
         "dm, recipient deactivated", "group dm, sender left", "inbound webhook, archived")


@pytest.mark.parametrize("path", PATHS)
async def test_idempotency_retry_after_change_returns_first(
    engine: Engine, world: World, path: str
) -> None:
    """A retry after the state changed returns the first result."""
    cases = await _cases(engine, world)
    assert sorted(cases) == sorted(PATHS)
    case = cases[path]
    first = await engine.submit(case.make("once", "key"))
    await engine.submit(case.change)
    # With a new key the send is refused now...
    await refused(engine, case.make("once", "new"), case.code)
    # ...but the retry of the first send gets its result, and writes nothing.
    before = await snapshot(engine)
    retry = await engine.submit(case.make("once", "key"))
    assert case.sent_id(retry) == case.sent_id(first) and retry == first
    assert await snapshot(engine) == before, "the retry wrote rows"
    # Another payload under that key is still refused as a reuse.
    await refused(engine, case.make("another", "key"), "idempotency_key_reused")

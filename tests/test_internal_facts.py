"""Internal nudges (mailbox.changed, agent.token_rotated) reach the agent's sessions only."""

from __future__ import annotations

from typing import Any

import trio

from broker.engine.agents import RotateToken
from broker.engine.engine import Engine
from broker.engine.facts import Fact
from broker.engine.mailbox import FailDelivery
from broker.engine.messages import SendChannelMessage
from broker.engine.webhooks import CreateSubscription
from tests.helpers.engine import World


async def test_nudges_write_no_outbox_rows_and_are_marked_internal(
    world: World, engine: Engine
) -> None:
    await engine.submit(CreateSubscription(workspace_id=world.workspace_id,
                                           url="https://hooks.example.invalid/x", events=["*"]))
    sent = await engine.submit(SendChannelMessage(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"], channel="general",
        text="hello"))
    bob = world.agents["bob"]
    seq = await engine.read(lambda c: c.execute(
        "SELECT seq FROM deliveries WHERE agent_id = ? AND message_id = ?",
        (bob, int(sent.id))).fetchone()[0])
    before = await engine.read(lambda c: c.execute("SELECT count(*) FROM outbox").fetchone()[0])
    assert before >= 1  # the message itself is queued for the "*" subscription
    await engine.submit(FailDelivery(workspace_id=world.workspace_id, agent_id=bob,
                                     delivery_id=f"{bob}:{seq}", error="busy", retryable=True))
    await engine.submit(RotateToken(workspace_id=world.workspace_id, agent_id=bob))
    types = await engine.read(lambda c: [r[0] for r in c.execute(
        "SELECT type FROM outbox ORDER BY id")])
    assert "mailbox.changed" not in types and "agent.token_rotated" not in types
    assert len(types) == before


async def test_observers_do_not_see_internal_facts() -> None:
    from broker.fanout import FanoutHub

    seen: list[str] = []

    class Observer:
        workspace_id = 1
        agent_id = None

        def offer_fact(self, view: Any) -> None:
            seen.append(view.type)

    hub = FanoutHub()
    hub.attach(Observer())  # type: ignore[arg-type]
    hub.publish([
        Fact(type="mailbox.changed", workspace_id=1, payload=b"{}", audience=(7,),
             internal=True),
        Fact(type="channel.created", workspace_id=1, payload=b"{}"),
    ])
    assert seen == ["channel.created"]
    await trio.lowlevel.checkpoint()

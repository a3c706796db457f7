from __future__ import annotations

from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from tests.helpers.engine import World


async def test_send_in_general_reaches_every_other_member(engine: Engine, world: World) -> None:
    msg = await engine.submit(SendChannelMessage(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"], channel="general",
        text="hello"))
    rows = await engine.read(lambda c: c.execute(
        "SELECT agent_id, seq FROM deliveries WHERE message_id = ? ORDER BY agent_id",
        (int(msg.id),)).fetchall())
    expected = sorted((world.agents[n], 1) for n in ("bob", "carol", "dave"))
    assert rows == expected


async def test_load_messages_returns_what_was_sent(engine: Engine, world: World) -> None:
    from broker.engine.history import load_messages

    sent = await engine.submit(SendChannelMessage(
        workspace_id=world.workspace_id, agent_id=world.agents["alice"], channel="general",
        text="hi @bob", data={"k": 1}))
    (loaded,) = await engine.read(load_messages, [int(sent.id)])
    assert loaded.text == "hi @bob"
    assert loaded.mentions == ["bob"]
    assert loaded.data == {"k": 1}
    assert loaded.channel_name == "general"
    assert loaded.id == sent.id

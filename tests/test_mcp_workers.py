"""MCP with two gateway processes (`--workers 2`): gateway 0 serves it, the other relays
(broker.mcp.forward), and a client whose requests reach either works as with one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mcp_types as types
import trio

from tests.helpers.daemon import serve
from tests.helpers.engine import make_world
from tests.helpers.mcp import (
    LEGACY,
    MODERN,
    SDK_CLIENT_STREAMS,
    data,
    mcp_client,
    plan_with_bob_subscribed,
)

pytestmark = [SDK_CLIENT_STREAMS]

DEADLINE_S = 90
ROUNDS = 3


async def test_mcp_two_workers_session_wait_and_notifications(tmp_path: Path) -> None:
    """bob (2025 session, a new connection per request, so his requests land on both
    gateways) waits, and each wait returns with alice's post; his GET stream hears of
    each; alice (2026) listens to her own inbox and hears of bob's DMs."""
    with trio.fail_after(DEADLINE_S):
        async with serve(tmp_path / "data", workers=2) as server:
            world = await make_world(server.engine)
            url = f"{server.url}/mcp"
            bob_updates = trio.Semaphore(0)

            async def on_message(message: Any) -> None:
                if isinstance(message, types.ResourceUpdatedNotification):
                    bob_updates.release()

            async with mcp_client(url, world.tokens["alice"], MODERN,
                                  fresh_connections=True) as alice, \
                    mcp_client(url, world.tokens["bob"], LEGACY, fresh_connections=True,
                               message_handler=on_message) as bob:
                await plan_with_bob_subscribed(alice, bob)
                for n in range(ROUNDS):
                    got: list[Any] = []

                    async def wait(got: list[Any]) -> None:
                        got.append(data(await bob.call_tool(
                            "message.inbox.wait", {"timeout_seconds": 30, "ack": True})))

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(wait, got)
                        posted = data(await alice.call_tool(
                            "message.post", {"channel": "plan", "text": f"round {n}"}))
                    (result,) = got
                    assert [d["message"]["id"] for d in result["deliveries"]] == [posted["id"]]
                    await bob_updates.acquire()
                async with alice.listen(resource_subscriptions=["broker://inbox"]) as stream:
                    data(await bob.call_tool("message.dm.send", {"to": "alice", "text": "done"}))
                    async for event in stream:
                        assert str(getattr(event, "uri", "")) == "broker://inbox"
                        break
                notice = await alice.call_tool("agent.me", {})
                assert notice.content[-1].text == "1 unread: 1 DM from bob"  # type: ignore[union-attr]

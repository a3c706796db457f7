"""The real @relaycast/sdk@6.0.2 realtime client (Node) against the gateway.

tests/interop/sdk_realtime.mjs connects as an agent the way the SDK does
(node token, /v1/node/ws, auto-ack) and prints the events its handlers get.
This test checks that `message.created`, `dm.received`, `thread.reply` and
`message.reacted` reach the handlers, then stops the daemon, writes more
messages to the agent while no daemon runs, starts a new daemon on the same
data directory and port, and checks that the SDK, reconnecting on its own,
receives them. Skipped only when node is not installed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import trio

from broker.engine.conversations import SendDm
from broker.engine.engine import Engine
from broker.engine.mailbox import seq_marks
from broker.engine.reactions import AddReaction
from broker.engine.threads import ReplyToThread
from tests.helpers.daemon import FAST_ENGINE, serve
from tests.helpers.engine import make_world
from tests.helpers.interop import INTEROP, NODE, ensure_sdk_installed, needs_node
from tests.helpers.realtime import eventually, post

pytestmark = needs_node

SDK_DEADLINE_S = 90


class Lines:
    """JSON lines from the SDK process, one event at a time."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.seen: list[dict[str, Any]] = []

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some()
            if not chunk:
                raise AssertionError(f"the SDK process ended; it printed {self.seen}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        event: dict[str, Any] = json.loads(line)
        self.seen.append(event)
        return event

    async def until(self, wanted: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Read until an event of each wanted type whose text is the wanted one arrived."""
        found: dict[str, dict[str, Any]] = {}
        while set(found) != set(wanted):
            event = await self.next()
            kind = event["event"]
            if kind in wanted and _text(event) == wanted[kind]:
                found[kind] = event["data"]
        return found


def _text(event: dict[str, Any]) -> str | None:
    data = event["data"]
    if event["event"] == "message.reacted":
        return str(data.get("emoji"))
    message = data.get("message") or {}
    return message.get("text")


async def test_sdk_realtime_handlers_receive_events_and_catch_up_after_a_restart(
    tmp_path: Path,
) -> None:
    await ensure_sdk_installed()
    assert NODE is not None
    data_dir = tmp_path / "data"
    process: trio.Process | None = None
    with trio.fail_after(SDK_DEADLINE_S):
        try:
            async with serve(data_dir) as server:
                port, engine = server.port, server.engine
                world = await make_world(engine, agents=("alice", "bob"))
                ws_id, alice = world.workspace_id, world.agents["alice"]
                process = await trio.lowlevel.open_process(
                    [NODE, "--experimental-websocket", str(INTEROP / "sdk_realtime.mjs"),
                     server.url or "", world.tokens["bob"]],
                    cwd=INTEROP, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                )
                assert process.stdout is not None
                lines = Lines(process.stdout)
                while (await lines.next())["event"] != "open":
                    pass
                root = await post(engine, ws_id, world.agents["bob"], "general", "root")
                await post(engine, ws_id, alice, "general", "hello bob")
                await engine.submit(SendDm(workspace_id=ws_id, agent_id=alice, to="bob",
                                           text="a secret"))
                await engine.submit(ReplyToThread(workspace_id=ws_id, agent_id=alice,
                                                  message_id=str(root), text="in the thread"))
                await engine.submit(AddReaction(workspace_id=ws_id, agent_id=alice,
                                                message_id=str(root), emoji="rocket"))
                got = await lines.until({
                    "message.created": "hello bob", "dm.received": "a secret",
                    "thread.reply": "in the thread", "message.reacted": "rocket"})
                assert got["message.created"]["channel"] == "general"
                assert got["message.created"]["message"]["agentName"] == "alice"
                assert got["dm.received"]["message"]["agentName"] == "alice"
                assert got["dm.received"]["conversationId"]
                assert got["thread.reply"]["parentId"] == str(root)
                assert got["message.reacted"]["messageId"] == str(root)
                assert got["message.reacted"]["agentName"] == "alice"
                # The SDK acks every delivery it gets (autoAckDeliveries).
                bob = world.agents["bob"]
                await eventually(lambda: _acked(engine, ws_id, bob, 4))

            # The daemon is gone; while none runs, more is written for bob.
            async with Engine.open(data_dir, FAST_ENGINE) as offline:
                await post(offline, ws_id, alice, "general", "while you were away")
                await offline.submit(SendDm(workspace_id=ws_id, agent_id=alice, to="bob",
                                            text="missed dm"))

            assert port is not None
            async with serve(data_dir, port=port):  # the SDK reconnects on its own
                await lines.until({"message.created": "while you were away",
                                   "dm.received": "missed dm"})
            # What was acked before the restart never came again.
            texts = [_text(e) for e in lines.seen]
            for text in ("hello bob", "a secret", "in the thread", "rocket"):
                assert texts.count(text) == 1, text
            assert any(e["event"] == "close" for e in lines.seen)
        finally:
            if process is not None:
                process.kill()
                await process.wait()


async def _acked(engine: Engine, workspace_id: int, agent_id: int, seq: int) -> bool:
    marks = await engine.read(seq_marks, workspace_id, agent_id)
    return marks.acked_seq >= seq

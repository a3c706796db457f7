"""`broker mcp`: the stdio bridge as a subprocess, driven by the SDK's stdio client."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tomllib
from typing import Any

import httpx
import mcp_types as types
import pytest
import trio

from broker.cli import main
from broker.config import ConfigError, load_settings
from broker.server import BrokerServer
from tests.helpers.mcp import (
    LEGACY,
    MODERN,
    SDK_CLIENT_STREAMS,
    data,
    plan_with_bob_subscribed,
    stdio_client,
    texts,
)
from tests.helpers.realtime import eventually
from tests.helpers.rest import make_rest_world

pytestmark = [SDK_CLIENT_STREAMS]


@pytest.mark.one_process  # reads the in-process MCP surface
async def test_mcp_stdio_bridge_carries_a_conversation_a_wait_and_notifications(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    """alice (2026 revision) and bob (2025) each through their own `broker mcp`: bob's
    wait returns when alice posts, his resource subscription hears of it, he answers in
    the thread and alice's result carries the unread notice."""
    assert server.url is not None
    world = await make_rest_world(client)
    updated: list[str] = []
    inbox_updated = trio.Event()
    bob_id = int(world.agents["bob"])
    assert server.mcp is not None

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updated.append(str(message.params.uri))
            if updated[-1] == "broker://inbox":
                inbox_updated.set()

    with trio.fail_after(60):
        async with stdio_client(server.url, world.tokens["alice"], MODERN) as alice, \
                stdio_client(server.url, world.tokens["bob"], LEGACY,
                             message_handler=on_message) as bob:
            await plan_with_bob_subscribed(alice, bob)
            waited: list[Any] = []

            async def wait() -> None:
                waited.append(data(await bob.call_tool(
                    "message.inbox.wait", {"timeout_seconds": 30, "ack": True})))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                # The wait is in flight: it follows bob on the hub.
                await eventually(lambda: _true(server.mcp.watches.get(bob_id) is not None
                                               and server.mcp.watches.get(bob_id).holders > 1))
                posted = data(await alice.call_tool("message.post",
                                                    {"channel": "plan", "text": "ready?"}))
            (result,) = waited
            assert [d["message"]["id"] for d in result["deliveries"]] == [posted["id"]]
            reply = await bob.call_tool("message.reply", {"message_id": posted["id"],
                                                          "text": "yes"})
            assert data(reply)["thread_id"] == posted["id"]
            checked = await alice.call_tool("message.inbox.check", {})
            assert texts(checked)[-1] == "1 unread: 1 in #plan"
            dm = data(await alice.call_tool("message.dm.send", {"to": "bob", "text": "thanks"}))
            data(await bob.call_tool("message.reaction.add",
                                     {"message_id": posted["id"], "emoji": "tada"}))
            data(await bob.call_tool("message.inbox.mark_read",
                                     {"message_id": dm["message"]["id"]}))
            readers = data(await alice.call_tool("message.inbox.get_readers",
                                                 {"message_id": dm["message"]["id"]}))
            assert [r["agent_name"] for r in readers] == ["bob"]
            tools = {tool.name for tool in (await bob.list_tools()).tools}
            assert {"message.post", "message.inbox.wait"} <= tools
            await inbox_updated.wait()


async def _true(value: bool) -> bool:
    return value


INITIALIZE = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {},
    "clientInfo": {"name": "editor", "version": "1"}}})


async def test_mcp_bridge_to_an_unreachable_daemon_says_so_in_one_line_and_exits() -> None:
    """Nothing listens at the URL: at the editor's first message `broker mcp` writes one
    line on stderr and exits non-zero, while the editor still holds stdin open (as an
    editor waiting for its answer does)."""
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{refusing.getsockname()[1]}"
        with trio.fail_after(30):
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "broker", "mcp", "--url", url, "--token", "at_live_x"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert process.stdin and process.stdout and process.stderr
            outputs: dict[str, bytes] = {}

            async def drain(name: str, stream: trio.abc.ReceiveStream) -> None:
                chunks = [chunk async for chunk in stream]
                outputs[name] = b"".join(chunks)

            try:
                async with process.stdin, trio.open_nursery() as nursery:
                    nursery.start_soon(drain, "out", process.stdout)
                    nursery.start_soon(drain, "err", process.stderr)
                    await process.stdin.send_all(INITIALIZE.encode() + b"\n")
                    status = await process.wait()
            finally:
                if process.returncode is None:
                    process.kill()
    assert status == 1
    assert outputs["err"].decode() == f"broker mcp: cannot reach {url}/mcp: connection refused\n"
    assert outputs["out"] == b""


def snippet_server(editor: str, body: str) -> Any:
    """The broker's server entry in `editor`'s configuration snippet `body`."""
    if editor == "codex":
        return tomllib.loads(body)["mcp_servers"]["broker"]
    parsed = json.loads(body)
    return (parsed["servers"] if editor == "vscode" else parsed["mcpServers"])["broker"]


def test_mcp_config_prints_each_editors_snippet(capsys: pytest.CaptureFixture[str]) -> None:
    """`broker mcp config --editor E` prints a snippet that E's file format parses, with the
    daemon's URL and the token in the bridge's environment."""
    for editor in ("claude-code", "cursor", "codex", "vscode"):
        assert main(["mcp", "config", "--editor", editor, "--url", "http://10.0.0.5:8787",
                     "--token", "at_live_abc"]) == 0
        out = capsys.readouterr().out
        header, body = out.split("\n", 1)
        assert header.startswith("# ")
        server = snippet_server(editor, body)
        assert server["args"] == ["mcp"]
        assert server["env"] == {"BROKER_URL": "http://10.0.0.5:8787",
                                 "BROKER_TOKEN": "at_live_abc"}
    with pytest.raises(SystemExit) as refused:
        main(["mcp", "config", "--editor", "vi"])
    assert refused.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_mcp_config_without_a_token_leaves_it_to_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --token the snippet has no BROKER_TOKEN (a placeholder pasted as is would
    override the token the editor passes down; one from this shell stays out of a file),
    and one line on stderr says where the token comes from."""
    monkeypatch.setenv("BROKER_TOKEN", "at_live_from_this_shell")
    for editor in ("claude-code", "cursor", "codex", "vscode"):
        assert main(["mcp", "config", "--editor", editor, "--url", "http://10.0.0.5:8787"]) == 0
        out, err = capsys.readouterr()
        body = out.split("\n", 1)[1]
        server = snippet_server(editor, body)
        assert server["env"] == {"BROKER_URL": "http://10.0.0.5:8787"}
        assert "at_live" not in out
        (line,) = err.splitlines()
        assert "BROKER_TOKEN" in line and "--token" in line


def test_mcp_bridge_variables_are_not_daemon_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """BROKER_URL and BROKER_TOKEN belong to `broker mcp`: a daemon started in the same
    shell does not refuse them as unknown settings (it still refuses a real typo)."""
    monkeypatch.setenv("BROKER_URL", "http://127.0.0.1:8787")
    monkeypatch.setenv("BROKER_TOKEN", "at_live_x")
    assert load_settings(None).mcp.enabled is True
    monkeypatch.setenv("BROKER_MCP_MAX_SESIONS", "3")
    with pytest.raises(ConfigError, match="BROKER_MCP_MAX_SESIONS"):
        load_settings(None)

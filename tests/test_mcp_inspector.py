"""A third-party MCP client against /mcp: the MCP Inspector CLI (Node), pinned by
tests/interop/package-lock.json and installed by `make interop-deps`."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from broker.server import BrokerServer
from tests.helpers.interop import INTEROP, NODE, ensure_sdk_installed, needs_node
from tests.helpers.mcp import mcp_url
from tests.helpers.rest import make_rest_world

INSPECTOR = "@modelcontextprotocol/inspector-cli"
# The CLI looks for its own package.json at ../package.json from the working directory.
INSPECTOR_BUILD = INTEROP / "node_modules" / INSPECTOR / "build"
RUN_DEADLINE_S = 60

pytestmark = needs_node


async def inspect(url: str, token: str, *args: str) -> Any:
    assert NODE is not None
    with trio.fail_after(RUN_DEADLINE_S):
        done = await trio.run_process(
            [NODE, "index.js", url, "--transport", "http",
             "--header", f"Authorization: Bearer {token}", *args],
            cwd=INSPECTOR_BUILD, capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return json.loads(done.stdout)


async def test_mcp_inspector_lists_the_tools_and_posts(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    await ensure_sdk_installed(INSPECTOR)
    world = await make_rest_world(client)
    url, alice = mcp_url(server), world.tokens["alice"]
    listed = await inspect(url, alice, "--method", "tools/list")
    names = {tool["name"] for tool in listed["tools"]}
    assert {"message.post", "message.inbox.check", "message.inbox.wait"} <= names
    post = next(tool for tool in listed["tools"] if tool["name"] == "message.post")
    assert set(post["inputSchema"]["required"]) == {"channel", "text"}
    assert post["annotations"] == {"readOnlyHint": False, "destructiveHint": False}
    listing = next(tool for tool in listed["tools"] if tool["name"] == "message.list")
    assert listing["annotations"]["readOnlyHint"] is True
    await inspect(url, alice, "--method", "tools/call", "--tool-name", "channel.create",
                  "--tool-arg", "name=plan")
    posted = await inspect(url, alice, "--method", "tools/call", "--tool-name", "message.post",
                           "--tool-arg", "channel=plan", "--tool-arg", "text=hello")
    assert posted["isError"] is False
    assert posted["structuredContent"]["text"] == "hello"
    stored = await server.engine.read(
        lambda c: c.execute("SELECT text FROM messages").fetchall())
    assert stored == [("hello",)]

"""docs/mcp.md stays in step with the server: its tool table is what `tools/list` answers,
its legacy names are the ones accepted, its example is what `broker mcp config` prints."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from broker.cli import main
from broker.mcp.tools import LEGACY_ALIASES, tools
from broker.server import BrokerServer
from tests.helpers.mcp import SDK_CLIENT_STREAMS, mcp_client, mcp_url
from tests.helpers.rest import make_rest_world

DOC = Path(__file__).resolve().parent.parent / "docs" / "mcp.md"
ROW = re.compile(r"^\| `([^`]+)` \| (?:`([^`]+)`|\(the hub\)) \| (agent|workspace key|either) "
                 r"\| (.+) \|$", re.M)
WHO = {"agent": "agent", "workspace": "workspace key", "any": "either", "none": "either"}


@SDK_CLIENT_STREAMS
async def test_mcp_docs_tool_table_is_what_tools_list_answers(
    server: BrokerServer, client: httpx.AsyncClient
) -> None:
    rows = {name: (op, who, text) for name, op, who, text in ROW.findall(DOC.read_text())}
    world = await make_rest_world(client)
    listed: dict[str, str] = {}
    for token in (world.tokens["alice"], world.key):
        async with mcp_client(mcp_url(server), token) as session:
            listed.update({t.name: t.description or "" for t in (await session.list_tools()).tools})
    assert set(rows) == set(listed)
    for name, (op, who, text) in rows.items():
        tool = tools()[name]
        assert text == listed[name], name
        assert op == ("" if tool.operation is None else tool.operation.name), name
        assert who == ("agent" if tool.operation is None else WHO[tool.operation.auth]), name


def test_mcp_docs_name_every_legacy_alias_and_show_a_real_snippet(
    capsys: pytest.CaptureFixture[str]
) -> None:
    text = DOC.read_text()
    section = text.split("are accepted on calls and not listed:", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`([^`]+)`", section)) == set(LEGACY_ALIASES)
    example = re.search(r"```\n\$ (broker mcp config [^\n]+)\n(.*?)```", text, re.S)
    assert example is not None
    assert main(example.group(1).split()[1:]) == 0
    out, err = capsys.readouterr()
    assert out == example.group(2)
    # Without --token, the line on stderr that the page quotes.
    assert f"`{err.strip()}`" in " ".join(text.split())

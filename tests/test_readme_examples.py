"""The README's Python client and Relaycast SDK examples run, as written, against a live daemon."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import httpx
import pytest
import trio

from broker.server import BrokerServer
from tests.helpers.interop import INTEROP, NODE, ensure_sdk_installed

# The same tests in one process and with two gateway processes (conftest.py).
pytestmark = pytest.mark.both_process_models

README = Path(__file__).resolve().parent.parent / "README.md"
DEADLINE_S = 60
DEFAULT_BASE = "http://127.0.0.1:8787"


def example(language: str) -> str:
    """The one fenced block of `language` in the README's realtime section."""
    section = README.read_text().split("## Realtime:", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one {language} block in the realtime section"
    return blocks[0]


async def register(base: str, workspace: str, *names: str) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=base) as http:
        key = (await http.post("/v1/workspaces", json={"name": workspace})).json()["data"]
        tokens = {}
        for name in names:
            reply = await http.post("/v1/agents", json={"name": name},
                                    headers={"Authorization": f"Bearer {key['api_key']}"})
            tokens[name] = reply.json()["data"]["token"]
    return tokens


async def test_readme_python_client_example(server: BrokerServer, tmp_path: Path) -> None:
    """The Python client example."""
    assert server.url is not None
    tokens = await register(server.url, "readme", "alice", "bob")
    script = tmp_path / "example.py"
    script.write_text(example("python"))
    env = dict(os.environ, ALICE=tokens["alice"], BOB=tokens["bob"],
               BROKER_WS=server.url.replace("http://", "ws://") + "/v1/ws",
               PYTHONPATH=str(README.parent))
    with trio.fail_after(DEADLINE_S):
        done = await trio.run_process([sys.executable, str(script)], env=env,
                                      capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    lines = out.splitlines()
    assert lines[0].startswith("sent ") and lines[1] == "1 message.created hello from python"


@pytest.mark.skipif(NODE is None, reason="node is not installed")
async def test_readme_relaycast_sdk_example(server: BrokerServer) -> None:
    """The Relaycast SDK example."""
    assert server.url is not None and NODE is not None
    await ensure_sdk_installed()
    code = example("js")
    assert DEFAULT_BASE in code
    # beside tests/interop/node_modules, so the import resolves
    script = INTEROP / f"readme_example_{os.getpid()}.mjs"
    script.write_text(code.replace(DEFAULT_BASE, server.url))
    try:
        with trio.fail_after(DEADLINE_S):
            done = await trio.run_process(
                [NODE, "--experimental-websocket", str(script)], cwd=INTEROP,
                capture_stdout=True, capture_stderr=True, check=False)
    finally:
        script.unlink()
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "bob got: hello from the Relaycast SDK"

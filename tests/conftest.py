"""Shared fixtures: an engine on a temporary file, and a small populated workspace."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from broker.config import HttpSettings, Settings
from broker.engine.config import EngineConfig
from broker.engine.engine import Engine
from broker.engine.workspaces import CreateWorkspace, RegisterAgent
from broker.server import BrokerServer

# Every test that touches the engine or a socket runs under this absolute bound.
TEST_DEADLINE_S = 60


@pytest.fixture
def engine_config() -> EngineConfig:
    # synchronous=NORMAL only to keep the suite fast; durability is tested in
    # tests that set FULL explicitly.
    return EngineConfig(synchronous="NORMAL")


@pytest.fixture
async def engine(tmp_path: Path, engine_config: EngineConfig) -> AsyncIterator[Engine]:
    with trio.fail_after(TEST_DEADLINE_S):
        async with Engine.open(tmp_path, engine_config) as eng:
            yield eng


class World(msgspec.Struct):
    """A workspace with agents, for domain tests: ids as ints, tokens and key as str."""

    workspace_id: int
    key: str
    agents: dict[str, int]
    tokens: dict[str, str]


async def make_world(engine: Engine, name: str = "acme", agents: tuple[str, ...] = (
    "alice", "bob", "carol", "dave")) -> World:
    ws = await engine.submit(CreateWorkspace(name))
    wid = int(ws.workspace_id)
    ids: dict[str, int] = {}
    tokens: dict[str, str] = {}
    for agent in agents:
        created = await engine.submit(RegisterAgent(workspace_id=wid, name=agent))
        ids[agent] = int(created.id)
        tokens[agent] = created.token
    return World(wid, ws.api_key, ids, tokens)


@pytest.fixture
async def world(engine: Engine) -> World:
    return await make_world(engine)


# -- a live server on 127.0.0.1, port 0, and an HTTP client for it -----------------


@pytest.fixture
def settings(tmp_path: Path, engine_config: EngineConfig) -> Settings:
    """The `server` fixture's settings; a test module may override this fixture."""
    return Settings(
        data_dir=str(tmp_path / "data"), engine=engine_config,
        http=HttpSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=1.0),
    )


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[BrokerServer]:
    srv = BrokerServer(settings)
    with trio.fail_after(TEST_DEADLINE_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.run)
            yield srv
            srv.stop()


@pytest.fixture
async def client(server: BrokerServer) -> AsyncIterator[httpx.AsyncClient]:
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        yield http

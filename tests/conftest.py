"""Shared fixtures: an engine on a temporary file, a small populated workspace, and a live
server with an HTTP client. Plain helpers live in tests/helpers/."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from broker.config import HttpSettings, ServerSettings, Settings
from broker.engine.config import EngineConfig
from broker.engine.engine import Engine
from broker.gateway.settings import GatewaySettings
from broker.server import BrokerServer
from tests.helpers.daemon import run_server
from tests.helpers.engine import TEST_DEADLINE_S, World, make_world
from tests.helpers.realtime import Live


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


@pytest.fixture
async def world(engine: Engine) -> World:
    return await make_world(engine)


# -- a live server on 127.0.0.1, port 0, and an HTTP client for it -----------------


# Gateway processes of the `server` fixture where a test does not choose:
# `PYTEST_BROKER_WORKERS=2 make test` runs the whole suite with two (tests
# marked `one_process` stay in one: they read or patch in-process objects).
DEFAULT_WORKERS = int(os.environ.get("PYTEST_BROKER_WORKERS", "1"))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module marked `both_process_models` runs its server tests twice: in one
    process (workers=1) and with two gateway processes (workers=2), but for
    tests marked `one_process` (they read or patch the in-process server)."""
    if "workers" in metafunc.fixturenames and \
            metafunc.definition.get_closest_marker("both_process_models") and \
            not metafunc.definition.get_closest_marker("one_process"):
        metafunc.parametrize("workers", [1, 2], indirect=True, ids=["1proc", "2workers"])


@pytest.fixture
def workers(request: pytest.FixtureRequest) -> int:
    """Gateway processes of the `server` fixture: as parametrized, else 1 for a test
    marked `one_process`, else DEFAULT_WORKERS."""
    if hasattr(request, "param"):
        return int(request.param)
    if request.node.get_closest_marker("one_process"):
        return 1
    return DEFAULT_WORKERS



@pytest.fixture
def gateway_settings() -> GatewaySettings:
    """The `settings` fixture's gateway settings; a test module may override this fixture."""
    return GatewaySettings()


@pytest.fixture
def settings(
    tmp_path: Path, engine_config: EngineConfig, gateway_settings: GatewaySettings,
    workers: int,
) -> Settings:
    """The `server` fixture's settings; a test module may override this fixture."""
    return Settings(
        data_dir=str(tmp_path / "data"), engine=engine_config,
        server=ServerSettings(workers=workers),
        http=HttpSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=1.0),
        gateway=gateway_settings,
    )


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[BrokerServer]:
    with trio.fail_after(TEST_DEADLINE_S):
        async with run_server(settings) as srv:
            yield srv


@pytest.fixture
async def client(server: BrokerServer) -> AsyncIterator[httpx.AsyncClient]:
    assert server.url is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        yield http


@pytest.fixture
async def live(server: BrokerServer, client: httpx.AsyncClient) -> Live:
    """The server with a world made through its engine, and an HTTP client for it."""
    return Live(server, await make_world(server.engine), client)

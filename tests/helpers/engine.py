"""Engine-level helpers: a workspace built through the writer, "wrote nothing" checks,
test-only commands, and waits for state another task moves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import apsw
import msgspec
import pytest
import trio

from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.workspaces import CreateWorkspace, RegisterAgent
from broker.engine.writer import Tx
from broker.sweeps import Sweeper

# Every test that touches the engine or a socket runs under this absolute bound.
TEST_DEADLINE_S = 60


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


def _dump(conn: apsw.Connection) -> dict[str, list[tuple[Any, ...]]]:
    tables = [
        r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " AND sql NOT LIKE 'CREATE VIRTUAL TABLE%' ORDER BY name")
    ]
    return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in tables}


async def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (FTS shadow tables included): "wrote nothing" is equality."""
    return await engine.read(_dump)


async def refused(engine: Engine, command: Any, code: str) -> BrokerError:
    """Submit `command`, expect BrokerError(code), and check that it changed no row."""
    before = await snapshot(engine)
    with pytest.raises(BrokerError) as caught:
        await engine.submit(command)
    assert caught.value.code == code, caught.value
    assert await snapshot(engine) == before, f"{type(command).__name__} wrote rows"
    return caught.value


async def query_refused(engine: Engine, code: str, fn: Callable[..., Any], *args: Any) -> None:
    with pytest.raises(BrokerError) as caught:
        await engine.read(fn, *args)
    assert caught.value.code == code, caught.value


class Sql(msgspec.Struct, frozen=True):
    """A test command: run one statement in the writer's transaction (for rows no command makes)."""

    sql: str
    args: tuple[Any, ...] = ()

    def apply(self, tx: Tx) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in tx.conn.execute(self.sql, self.args).fetchall()]


class NewIds(msgspec.Struct, frozen=True):
    """A test command: allocate ids from the writer's allocator (unique across tables)."""

    n: int

    def apply(self, tx: Tx) -> list[int]:
        return [tx.new_id() for _ in range(self.n)]


class Gate(msgspec.Struct, frozen=True):
    """A test command that holds the writer thread until released, so a batch can queue up."""

    entered: threading.Event
    release: threading.Event

    def apply(self, tx: Tx) -> None:
        self.entered.set()
        self.release.wait(timeout=30)


async def hold_writer(engine: Engine, nursery: trio.Nursery) -> threading.Event:
    """Occupy the writer with a Gate; returns the event that releases it."""
    entered, release = threading.Event(), threading.Event()
    nursery.start_soon(engine.submit, Gate(entered, release))
    await trio.to_thread.run_sync(entered.wait, 30)
    return release


async def wait_queued(engine: Engine, n: int) -> None:
    # The writer's queue has no "wait until depth" event; poll its statistics.
    while engine.writer.statistics().queue_depth < n:  # noqa: ASYNC110
        await trio.sleep(0.001)


async def delivery_rows(engine: Engine, agent_id: int) -> list[tuple[Any, ...]]:
    """(seq, state, attempts, delivered_at set, acked_at set) of each of the agent's rows."""
    return await engine.read(lambda c: c.execute(
        "SELECT seq, state, attempts, delivered_at IS NOT NULL, acked_at IS NOT NULL"
        " FROM deliveries WHERE agent_id = ? ORDER BY seq", (agent_id,)).fetchall())


async def wait_purged(sweeper: Sweeper, count: int) -> None:
    """Wait until the sweeper finished `count` purges (the fixture's deadline bounds it)."""
    while True:
        if sweeper.statistics().workspaces_purged >= count:
            return
        await trio.sleep(0.01)


class WallClock:
    """A wall clock for the writer (`engine.writer.clock`) that moves only when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

"""Rate limits and socket caps shared by every process of the daemon (`SharedLimits`).

First the shared tables alone: the same verdicts as the in-process buckets,
a full window, and two processes taking from one bucket at once. Then a
daemon with two gateway processes, each request and socket on a connection
of its own so that the kernel spreads them over both: every limit and cap
holds once for the daemon, not once per gateway.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import msgspec
import pytest
import trio

from broker.config import HttpSettings, ServerSettings, Settings
from broker.gateway.settings import GatewaySettings
from broker.ratelimit import (
    MAX_COUNTED_SOCKETS,
    Bucket,
    RateLimited,
    RateLimiter,
    RateLimitSettings,
    SharedBucket,
    SharedLimits,
)
from broker.server import BrokerServer
from broker.shared_tables import WINDOW, SharedRegion, SlotTable
from tests.helpers.daemon import FAST_ENGINE, run_server
from tests.helpers.engine import TEST_DEADLINE_S, World, make_world
from tests.helpers.realtime import close_of, next_frame, raw_socket, send_json

SECOND = 1_000_000_000
# How long a refused socket may take to be closed (an admitted one is never closed).
REFUSED_WITHIN_S = 10

# -- the tables alone ------------------------------------------------------------------------


@pytest.fixture
def shared() -> Iterator[SharedLimits]:
    limits = SharedLimits.create(max_sessions=100, max_keys=1000)
    yield limits
    limits.close()


def test_shared_bucket_verdicts_match_the_in_process_bucket(shared: SharedLimits) -> None:
    """20,000 random takes and peeks over 50 ids and 50 addresses and a moving clock: the
    same verdicts."""
    rng = random.Random(7)
    local, table = Bucket(30), SharedBucket(30, shared.tables["agents"])
    now = 10 * SECOND
    for _ in range(20_000):
        now += rng.randrange(0, SECOND // 4)
        key = rng.choice([rng.randrange(50), str(rng.randrange(50))])
        if rng.random() < 0.2:
            assert table.peek(key, now) == local.peek(key, now)
        else:
            assert table.take(key, now) == local.take(key, now)
    # An id and an address that print alike are two keys.
    while table.take(5, now).allowed:
        pass
    assert table.take("5", now).allowed


def test_shared_bucket_full_window_drops_the_key_nearest_to_full() -> None:
    """One home slot for every key (a table of 1 slot): the 17th key takes the slot of
    the one whose bucket refills first, which then starts again full."""
    region = SharedRegion.create(SlotTable.size(1))
    try:
        bucket = SharedBucket(1, SlotTable(region.view, 0, 1, salt=b""))
        now = 0
        for key in range(WINDOW):
            now += SECOND
            assert bucket.take(key, now).allowed
        assert not bucket.take(0, now).allowed and not bucket.take(1, now).allowed
        now += SECOND
        assert bucket.take("newcomer", now).allowed
        assert not bucket.take(1, now).allowed  # kept: it refills later than key 0 does
        assert not bucket.take("newcomer", now).allowed
        assert bucket.take(0, now).allowed  # dropped: a full bucket again (and key 1 goes)
        assert len(bucket) == WINDOW
    finally:
        region.close()


def race(script: str, shared: SharedLimits) -> list[str]:
    """Run `script` in two processes on `shared`, started together; what each printed last."""
    racers = [subprocess.Popen(
        [sys.executable, "-c", script, str(shared.region.fd)], pass_fds=(shared.region.fd,),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for racer in racers:
            assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        return [racer.communicate(timeout=60)[0].strip() for racer in racers]
    finally:
        for racer in racers:
            racer.kill()


TAKER = """
import sys
from broker.ratelimit import RateLimited, RateLimiter, RateLimitSettings, SharedLimits
shared = SharedLimits.attach(int(sys.argv[1]), max_sessions=100, max_keys=1000)
limiter = RateLimiter(RateLimitSettings(agent_per_minute=0, workspace_per_minute=50_000),
                      clock=lambda: 5.0, shared=shared)
print("ready", flush=True)
sys.stdin.readline()
passed = 0
for _ in range(40_000):
    try:
        limiter.take_request("message.send", 1, None, "")
        passed += 1
    except RateLimited:
        pass
print(passed, flush=True)
"""


def test_shared_bucket_two_processes_at_once_pass_the_limit_once(shared: SharedLimits) -> None:
    """Two processes, 40,000 takes each from one bucket of 50,000 at a standing clock,
    started together: 50,000 pass in all (no update lost while both take)."""
    passed = [int(printed) for printed in race(TAKER, shared)]
    assert sum(passed) == 50_000, passed
    refused = RateLimiter(RateLimitSettings(workspace_per_minute=50_000), clock=lambda: 5.0,
                          shared=shared)
    with pytest.raises(RateLimited, match="rate limit exceeded"):
        refused.take_request("message.send", 1, None, "")


ADMITTER = """
import sys
from broker.ratelimit import RateLimiter, RateLimitSettings, SharedLimits
shared = SharedLimits.attach(int(sys.argv[1]), max_sessions=100, max_keys=1000)
limiter = RateLimiter(RateLimitSettings(), shared=shared)
print("ready", flush=True)
sys.stdin.readline()
for i in range(30_000):
    agent = i % 3
    if limiter.admit_socket(agent, 0, 0) is None:
        limiter.release_socket(agent)
print("done", flush=True)
"""


def test_shared_socket_counts_two_processes_at_once_end_where_they_began(
    shared: SharedLimits,
) -> None:
    """Two processes admitting and releasing sockets of three agents at once, 30,000 times
    each: no count drifts (without the lock the total ended at -1 and the agents' counts
    at 3, 9 and 5), so every agent still gets exactly its cap."""
    assert race(ADMITTER, shared) == ["done", "done"]
    limiter = RateLimiter(RateLimitSettings(), shared=shared)
    assert limiter.sockets() == 0
    for agent in range(3):
        assert [limiter.admit_socket(agent, 0, 2) for _ in range(3)] == [
            None, None, "sessions_per_agent"]


FAILER = """
import sys
from broker.ratelimit import RateLimiter, RateLimitSettings, SharedLimits
shared = SharedLimits.attach(int(sys.argv[1]), max_sessions=100, max_keys=1000)
limiter = RateLimiter(RateLimitSettings(auth_failures_per_minute=40_000), clock=lambda: 5.0,
                      shared=shared)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(20_000):
    limiter.auth_failed("198.51.100.7")
print("done", flush=True)
"""


def test_shared_auth_failures_two_processes_at_once_are_all_counted(
    shared: SharedLimits,
) -> None:
    """40,000 refused tokens from one address, counted by two processes at once against a
    limit of 40,000 at a standing clock: every one counts, so the address is now blocked
    (one lost update would leave it one more guess)."""
    assert race(FAILER, shared) == ["done", "done"]
    limiter = RateLimiter(RateLimitSettings(auth_failures_per_minute=40_000),
                          clock=lambda: 5.0, shared=shared)
    with pytest.raises(RateLimited):
        limiter.check_auth("198.51.100.7")
    limiter.check_auth("198.51.100.8")  # another address is not


def test_shared_keys_are_salted_per_daemon() -> None:
    """Each region draws its own salt, so where a key lands differs from daemon to daemon
    (a client cannot pick addresses that crowd one window of every daemon)."""
    one = SharedLimits.create(max_sessions=100, max_keys=1000)
    two = SharedLimits.create(max_sessions=100, max_keys=1000)
    try:
        for name in SharedLimits.LIMITS:
            keys = [(one.tables[name].key_of(k), two.tables[name].key_of(k))
                    for k in (5, "203.0.113.9")]
            assert all(a != b for a, b in keys)
        assert one.tables["agents"].salt != two.tables["agents"].salt
    finally:
        one.close()
        two.close()


def test_shared_socket_counts_cap_two_limiters_and_are_given_back(shared: SharedLimits) -> None:
    """Two limiters on one region (as two gateways): caps over both; released places return."""
    mapped = SharedLimits.attach(os.dup(shared.region.fd), max_sessions=100, max_keys=1000)
    try:
        one, two = (RateLimiter(RateLimitSettings(), shared=s) for s in (shared, mapped))
        assert one.admit_socket(7, 3, 2) is None
        assert two.admit_socket(7, 3, 2) is None
        assert one.admit_socket(7, 3, 2) == "sessions_per_agent"
        assert two.admit_socket(None, 3, 2) is None  # an observer: the total only
        assert one.admit_socket(8, 3, 2) == "sessions"
        assert (one.sockets(), two.sockets()) == (3, 3)
        two.release_socket(7)
        assert one.admit_socket(7, 3, 2) is None
        for limiter, agent in ((one, 7), (two, 7), (one, None)):
            limiter.release_socket(agent)
        assert one.sockets() == 0
        assert one.statistics().sessions_per_agent == 1 and one.statistics().sessions == 1
        # The process that made the tables reports their keys; the others none.
        assert one.statistics().tracked_keys == 0 and two.statistics().tracked_keys is None
    finally:
        mapped.close()


def test_shared_socket_counts_hold_when_windows_are_full(caplog: pytest.LogCaptureFixture) -> None:
    """40 agents in a socket table of 16 slots (31 with the last window): those that find
    no room are counted in this process, and every agent still meets its cap of 2, before
    and after all their sockets are released (no count drifts below 0)."""
    shared = SharedLimits.create(max_sessions=1, max_keys=1000)
    try:
        limiter = RateLimiter(RateLimitSettings(), shared=shared)
        agents = range(1, 41)
        for _ in range(2):
            assert [limiter.admit_socket(a, 0, 2) for a in agents] == [None] * 40
            assert [limiter.admit_socket(a, 0, 2) for a in agents] == [None] * 40
            assert {limiter.admit_socket(a, 0, 2) for a in agents} == {"sessions_per_agent"}
            assert limiter.sockets() == 80
            for agent in agents:
                limiter.release_socket(agent)
                limiter.release_socket(agent)
            assert limiter.sockets() == 0
        assert "counted in this process alone" in caplog.text
    finally:
        shared.close()


def test_shared_limits_layout_is_bounded_whatever_max_sessions_says() -> None:
    """A cap of a billion sockets does not size a table of a billion slots."""
    key_slots, socket_slots, size = SharedLimits.layout(10**9, 100_000)
    assert (key_slots, socket_slots) == (262_144, 2 * MAX_COUNTED_SOCKETS)
    assert size < 64 * 2**20
    assert SharedLimits.layout(20_000, 100_000)[1] == 65_536


def test_shared_limits_attach_refuses_another_layout(shared: SharedLimits) -> None:
    """A gateway with other settings than the writer process maps nothing, and closes
    the descriptor it was handed: a region of another size, or of the same size whose
    header names other slot counts."""
    fd = os.dup(shared.region.fd)
    with pytest.raises(ValueError, match="disagree on its layout"):
        SharedLimits.attach(fd, max_sessions=100, max_keys=5000)
    with pytest.raises(OSError):
        os.fstat(fd)
    key_slots, socket_slots, _ = SharedLimits.layout(100, 1000)
    struct.pack_into("<qq", shared.region.view, 0, key_slots, socket_slots * 2)
    fd = os.dup(shared.region.fd)
    with pytest.raises(ValueError, match="slots, not"):
        SharedLimits.attach(fd, max_sessions=100, max_keys=1000)
    with pytest.raises(OSError):
        os.fstat(fd)


# -- a daemon with two gateway processes ------------------------------------------------------


class TwoGateways(msgspec.Struct):
    server: BrokerServer
    world: World
    port: int


@asynccontextmanager
async def two_gateways(tmp_path: Path, limits: RateLimitSettings,
                       gateway: GatewaySettings | None = None) -> AsyncIterator[TwoGateways]:
    settings = Settings(
        data_dir=str(tmp_path / "data"), engine=FAST_ENGINE, server=ServerSettings(workers=2),
        http=HttpSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=1.0),
        gateway=gateway or GatewaySettings(), rate_limits=limits,
    )
    with trio.fail_after(TEST_DEADLINE_S):
        async with run_server(settings) as server:
            assert server.port is not None
            yield TwoGateways(server, await make_world(server.engine), server.port)


async def fresh(live: TwoGateways, method: str, path: str, token: str | None = None,
                **kwargs: object) -> httpx.Response:
    """One request on a connection of its own (the kernel picks its gateway)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{live.port}", timeout=10) as http:
        return await http.request(method, path, headers=headers, **kwargs)  # type: ignore[arg-type]


async def refusals_of(live: TwoGateways, token: str, sockets: int) -> list[int | None]:
    """Open `sockets` sockets one after another, each on its own connection: the close
    codes the daemon sent (each within REFUSED_WITHIN_S: a socket it admitted would wait
    until the test's deadline)."""
    codes = []
    for _ in range(sockets):
        async with raw_socket(live.server, token) as ws:
            with trio.fail_after(REFUSED_WITHIN_S):
                codes.append((await close_of(ws))[0])
    return codes


async def released(live: TwoGateways) -> None:
    """Until every gateway has given back its ended sockets' places (a client's close can
    complete before the gateway's release runs)."""
    while live.server.limiter.sockets():  # noqa: ASYNC110 (a count in shared memory)
        await trio.sleep(0.01)


async def metric(live: TwoGateways, name: str) -> float:
    text = (await fresh(live, "GET", "/metrics")).text
    found = [row for row in text.splitlines() if row.startswith(f"{name} ")]
    assert len(found) == 1, text
    return float(found[0].split()[-1])


async def test_agent_limit_holds_once_over_two_gateways(tmp_path: Path) -> None:
    """12 sends on 12 connections against 1 a minute: 1 passes (each gateway's table of
    its own would let one through each), the refused write nothing."""
    async with two_gateways(tmp_path, RateLimitSettings(agent_per_minute=1)) as live:
        alice = live.world.tokens["alice"]
        statuses = [(await fresh(live, "POST", "/v1/dm", alice,
                                 json={"to": "bob", "text": f"hi {n}"})).status_code
                    for n in range(12)]
        assert statuses == [201] + [429] * 11
        row = await live.server.engine.read(
            lambda c: c.execute("SELECT count(*) FROM messages").fetchone())
        assert row[0] == 1
        refusals = await metric(live, 'broker_refusals_total{reason="agent"}')
        assert refusals == 11
        # Alice's bucket and her workspace's, reported once (by the writer process).
        assert await metric(live, "broker_rate_limit_keys") == 2


async def test_auth_failures_block_the_address_on_every_gateway(tmp_path: Path) -> None:
    """One refused token (1 a minute) blocks the address: 11 more tries with a good token,
    each on a connection of its own, are all refused."""
    async with two_gateways(tmp_path, RateLimitSettings(auth_failures_per_minute=1)) as live:
        assert (await fresh(live, "GET", "/v1/agent", "at_live_guess")).status_code == 401
        alice = live.world.tokens["alice"]
        statuses = [(await fresh(live, "GET", "/v1/agent", alice)).status_code
                    for _ in range(11)]
        assert statuses == [429] * 11


async def test_session_cap_per_agent_holds_once_over_two_gateways(tmp_path: Path) -> None:
    """Two of alice's sockets open; ten more, each its own connection, all close with 4429
    (one gateway's count alone would admit those the other gateway took); bob is admitted."""
    gateway = GatewaySettings(max_sessions_per_agent=2)
    async with two_gateways(tmp_path, RateLimitSettings(), gateway) as live:
        alice = live.world.tokens["alice"]
        async with AsyncExitStack() as held:
            for n in range(2):
                ws = await held.enter_async_context(raw_socket(live.server, alice))
                await send_json(ws, {"v": 1, "id": f"p{n}", "type": "ping"})
                assert (await next_frame(ws, "pong"))["re"] == f"p{n}"
            assert await refusals_of(live, alice, 10) == [4429] * 10
            async with raw_socket(live.server, live.world.tokens["bob"]) as bob:
                await send_json(bob, {"v": 1, "id": "p", "type": "ping"})
                assert (await next_frame(bob, "pong"))["re"] == "p"
        assert await metric(live, 'broker_refusals_total{reason="sessions_per_agent"}') == 10
        # Closed sockets give their places back, wherever they were served.
        await released(live)
        async with AsyncExitStack() as held:
            for n in range(2):
                ws = await held.enter_async_context(raw_socket(live.server, alice))
                await send_json(ws, {"v": 1, "id": f"q{n}", "type": "ping"})
                assert (await next_frame(ws, "pong"))["re"] == f"q{n}"


async def test_total_session_cap_holds_once_over_two_gateways(tmp_path: Path) -> None:
    """Three sockets open against a cap of 3; nine observers, each its own connection, all
    close with 1013; once those three end, an observer is admitted."""
    gateway = GatewaySettings(max_sessions=3)
    async with two_gateways(tmp_path, RateLimitSettings(), gateway) as live:
        tokens = [live.world.tokens[name] for name in ("alice", "bob", "carol")]
        async with AsyncExitStack() as held:
            for n, token in enumerate(tokens):
                ws = await held.enter_async_context(raw_socket(live.server, token))
                await send_json(ws, {"v": 1, "id": f"p{n}", "type": "ping"})
                assert (await next_frame(ws, "pong"))["re"] == f"p{n}"
            assert await refusals_of(live, live.world.key, 9) == [1013] * 9
        assert await metric(live, 'broker_refusals_total{reason="sessions"}') == 9
        await released(live)
        async with raw_socket(live.server, live.world.key) as observer:
            await send_json(observer, {"type": "ping"})
            await next_frame(observer, "pong")

"""The webhook dispatcher against real local receivers: signing, retries, dead letters,
restarts, isolation of slow endpoints, and the dispatch-time SSRF guard.

Receivers listen on 127.0.0.1 port 0; every test runs under the engine
fixture's absolute deadline. Timed behaviour uses small configured backoffs
and jitter 0, and asserts the recorded spacing against the schedule: never
earlier than scheduled, and later only within a generous tolerance.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from broker.engine import webhooks as wh
from broker.engine.config import EngineConfig
from broker.engine.engine import Engine
from broker.webhooks.destinations import DestinationPolicy, DestinationRefused, GuardedBackend
from broker.webhooks.dispatcher import (
    classify,
    retry_after_seconds,
    retry_delay,
)
from broker.webhooks.settings import WebhookSettings
from broker.webhooks.signing import standard_signature, verify_relay, verify_standard
from tests.helpers.engine import World, make_world
from tests.helpers.webhooks import FAST, Receiver, dispatching, send, serving, subscribe, wait_state

# How much later than scheduled a retry may come on a loaded machine.
LATE_TOLERANCE_S = 1.5
EARLY_TOLERANCE_S = 0.02


def rows(engine: Engine) -> list[tuple[Any, ...]]:
    return engine.writer.connection.execute(
        "SELECT id, subscription_id, state, attempts, last_status, last_error FROM outbox"
        " ORDER BY id").fetchall()


# -- signing -------------------------------------------------------------------------


async def test_dispatch_signs_in_both_schemes(engine: Engine, world: World) -> None:
    """Deliveries are signed in both schemes."""
    async with serving(Receiver()) as plain, serving(Receiver()) as standard:
        relay_sub = await subscribe(engine, world, ["message.created"], url=plain.url,
                                    secret="relay-secret-1", headers={"X-Team": "ops"})
        std_sub = await subscribe(engine, world, ["message.created"], url=standard.url)
        async with dispatching(engine):
            message = await send(engine, world, "alice", "signed hello")
            (got_plain,) = await plain.wait_for(1)
            (got_std,) = await standard.wait_for(1)
            for row in rows(engine):
                await wait_state(engine, row[0], "delivered")
    for got, sub in ((got_plain, relay_sub), (got_std, std_sub)):
        body = got.json()
        assert body["type"] == "message.created"
        assert body["workspace_id"] == str(world.workspace_id)
        assert body["data"]["id"] == message.id and body["data"]["text"] == "signed hello"
        assert got.headers["content-type"] == "application/json"
        assert got.headers["x-relay-event"] == "message.created"
        assert got.headers["x-relay-timestamp"] == body["timestamp"]
        assert verify_relay(sub.secret, got.body, got.headers["x-relay-signature"])
        assert not verify_relay(sub.secret, got.body + b" ", got.headers["x-relay-signature"])
    assert got_plain.headers["x-team"] == "ops"
    assert "webhook-signature" not in got_plain.headers
    assert verify_standard(std_sub.secret, got_std.headers, got_std.body)
    assert not verify_standard(std_sub.secret, got_std.headers, got_std.body[:-1])
    assert got_std.headers["webhook-id"] == f"msg_{got_std.headers['x-relay-delivery']}"
    assert {r[2] for r in rows(engine)} == {"delivered"}


def test_signature_matches_standard_webhooks_vector() -> None:
    """Standard Webhooks reference vector."""
    # The example of the Standard Webhooks specification.
    assert standard_signature(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
        b'{"test": 2432232314}',
    ) == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


# -- retries, final answers, dead letters ---------------------------------------------------


async def test_dispatch_500_then_200_retries_on_schedule(
    engine: Engine, world: World
) -> None:
    """A 500 then 200 is one success with retries on schedule."""
    async with serving(Receiver(statuses=[500, 503])) as receiver:
        await subscribe(engine, world, ["message.created"], url=receiver.url)
        async with dispatching(engine):
            await send(engine, world, "alice", "flaky")
            got = await receiver.wait_for(3)
            (row,) = rows(engine)
            await wait_state(engine, row[0], "delivered")
        await trio.sleep(FAST.poll_interval_seconds * 4)
    assert len(receiver.requests) == 3  # one success, then nothing more
    assert len({g.headers["x-relay-delivery"] for g in got}) == 1
    assert [g.headers["x-relay-attempt"] for g in got] == ["1", "2", "3"]
    for n, (before, after) in enumerate(zip(got, got[1:], strict=False), start=1):
        scheduled = retry_delay(n, FAST, random.Random())
        gap = after.at - before.at
        assert scheduled - EARLY_TOLERANCE_S <= gap <= scheduled + LATE_TOLERANCE_S, (n, gap)
    assert rows(engine)[0][2:5] == ("delivered", 3, 200)


async def test_dispatch_4xx_final_but_408_429_retried(engine: Engine, world: World) -> None:
    """A 4xx is final, but 408 and 429 are retried."""
    async with serving(Receiver(statuses=[404])) as gone, \
            serving(Receiver(statuses=[408, 429])) as busy:
        await subscribe(engine, world, ["message.created"], url=gone.url)
        await subscribe(engine, world, ["message.created"], url=busy.url)
        async with dispatching(engine):
            await send(engine, world, "alice", "who takes it")
            await busy.wait_for(3)
            gone_row, busy_row = rows(engine)
            await wait_state(engine, busy_row[0], "delivered")
            await wait_state(engine, gone_row[0], "dead")
    assert len(gone.requests) == 1
    gone_row, busy_row = rows(engine)
    assert gone_row[2:5] == ("dead", 1, 404)
    assert busy_row[2:5] == ("delivered", 3, 200)


async def test_dispatch_dead_letter_then_replay(engine: Engine, world: World) -> None:
    """Dead letter after max attempts, then replay."""
    settings = msgspec.structs.replace(FAST, max_attempts=3, backoff_base_seconds=0.05)
    async with serving(Receiver(default=500)) as receiver:
        sub = await subscribe(engine, world, ["message.created"], url=receiver.url)
        async with dispatching(engine, settings) as dispatcher:
            await send(engine, world, "alice", "doomed")
            (row,) = rows(engine)
            dead = await wait_state(engine, row[0], "dead")
            assert dead[1:3] == (3, 500) and "gave up after 3 attempts" in dead[3]
            assert len(receiver.requests) == 3
            letters = await engine.read(wh.list_dead_letters, world.workspace_id, sub.id, 10)
            assert [d.id for d in letters] == [str(row[0])]
            receiver.default = 200
            await engine.submit(wh.ReplayDeadLetters(workspace_id=world.workspace_id,
                                                     subscription_id=sub.id))
            dispatcher.notify()
            await wait_state(engine, row[0], "delivered")
    assert len(receiver.requests) == 4
    assert receiver.requests[-1].headers["x-relay-attempt"] == "1"
    assert await engine.read(wh.list_dead_letters, world.workspace_id, sub.id, 10) == []


# -- at least once across restarts ------------------------------------------------------------


async def test_dispatch_delivers_row_committed_before_crash(
    tmp_path: Path, engine_config: EngineConfig
) -> None:
    """A row committed before a crash is delivered after the restart."""
    with trio.fail_after(30):
        async with serving(Receiver(hang=True)) as receiver:
            # Run 1: commit, and die while the only attempt is in flight.
            async with Engine.open(tmp_path, engine_config) as engine:
                world = await make_world(engine)
                await subscribe(engine, world, ["message.created"], url=receiver.url)
                async with dispatching(engine, grace=0):
                    await send(engine, world, "alice", "survives")
                    await receiver.wait_for(1)
                (row,) = rows(engine)
                assert row[2:4] == ("pending", 0)
            # Run 2: commit with no dispatcher at all.
            async with Engine.open(tmp_path, engine_config) as engine:
                await send(engine, world, "alice", "committed, not sent")
            receiver.hang = False
            # Run 3: the restarted daemon delivers both.
            async with Engine.open(tmp_path, engine_config) as engine:
                async with dispatching(engine):
                    await receiver.wait_for(3)
                    for row in rows(engine):
                        await wait_state(engine, row[0], "delivered")
    texts = [r.json()["data"]["text"] for r in receiver.requests]
    assert texts[0] == "survives" and sorted(texts[1:]) == ["committed, not sent", "survives"]
    first, *rest = receiver.requests
    assert first.headers["x-relay-delivery"] in {r.headers["x-relay-delivery"] for r in rest}


# -- isolation --------------------------------------------------------------------------------


async def test_dispatch_hanging_endpoint_delays_no_other(
    engine: Engine, world: World
) -> None:
    """A hanging endpoint does not delay another subscription."""
    # The hanging endpoint's requests would each take request_timeout; the
    # other subscription's six events must arrive while they are still open.
    settings = msgspec.structs.replace(FAST, concurrency=4, per_subscription_concurrency=2,
                                       request_timeout_seconds=20)
    async with serving(Receiver(hang=True)) as stuck, serving(Receiver()) as fine:
        await subscribe(engine, world, ["message.created"], url=stuck.url)  # older: first in line
        fine_sub = await subscribe(engine, world, ["message.created"], url=fine.url)
        async with dispatching(engine, settings) as dispatcher:
            for i in range(6):
                await send(engine, world, "alice", f"event {i}")
            with trio.fail_after(settings.request_timeout_seconds / 2):
                await fine.wait_for(6)
                for row in rows(engine):
                    if str(row[1]) == fine_sub.id:
                        await wait_state(engine, row[0], "delivered")
            assert stuck.open_requests == 2 and stuck.most_open == 2
            # the fine subscription's last request may still be winding down
            # after its row committed; then only the stuck pair is in flight
            with trio.fail_after(5):
                while dispatcher.statistics().in_flight != 2:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            assert dispatcher.statistics().busy_subscriptions == 1
    assert len(stuck.requests) == 2  # never more than its own share


async def test_dispatch_silent_endpoint_times_out_and_retries(
    engine: Engine, world: World
) -> None:
    """An endpoint that never answers times out and is retried."""
    settings = msgspec.structs.replace(FAST, request_timeout_seconds=0.3)
    async with serving(Receiver(hang=True)) as stuck:
        await subscribe(engine, world, ["message.created"], url=stuck.url)
        async with dispatching(engine, settings):
            await send(engine, world, "alice", "into the void")
            await stuck.wait_for(2)
    (row,) = rows(engine)
    assert row[3] >= 1 and row[5].startswith("timeout")


# -- the dispatch-time SSRF guard ---------------------------------------------------------------


class _Resolver(trio.abc.HostnameResolver):
    """Resolves every name to one address (DNS for the tests, no network)."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def getaddrinfo(self, host: bytes | str | None, port: bytes | str | int | None,
                          family: int = 0, type: int = 0, proto: int = 0,
                          flags: int = 0) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.address, int(port or 0)))]

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int],
                          flags: int) -> tuple[str, str]:
        raise NotImplementedError


async def test_dispatch_refuses_a_name_that_resolves_to_a_private_address(
    engine: Engine, world: World
) -> None:
    trio.socket.set_custom_hostname_resolver(_Resolver("127.0.0.1"))
    closed = msgspec.structs.replace(FAST, allow_hosts=())
    async with serving(Receiver()) as receiver:
        port = receiver.url.rsplit(":", 1)[1].split("/")[0]
        # Stored without the subscription-time check (as if DNS changed since).
        await subscribe(engine, world, ["message.created"],
                        url=f"http://rebind.example:{port}/hook")
        await subscribe(engine, world, ["message.created"], url=receiver.url)
        async with dispatching(engine, closed) as dispatcher:
            await send(engine, world, "alice", "to the inside")
            for row in rows(engine):
                dead = await wait_state(engine, row[0], "dead")
                assert dead[3].startswith("destination_refused")
            assert dispatcher.statistics().refused == 2
        assert receiver.requests == []
        # Allow-listed, the same name is delivered, to the checked address,
        # with the name kept in the Host header.
        async with dispatching(engine):
            await engine.submit(wh.ReplayDeadLetters(
                workspace_id=world.workspace_id, subscription_id=str(rows(engine)[0][1])))
            got = await receiver.wait_for(1)
    assert got[0].headers["host"] == f"rebind.example:{port}"


@pytest.mark.parametrize("host", [
    "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200",
    "0.0.0.0", "::1", "fd00:ec2::254", "fe80::1", "::ffff:127.0.0.1", "224.0.0.1", "localhost",
    "metadata.google.internal", "api.localhost",
])
def test_guard_refuses_local_and_metadata_hosts(host: str) -> None:
    """The guard refuses local and metadata hosts."""
    with pytest.raises(DestinationRefused):
        DestinationPolicy().check_host(host)


# IPv6 addresses that embed a forbidden IPv4 address: NAT64 (well-known and
# local-use), 6to4, IPv4-mapped, IPv4-compatible, Teredo (client 169.254.169.254
# stored inverted in the last 32 bits), IPv4-translated, ISATAP (under a
# global /64, both interface ids).
EMBEDDED_FORBIDDEN = [
    "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::a9fe:a9fe",
    "2002:a9fe:a9fe::", "2002:7f00:1::1", "2002:c0a8:101::", "::ffff:a9fe:a9fe",
    "::169.254.169.254", "::127.0.0.1", "::10.0.0.1", "2001:0:4136:e378:8000:63bf:5601:5601",
    "::ffff:0:a9fe:a9fe", "::ffff:0:7f00:1", "2600::5efe:a9fe:a9fe", "2600::200:5efe:a9fe:a9fe",
    "2600::5efe:a00:1",
]
# The same forms around a public IPv4 address are ordinary destinations.
EMBEDDED_PUBLIC = ["64:ff9b::808:808", "2002:808:808::1", "::ffff:8.8.8.8", "::ffff:0:808:808",
                   "2600::5efe:808:808"]


@pytest.mark.parametrize("host", EMBEDDED_FORBIDDEN)
def test_guard_unwraps_embedded_ipv4_at_subscribe(host: str) -> None:
    """The guard unwraps IPv4 embedded in IPv6 at subscribe time."""
    with pytest.raises(DestinationRefused):
        DestinationPolicy().check_host(host)
    with pytest.raises(DestinationRefused):
        DestinationPolicy().check_host(f"[{host}]")


def test_guard_allows_embedded_public_ipv4() -> None:
    """Embedded public IPv4 is allowed and the allow list covers embedded."""
    for host in EMBEDDED_PUBLIC:
        DestinationPolicy().check_host(host)
    policy = DestinationPolicy(["169.254.0.0/16"])
    for host in ("64:ff9b::a9fe:a9fe", "::ffff:a9fe:a9fe", "2002:a9fe:a9fe::"):
        policy.check_host(host)
    with pytest.raises(DestinationRefused):
        policy.check_host("64:ff9b::7f00:1")


class _Resolver6(trio.abc.HostnameResolver):
    """Resolves every name to one IPv6 address (DNS for the tests, no network)."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def getaddrinfo(self, host: bytes | str | None, port: bytes | str | int | None,
                          family: int = 0, type: int = 0, proto: int = 0,
                          flags: int = 0) -> list[Any]:
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "",
                 (self.address, int(port or 0), 0, 0))]

    async def getnameinfo(self, sockaddr: tuple[str, int] | tuple[str, int, int, int],
                          flags: int) -> tuple[str, str]:
        raise NotImplementedError


@pytest.mark.parametrize("address", EMBEDDED_FORBIDDEN)
async def test_guard_unwraps_embedded_ipv4_at_connect(address: str) -> None:
    """The guard unwraps IPv4 embedded in IPv6 at connect time.

    A name that resolves to such an address is refused before any socket is opened.
    """
    trio.socket.set_custom_hostname_resolver(_Resolver6(address))
    backend = GuardedBackend(DestinationPolicy())
    with pytest.raises(DestinationRefused):
        await backend.connect_tcp("rebind.example", 80)
    with pytest.raises(DestinationRefused):
        await DestinationPolicy().check_url("http://rebind.example/hook")


async def test_guard_connect_check_passes_embedded_public_ipv4() -> None:
    """A name resolving to embedded public IPv4 passes the connect check."""
    trio.socket.set_custom_hostname_resolver(_Resolver6("64:ff9b::808:808"))
    assert await DestinationPolicy().resolve("nat64.example", 80) == "64:ff9b::808:808"


def test_allow_list_takes_names_addresses_networks() -> None:
    """The allow list takes names addresses and networks."""
    policy = DestinationPolicy(["127.0.0.1", "10.0.0.0/8", "Hooks.Internal.", "[::1]"])
    for host in ("127.0.0.1", "10.9.8.7", "hooks.internal", "::1", "::ffff:10.0.0.1",
                 "93.184.215.14", "example.com"):
        policy.check_host(host)
    for host in ("127.0.0.2", "192.168.0.1", "localhost"):
        with pytest.raises(DestinationRefused):
            policy.check_host(host)
    with pytest.raises(ValueError):
        DestinationPolicy(["10.0.0.0/33"])


# -- the schedule ---------------------------------------------------------------------------


@given(attempt=st.integers(1, 100), jitter=st.floats(0, 0.99), seed=st.integers(0, 2**32))
def test_retry_delay_is_exponential_jittered_and_capped(
    attempt: int, jitter: float, seed: int
) -> None:
    settings = WebhookSettings(backoff_base_seconds=2, backoff_multiplier=4,
                               backoff_cap_seconds=3600, jitter=jitter)
    delay = retry_delay(attempt, settings, random.Random(seed))
    nominal = min(3600.0, 2 * 4.0 ** (attempt - 1))
    assert nominal * (1 - jitter) - 1e-9 <= delay <= min(3600.0, nominal * (1 + jitter)) + 1e-9


def test_retry_delay_default_schedule() -> None:
    """Default schedule."""
    delays = [retry_delay(n, WebhookSettings(jitter=0), random.Random()) for n in range(1, 10)]
    assert delays == [2, 8, 32, 128, 512, 2048, 3600, 3600, 3600]


def test_classify_answers() -> None:
    """Answers are classified."""
    assert classify(200).ok and classify(204).ok
    for status in (500, 502, 503, 408, 429):
        result = classify(status)
        assert not result.ok and not result.final
    for status in (301, 400, 401, 403, 404, 410, 422):
        assert classify(status).final
    assert classify(429, "30").retry_after == 30
    assert classify(500, "30").retry_after is None
    assert retry_after_seconds("soon") is None and retry_after_seconds("-1") is None


async def test_dispatch_prunes_delivered_rows_after_retention(
    engine: Engine, world: World
) -> None:
    """Delivered rows are pruned after the retention."""
    settings = msgspec.structs.replace(FAST, delivered_retention_seconds=0,
                                       prune_interval_seconds=0.05)
    async with serving(Receiver()) as receiver:
        await subscribe(engine, world, ["message.created"], url=receiver.url)
        async with dispatching(engine, settings):
            await send(engine, world, "alice", "short-lived")
            await receiver.wait_for(1)
            while True:  # polled: the pruning task signals nothing
                if not rows(engine):
                    break
                await trio.sleep(0.02)
    assert len(receiver.requests) == 1

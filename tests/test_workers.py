"""The daemon over processes (`--workers`): settings, lifecycle, and a gap in the facts.

The wire-level behaviour with gateway processes is tested by running the
REST, WebSocket, Relaycast and README test modules in both process models
(conftest.py, `both_process_models`); the kills by tests/test_crash_safety.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trio
import trio.testing
from starlette.applications import Starlette

from broker.cli import build_parser, settings_for
from broker.client import connect
from broker.config import ConfigError, HttpSettings, ServerSettings, Settings, load_settings
from broker.engine.agents import SetPresence
from broker.engine.config import EngineConfig
from broker.engine.errors import BrokerError, StartupError
from broker.engine.messages import SendChannelMessage
from broker.http import listener
from broker.http.app import service_routes
from broker.http.errors import status_for
from broker.http.listener import CLAIM_PREFIX, claim_and_bind
from broker.workers import writer_side
from broker.workers.channel import Link, LinkClosed, pack_command, unpack_command, unpack_result
from broker.workers.gateway_process import RemoteWriter
from tests.helpers.daemon import refused_start, run_daemon, serve, wait_gone
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.mcp import SDK_CLIENT_STREAMS, data, mcp_client
from tests.helpers.realtime import _raw, closed_with, eventually, post

PROCESS_DEADLINE_S = 60


def test_workers_setting_from_toml_environment_and_flag(tmp_path: Path) -> None:
    """`[server] workers`, BROKER_SERVER_WORKERS and --workers, in that precedence; unset
    means the number of cores, 0 and 1 mean one process."""
    config = tmp_path / "broker.toml"
    config.write_text("[server]\nworkers = 3\n")
    assert load_settings(config).server.workers == 3
    assert load_settings(config, {"BROKER_SERVER_WORKERS": "4"}).server.workers == 4
    args = build_parser().parse_args(["serve", "--config", str(config), "--workers", "0"])
    assert settings_for(args).server.gateway_processes() == 0
    assert ServerSettings(workers=1).gateway_processes() == 0
    assert ServerSettings(workers=2).gateway_processes() == 2
    assert ServerSettings().gateway_processes() in (0, *range(2, 1025))


@pytest.mark.parametrize(("text", "environ", "fragment"), [
    ("[server]\nworkers = -1\n", {}, "$.server.workers"),
    ("[server]\nworkers = 65\n", {}, "$.server.workers"),
    ('[server]\nworkers = "many"\n', {}, "$.server.workers"),
    ("[server]\nprocesses = 2\n", {}, "processes"),
    ("", {"BROKER_SERVER_WORKERS": "two"}, "BROKER_SERVER_WORKERS"),
])
def test_workers_bad_setting_names_it(
    tmp_path: Path, text: str, environ: dict[str, str], fragment: str
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ)
    assert fragment in str(info.value)


def test_workers_bad_flag_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "broker", "serve", "--workers", "-3"],
                          capture_output=True, text=True, timeout=PROCESS_DEADLINE_S,
                          check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--workers -3" in done.stderr, done.stderr


async def test_workers_ready_after_every_gateway_listens_and_sigterm_drains_in_order(
    tmp_path: Path,
) -> None:
    """READY=1 comes after both gateways listen. SIGTERM: the sessions are closed with
    1001 by their gateways, the gateways exit 0, and only then the writer closes."""
    with trio.fail_after(PROCESS_DEADLINE_S):
        async with run_daemon(tmp_path / "data", workers=2) as daemon:
            async with httpx.AsyncClient(base_url=daemon.url) as http:
                created = (await http.post("/v1/workspaces", json={"name": "w"})).json()
                agent = await http.post(
                    "/v1/agents", json={"name": "a"},
                    headers={"Authorization": f"Bearer {created['data']['api_key']}"})
                token = agent.json()["data"]["token"]
            port = int(daemon.url.rsplit(":", 1)[1])
            async with _raw(port, f"/v1/ws?token={token}", None, 100, None, None) as ws:
                daemon.process.send_signal(signal.SIGTERM)
                assert await closed_with(ws) == 1001
            assert await daemon.process.wait() == 0
            output = (await daemon.finished()).decode()
            stopping = await daemon.notifications.recv(4096)
    assert stopping.startswith(b"STOPPING=1")

    def at(pattern: str) -> int:
        found = re.search(pattern, output, re.MULTILINE)
        assert found, (pattern, output)
        return found.start()

    ready = at(r"broker listening on http://\S+ \(2 gateway processes")
    assert at(r"gateway 0 listening on") < ready and at(r"gateway 1 listening on") < ready
    exits = at(r"gateway processes stopped: exit statuses 0 0")
    assert at(r"gateway 0: stopped") < exits and at(r"gateway 1: stopped") < exits
    assert exits < at(r"gateways stopped; closing the engine") < at(r"broker \S+: stopped$")


async def test_workers_gap_in_commit_numbers_sends_sessions_to_the_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of facts that no gateway received (its link was full) is seen as a gap at
    the next batch, and the sessions catch up from the database: the missed delivery
    arrives although nothing later was sent to its agent, once, in seq order."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path / "data", workers=2) as server:
            engine = server.engine
            world = await make_world(engine)
            wid, alice = world.workspace_id, world.agents["alice"]
            ws_url = f"ws://127.0.0.1:{server.port}/v1/ws"
            async with connect(ws_url, world.tokens["bob"]) as client:
                deliveries = client.deliveries()
                await post(engine, wid, alice, "general", "before")
                before = await deliveries.__anext__()
                assert before.data["text"] == "before"
                # Every link counts as full: the next batches reach no gateway.
                assert server.pool is not None
                host = server.pool.host
                monkeypatch.setattr(writer_side, "MAX_LINK_BACKLOG", -1)
                await post(engine, wid, alice, "general", "missed")
                # The writer publishes a batch's facts before it takes the next
                # command: once this one returns, "missed" is in the facts channel.
                await engine.submit(SetPresence(changes=((alice, "online"),)))
                facts = engine.facts
                assert facts is not None
                await eventually(lambda: _true(facts.statistics().current_buffer_used == 0))
                await trio.testing.wait_all_tasks_blocked()
                monkeypatch.undo()
                # both links missed them
                assert host.missed_batches >= 2
                # A batch that delivers nothing to bob: only its number shows the gap.
                await engine.submit(SetPresence(changes=((alice, "offline"),)))
                missed = await deliveries.__anext__()
                assert (missed.seq, missed.data["text"]) == (before.seq + 1, "missed")
                await post(engine, wid, alice, "general", "after")
                after = await deliveries.__anext__()
                assert (after.seq, after.data["text"]) == (before.seq + 2, "after")


async def test_workers_metrics_describe_the_whole_daemon(tmp_path: Path) -> None:
    """/metrics on any gateway sums every gateway's requests and adds the writer's figures."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path / "data", workers=2) as server:
            requests = 12
            for _ in range(requests):  # new connections: the kernel spreads them
                async with httpx.AsyncClient(base_url=str(server.url)) as http:
                    assert (await http.get("/healthz")).status_code == 200
            await make_world(server.engine)
            async with httpx.AsyncClient(base_url=str(server.url)) as http:
                text = (await http.get("/metrics")).text
    found = re.search(r'^broker_http_requests_total\{method="GET",route="/healthz",'
                      r'status="200"\} (\S+)$', text, re.MULTILINE)
    assert found and float(found.group(1)) == requests, text
    batches = re.search(r"^broker_writer_commands_total (\S+)$", text, re.MULTILINE)
    assert batches and float(batches.group(1)) >= 5, text  # ResetPresence + the world


@pytest.mark.parametrize("workers", [1, 2], ids=["1proc", "2workers"])
async def test_workers_port_is_held_alone(tmp_path: Path, workers: int) -> None:
    """A second `broker serve --workers 2` (its gateways would join a port held with
    SO_REUSEPORT, a kernel's matter of same user and same option) exits 2 on the port of a
    running daemon, and the first daemon still answers every request: 20 fresh connections
    (each hashed to a gateway by the kernel) all see its workspace."""
    with trio.fail_after(PROCESS_DEADLINE_S):
        async with serve(tmp_path / "first", workers=workers) as server:
            async with httpx.AsyncClient(base_url=str(server.url)) as http:
                created = await http.post("/v1/workspaces", json={"name": "first"})
            key = created.json()["data"]["api_key"]
            done = await refused_start(tmp_path / "second", port=server.port, workers=2)
            names = []
            for _ in range(20):
                async with httpx.AsyncClient(
                        base_url=str(server.url),
                        headers={"Authorization": f"Bearer {key}"}) as http:
                    names.append((await http.get("/v1/workspace")).json()["data"]["name"])
    assert done.returncode == 2, done
    assert b"another broker daemon holds port" in done.stderr, done
    assert names == ["first"] * 20
    assert not (tmp_path / "second" / "broker.db").exists()


async def test_workers_port_claim_covers_every_host(tmp_path: Path) -> None:
    """The claim names the port alone: a broker on 0.0.0.0 or [::] of the port that a daemon
    serves on 127.0.0.1 is refused before it binds anything (with SO_REUSEPORT the kernel
    would let the wildcard listen beside it, and hand it every connection to other local
    addresses)."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path / "data", workers=2) as server:
            refusals = []
            for host in ("0.0.0.0", "::", "127.0.0.2"):
                for listen in (False, True):
                    with pytest.raises(StartupError) as refused:
                        claim_and_bind(HttpSettings(host=host, port=server.port), listen=listen)
                    refusals.append(str(refused.value))
            async with httpx.AsyncClient(base_url=str(server.url)) as http:
                assert (await http.get("/healthz")).status_code == 200
    shown = {"0.0.0.0": "0.0.0.0", "::": "[::]", "127.0.0.2": "127.0.0.2"}
    assert refusals == [
        f"cannot listen on {address}:{server.port}: another broker daemon holds port "
        f"{server.port}" for address in shown.values() for _ in (False, True)]


def test_workers_port_claim_held_by_no_broker_is_passed_over(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An abstract name has no permissions: a process that binds a port's claim name but
    takes no connections (no broker's claim does that) does not keep a daemon off the
    port; the daemon says so and binds. And port 0 takes another port when the one the
    kernel picked is claimed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:
        squatter.bind(CLAIM_PREFIX + str(port).encode())
        claim, sock = claim_and_bind(HttpSettings(host="127.0.0.1", port=port), listen=True)
        with claim, sock:
            assert not claim.held
            assert sock.getsockname()[1] == port
    assert "not a broker daemon of this user" in caplog.text

    first, first_sock = claim_and_bind(HttpSettings(host="127.0.0.1", port=0), listen=False)
    with first, first_sock:
        taken = first_sock.getsockname()[1]
        picks = iter([taken, 0])
        real_bound = listener._bound

        def bound_taken_first(http: HttpSettings, *, reuse_port: bool) -> socket.socket:
            return real_bound(HttpSettings(host=http.host, port=next(picks)),
                              reuse_port=reuse_port)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(listener, "_bound", bound_taken_first)
            second, second_sock = claim_and_bind(HttpSettings(host="127.0.0.1", port=0),
                                                 listen=False)
        with second, second_sock:
            assert second.held and second_sock.getsockname()[1] not in (0, taken)


async def test_workers_port_is_free_at_once_after_kill_9(tmp_path: Path) -> None:
    """SIGKILL to every process of a `--workers 2` daemon (its process group) frees the
    port and its claim with them: a new daemon on the same data and port starts at once
    and serves the data of the first, though connections of the first were open."""
    with trio.fail_after(2 * PROCESS_DEADLINE_S):
        async with run_daemon(tmp_path / "data", workers=2, new_session=True) as first:
            port = int(first.url.rsplit(":", 1)[1])
            gateways = await first.gateway_pids()
            async with httpx.AsyncClient(base_url=first.url) as http:
                created = await http.post("/v1/workspaces", json={"name": "first"})
                assert created.status_code == 201
                os.killpg(first.process.pid, signal.SIGKILL)
                assert await first.process.wait() == -signal.SIGKILL
            await wait_gone(gateways)
        async with run_daemon(tmp_path / "data", workers=2, port=port) as second:
            assert second.url == first.url
            async with httpx.AsyncClient(
                    base_url=second.url,
                    headers={"Authorization": f"Bearer {created.json()['data']['api_key']}"},
            ) as http:
                again = await http.get("/v1/workspace")
    assert (again.status_code, again.json()["data"]["name"]) == (200, "first")


@SDK_CLIENT_STREAMS
async def test_workers_mcp_answers_on_every_gateway(tmp_path: Path) -> None:
    """MCP lives in gateway 0; the other gateways forward /mcp to it, so every connection
    gets MCP's own answers (SO_REUSEPORT spreads 16 fresh connections over both gateways:
    all on one would be a 1 in 2^15 chance), and a session opened through one
    connection is known through any other."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path / "data", workers=2) as server:
            world = await make_world(server.engine)
            for _ in range(16):
                async with httpx.AsyncClient(base_url=str(server.url)) as http:
                    refused = await http.post("/mcp", json=body)
                    assert refused.status_code == 401, refused.text
                    assert refused.json()["error"]["data"]["code"] == "unauthorized"
            async with mcp_client(f"{server.url}/mcp", world.tokens["alice"]) as alice:
                assert data(await alice.call_tool("agent.me", {}))["name"] == "alice"


def test_link_commands_round_trip_and_only_engine_commands_are_taken() -> None:
    """A command crosses the link as itself; a name that is not a command Struct of the
    engine (another module, a non-command class, a missing one) is refused."""
    command = SendChannelMessage(workspace_id=1, agent_id=2, channel="general", text="hi",
                                 idempotency_key="k1")
    assert unpack_command(*pack_command(command)) == command
    for name in ("os:system", "broker.engine.facts:Fact", "broker.engine.nope:Send",
                 "broker.engine.messages:Nope", "broker.engine.messages:"):
        with pytest.raises(TypeError):
            unpack_command(name, b"\x80")


async def _true(value: bool) -> bool:
    return value


class _FailingEngine:
    """An engine whose every command hits a bug."""

    async def submit(self, command: object) -> None:
        raise RuntimeError("secret internals")


@asynccontextmanager
async def _linked_pair() -> AsyncIterator[tuple[Link, Link]]:
    a, b = trio.socket.socketpair()
    async with trio.SocketStream(a) as one, trio.SocketStream(b) as other:
        yield Link(one), Link(other)


async def test_writer_host_answers_a_bug_in_a_command_as_one_process_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A command that raises, or a name that is no command, reaches the gateway as
    internal_error with the generic message (a 500, as in one process), not the
    exception text; the traceback is logged in the writer process."""
    host = writer_side.WriterHost(cast(Any, _FailingEngine()), _empty_metrics)
    command = SendChannelMessage(workspace_id=1, agent_id=2, channel="general", text="hi",
                                 idempotency_key="k1")
    with trio.fail_after(TEST_DEADLINE_S):
        async with _linked_pair() as (ours, gateway), trio.open_nursery() as nursery:
            await nursery.start(ours.run_sender)
            await host._submit(0, ours, 1, *pack_command(command))
            await host._submit(0, ours, 2, "os:system", b"\x80")
            answers = [await gateway.receive(), await gateway.receive()]
            ours.close()
    for call, (kind, got_call, ok, value) in zip((1, 2), answers, strict=True):
        error = unpack_result(value)
        assert (kind, got_call, ok) == ("result", call, False)
        assert (error.code, error.message) == writer_side.INTERNAL_ERROR
        assert status_for(error.code) == 500
    assert "secret internals" in caplog.text


async def test_link_sender_returns_when_the_peer_is_gone() -> None:
    """Frames queued to a link whose peer has closed end its sender quietly (the
    receiving side reports the loss) and the link takes nothing more."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with _linked_pair() as (ours, peer):
            await peer.stream.aclose()
            async with trio.open_nursery() as nursery:
                await nursery.start(ours.run_sender)
                ours.send_nowait(("facts", 1, b"x" * 1024))
            with pytest.raises(LinkClosed):
                ours.send_nowait(("facts", 2, b"x"))
            with pytest.raises(LinkClosed):
                await ours.receive()


async def test_remote_writer_metrics_after_the_writer_is_lost_is_writer_failed() -> None:
    """/metrics asked while the writer link ends, or after, raises writer_failed (a 503),
    never hands back the error object as the body."""
    outcomes: list[str] = []

    async def ask(remote: RemoteWriter) -> None:
        try:
            await remote.daemon_metrics()
        except BrokerError as exc:
            outcomes.append(exc.code)

    with trio.fail_after(TEST_DEADLINE_S):
        async with _linked_pair() as (ours, _writer):
            remote = RemoteWriter(ours, EngineConfig())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, remote)
                await trio.testing.wait_all_tasks_blocked()
                remote.lost()
            await ask(remote)
    assert outcomes == ["writer_failed", "writer_failed"]
    assert status_for("writer_failed") == 503


async def _empty_metrics() -> bytes:
    return b""


class _LostWriterMetrics:
    """A gateway's metrics once its writer is gone."""

    async def render(self) -> bytes:
        raise BrokerError("writer_failed", "the writer has stopped")


async def test_metrics_route_without_a_writer_is_503() -> None:
    """/metrics on a gateway whose writer link ended answers 503 writer_failed."""
    app = Starlette(routes=service_routes(cast(Any, None), Settings(),
                                          cast(Any, _LostWriterMetrics())))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway") as client:
        response = await client.get("/metrics")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "writer_failed"

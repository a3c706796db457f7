"""Early answers (given before the request body was read) close their connection.

Run against a `broker serve` process, because what matters is what it keeps
open: its sockets and files, and whether a stop waits on connections that
were never closed. hypercorn leaves such a connection open for good when ten
chunks of the unread body wait in the application's queue
(broker.http.keepalive); a body sent as many small chunks in one write gets
there every time, a 1.1 MB body in one piece now and then.
"""

from __future__ import annotations

import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import trio

from tests.helpers.daemon import Daemon, run_daemon
from tests.helpers.engine import TEST_DEADLINE_S
from tests.helpers.rest import announce, make_rest_world

# Small, so that the refused bodies below stay small; a grace no test waits out.
CONFIG = "[http]\nmax_body_bytes = 256\nshutdown_grace_seconds = 3600\n"
# Far more chunks than the ten hypercorn queues for the application.
SMALL_CHUNKS = b"".join(b"8\r\n" + b"x" * 8 + b"\r\n" for _ in range(2000)) + b"0\r\n\r\n"
# What the outside tester sent: a body of 1.1 MB, announced with its length.
LARGE_BODY = b'{"text": "' + b"x" * 1_100_000 + b'"}'
TCP_LISTEN = "0A"


async def early_answer(port: int, method: str, target: str, token: str | None,
                       body: bytes, chunked: bool) -> tuple[int, bytes]:
    """Send one request, read until the server ends the connection; its status and head.

    The body is sent beside the reading: the server may close while it is still
    being written. A reset after the answer counts as the end too.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = f"{method} {target} HTTP/1.1\r\nHost: broker\r\n".encode()
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n".encode()
    head += b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % len(body)
    received = bytearray()

    async def send_request() -> None:
        try:
            await stream.send_all(head + b"\r\n" + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send_request)
        try:
            while data := await stream.receive_some(65536):
                received += data
        except trio.BrokenResourceError:
            assert b"\r\n\r\n" in received, "reset before the answer"
        nursery.cancel_scope.cancel()
    answer, _, _ = bytes(received).partition(b"\r\n\r\n")
    return int(answer.split(b" ")[1]), answer.lower()


def tcp_connections(pid: int) -> int:
    """How many TCP sockets process `pid` holds other than listening ones."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[9] in inodes and fields[3] != TCP_LISTEN:
                    count += 1
    return count


async def wait_no_connections(daemon: Daemon) -> int:
    """Wait until the daemon holds no TCP connection; then its count of open files."""
    pid = daemon.process.pid
    while True:
        if not tcp_connections(pid):
            return len(os.listdir(f"/proc/{pid}/fd"))
        # Another process: nothing to wait on but what /proc shows of it.
        await trio.sleep(0.01)


async def test_keepalive_early_answers_close_their_connections(tmp_path: Path) -> None:
    """413s, a refused token on a POST and a refused upload each end their connection: the
    client reads the end, the daemon's open files come back to what they were, and a stop
    right after is not held for the grace."""
    config = tmp_path / "broker.toml"
    config.write_text(CONFIG)
    with trio.fail_after(TEST_DEADLINE_S):
        async with run_daemon(tmp_path / "data", "--config", str(config)) as daemon:
            # Each answer closes its connection (hypercorn keeps a connection the client
            # closed while idle until its keep-alive timeout).
            async with httpx.AsyncClient(base_url=daemon.url,
                                         headers={"connection": "close"}) as client:
                world = await make_rest_world(client, agents=("alice",))
                upload = await announce(client, world.tokens["alice"], b"x" * 32)
            files_before = await wait_no_connections(daemon)
            port = int(daemon.url.rsplit(":", 1)[1])
            messages = "/v1/channels/general/messages"
            upload_path = upload["upload_url"].split(daemon.url, 1)[1].split("?", 1)[0]
            cases = [
                ("POST", messages, world.tokens["alice"], SMALL_CHUNKS, True, 413),
                ("POST", messages, "at_live_nope", SMALL_CHUNKS, True, 401),
                ("PUT", upload_path + "?token=nope", None, SMALL_CHUNKS, True, 403),
                *[("POST", messages, world.tokens["alice"], LARGE_BODY, False, 413)] * 5,
            ]
            for method, target, token, body, chunked, expected in cases:
                status, head = await early_answer(port, method, target, token, body, chunked)
                assert status == expected, head
                assert b"\r\nconnection: close" in head
            assert await wait_no_connections(daemon) == files_before
            daemon.process.send_signal(signal.SIGTERM)
            output = await daemon.finished()
            assert await daemon.process.wait() == 0, output.decode()
    assert b"stopped" in output


INITIALIZE = (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":'
              b'"2025-11-25","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}')
# Fresh connections, so that with two gateways SO_REUSEPORT sends some to gateway 1,
# which relays /mcp to gateway 0 (all 16 on gateway 0: one run in 65,536, and then the
# test proves less); each agent may hold 8 MCP sessions, so two agents.
MCP_AGENTS = ("alice", "bob")
SESSIONS_PER_AGENT = 8


async def mcp_initialize(port: int, token: str, close: bool) -> trio.SocketStream:
    """POST an MCP initialize on a new connection and read its answer; the stream.

    close: the request says `Connection: close`.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = (b"POST /mcp HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
            b"Accept: application/json, text/event-stream\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: {len(INITIALIZE)}\r\n".encode()
            + (b"Connection: close\r\n" if close else b"") + b"\r\n")
    await stream.send_all(head + INITIALIZE)
    received = bytearray()
    while b'"serverInfo"' not in received and (data := await stream.receive_some(65536)):
        received += data
    assert received.startswith(b"HTTP/1.1 200"), bytes(received[:200])
    return stream


@pytest.mark.parametrize("workers", [1, 2])
async def test_keepalive_mcp_answers_end_their_connections(tmp_path: Path, workers: int) -> None:
    """/mcp answers end their connections as any answer does, served or relayed: one
    that says `Connection: close` is closed by the server, and a stop with kept-alive
    connections left idle is not held for the grace. (The SDK's SSE answer, and the
    relay, used to cancel the server's own close on the disconnect it queues.)"""
    config = tmp_path / "broker.toml"
    config.write_text(CONFIG)
    with trio.fail_after(TEST_DEADLINE_S):
        async with run_daemon(tmp_path / "data", "--config", str(config),
                              workers=workers) as daemon:
            async with httpx.AsyncClient(base_url=daemon.url,
                                         headers={"connection": "close"}) as client:
                world = await make_rest_world(client, agents=MCP_AGENTS)
            port = int(daemon.url.rsplit(":", 1)[1])
            for name in MCP_AGENTS:
                for _ in range(SESSIONS_PER_AGENT // 2):
                    async with await mcp_initialize(port, world.tokens[name], True) as stream:
                        # The rest of the answer, then the end: the server closed it.
                        while await stream.receive_some(65536):
                            pass
            async with AsyncExitStack() as idle:
                for name in MCP_AGENTS:
                    for _ in range(SESSIONS_PER_AGENT // 2):
                        await idle.enter_async_context(
                            await mcp_initialize(port, world.tokens[name], False))
                daemon.process.send_signal(signal.SIGTERM)
                output = await daemon.finished()
                assert await daemon.process.wait() == 0, output.decode()
    assert b"stopped" in output

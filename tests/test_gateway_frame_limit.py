"""A WebSocket message over the frame limit closes that socket (1009) and nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio_websocket

from broker.gateway.settings import GatewaySettings
from tests.helpers.daemon import serve
from tests.helpers.engine import make_world
from tests.helpers.realtime import raw_socket

LIMIT = 4096
DEADLINE_S = 20


@pytest.mark.parametrize("first, then", [
    (b"x" * (LIMIT * 4), "a text frame after a binary one over the limit"),
    ("y" * (LIMIT * 4), b"a binary frame after a text one over the limit"),
    (b"x" * (LIMIT * 4), b"x" * (LIMIT * 4)),
], ids=["binary-then-text", "text-then-binary", "binary-then-binary"])
async def test_frame_limit_refuses_a_socket_and_the_daemon_keeps_serving(
    tmp_path: Path, first: str | bytes, then: str | bytes
) -> None:
    """Over-limit message, then more of either kind: hypercorn's buffer once ended the server."""
    with trio.fail_after(DEADLINE_S):
        async with serve(tmp_path, GatewaySettings(max_frame_bytes=LIMIT)) as server:
            world = await make_world(server.engine)
            async with raw_socket(server, world.tokens["alice"]) as alice:
                await alice.send_message(first)
                try:
                    await alice.send_message(then)
                    await alice.send_message('{"v":1,"id":"late","type":"ping"}')
                    while True:  # the close comes; the late ping is never answered
                        assert "late" not in await alice.get_message()
                except trio_websocket.ConnectionClosed as closed:
                    assert closed.reason is not None and closed.reason.code == 1009
            # The daemon still serves other sockets.
            async with raw_socket(server, world.tokens["bob"]) as bob:
                await bob.send_message('{"v":1,"id":"p","type":"ping"}')
                assert '"re":"p"' in await bob.get_message()

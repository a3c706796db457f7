"""What a connect costs in database reads: each is a trip to a reader thread, which in a
connect storm is a large share of the daemon's time (BENCHMARKS.md, "Tuning, session 8").

Counted on a live daemon: the reads the reader pool ran between before the
handshake and the session going live.
"""

from __future__ import annotations

from pathlib import Path

import trio

from broker.gateway.frame_queue import Mode
from broker.server import BrokerServer
from tests.helpers.daemon import serve
from tests.helpers.engine import TEST_DEADLINE_S, make_world
from tests.helpers.realtime import eventually, gateway_of, next_deliveries, post, raw_socket


async def _settled(server: BrokerServer) -> bool:
    """The one session is live with no redelivery asked for, and no read is running."""
    sessions = gateway_of(server).sessions
    return (len(sessions) == 1 and all(s.queue.mode is Mode.LIVE and not s.queue.redelivery_wanted
                                       for s in sessions)
            and server.engine.readers.statistics().busy == 0)


async def test_connect_with_nothing_unacked_reads_token_and_marks(tmp_path: Path) -> None:
    """Nothing unacked: two reads, the token, then the marks with the credential's expiry.

    No read of held deliveries: held rows lie above the acked seq, and the
    marks read showed none there.
    """
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path) as server:
            world = await make_world(server.engine)
            before = server.engine.readers.statistics().queries
            async with raw_socket(server, world.tokens["bob"]):
                await eventually(lambda: _settled(server))
                assert server.engine.readers.statistics().queries - before == 2


async def test_connect_with_unacked_reads_page_and_held(tmp_path: Path) -> None:
    """One unacked delivery: the token, the marks, one replay page, the held rows (four)."""
    with trio.fail_after(TEST_DEADLINE_S):
        async with serve(tmp_path) as server:
            world = await make_world(server.engine)
            await post(server.engine, world.workspace_id, world.agents["alice"], "general", "hi")
            before = server.engine.readers.statistics().queries
            async with raw_socket(server, world.tokens["bob"]) as ws:
                (delivery,) = await next_deliveries(ws)
                assert delivery["payload"]["data"]["text"] == "hi"
                await eventually(lambda: _settled(server))
                assert server.engine.readers.statistics().queries - before == 4

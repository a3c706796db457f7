"""No acknowledged message is lost when the daemon is killed with SIGKILL, again and again.

The daemon runs as a subprocess; three agents send over WebSocket while it
is killed at random moments, and restarted. At the end every send that got
a reply exists with all its delivery rows, no message exists without its
deliveries, the integrity check passes, and every recipient receives every
acknowledged message, in seq order, exactly once per seq.

In one process the daemon is killed twelve times. With two gateway
processes (`--workers 2`), three times each: every process at once; the
writer process alone (its gateways must exit on their own); one gateway
alone (the daemon must exit non-zero on its own, never half alive).
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import apsw
import httpx
import pytest
import trio

from broker.client import ConnectionLost, RequestError, connect
from broker.engine.backup import check
from tests.helpers.daemon import Daemon, run_daemon, wait_gone

SENDERS = ("s1", "s2", "s3")
RECIPIENTS = ("r1", "r2")
DEADLINE_S = 300


async def kill(daemon: Daemon, victim: str, workers: int) -> None:
    """SIGKILL `victim`: the daemon (every process of it), the writer process or a gateway;
    then wait until none of its processes is left."""
    gateways = await daemon.gateway_pids() if workers > 1 else []
    if victim == "gateway":
        os.kill(gateways[0], signal.SIGKILL)
    else:
        daemon.kill()
        if victim == "daemon":
            for pid in gateways:
                os.kill(pid, signal.SIGKILL)
    status = await daemon.process.wait()
    assert status != 0, "killed, not a clean exit"
    if victim == "gateway":
        # the writer process saw its gateway die and stopped the daemon itself
        assert status == 1, (status, daemon.output.decode()[-2000:])
    await wait_gone(gateways)  # a gateway never outlives its writer


async def register(url: str) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        created = (await http.post("/v1/workspaces", json={"name": "crash"})).json()["data"]
        key = created["api_key"]
        tokens: dict[str, str] = {}
        for name in SENDERS + RECIPIENTS:
            reply = await http.post("/v1/agents", json={"name": name},
                                    headers={"Authorization": f"Bearer {key}"})
            assert reply.status_code == 201, reply.text
            tokens[name] = reply.json()["data"]["token"]
    return tokens


async def send_until_killed(ws_url: str, token: str, name: str, cycle: int,
                            acked: dict[str, str]) -> None:
    """Send as fast as replies come back; record each acknowledged send; stop at the kill."""
    try:
        async with connect(ws_url, token, reconnect=False, request_timeout=10) as client:

            async def consume() -> None:
                # senders receive each other's messages; the client stops
                # reading the socket (replies too) while deliveries pile up
                async for _ in client.deliveries():
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(consume)
                n = 0
                while True:
                    text = f"{name}-{cycle}-{n}"
                    reply = await client.request("message.send", channel="general", text=text,
                                                 idempotency_key=text)
                    acked[text] = reply["id"]
                    n += 1
    except (ConnectionLost, RequestError, OSError, trio.TooSlowError):
        return
    except BaseExceptionGroup as group:
        if group.subgroup((ConnectionLost, RequestError, OSError)) is None:
            raise


@pytest.mark.parametrize(("workers", "victim", "kills"), [
    (1, "daemon", 12), (2, "daemon", 3), (2, "writer", 3), (2, "gateway", 3),
], ids=["one-process", "workers-all", "workers-writer", "workers-gateway"])
async def test_daemon_sigkill_loses_no_acked_message(
    tmp_path: Path, workers: int, victim: str, kills: int
) -> None:
    """Acknowledged messages survive repeated SIGKILL, of any of the daemon's processes."""
    data = tmp_path / "data"
    rng = random.Random(20261129)
    acked: dict[str, str] = {}
    with trio.fail_after(DEADLINE_S):
        async with run_daemon(data, workers=workers) as daemon:
            tokens = await register(daemon.url)
            await kill(daemon, "daemon", workers)
        for cycle in range(kills):
            async with run_daemon(data, workers=workers) as daemon:
                async with trio.open_nursery() as nursery:
                    for name in SENDERS:
                        nursery.start_soon(send_until_killed, daemon.ws_url, tokens[name], name,
                                           cycle, acked)
                    await trio.sleep(rng.uniform(0.2, 0.8))
                    await kill(daemon, victim, workers)
        assert len(acked) > kills * 3, len(acked)  # sends really happened in the cycles
        print(f"{len(acked)} acknowledged sends over {kills} kills of the {victim}")

        db = apsw.Connection(str(data / "broker.db"), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            stored = {text: str(mid) for mid, text in db.execute("SELECT id, text FROM messages")}
            members = db.execute("SELECT count(*) FROM agents").fetchone()
            short = db.execute(
                "SELECT m.id, count(d.agent_id) FROM messages m"
                " LEFT JOIN deliveries d ON d.message_id = m.id"
                " GROUP BY m.id HAVING count(d.agent_id) <> ?",
                (members[0] - 1 if members else 0,)).fetchall()
        finally:
            db.close()
        missing = {t for t, mid in acked.items() if stored.get(t) != mid}
        assert not missing, f"acknowledged but lost: {sorted(missing)[:10]}"
        assert short == [], "messages without all their deliveries"
        report = check(data / "broker.db")
        assert report.ok, report

        async with run_daemon(data, workers=workers) as daemon:
            for name in RECIPIENTS:
                seen: list[tuple[int, str]] = []
                async with connect(daemon.ws_url, tokens[name]) as client:
                    wanted = set(stored)
                    async for delivery in client.deliveries():
                        seen.append((delivery.seq, delivery.data["text"]))
                        wanted.discard(delivery.data["text"])
                        if not wanted:
                            break
                seqs = [s for s, _ in seen]
                assert seqs == sorted(set(seqs)), f"{name}: out of order or repeated"
                assert {t for _, t in seen} >= set(acked), name
            await kill(daemon, "daemon", workers)

"""Benchmarks: `python -m broker.bench writer` and `python -m broker.bench limits`.

writer: committed channel sends per second through the writer actor, and, in
the same run, raw apsw executing the very same SQL statements in a plain
loop with the same batch size and pragmas. The last line is
`ratio: <actor / raw>`. The raw loop's statements are checked against a
trace of the actor's commands (a sender's first two sends in one
transaction: the second reuses the first's reads, Tx.read_once), so the
comparison cannot silently drift. The
process uses the daemon's garbage-collector settings (`broker.gc_tuning`).

limits: what one rate-limit check costs (a request by an agent: its
workspace's and its own bucket) and one socket's admission and release,
with the tables in this process's dicts (one process serves the port) and
in the shared memory that gateway processes use (`SharedLimits`), over
1,000 agents, limits high enough that nothing is refused.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import msgspec
import trio

from broker.engine.channels import CreateChannel, JoinChannel
from broker.engine.config import EngineConfig, Limits
from broker.engine.database import open_writer
from broker.engine.engine import DATABASE_FILE, Engine
from broker.engine.ids import IdAllocator
from broker.engine.messages import SendChannelMessage
from broker.engine.outbox import ENQUEUE_SQL
from broker.engine.workspaces import CreateWorkspace, RegisterAgent
from broker.engine.writer import Command, Tx
from broker.gc_tuning import settle_heap
from broker.ratelimit import RateLimiter, RateLimitSettings, SharedLimits
from protocol.objects import Message, iso

_encoder = msgspec.json.Encoder()
CHANNEL = "bench"
TEXT = "benchmark message with a little text in it"


class Topology(msgspec.Struct):
    workspace_id: int
    agent_ids: list[int]



async def _setup_actor(engine: Engine, members: int) -> Topology:
    ws = await engine.submit(CreateWorkspace("bench"))
    wid = int(ws.workspace_id)
    ids = [int((await engine.submit(RegisterAgent(workspace_id=wid, name=f"m{i}"))).id)
           for i in range(members)]
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=ids[0], name=CHANNEL))
    for agent_id in ids[1:]:
        await engine.submit(JoinChannel(workspace_id=wid, agent_id=agent_id, channel=CHANNEL))
    return Topology(wid, ids)


def _send(topology: Topology, i: int) -> SendChannelMessage:
    sender = topology.agent_ids[i % len(topology.agent_ids)]
    return SendChannelMessage(workspace_id=topology.workspace_id, agent_id=sender,
                              channel=CHANNEL, text=f"{TEXT} {i}")


async def bench_actor(
    data_dir: Path, config: EngineConfig, sends: int, members: int, concurrency: int
) -> tuple[float, float, int, list[str]]:
    """Sends/s through the actor, the mean batch size, batches, and the statements of
    one sender's first two sends in one batch."""
    async with Engine.open(data_dir, config) as engine:
        topology = await _setup_actor(engine, members)
        statements: list[str] = []

        def trace(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
            if sql not in ("BEGIN IMMEDIATE", "COMMIT"):
                statements.append(sql)
            return True

        # Two sends started in one scheduler round are queued before the
        # writer's task runs again, so they share a batch (checked, retried).
        pair = (_send(topology, 0), _send(topology, members))
        for _ in range(10):
            statements.clear()
            batches = engine.writer.statistics().batches
            engine.writer.connection.exec_trace = trace
            async with trio.open_nursery() as nursery:
                for command in pair:
                    nursery.start_soon(engine.submit, command)
            engine.writer.connection.exec_trace = None
            if engine.writer.statistics().batches == batches + 1:
                break
        else:
            raise RuntimeError("two concurrent sends never shared a batch")

        before = engine.writer.statistics()
        next_index = 1

        async def worker() -> None:
            nonlocal next_index
            while next_index <= sends:
                i = next_index
                next_index += 1
                await engine.submit(_send(topology, i))

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed = time.perf_counter() - started
        after = engine.writer.statistics()
    batches = after.batches - before.batches
    commands = after.commands - before.commands
    return sends / elapsed, commands / batches, batches, statements


def raw_send(conn: apsw.Connection, ids: IdAllocator, topology: Topology, i: int,
             ttl_ms: int, depth: int, reads: dict[Any, Any]) -> None:
    """One channel send as plain apsw statements: the SQL that SendChannelMessage runs.

    `reads`: what this transaction's earlier sends read, by sender; like the
    writer (Tx.read_once), a sender's author, channel and recipients are
    read by its first send of the transaction only, and whether the
    workspace has webhook subscriptions by the transaction's first send.
    Empty it at each BEGIN.
    """
    now = int(time.time() * 1000)
    wid = topology.workspace_id
    sender = topology.agent_ids[i % len(topology.agent_ids)]
    text = f"{TEXT} {i}"
    known = reads.get(sender)
    if known is None:
        agent = conn.execute(
            "SELECT id, name, type, workspace_id FROM agents"
            " WHERE id = ? AND workspace_id = ? AND deactivated_at IS NULL", (sender, wid),
        ).fetchone()
        channel = conn.execute(
            "SELECT c.id, c.name, c.archived_at IS NOT NULL, m.agent_id IS NOT NULL,"
            " coalesce(m.muted, 0) FROM channels c"
            " LEFT JOIN channel_members m ON m.channel_id = c.id AND m.agent_id = ?"
            " WHERE c.workspace_id = ? AND c.name = ?", (sender, wid, CHANNEL),
        ).fetchone()
        assert agent is not None and channel is not None
    else:
        agent, channel, recipients = known
    channel_id = channel[0]
    message_id = ids.next()
    conn.execute(
        "INSERT INTO messages(id, workspace_id, channel_id, conversation_id, agent_id, thread_id,"
        " text, data, mode, mentions, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (message_id, wid, channel_id, None, sender, None, text, None, "wait", None, now),
    )
    if known is None:
        members = conn.execute(
            "SELECT json_group_array(m.agent_id) FROM channel_members m"
            " JOIN agents a ON a.id = m.agent_id"
            " WHERE m.channel_id = ? AND m.agent_id <> ? AND a.deactivated_at IS NULL"
            " AND (m.muted = 0 OR a.name IN (SELECT value FROM json_each(?)))",
            (channel_id, sender, "[]"),
        ).fetchone()
        assert members is not None
        recipients = msgspec.json.decode(members[0])
        reads[sender] = (agent, channel, recipients)
    log_id = ids.next()
    # the same event bytes as the command writes, so both loops store equal data
    payload = _encoder.encode({"type": "message.created", "data": Message(
        id=str(message_id), channel_id=str(channel_id), channel_name=CHANNEL,
        agent_id=str(sender), agent_name=agent[1], text=text, created_at=iso(now) or "")})
    conn.execute(
        "INSERT INTO message_log(id, workspace_id, type, message_id, channel_id,"
        " conversation_id, agent_id, payload, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
        (log_id, wid, "message.created", message_id, channel_id, None, sender, payload, now),
    )
    room = (_encoder.encode(sorted(recipients)).decode(), depth)
    where = "agent_id IN (SELECT value FROM json_each(?1)) AND pending_count < ?2"
    picked = conn.execute(
        f"SELECT json_group_array(json_array(agent_id, last_seq + 1)) FROM mailboxes WHERE {where}",
        room,
    ).fetchone()
    assert picked is not None and picked[0] != "[]", "a mailbox is full"
    conn.execute(
        "INSERT INTO deliveries(agent_id, seq, log_id, message_id, expires_at, created_at)"
        f" SELECT agent_id, last_seq + 1, ?3, ?4, ?5, ?6 FROM mailboxes WHERE {where}",
        (*room, log_id, message_id, now + ttl_ms, now),
    )
    conn.execute(
        "UPDATE mailboxes SET last_seq = last_seq + 1, pending_count = pending_count + 1"
        f" WHERE {where}", room,
    )
    # the webhook outbox enqueue of record_event: the probe, once (there is
    # no subscription here, so no INSERT follows)
    if "subscribed" not in reads:
        reads["subscribed"] = conn.execute(
            "SELECT 1 FROM webhook_subscriptions WHERE workspace_id = ? AND active LIMIT 1",
            (wid,),
        ).fetchone() is not None
    if reads["subscribed"]:
        conn.execute(ENQUEUE_SQL, (ids.next(), wid, log_id, "message.created", payload, now,
                                   channel_id))


def bench_raw(data_dir: Path, config: EngineConfig, sends: int, members: int,
              batch: int) -> tuple[float, list[str]]:
    """Sends/s for raw apsw in batches of `batch`, and one send's statements."""
    path = data_dir / DATABASE_FILE
    conn, lock = open_writer(path, config)
    try:
        tx = Tx(conn, IdAllocator(), config.limits)

        def run(command: Command[Any]) -> Any:
            tx.now_ms = int(time.time() * 1000)
            tx.forget_reads()  # as the writer does at each BEGIN
            with conn:
                return command.apply(tx)

        ws = run(CreateWorkspace("bench"))
        wid = int(ws.workspace_id)
        ids = [int(run(RegisterAgent(workspace_id=wid, name=f"m{i}")).id) for i in range(members)]
        run(CreateChannel(workspace_id=wid, agent_id=ids[0], name=CHANNEL))
        for agent_id in ids[1:]:
            run(JoinChannel(workspace_id=wid, agent_id=agent_id, channel=CHANNEL))
        topology = Topology(wid, ids)
        ttl, depth = config.limits.delivery_ttl_seconds * 1000, config.limits.mailbox_depth

        statements: list[str] = []

        def trace(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
            if sql not in ("BEGIN IMMEDIATE", "COMMIT"):
                statements.append(sql)
            return True

        conn.exec_trace = trace
        conn.execute("BEGIN IMMEDIATE")
        reads: dict[Any, Any] = {}
        for i in (0, members):  # one sender's first two sends, as the actor's trace
            raw_send(conn, tx.ids, topology, i, ttl, depth, reads)
        conn.execute("COMMIT")
        conn.exec_trace = None

        started = time.perf_counter()
        i = 1
        while i <= sends:
            conn.execute("BEGIN IMMEDIATE")
            reads.clear()
            for _ in range(min(batch, sends - i + 1)):
                raw_send(conn, tx.ids, topology, i, ttl, depth, reads)
                i += 1
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
        lock.release()
    return sends / elapsed, statements


def writer_benchmark(args: argparse.Namespace) -> int:
    # Mailboxes deep enough for every send: with the default depth the later
    # sends would find them full and write no deliveries (nothing acks here).
    config = EngineConfig(synchronous=args.synchronous, max_batch=args.max_batch,
                          limits=Limits(mailbox_depth=max(Limits().mailbox_depth, args.sends)))
    print(f"writer benchmark: {args.sends} channel sends, {args.members} members each "
          f"({args.members - 1} deliveries per send), {args.concurrency} concurrent submitters, "
          f"synchronous={args.synchronous}, max_batch={args.max_batch}, {args.rounds} rounds")
    ratios: list[float] = []
    for round_ in range(1, args.rounds + 1):
        # Actor and raw alternate on fresh files, so a passing load on the
        # machine hits both sides of a round alike; the median is reported.
        with tempfile.TemporaryDirectory(prefix="broker-bench-") as tmp:
            actor_dir, raw_dir = Path(tmp, "actor"), Path(tmp, "raw")
            actor_rate, mean_batch, batches, actor_sql = trio.run(
                bench_actor, actor_dir, config, args.sends, args.members, args.concurrency)
            batch = max(1, round(mean_batch))
            raw_rate, raw_sql = bench_raw(raw_dir, config, args.sends, args.members, batch)
        if actor_sql != raw_sql:
            print("error: the raw loop no longer runs the same statements as SendChannelMessage:",
                  file=sys.stderr)
            for a, r in zip(actor_sql, raw_sql, strict=False):
                if a != r:
                    print(f"  actor: {a}\n  raw:   {r}", file=sys.stderr)
            return 1
        ratios.append(actor_rate / raw_rate)
        print(f"round {round_}: actor {actor_rate:8.0f} sends/s ({batches} batches, mean batch "
              f"{mean_batch:.1f}); raw apsw {raw_rate:8.0f} sends/s (batches of {batch}); "
              f"ratio {ratios[-1]:.2f}")
    print(f"statements of a sender's first two sends in a transaction: {len(actor_sql)} "
          "(identical in both)")
    print(f"ratio: {statistics.median(ratios):.2f}")
    return 0


def _per_call_us(call: Callable[[int], object], calls: int) -> float:
    started = time.perf_counter()
    for i in range(calls):
        call(i)
    return (time.perf_counter() - started) / calls * 1e6


def limits_benchmark(args: argparse.Namespace) -> int:
    settings = RateLimitSettings(workspace_per_minute=10**9, agent_per_minute=10**9)
    shared = SharedLimits.create(max_sessions=20_000)
    agents = 1000
    print(f"rate-limit benchmark: {args.calls} calls each, {agents} agents of one workspace, "
          f"{args.rounds} rounds (median, microseconds per call)")
    try:
        for name, limiter in (("in-process", RateLimiter(settings)),
                              ("shared", RateLimiter(settings, shared=shared))):

            def request(i: int, limiter: RateLimiter = limiter) -> None:
                limiter.take_request("message.send", 1, i % agents, "")

            def socket(i: int, limiter: RateLimiter = limiter) -> None:
                limiter.admit_socket(i % agents, 20_000, 8)
                limiter.release_socket(i % agents)

            checks = [_per_call_us(request, args.calls) for _ in range(args.rounds)]
            sockets = [_per_call_us(socket, args.calls) for _ in range(args.rounds)]
            print(f"{name:>10}: request {statistics.median(checks):.2f} us "
                  f"({min(checks):.2f}-{max(checks):.2f}); socket admitted and released "
                  f"{statistics.median(sockets):.2f} us ({min(sockets):.2f}-{max(sockets):.2f})")
    finally:
        shared.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.bench")
    sub = parser.add_subparsers(dest="benchmark", required=True)
    writer = sub.add_parser("writer", help="writer actor vs raw apsw, channel sends")
    writer.add_argument("--sends", type=int, default=20_000)
    writer.add_argument("--members", type=int, default=10)
    writer.add_argument("--concurrency", type=int, default=512,
                        help="tasks submitting at once (bounds the batch size)")
    writer.add_argument("--max-batch", type=int, default=EngineConfig().max_batch)
    writer.add_argument("--rounds", type=int, default=3)
    writer.add_argument("--synchronous", default="FULL", choices=["OFF", "NORMAL", "FULL", "EXTRA"])
    writer.set_defaults(run=writer_benchmark)
    limits = sub.add_parser("limits", help="one rate-limit check and one socket admission, "
                                           "in-process and shared tables")
    limits.add_argument("--calls", type=int, default=100_000)
    limits.add_argument("--rounds", type=int, default=5)
    limits.set_defaults(run=limits_benchmark)
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    # The collector settings of `broker serve`, for both sides; only when run
    # as a program (a test calling main() must not freeze its own heap).
    settle_heap()
    sys.exit(main())

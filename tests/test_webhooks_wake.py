"""The webhook dispatcher is woken by the commits that write outbox rows (it does not
poll), and its statistics are in /metrics."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import httpx
import msgspec
import pytest
import trio
import trio.testing

from broker.engine.engine import Engine
from broker.engine.outbox import OUTBOX_WRITTEN
from broker.http.metrics import BrokerMetrics
from broker.webhooks.dispatcher import WebhookDispatcher
from tests.helpers.engine import TEST_DEADLINE_S, World
from tests.helpers.webhooks import FAST, Receiver, dispatching, send, serving, subscribe, wait_state

# A poll interval no test outlives: a delivery that came from polling would time out.
NEVER = msgspec.structs.replace(FAST, poll_interval_seconds=3600.0)
# Real time for a delivery woken by its commit, on a loaded machine.
PROMPT_S = 10


async def test_webhook_dispatcher_idle_makes_no_queries(
    engine: Engine, world: World, mock_clock: trio.testing.MockClock
) -> None:
    """Idle for half the test deadline in virtual time (where a 0.25 s poll would look 120
    times), the dispatcher looks at the outbox once, at start."""
    dispatcher = WebhookDispatcher(engine, FAST, stop_grace_seconds=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        # Time moves only here, in quarter seconds, each time everything waits.
        for _ in range(int(TEST_DEADLINE_S / 2 / 0.25)):
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(0.25)
        await trio.testing.wait_all_tasks_blocked()
        idle = dispatcher.statistics()
        dispatcher.stop()
    assert (idle.scans, idle.wakeups) == (1, 0)


async def test_webhook_dispatcher_is_woken_by_the_commit(engine: Engine, world: World) -> None:
    """A send to a subscribed workspace is delivered at once, with a poll interval of an hour."""
    async with serving(Receiver()) as receiver:
        await subscribe(engine, world, ["message.created"], url=receiver.url)
        async with dispatching(engine, NEVER) as dispatcher:
            await trio.testing.wait_all_tasks_blocked()
            assert dispatcher.statistics().scans == 1
            with trio.fail_after(PROMPT_S):
                await send(engine, world, "alice", "wake up")
                (got,) = await receiver.wait_for(1)
                await wait_state(engine, int(got.headers["x-relay-delivery"]), "delivered")
            stats = dispatcher.statistics()
    assert got.json()["data"]["text"] == "wake up"
    # One look at start, one on the commit, one when the delivery's slot came free.
    assert stats.scans <= 4 and stats.delivered == 1


class _NotedStart:
    """A task status that notes the commit signals listened to when `started()` is called."""

    def __init__(self, listening: list[str]) -> None:
        self.listening = listening
        self.at_start: list[str] | None = None
        self.reported = trio.Event()

    def started(self, value: object = None) -> None:
        self.at_start = list(self.listening)
        self.reported.set()


async def test_webhook_dispatcher_listens_to_commits_before_it_reports_started(
    engine: Engine, world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A send committed right after started() is delivered, woken by its own commit.

    The callback was registered by a task started with start_soon, which may
    run after such a commit (and after the first look at the outbox): its
    wake-up was lost, and the rows waited for the next one."""
    listening: list[str] = []
    register = engine.writer.on_commit

    def noted(name: str, callback: Callable[[], None]) -> Callable[[], None]:
        listening.append(name)
        return register(name, callback)

    monkeypatch.setattr(engine.writer, "on_commit", noted)
    async with serving(Receiver()) as receiver:
        await subscribe(engine, world, ["message.created"], url=receiver.url)
        dispatcher = WebhookDispatcher(engine, NEVER, stop_grace_seconds=0)
        status = _NotedStart(listening)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(dispatcher.run, task_status=status))
            await status.reported.wait()
            assert status.at_start == [OUTBOX_WRITTEN]
            with trio.fail_after(PROMPT_S):
                await send(engine, world, "alice", "right after start")
                (got,) = await receiver.wait_for(1)
            dispatcher.stop()
    assert got.json()["data"]["text"] == "right after start"


async def test_webhook_statistics_in_metrics(engine: Engine, world: World) -> None:
    """After one failed attempt (a 500) and its successful retry, /metrics says so."""
    metrics = BrokerMetrics(engine)
    async with serving(Receiver(statuses=[500])) as receiver:
        await subscribe(engine, world, ["message.created"], url=receiver.url)
        await send(engine, world, "alice", "counted")
        dispatcher = WebhookDispatcher(engine, FAST, stop_grace_seconds=0)
        metrics.watch_webhooks(dispatcher)
        before = (await metrics.render()).decode()
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            got = await receiver.wait_for(2)
            await wait_state(engine, int(got[0].headers["x-relay-delivery"]), "delivered")
            after = (await metrics.render()).decode()
            dispatcher.stop()
    assert "broker_webhook_queue_depth 1.0" in before
    assert "broker_webhook_attempts_total 0.0" in before
    age = next(line for line in before.splitlines()
               if line.startswith("broker_webhook_oldest_pending_seconds "))
    assert float(age.split()[1]) >= 0
    for line in (
        "broker_webhook_attempts_total 2.0",
        "broker_webhook_delivered_total 1.0",
        "broker_webhook_retried_total 1.0",
        "broker_webhook_dead_lettered_total 0.0",
        'broker_webhook_failures_total{reason="status"} 1.0',
        'broker_webhook_failures_total{reason="timeout"} 0.0',
        'broker_webhook_failures_total{reason="connection"} 0.0',
        "broker_webhook_in_flight 0.0",
        "broker_webhook_queue_depth 0.0",
        "broker_webhook_oldest_pending_seconds 0.0",
    ):
        assert line in after, line


async def test_webhook_metrics_served_by_the_server(client: httpx.AsyncClient) -> None:
    text = (await client.get("/metrics")).text
    for line in ("broker_webhook_attempts_total 0.0", "broker_webhook_queue_depth 0.0",
                 'broker_webhook_failures_total{reason="refused"} 0.0'):
        assert line in text, line

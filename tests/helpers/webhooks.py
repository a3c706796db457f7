"""Webhook helpers: `Receiver`, a local HTTP endpoint on 127.0.0.1 port 0 that records
what it gets and answers from a script; subscriptions and sends through the writer; a
dispatcher run for the length of a block."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from broker.engine import webhooks as wh
from broker.engine.engine import Engine
from broker.engine.messages import SendChannelMessage
from broker.webhooks.dispatcher import WebhookDispatcher
from broker.webhooks.settings import WebhookSettings
from tests.helpers.engine import World


@dataclass
class Received:
    at: float  # trio.current_time() when the request arrived
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


@dataclass
class Receiver:
    """An ASGI app that records requests; answers `statuses` in turn, then `default`.

    hang: never answer (the request stays open until the client gives up).
    """

    statuses: list[int] = field(default_factory=list)
    default: int = 200
    hang: bool = False
    requests: list[Received] = field(default_factory=list)
    open_requests: int = 0
    most_open: int = 0
    url: str = ""

    def __post_init__(self) -> None:
        self._changed = trio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Received(trio.current_time(), headers, body))
        self.open_requests += 1
        self.most_open = max(self.most_open, self.open_requests)
        self._changed.set()
        self._changed = trio.Event()
        try:
            if self.hang:
                await trio.sleep_forever()
            status = self.statuses.pop(0) if self.statuses else self.default
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.open_requests -= 1

    async def wait_for(self, count: int) -> list[Received]:
        """Wait until `count` requests have arrived; returns them all."""
        while len(self.requests) < count:
            await self._changed.wait()
        return self.requests


@asynccontextmanager
async def serving(receiver: Receiver) -> AsyncIterator[Receiver]:
    """Serve `receiver` on 127.0.0.1, port 0; sets receiver.url."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tests.receiver")
    config.graceful_timeout = 0
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(receiver, config, task_status=task_status)
        )
        receiver.url = binds[0] + "/hook"
        yield receiver
        nursery.cancel_scope.cancel()


async def subscribe(engine: Engine, world: World, events: list[str], *,
                    url: str = "http://127.0.0.1:9/hook", **kwargs: Any) -> wh.SubscriptionCreated:
    return await engine.submit(wh.CreateSubscription(
        workspace_id=world.workspace_id, url=url, events=events, **kwargs))


async def send(engine: Engine, world: World, agent: str, text: str,
               channel: str = "general") -> Any:
    return await engine.submit(SendChannelMessage(
        workspace_id=world.workspace_id, agent_id=world.agents[agent], channel=channel, text=text))


FAST = WebhookSettings(
    allow_hosts=("127.0.0.1",), poll_interval_seconds=0.05, backoff_base_seconds=0.2,
    backoff_multiplier=2, backoff_cap_seconds=5, jitter=0, request_timeout_seconds=5,
    max_attempts=5,
)


@asynccontextmanager
async def dispatching(engine: Engine, settings: WebhookSettings = FAST,
                      grace: float = 0.0) -> AsyncIterator[WebhookDispatcher]:
    dispatcher = WebhookDispatcher(engine, settings, stop_grace_seconds=grace)
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        yield dispatcher
        dispatcher.stop()


async def wait_state(engine: Engine, outbox_id: int, state: str) -> tuple[Any, ...]:
    """Wait until the outbox row reaches `state` (the fixture's deadline bounds it)."""
    while True:
        row = engine.writer.connection.execute(
            "SELECT state, attempts, last_status, last_error FROM outbox WHERE id = ?",
            (outbox_id,)).fetchone()
        if row is not None and row[0] == state:
            return tuple(row)
        await trio.sleep(0.01)

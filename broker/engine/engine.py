"""The engine: the writer actor and the reader pool over one database file.

`Engine` is what the HTTP layer, the gateway and the daemon hold: writes go
through `engine.submit(command)`, reads through `engine.read(fn, *args)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar

import trio

from broker.engine.config import EngineConfig
from broker.engine.facts import Fact
from broker.engine.readers import ReaderPool
from broker.engine.writer import Command, WriterActor

T = TypeVar("T")

DATABASE_FILE = "broker.db"
# Batches of committed facts waiting for the fanout; when it is full the
# writer waits, so the fanout must only route, never await a socket.
FACTS_BUFFER = 1024


class Engine:
    """Writer + readers; create with `Engine.open(...)`."""

    def __init__(
        self, writer: WriterActor, readers: ReaderPool,
        facts: trio.MemoryReceiveChannel[list[Fact]] | None,
    ) -> None:
        self.writer = writer
        self.readers = readers
        self.config = writer.config
        self.limits = writer.config.limits
        self.facts = facts

    @classmethod
    @asynccontextmanager
    async def open(
        cls, data_dir: Path, config: EngineConfig | None = None, *, with_facts: bool = False
    ) -> AsyncIterator[Engine]:
        """Open the database under data_dir, run the writer, yield; drain and close on exit.

        with_facts: publish committed facts on `engine.facts` (someone must consume them).
        """
        config = config or EngineConfig()
        path = Path(data_dir) / DATABASE_FILE
        send: trio.MemorySendChannel[list[Fact]] | None = None
        receive: trio.MemoryReceiveChannel[list[Fact]] | None = None
        if with_facts:
            send, receive = trio.open_memory_channel[list[Fact]](FACTS_BUFFER)
        writer = WriterActor(path, config, facts=send)
        writer.open()
        readers = ReaderPool(path, config)
        readers.open()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                try:
                    yield cls(writer, readers, receive)
                finally:
                    await writer.aclose()
        finally:
            readers.close()
            if send is not None:
                await send.aclose()

    async def submit(self, command: Command[T]) -> T:
        """Apply a write command; see WriterActor.submit."""
        return await self.writer.submit(command)

    async def read(self, fn: Callable[..., T], *args: object) -> T:
        """Run a query `fn(conn, *args)` on the reader pool."""
        return await self.readers.run(fn, *args)

"""`broker mcp`: the daemon's `/mcp` for editors that spawn a command and speak MCP on stdio.

The bridge moves JSON-RPC messages between the SDK's stdio server
transport and its streamable HTTP client transport, unchanged, so the
editor talks to the daemon's MCP server itself (every tool, resource and
notification, in either protocol revision) and the bridge has no MCP logic
to keep in step. The one thing it adds is what an HTTP hop needs and stdio
lacks: the routing headers (`MCP-Protocol-Version`, `Mcp-Method`,
`Mcp-Name`) that the 2026 revision wants to match the request, taken from
the request itself, and the version a 2025 session negotiated.

stdout is the protocol: logs go to stderr only.

A daemon that cannot be reached (nothing listening, a wrong host) ends the
bridge with `Unreachable`, which `broker mcp` reports in one line: the
editor shows a server that stopped and why, not a transport's traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from typing import Any, cast

import anyio
import httpx2
import trio
from mcp.client.streamable_http import streamable_http_client
from mcp.server.stdio import stdio_server
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
)
from mcp.shared.message import ClientMessageMetadata, SessionMessage
from mcp_types import JSONRPCRequest, JSONRPCResponse
from mcp_types._types import PROTOCOL_VERSION_META_KEY

log = logging.getLogger(__name__)


class Unreachable(Exception):
    """The daemon at `url` did not take a connection; `reason` says why, in a few words."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"cannot reach {url}: {reason}")
        self.url = url
        self.reason = reason


class StdinLines:
    """The process's stdin, line by line, for the SDK's stdio transport.

    Each line is read in a worker thread that a cancellation abandons (trio's
    threads are daemon threads): the bridge can end while the editor keeps
    stdin open, as it does while it waits for an answer.
    """

    def __init__(self) -> None:
        # Not sys.stdin: its platform encoding is unreliable, and it stays the interpreter's.
        self._file = open(sys.stdin.fileno(), encoding="utf-8", errors="replace",
                          closefd=False)

    def __aiter__(self) -> StdinLines:
        return self

    async def __anext__(self) -> str:
        line = await trio.to_thread.run_sync(self._file.readline, abandon_on_cancel=True)
        if not line:
            raise StopAsyncIteration
        return line


class Bridge:
    """One stdio connection relayed to `url` with `token` (see the module docstring)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        # The version a 2025 `initialize` negotiated, stamped on the requests after it.
        self.negotiated: str | None = None
        self._initialize_ids: set[Any] = set()
        self.relayed = 0

    async def run(self) -> None:
        """Relay until stdin closes.

        Raises Unreachable when a connection to the daemon fails (at the
        first message, or later if the daemon goes away).
        """
        failures: list[BaseException] = []
        try:
            await self._relay()
        except* (httpx2.ConnectError, httpx2.ConnectTimeout) as group:
            failures.extend(_leaves(group))
        if failures:
            raise Unreachable(self.url, _reason(failures[0])) from failures[0]

    async def _relay(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        # Our own stdin reader: the SDK's waits in a thread that a cancellation cannot
        # leave, so a bridge whose daemon failed would stay until the editor closed stdin.
        lines = cast(anyio.AsyncFile[str], StdinLines())
        async with stdio_server(stdin=lines) as (stdin, stdout), \
                create_mcp_http_client(headers=headers) as http, \
                streamable_http_client(self.url, http_client=http) as (upstream, downstream):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._to_daemon, stdin, downstream, nursery.cancel_scope)
                nursery.start_soon(self._to_editor, upstream, stdout)

    async def _to_daemon(self, stdin: Any, downstream: Any, done: trio.CancelScope) -> None:
        async with downstream:
            async for item in stdin:
                if isinstance(item, Exception):
                    log.warning("mcp bridge: unreadable message from the editor: %s", item)
                    continue
                await downstream.send(self.stamped(item))
        # The editor closed stdin: the session ends (the transport sends its DELETE).
        done.cancel()

    async def _to_editor(self, upstream: Any, stdout: Any) -> None:
        async with stdout:
            async for item in upstream:
                if isinstance(item, Exception):
                    log.warning("mcp bridge: %s", item)
                    continue
                self._note_negotiated(item)
                try:
                    await stdout.send(item)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return
                self.relayed += 1

    def stamped(self, item: SessionMessage) -> SessionMessage:
        """The message with the HTTP headers its revision wants."""
        message = item.message
        if not isinstance(message, JSONRPCRequest):
            return SessionMessage(message, metadata=self._version_headers())
        params = message.params or {}
        meta = params.get("_meta") if isinstance(params, dict) else None
        version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
        if message.method == "initialize":
            self._initialize_ids.add(message.id)
            return SessionMessage(message)
        if not isinstance(version, str):
            return SessionMessage(message, metadata=self._version_headers())
        headers = {MCP_PROTOCOL_VERSION_HEADER: version, MCP_METHOD_HEADER: message.method}
        name_key = NAME_BEARING_METHODS.get(message.method)
        name = params.get(name_key) if name_key is not None else None
        if isinstance(name, str):
            headers[MCP_NAME_HEADER] = encode_header_value(name)
        return SessionMessage(message, metadata=ClientMessageMetadata(headers=headers))

    def _version_headers(self) -> ClientMessageMetadata | None:
        if self.negotiated is None:
            return None
        return ClientMessageMetadata(headers={MCP_PROTOCOL_VERSION_HEADER: self.negotiated})

    def _note_negotiated(self, item: SessionMessage) -> None:
        message = item.message
        if isinstance(message, JSONRPCResponse) and message.id in self._initialize_ids:
            self._initialize_ids.discard(message.id)
            version = message.result.get("protocolVersion")
            if isinstance(version, str):
                self.negotiated = version


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _reason(exc: BaseException) -> str:
    """The system's words for the first OS error behind `exc` ("connection refused"),
    else the exception's own message."""
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if isinstance(current, OSError) and current.errno is not None:
            text = os.strerror(current.errno) if current.errno > 0 else current.strerror
            return (text or str(current)).lower()
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return str(exc) or type(exc).__name__

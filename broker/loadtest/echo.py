"""The transport ceiling: a bare trio-websocket server that answers every request at once.

`python -m broker.loadtest.echo [--port 0] [--certfile PEM --keyfile PEM]`
prints `echo listening on PORT` and serves until killed (over TLS with a
certificate). It accepts the same handshake as the broker
(subprotocol negotiation, the Authorization header is ignored), decodes each
request frame and answers it with a reply frame that echoes the request as
its `data`, so the load generator's clients run their exact code path
(framing, encoding, decoding, request bookkeeping) against a server that
does no work at all. What that reaches is the ceiling the broker is
compared with.

The server reads with 64 KiB buffers and queues up to 64 frames per
connection (trio-websocket's defaults, 4 KiB and 1 frame, would handicap
it); a generous ceiling only makes the comparison stricter. It also uses
the daemon's garbage-collector settings (`broker.gc_tuning`).
"""

from __future__ import annotations

import argparse
import ssl
import sys
from typing import Any

import msgspec
import trio
import trio_websocket

from broker.gc_tuning import settle_heap
from broker.loadtest.tls import server_context
from protocol.codec import JSON_SUBPROTOCOL, MSGPACK_SUBPROTOCOL

RECEIVE_BUFFER = 64 * 1024
MESSAGE_QUEUE = 64
MAX_MESSAGE_SIZE = 16 * 1024 * 1024


class _Reply(msgspec.Struct, kw_only=True):
    re: str | None
    data: Any
    v: int = 1
    type: str = "reply"
    ok: bool = True


async def _serve_one(request: trio_websocket.WebSocketRequest) -> None:
    offered = request.proposed_subprotocols
    msgpack = MSGPACK_SUBPROTOCOL in offered
    chosen = MSGPACK_SUBPROTOCOL if msgpack else (
        JSON_SUBPROTOCOL if JSON_SUBPROTOCOL in offered else None)
    ws = await request.accept(subprotocol=chosen)
    json_encoder, msgpack_encoder = msgspec.json.Encoder(), msgspec.msgpack.Encoder()
    while True:
        try:
            message = await ws.get_message()
        except trio_websocket.ConnectionClosed:
            return
        frame = (msgspec.msgpack.decode(message) if isinstance(message, bytes)
                 else msgspec.json.decode(message))
        if not isinstance(frame, dict) or "id" not in frame:
            continue  # acks and pongs need no answer
        reply = _Reply(re=frame.get("id"), data=frame)
        try:
            if msgpack:
                await ws.send_message(msgpack_encoder.encode(reply))
            else:
                await ws.send_message(json_encoder.encode(reply).decode())
        except trio_websocket.ConnectionClosed:
            return


async def serve_echo(host: str, port: int, ssl_context: ssl.SSLContext | None = None, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled (over TLS with `ssl_context`); `task_status.started(port)` once it
    listens."""
    async with trio.open_nursery() as nursery:
        server = await nursery.start(lambda task_status: trio_websocket.serve_websocket(
            _serve_one, host, port, ssl_context, message_queue_size=MESSAGE_QUEUE,
            max_message_size=MAX_MESSAGE_SIZE, receive_buffer_size=RECEIVE_BUFFER,
            task_status=task_status))
        task_status.started(int(server.port))


async def _main(host: str, port: int, ssl_context: ssl.SSLContext | None) -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_echo, host, port, ssl_context)
        settle_heap()  # as the daemon does: the ceiling gets the same collector settings
        print(f"echo listening on {bound}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.loadtest.echo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--certfile", help="serve TLS with this PEM chain (and --keyfile)")
    parser.add_argument("--keyfile", help="the PEM key of --certfile")
    args = parser.parse_args(argv)
    if bool(args.certfile) != bool(args.keyfile):
        parser.error("--certfile and --keyfile go together")
    context = server_context(args.certfile, args.keyfile) if args.certfile else None
    try:
        trio.run(_main, args.host, args.port, context)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Connection reuse after an early answer: say `Connection: close`, then let the server close.

A route may answer before it has read the request body: a body over
`http.max_body_bytes` (413, refused as soon as it passes the limit), a bad
token on a POST, a refused upload. The server cannot start the next request
on that connection (the rest of the body is still on the wire, and reading
it to the end could mean reading gigabytes for a refused request), so the
answer must close it. Without a header saying so, a client that keeps
connections alive sends its next request on the closing socket and gets
"server disconnected", depending on timing. The middleware marks every such
answer `Connection: close`; hypercorn's h11 protocol then closes the
connection once the answer is sent. An answer sent after the body was read
in full (or to a request without a body) is left alone and the connection
stays alive.

That close only happens if hypercorn can tell the application the request
is over. hypercorn (0.18) hands the body to the application through a
bounded queue (`max_app_queue_size`, 10 messages), and its connection task
keeps putting the chunks of the unread body into it after the early answer.
When the answer is complete it puts `http.disconnect` into the same queue
before it closes the socket. An application that answered early takes
nothing more from that queue, so once ten chunks wait there both puts block
for good: the socket is never closed (CLOSE-WAIT after the client gives up),
its file stays open, and a graceful stop waits the whole grace for that
connection. A larger queue only moves the threshold, and closing the socket
ourselves would mean reaching into hypercorn's private state for it. So the
middleware stays on the ASGI interface: while it sends the last message of
an early answer it takes whatever the server hands over and drops it, until
that send has returned, which is after hypercorn's `http.disconnect` got in
and the close was done. That drops what was already queued and what arrives
during one send, never the body to its end.

`disconnect_after_last_send` is the other side of the same server
behaviour: an app that cancels its answer on `http.disconnect` must not get
it while its answer's last message is still being sent.
"""

from __future__ import annotations

import trio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.engine.errors import BrokerError

# The longest wait for the next bytes of a request body: hypercorn times out
# headers, not bodies, so a client that announces a body and stops would hold
# its request open for good. Such a request gets an early answer, 408
# `request_timeout` (broker.http.app.read_body, broker.mcp.endpoint.read_body).
BODY_STALL_SECONDS = 30.0


def body_stalled() -> BrokerError:
    """The error of a body that stopped arriving for BODY_STALL_SECONDS."""
    return BrokerError("request_timeout",
                       f"no byte of the body came for {BODY_STALL_SECONDS:g} seconds")


class CloseWhenBodyUnread:
    """ASGI middleware: an answer sent before its request body was read says Connection: close,
    and the unread body is dropped while that answer ends, so the server can close."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        body_read = False
        answered_early = False

        async def receive_and_watch() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            return message

        async def send_and_mark(message: Message) -> None:
            nonlocal answered_early
            if message["type"] == "http.response.start" and not body_read:
                answered_early = True
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            if answered_early and message["type"] == "http.response.body" \
                    and not message.get("more_body", False):
                await send_dropping_body(send, message, receive)
            else:
                await send(message)

        await self.app(scope, receive_and_watch, send_and_mark)


async def send_dropping_body(send: Send, message: Message, receive: Receive) -> None:
    """`send(message)` while the request body still offered by `receive` is taken and dropped.

    Ends when the send has returned (the server's close included); stops
    taking early at `http.disconnect`. Raises what the send raises.
    """

    async def drop_body() -> None:
        while (await receive())["type"] == "http.request":
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drop_body)
        await send(message)
        nursery.cancel_scope.cancel()


def has_body(scope: Scope) -> bool:
    """True if the request declares a body (chunked, or a Content-Length other than 0)."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return bytes(value).strip() != b"0"
    return False


def disconnect_after_last_send(receive: Receive, send: Send) -> tuple[Receive, Send]:
    """`receive` and `send` for an app that watches for `http.disconnect` beside its answer.

    hypercorn (0.18) queues `http.disconnect` from inside the send of an answer's
    last message, and then closes the connection or starts its keep-alive
    timer in that same call. An app that cancels its answer on the disconnect
    (the MCP SDK's SSE responses do) cancels that send midway: the server then
    neither closes the connection nor times it out, and a stop waits its whole
    grace for it. The pair returned hands the disconnect over only once that
    last send has returned.
    """
    sending_last = False
    last_sent = trio.Event()

    async def receive_after_last_send() -> Message:
        message = await receive()
        if message["type"] == "http.disconnect" and sending_last:
            await last_sent.wait()
        return message

    async def send_last_apart(message: Message) -> None:
        nonlocal sending_last
        if message["type"] != "http.response.body" or message.get("more_body", False):
            await send(message)
            return
        sending_last = True
        try:
            await send(message)
        finally:
            last_sent.set()

    return receive_after_last_send, send_last_apart

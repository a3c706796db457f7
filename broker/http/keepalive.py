"""Connection reuse after an early answer: say `Connection: close` when the body was not read.

A route may answer before it has read the request body: a body over
`http.max_body_bytes` (413, refused as soon as it passes the limit), a bad
token on a POST, a refused upload. hypercorn then cannot start the next
request on that connection (the rest of the body is still on the wire, and
reading it to the end could mean reading gigabytes for a refused request),
so it closes the connection once the answer is sent. Without a header saying
so, a client that keeps connections alive sends its next request on the
closing socket and gets "server disconnected", depending on timing.

The middleware marks every such answer `Connection: close`, so clients open
a new connection for the next request; an answer sent after the body was
read in full (or to a request without a body) is left alone and the
connection stays alive.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class CloseWhenBodyUnread:
    """ASGI middleware: an answer sent before its request body was read says Connection: close."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        body_read = False

        async def receive_and_watch() -> Message:
            nonlocal body_read
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
            return message

        async def send_and_mark(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_and_watch, send_and_mark)


def has_body(scope: Scope) -> bool:
    """True if the request declares a body (chunked, or a Content-Length other than 0)."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return bytes(value).strip() != b"0"
    return False

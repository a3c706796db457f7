"""hypercorn's WebSocket message buffer, made safe after a message over the size limit.

hypercorn (0.18) refuses a message over `websocket_max_message_size` by
sending a 1009 close, but leaves the partial message in its buffer. The
next message of the other kind (text after binary, or the reverse) is then
written into the wrong kind of buffer, and the `TypeError` escapes hypercorn's
connection handler, which catches only `OSError`: it ends the whole server,
every connection with it. So one client could stop the daemon with two
frames.

`OverflowSafeBuffer` keeps hypercorn's behaviour up to the first overflow,
then drops the partial message and refuses every later one the same way.
hypercorn answers each refusal by sending its close again, which the
WebSocket state machine declines quietly since the close is already sent,
and never hands the dropped messages to the application. hypercorn builds
the buffer by its module-level name when a WebSocket stream starts, so
`install()` replaces that name; it changes nothing else.
"""

from __future__ import annotations

from typing import Any

from hypercorn.protocol import ws_stream


class OverflowSafeBuffer(ws_stream.WebsocketBuffer):
    """A message buffer that refuses every message after its first one over the limit."""

    overflowed = False

    def extend(self, event: Any) -> None:
        if self.overflowed:
            raise ws_stream.FrameTooLargeError()
        try:
            super().extend(event)
        except ws_stream.FrameTooLargeError:
            self.overflowed = True
            self.clear()
            raise


def install() -> None:
    """Make hypercorn build `OverflowSafeBuffer`s for the WebSocket streams it starts from now."""
    ws_stream.WebsocketBuffer = OverflowSafeBuffer  # type: ignore[misc]

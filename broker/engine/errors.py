"""Domain errors: one exception type with a stable machine-readable code.

The HTTP layer and the WebSocket gateway turn a `BrokerError` into the same
error body, `{"code": ..., "message": ...}`; the code is the contract, the
message is for people.
"""

from __future__ import annotations


class BrokerError(Exception):
    """A request that the broker refuses, with a stable `code` and a human `message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[BrokerError], tuple[str, str]]:
        # Rebuilt from (code, message) when it crosses a process boundary
        # (the writer answers a gateway process with it: broker.workers).
        return (BrokerError, (self.code, self.message))


class StartupError(Exception):
    """The broker cannot start on this data or this port: a foreign file, a newer schema,
    a held lock, a port in use."""

"""The systemd notify protocol: READY, STOPPING, STATUS and the watchdog.

A datagram to the socket named by $NOTIFY_SOCKET (a path, or an abstract
name written with a leading '@'); with no such variable every call is a
no-op, so the daemon runs the same outside systemd. The watchdog pings come
from a task on the event loop itself: if the loop hangs, the pings stop and
systemd (WatchdogSec=) kills and restarts the daemon.
"""

from __future__ import annotations

import logging
import os
import socket as _socket

import trio

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends `KEY=value` lines to systemd; silent when not under systemd."""

    def __init__(self, address: str | None = None) -> None:
        raw = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address: str | None
        if not raw:
            self.address = None
        elif raw.startswith("@"):
            self.address = "\0" + raw[1:]
        else:
            self.address = raw
        self._sock: trio.socket.SocketType | None = None
        self.sent = 0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def notify(self, *fields: str) -> bool:
        """Send `fields` (e.g. "READY=1", "STATUS=serving") as one datagram; False if disabled.

        A send that fails is logged, not raised: losing a notification must
        never take the broker down.
        """
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        try:
            await self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("systemd notify to %r failed: %s", self.address, exc)
            return False
        self.sent += 1
        return True

    async def ready(self, status: str) -> bool:
        return await self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    async def stopping(self, status: str = "stopping") -> bool:
        return await self.notify("STOPPING=1", f"STATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for ($WATCHDOG_USEC), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1_000_000 / 2


async def run_watchdog(
    notifier: SystemdNotifier, interval: float, *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send WATCHDOG=1 every `interval` seconds from the event loop, until cancelled."""
    task_status.started()
    while True:
        await notifier.notify("WATCHDOG=1")
        await trio.sleep(interval)

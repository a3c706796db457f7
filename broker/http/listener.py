"""The daemon's port: one listening socket, opened once, that holds the port alone.

The process that opens the engine also opens this socket, in both process
models: hypercorn serves it in one process (`fd://N`), and with gateway
processes every gateway inherits the same socket and accepts on it (the
kernel queues each new connection once; whichever gateway accepts first
serves it). No SO_REUSEPORT: a port held with it can be joined by any
process of the same user that sets it too, so a second daemon would start
on the port and the kernel would spread requests over both daemons'
databases. Without it, a second daemon on the same address fails at start,
with one line that names the address.

SO_REUSEADDR only lets a restart bind while connections of the last run
are still in TIME_WAIT; it never lets two processes listen on one port.
"""

from __future__ import annotations

import socket

from broker.config import HttpSettings
from broker.engine.errors import StartupError

# Connections the kernel queues on the port before a gateway accepts them:
# its own cap (net.core.somaxconn), so a burst of connects at a restart is
# queued rather than dropped (a dropped SYN costs the client a second or more).
LISTEN_BACKLOG = socket.SOMAXCONN


def open_listener(http: HttpSettings) -> socket.socket:
    """A socket listening on `http.host`:`http.port` (port 0: one the kernel picks).

    Accepted connections inherit TCP_NODELAY from it, as from the sockets
    hypercorn makes. Raises StartupError naming the address when the port
    cannot be had: in use, a host that is not this machine's, a port that
    needs privileges.
    """
    family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((http.host, http.port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        raise StartupError(
            f"cannot listen on {address(http.host, http.port)}: {reason[:1].lower()}{reason[1:]}"
        ) from None
    return sock


def address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""The daemon's port: a claim that keeps every other broker off it, then the sockets.

With gateway processes every gateway listens on the port with a socket of
its own and SO_REUSEPORT, and the kernel hashes new connections evenly over
them (one listening socket that they all accept on hands each connection to
whichever gateway calls accept first: a trickle of connections can land
mostly on one; BENCHMARKS.md, "The port"). The writer process holds the
port meanwhile with a bound socket that does not listen (`hold_port`). In
one process hypercorn serves one socket without SO_REUSEPORT
(`open_listener`).

SO_REUSEPORT admits any process of the same user that sets it too: alone,
it lets a second daemon (another data directory) listen on the port, and
the kernel then spreads requests over two daemons' databases. So before it
binds anything on the port the daemon takes a claim on it (`PortClaim`): a
Linux abstract-namespace Unix socket named after the port. An abstract
name is exclusive within a network namespace (the scope of the port
itself), whoever asks, and the kernel frees it when the process that holds
it dies, by kill -9 too: no lock file to go stale, no clean-up at start. A
second broker cannot bind the name and stops at start with one line.

The claim names the port alone, not the host: with SO_REUSEPORT the kernel
lets 0.0.0.0:P, 127.0.0.1:P and [::]:P listen at once for one user and hands
a connection to the most specific listener, so a daemon on 127.0.0.1:P
would take every loopback connection from one on 0.0.0.0:P. One broker per
port: two brokers on two addresses of one port are refused too.

SO_REUSEADDR only lets a restart bind while connections of the last run
are still in TIME_WAIT; it never lets two processes listen on one port.
"""

from __future__ import annotations

import errno
import socket

from broker.config import HttpSettings
from broker.engine.errors import StartupError

# Connections the kernel queues on a listening socket before a gateway
# accepts them: its own cap (net.core.somaxconn), so a burst of connects at a
# restart is queued rather than dropped (a dropped SYN costs the client a
# second or more).
LISTEN_BACKLOG = socket.SOMAXCONN

# The claim's abstract name, followed by the port number.
CLAIM_PREFIX = b"\0agent-broker:port:"


class PortClaim:
    """This daemon's claim on a port, held until `close()` (or until the process dies)."""

    def __init__(self, http: HttpSettings, port: int) -> None:
        """Take the claim on `port`, which `http.host` is served on.

        Raises StartupError naming the address when another broker holds it.
        """
        self.port = port
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(CLAIM_PREFIX + str(port).encode())
        except OSError as exc:
            self._sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            raise StartupError(f"cannot listen on {address(http.host, port)}: another "
                               f"broker daemon holds port {port}") from None

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PortClaim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def claim_and_bind(http: HttpSettings, *, listen: bool) -> tuple[PortClaim, socket.socket]:
    """The claim on `http.port`, then a socket bound to the address: (claim, socket).

    listen: a listening socket without SO_REUSEPORT (`open_listener`, one
    process); otherwise a bound one with SO_REUSEPORT that holds the port for
    the gateways (`hold_port`). Port 0 is claimed once the kernel has picked
    one. Raises StartupError as `PortClaim` and `open_listener` do.
    """
    claim = PortClaim(http, http.port) if http.port else None
    try:
        sock = open_listener(http) if listen else hold_port(http)
    except BaseException:
        if claim is not None:
            claim.close()
        raise
    if claim is None:
        try:
            claim = PortClaim(http, sock.getsockname()[1])
        except BaseException:
            sock.close()
            raise
    return claim, sock


def open_listener(http: HttpSettings, *, reuse_port: bool = False) -> socket.socket:
    """A socket listening on `http.host`:`http.port` (port 0: one the kernel picks).

    reuse_port: beside other sockets of this user on the port (a gateway's).
    Accepted connections inherit TCP_NODELAY from it, as from the sockets
    hypercorn makes. Raises StartupError naming the address when the port
    cannot be had: in use, a host that is not this machine's, a port that
    needs privileges.
    """
    sock = _bound(http, reuse_port=reuse_port)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise _cannot_listen(http, exc) from None
    return sock


def hold_port(http: HttpSettings) -> socket.socket:
    """A socket bound to `http.host`:`http.port` with SO_REUSEPORT, not listening: it keeps
    the port (port 0: one the kernel picks) for the gateways' listening sockets.

    Raises StartupError as `open_listener` does.
    """
    return _bound(http, reuse_port=True)


def _bound(http: HttpSettings, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in http.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((http.host, http.port))
    except OSError as exc:
        sock.close()
        raise _cannot_listen(http, exc) from None
    return sock


def _cannot_listen(http: HttpSettings, exc: OSError) -> StartupError:
    reason = exc.strerror or str(exc)
    return StartupError(
        f"cannot listen on {address(http.host, http.port)}: {reason[:1].lower()}{reason[1:]}")


def address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

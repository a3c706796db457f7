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
second broker cannot bind the name and stops at start with one line. Any
local user may bind an abstract name, though: a claim held by a process of
another user, or by one that takes no connections (a broker's claim
listens), is passed over with a warning, since SO_REUSEPORT never puts
another user's socket beside this daemon's.

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
import logging
import os
import socket
import struct

from broker.config import HttpSettings
from broker.engine.errors import StartupError

log = logging.getLogger(__name__)

# Connections the kernel queues on a listening socket before a gateway
# accepts them: its own cap (net.core.somaxconn), so a burst of connects at a
# restart is queued rather than dropped (a dropped SYN costs the client a
# second or more).
LISTEN_BACKLOG = socket.SOMAXCONN

# The claim's abstract name, followed by the port number.
CLAIM_PREFIX = b"\0agent-broker:port:"
# Ports the kernel picks for port 0 before giving up when each is another broker's.
PORT_ZERO_ATTEMPTS = 5


class PortClaim:
    """This daemon's claim on a port, held until `close()` (or until the process dies).

    `held` is False when the name was taken by a process of another user (see
    `__init__`): the daemon then goes on without a claim.
    """

    def __init__(self, http: HttpSettings, port: int) -> None:
        """Take the claim on `port`, which `http.host` is served on.

        Raises StartupError naming the address when a broker of this user holds it.
        An abstract name has no permissions: any local user may bind it. A claim
        held by another user's process is not a broker that could share the
        port (SO_REUSEPORT joins sockets of one user only), so it is logged and
        passed over rather than letting anyone keep the daemon from starting.
        The claim listens, so that a second daemon can ask who holds it.
        """
        self.port = port
        self.held = True
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = CLAIM_PREFIX + str(port).encode()
        try:
            self._sock.bind(name)
            # Nothing accepts: a probe's connection stays in the queue (see _holder_uid).
            self._sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            self._sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
            holder = _holder_uid(name)
            if holder == os.geteuid():
                raise StartupError(f"cannot listen on {address(http.host, port)}: another "
                                   f"broker daemon holds port {port}") from None
            self.held = False
            log.warning("the claim on port %d (%r) is held by %s, not a broker daemon of "
                        "this user; going on without it", port, name,
                        "a process that does not listen on it" if holder is None
                        else f"a process of uid {holder}")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PortClaim:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _holder_uid(name: bytes) -> int | None:
    """The user id of the process that holds the abstract socket `name` (None: it does
    not take connections, so it is no broker's claim).

    A broker's claim listens but never accepts, so the probe's connection stays
    in its queue, even once the probe is closed. The connect does not block: a
    queue full of earlier probes (SOMAXCONN of them) is taken for a broker of
    this user.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(name)
        credentials = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
    except BlockingIOError:
        return os.geteuid()
    except OSError:
        return None
    finally:
        probe.close()
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


def claim_and_bind(http: HttpSettings, *, listen: bool) -> tuple[PortClaim, socket.socket]:
    """The claim on `http.port`, then a socket bound to the address: (claim, socket).

    listen: a listening socket without SO_REUSEPORT (`open_listener`, one
    process); otherwise a bound one with SO_REUSEPORT that holds the port for
    the gateways (`hold_port`). Port 0 is claimed once the kernel has picked
    one. Raises StartupError as `PortClaim` and `open_listener` do.
    """
    if http.port:
        claim = PortClaim(http, http.port)
        try:
            return claim, open_listener(http) if listen else hold_port(http)
        except BaseException:
            claim.close()
            raise
    # Port 0: the kernel picks a port free on this host, which a broker on another of
    # the machine's addresses may still hold; then take another.
    for attempt in range(PORT_ZERO_ATTEMPTS):
        sock = open_listener(http) if listen else hold_port(http)
        try:
            return PortClaim(http, sock.getsockname()[1]), sock
        except StartupError:
            sock.close()
            if attempt == PORT_ZERO_ATTEMPTS - 1:
                raise
        except BaseException:
            sock.close()
            raise
    raise AssertionError("unreachable")


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

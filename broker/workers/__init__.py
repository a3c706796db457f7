"""The daemon over several processes: one writer process and N gateway processes.

One process caps the daemon at about one core (the event loop and the
writer thread share one GIL). With `server.workers` = N > 1
(`broker serve --workers N`; unset: the number of cores):

    clients --> one listening socket (bound once by the writer process)
                gateway process 0 .. N-1: hypercorn + starlette, sessions,
                  a reader pool (read-only connections), a fanout hub
                     |  commands, results           ^  committed facts, in commit
                     v  (one socketpair each)       |  order, numbered per batch
                writer process (the `broker serve` process itself): the writer
                  actor on the one write connection and its lock, the sweeps,
                  the file sweep, the webhook dispatcher

- The writer process opens the engine, resets presence, starts its services,
  binds the port, then starts the gateways (`GatewayPool`: fresh
  interpreters, `python -m broker.workers.gateway_process`, the listening
  socket and one end of a socketpair passed as file descriptors). It
  reports started (and `broker serve` sends READY=1) only once every
  gateway listens.
- A gateway submits every write as a command over its link
  (`broker.workers.channel`) and reads through its own reader pool: the
  HTTP app and the gateway run on a `GatewayEngine`, which offers what
  `Engine` does. The writer process pushes every committed batch of facts,
  numbered, to every gateway; a gateway that misses a number sends its
  sessions back to the database, as a full frame queue does
  (`FrameQueue.fall_behind`): the rows are durable, so no delivery is lost
  or doubled.
- Stop: the writer process tells each gateway to stop; a gateway stops
  accepting, lets requests in flight finish, closes its sockets with 1001,
  commits what its sessions acked, and exits 0; then the writer process
  ends its services, drains the writer and checkpoints. A gateway that
  exits otherwise takes the daemon down (`WorkerDied`, exit status 1); a
  gateway whose link to the writer ends (the writer process died, even by
  SIGKILL: the kernel closes its end) exits at once with status 3.
- /metrics, /healthz and /readyz answer on any gateway for the whole
  daemon (`broker.workers.metrics`; /readyz commits a probe through the
  writer). Rate limits and socket caps are each gateway's own
  (docs/operations.md, "Processes").

The seam for a per-daemon service (the MCP endpoint): each gateway process
knows its `WorkerInfo` (`app.state.worker`): its index, the number of
gateways, and the path of gateway 0's private Unix socket, on which gateway
0 serves the same app as on the shared port (in a 0700 directory of its
own, removed at stop). A route that must live in one process answers in
gateway 0 and, in the others, forwards its request to that socket (with
`httpx.AsyncHTTPTransport(uds=...)`, say).
"""

from __future__ import annotations

import msgspec


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Which process serves a request: gateway `index` of `count` (0 of 1 in one process).

    gateway0_socket: the Unix socket on which gateway 0 serves the app (None
    in one process, where every request is already in "gateway 0").
    """

    index: int
    count: int
    gateway0_socket: str | None = None

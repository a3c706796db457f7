"""The daemon over several processes: one writer process and N gateway processes.

One process caps the daemon at about one core (the event loop and the
writer thread share one GIL). With `server.workers` = N > 1
(`broker serve --workers N`; unset: the number of cores):

    clients --> the port: one listening socket per gateway (SO_REUSEPORT)
                gateway process 0 .. N-1: hypercorn + starlette, sessions,
                  a reader pool (read-only connections), a fanout hub
                     |  commands, results           ^  committed facts, in commit
                     v  (one socketpair each)       |  order, numbered per batch
                writer process (the `broker serve` process itself): the writer
                  actor on the one write connection and its lock, the sweeps,
                  the file sweep, the webhook dispatcher

- The writer process first claims the port (an abstract Unix socket named
  after it, held until the process ends: a second broker on the port exits
  2) and holds it with a bound socket that does not listen
  (`broker.http.listener`), both before the database. Then it opens the
  engine, resets presence, starts its services and starts the gateways
  (`GatewayPool`: fresh interpreters, `python -m
  broker.workers.gateway_process`, one end of a socketpair passed as a file
  descriptor). Each gateway listens on the port with a socket of its own
  and SO_REUSEPORT, so the kernel spreads new connections evenly over them.
  The writer process closes its holding socket, reports started (and
  `broker serve` sends READY=1) only once every gateway listens.
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
  writer). Rate limits and socket caps are the daemon's: the writer
  process makes one shared-memory file for their buckets and counts, and
  every gateway maps it (`broker.ratelimit.SharedLimits`, passed as a file
  descriptor like the link).

The seam for a per-daemon service (the MCP endpoint): gateway 0 also serves
the app on a private Unix socket (in a 0700 directory of its own, removed at
stop), whose path every gateway gets from the writer process in its hello.
A route that must live in one process answers in gateway 0 and, in the
others, forwards its request to that socket (`broker.mcp.forward`).
"""


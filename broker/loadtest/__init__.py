"""Load generator and benchmarks for the broker (`broker loadtest`, see BENCHMARKS.md).

- `topology`: who talks to whom (channels of K, DM pairs, senders) and its
  setup over REST;
- `runner`: one shard of agents on `broker.client` connections, in the
  caller's loop or in spawned processes, with exact per-message accounting;
- `echo`: the transport ceiling, a bare trio-websocket server answering
  each request, driven by the very same client code;
- `report`: shard results merged, loss counted, the table and the JSON;
- `scenarios`: memory per idle connection, history-page latency (with a
  bulk load through the writer);
- `processes`: the daemon and echo subprocesses and what /proc says of them;
- `tls`: `--tls` (a throwaway CA and certificate for the run) and `--ca-file`;
- `command`: the command-line entry point.
"""

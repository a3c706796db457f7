"""`broker loadtest`: the traffic run with its echo ceiling, and the idle, history and
connect-storm scenarios.

    broker loadtest --agents 100 --channel-size 10 --senders 20 --window 8 \\
        --duration 10 --procs 2 --json result.json
    broker loadtest --agents 100 --channel-size 10 --senders 20 --window 8 \\
        --duration 8 --procs 2 --latency-at 0.1,0.5
    broker loadtest --agents 12 --channel-size 12 --senders 2 --window 50 \\
        --duration 8 --procs 2 --peer jetstream --peer jetstream-default
    broker loadtest --idle 1000,5000
    broker loadtest --history 10000,1000000
    broker loadtest --connect 1000,5000

A traffic run starts a daemon of its own (`broker serve` on a temporary
data directory, port 0) unless `--url` names one, builds the topology over
REST, runs the echo phase (the same clients against a bare trio-websocket
echo server in its own process), then the broker phase, and prints the
summary table. Progress goes to stderr. `--latency-at` makes it a curve:
a closed-loop run finds the maximum, then an open-loop run at each fraction
of it, each phase on a fresh daemon (the same one with `--url`).
`--peer` runs the same topology against NATS JetStream or Mosquitto
afterwards and prints the rows side by side (broker.loadtest.peers).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from broker.loadtest.peers import PEERS, format_peers, peer_topology, run_peer, unavailable
from broker.loadtest.processes import (
    ServerProcess,
    raise_fd_limit,
    start_daemon,
    start_echo,
    start_profiler,
    stop_profiler,
)
from broker.loadtest.report import build_report, format_curve, format_table
from broker.loadtest.runner import BROKER, ECHO, ShardResult, run_local, run_processes
from broker.loadtest.scenarios import history_latency, idle_memory, parse_counts
from broker.loadtest.storm import connect_storm
from broker.loadtest.tls import certificate_for, client_context
from broker.loadtest.topology import LoadSpec, Topology, build_topology


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `broker loadtest` (also `python -m broker.loadtest`)."""
    shape = parser.add_argument_group("topology and load")
    shape.add_argument("--agents", type=int, default=100, help="connected agents (default 100)")
    shape.add_argument("--channel-size", type=int, default=10,
                       help="members per channel (default 10)")
    shape.add_argument("--senders", type=int, default=10, help="agents that send (default 10)")
    shape.add_argument("--window", type=int, default=8,
                       help="requests in flight per sender (default 8)")
    stop = shape.add_mutually_exclusive_group()
    stop.add_argument("--duration", type=float, help="seconds of sending (default 10)")
    stop.add_argument("--messages", type=int, help="total messages to send instead")
    shape.add_argument("--rate", type=float,
                       help="open loop: total sends per second on a fixed schedule "
                            "(window is then the cap of requests in flight per sender)")
    shape.add_argument("--latency-at", metavar="FRACTIONS",
                       help="a latency curve: find the maximum sends/s closed loop, then run "
                            "open loop at these fractions of it, e.g. 0.1,0.5 (each phase "
                            "as long as --duration, or --messages each; not with --rate, "
                            "--profile, --idle or --history)")
    shape.add_argument("--dm-share", type=float, default=0.0,
                       help="fraction of sends that are DMs to the sender's partner (default 0)")
    shape.add_argument("--text-bytes", type=int, default=32, help="message text length")
    shape.add_argument("--msgpack", action="store_true", help="MessagePack frames, not JSON")
    shape.add_argument("--no-batch", dest="batch", action="store_false",
                       help="one deliver frame per delivery, not deliver.batch frames")
    shape.add_argument("--procs", type=int, default=2,
                       help="generator processes (default 2; 0 = in this process)")
    target = parser.add_argument_group("target")
    target.add_argument("--url", help="an already running broker (http://host:port); "
                                      "default: start one on a temporary data directory")
    target.add_argument("--config", type=Path,
                        help="TOML configuration for the daemon the run starts")
    target.add_argument("--tls", action="store_true",
                        help="the daemon the run starts (and the echo server) serve TLS with "
                             "a throwaway certificate for 127.0.0.1; every client trusts its "
                             "CA (pip install '.[bench]'; not with --url, --peer or --history)")
    target.add_argument("--ca-file", type=Path, metavar="PEM",
                        help="with --url https://...: the CA its certificate chains to "
                             "(default: the system's)")
    target.add_argument("--no-echo", action="store_true", help="skip the echo ceiling")
    target.add_argument("--peer", action="append", choices=PEERS, default=[],
                        help="then run the same topology against this peer, started for the "
                             "run, and print both rows (repeatable; one channel, no DMs; "
                             "pip install '.[bench]'; mosquitto needs its binary)")
    target.add_argument("--profile", type=Path, metavar="FILE",
                        help="sample the daemon with py-spy during the broker phase (pip install "
                             "'.[bench]'); FILE.txt: collapsed stacks, .json: speedscope, "
                             "else an SVG flame graph")
    other = parser.add_argument_group("other scenarios")
    other.add_argument("--idle", metavar="COUNTS",
                       help="memory per idle connection at these cumulative counts, e.g. "
                            "1000,5000")
    other.add_argument("--history", metavar="SIZES",
                       help="history-page latency with these numbers of stored messages, e.g. "
                            "10000,1000000 (bulk-loaded through the writer)")
    other.add_argument("--connect", metavar="COUNTS",
                       help="connect storm: that many agents of one workspace connecting at "
                            "once, each asking for presence, on a fresh daemon per count, e.g. "
                            "1000,5000 (with --profile: py-spy on the largest)")
    other.add_argument("--no-presence", dest="presence", action="store_false",
                       help="with --connect: no agent asks for presence (the connect path "
                            "alone)")
    other.add_argument("--history-dir", type=Path,
                       help="keep the bulk-loaded history databases here")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")


def spec_from(args: argparse.Namespace) -> LoadSpec:
    duration = args.duration if args.messages is None and args.duration is not None else None
    if args.messages is None and duration is None:
        duration = 10.0
    return LoadSpec(
        agents=args.agents, channel_size=args.channel_size, senders=args.senders,
        window=args.window, duration=duration, messages=args.messages, rate=args.rate,
        dm_share=args.dm_share, text_bytes=args.text_bytes, msgpack=args.msgpack,
        batch=args.batch,
    )


class Progress:
    """Prints the counters the shards report, at most once a second, on stderr."""

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.started = time.monotonic()
        self.by_shard: dict[int, tuple[int, int]] = {}
        self.printed = 0.0
        self.last = (0, 0, self.started)

    def __call__(self, shard: int, sends: int, deliveries: int) -> None:
        self.by_shard[shard] = (sends, deliveries)
        now = time.monotonic()
        if now - self.printed < 1.0:
            return
        self.printed = now
        total_sends = sum(s for s, _ in self.by_shard.values())
        total_deliveries = sum(d for _, d in self.by_shard.values())
        last_sends, last_deliveries, last_time = self.last
        span = max(now - last_time, 1e-9)
        self.last = (total_sends, total_deliveries, now)
        print(f"[{self.phase} {now - self.started:5.1f} s] sends {total_sends:,} "
              f"({(total_sends - last_sends) / span:,.0f}/s)  deliveries {total_deliveries:,} "
              f"({(total_deliveries - last_deliveries) / span:,.0f}/s)", file=sys.stderr)


async def run_phase(topology: Topology, url: str, mode: str, procs: int) -> list[ShardResult]:
    progress = Progress(mode)
    if procs == 0:
        return await run_local(topology, url, mode, progress)
    return await run_processes(topology, url, mode, procs, progress)


async def run_traffic(spec: LoadSpec, *, procs: int, url: str | None = None,
                      config: Path | None = None, echo: bool = True,
                      profile: Path | None = None, tls: bool = False,
                      cafile: str | None = None) -> dict[str, Any]:
    """The traffic run: topology, echo phase, broker phase; the report (see broker.loadtest.report).

    tls: the daemon the run starts and the echo server serve TLS (broker.loadtest.tls);
    cafile: what the clients trust when `url` is an https:// broker.
    Raises ValueError for `tls` with a `url` or a `cafile`, RuntimeError when a
    server or a shard fails.
    """
    if tls and (url is not None or cafile is not None):
        raise ValueError("tls makes a certificate for a daemon of the run's own: not with a url "
                         "or a cafile")
    raise_fd_limit()
    extra: dict[str, Any] = {"procs": procs}
    with tempfile.TemporaryDirectory(prefix="broker-loadtest-") as tmp:
        daemon: ServerProcess | None = None
        certificate = certificate_for(Path(tmp), tls)
        if certificate is not None:
            cafile = certificate.cafile
        if url is None:
            options = ("--config", str(config)) if config is not None else ()
            daemon = start_daemon(Path(tmp) / "data", *options, tls=certificate)
            url = daemon.address
        extra.update(url=url, tls=url.startswith("https://"))
        try:
            print(f"loadtest: building {spec.agents} agents in channels of {spec.channel_size} "
                  f"on {url}", file=sys.stderr)
            topology = await build_topology(url, spec, cafile=cafile)
            echo_results: list[ShardResult] = []
            if echo:
                if certificate is None and extra["tls"]:
                    print("loadtest: the echo ceiling runs without TLS (only --tls makes a "
                          "certificate for it)", file=sys.stderr)
                server = start_echo(certificate)
                try:
                    scheme = "wss" if certificate is not None else "ws"
                    echo_url = f"{scheme}://127.0.0.1:{server.address}/v1/ws"
                    extra["echo_url"] = echo_url
                    echo_results = await run_phase(topology, echo_url, ECHO, procs)
                finally:
                    server.stop()
            metrics_before = await scrape_metrics(url, cafile)
            cpu_before = daemon.cpu_seconds() if daemon is not None else 0.0
            sampler = start_profiler(daemon.pid, profile) if profile and daemon else None
            started = time.monotonic()
            try:
                broker_results = await run_phase(topology, topology.ws_url, BROKER, procs)
            finally:
                if sampler is not None:
                    stop_profiler(sampler)
            extra.update(daemon_figures(metrics_before, await scrape_metrics(url, cafile)))
            if daemon is not None:
                wall = time.monotonic() - started
                daemon_cpu = daemon.cpu_seconds() - cpu_before
                extra["daemon_cpu_percent"] = round(100 * daemon_cpu / wall, 1)
                extra["daemon_cpu_seconds"] = round(daemon_cpu, 2)
                acked = sum(r.sends_acked for r in broker_results)
                extra["daemon_cpu_ms_per_send"] = (round(1000 * daemon_cpu / acked, 3)
                                                   if acked else None)
                extra["daemon_rss_mib"] = round(daemon.rss_bytes() / 2**20, 1)
        finally:
            if daemon is not None:
                daemon.stop()
    return build_report(topology, broker_results, echo_results, extra)


def parse_fractions(text: str) -> list[float]:
    """`0.1,0.5` -> [0.1, 0.5]: fractions of the maximum, each above 0 and at most 1.

    Raises ValueError for anything else (no number, a word, nan, 0, over 1).
    """
    try:
        fractions = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fractions = []
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise ValueError(f"{text!r}: expected fractions above 0 and at most 1, separated by "
                         "commas, e.g. 0.1,0.5")
    return fractions


async def latency_curve(spec: LoadSpec, fractions: list[float], *, procs: int,
                        url: str | None = None, config: Path | None = None,
                        echo: bool = True, tls: bool = False,
                        cafile: str | None = None) -> dict[str, Any]:
    """The maximum (closed loop), then the latency at each fraction of it (open loop).

    Both in one invocation, so that "half the maximum" is half of what this
    machine managed minutes ago, not in another run at another time. Each
    phase is a whole traffic run (a fresh daemon unless `url` is given; with
    `spec.messages` every phase sends that many, so a tenth of the maximum
    takes ten times as long); the echo ceiling, if wanted, runs with the
    maximum only. Returns the maximum's report, unchanged, with `points`:
    one per fraction, its `fraction` and `rate` and either its whole report
    or, if that run failed, `failed` (why; the other points still run).
    `lost_all_phases`, `errors_all_phases` and `failed_points` add up every
    phase. tls, cafile: as run_traffic's, for every phase.

    Raises ValueError if `spec.rate` is set (the curve finds its rates),
    RuntimeError if the closed-loop run fails or acknowledges no send.
    """
    if spec.rate is not None:
        raise ValueError("a latency curve finds its rates itself; spec.rate must be None")
    peak = await run_traffic(spec, procs=procs, url=url, config=config, echo=echo, tls=tls,
                             cafile=cafile)
    if peak["sends_per_s"] <= 0:
        raise RuntimeError("the closed-loop run acknowledged no send; no maximum to take "
                           "fractions of")
    points: list[dict[str, Any]] = []
    for fraction in fractions:
        rate = fraction * peak["sends_per_s"]
        print(f"loadtest: {fraction:g} of the maximum, {rate:,.1f} sends/s open loop",
              file=sys.stderr)
        try:
            point = await run_traffic(msgspec.structs.replace(spec, rate=rate), procs=procs,
                                      url=url, config=config, echo=False, tls=tls,
                                      cafile=cafile)
        except RuntimeError as exc:
            print(f"loadtest: the run at {fraction:g} of the maximum failed: {exc}",
                  file=sys.stderr)
            points.append({"fraction": fraction, "rate": rate, "failed": str(exc)})
            continue
        points.append({"fraction": fraction, "rate": rate, **point})
    measured = [peak, *(p for p in points if "failed" not in p)]
    return {**peak, "points": points,
            "lost_all_phases": sum(r["lost"] for r in measured),
            "errors_all_phases": sum(r["errors"] for r in measured),
            "failed_points": sum(1 for p in points if "failed" in p)}


_BUCKET = re.compile(r'^(broker_writer_\w+?)(_bucket\{le="([^"]+)"\}|_sum|_count) (\S+)$')
# The writer thread's CPU time in its two stages (counters).
_CPU = re.compile(r'^(broker_writer_(?:apply|sync)_cpu_seconds)_total (\S+)$')
# The daemon's own timing of the generator's sends (frame read to reply
# queued), summed over the two send operations it uses.
_SEND = re.compile(r'^broker_ws_request_seconds(_bucket|_sum|_count)'
                   r'\{(?:le="([^"]+)",)?operation="(?:message|dm)\.send"\} (\S+)$')
# The daemon's garbage-collector pauses, summed over the generations.
_GC = re.compile(r'^broker_gc_pause_seconds(_bucket|_sum|_count)'
                 r'\{generation="\d"(?:,le="([^"]+)")?\} (\S+)$')


async def scrape_metrics(url: str, cafile: str | None = None) -> dict[str, float]:
    """The daemon's figures from its /metrics (see `parse_metrics`; empty if unreachable)."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10,
                                     verify=client_context(cafile)) as http:
            text = (await http.get("/metrics")).text
    except httpx.HTTPError:
        return {}
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    """The daemon's figures in a /metrics text (name -> value).

    The writer's histograms and CPU counters, the send requests' timing and
    the collector's pauses.
    """
    figures: dict[str, float] = {}
    for line in text.splitlines():
        if cpu := _CPU.match(line):
            figures[cpu.group(1)] = float(cpu.group(2))
        elif found := _BUCKET.match(line):
            name, kind, le, value = found.groups()
            key = f"{name}:{le}" if le is not None else f"{name}{kind}"
            figures[key] = float(value)
        elif summed := (_SEND.match(line) or _GC.match(line)):
            kind, le, value = summed.groups()
            name = ("broker_ws_send_seconds" if summed.re is _SEND
                    else "broker_gc_pause_seconds")
            key = f"{name}:{le}" if kind == "_bucket" else f"{name}{kind}"
            figures[key] = figures.get(key, 0.0) + float(value)
    return figures


def daemon_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The daemon during the broker phase: commits, mean batch, where a command's time went.

    commit: a batch from the event loop handing it over to its results back
    (the `commit_mean_ms` of earlier reports); queue: a command waiting for
    its batch to start; apply and sync: a batch's statements and its COMMIT,
    in the writer thread, each also as that thread's CPU time (`_cpu_mean_ms`:
    the rest of the stage the thread did not run, waiting for the GIL, a core
    or the disk); handover: commit less apply and sync, the batch's trip to
    the thread and back; daemon_send: a send request in the daemon, from its
    frame read to its reply queued (the part of send->reply the daemon
    itself sees); gc: the daemon's garbage-collector pauses (no Python
    runs meanwhile), their number, total and longest. Each p99 (and the longest
    pause) is the upper bound of the histogram bucket that holds it.
    """
    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    def bound_ms(name: str, needed: float) -> float | None:
        """The upper bound (ms) of the first bucket of `name` holding `needed` of the
        phase's observations; None if only the open last bucket does."""
        bounds = sorted((float(key.split(":")[1]), key) for key in after
                        if key.startswith(f"{name}:") and "Inf" not in key)
        found = next((bound for bound, key in bounds if delta(key) >= needed), math.inf)
        return None if math.isinf(found) else round(1000 * found, 3)

    commits = delta("broker_writer_commit_seconds_count")
    if commits <= 0:
        return {}
    figures: dict[str, Any] = {
        "commits": int(commits),
        "batch_mean": round(delta("broker_writer_batch_size_sum")
                            / max(delta("broker_writer_batch_size_count"), 1), 1),
    }
    for stage, name in (("commit", "broker_writer_commit_seconds"),
                        ("queue", "broker_writer_queue_seconds"),
                        ("apply", "broker_writer_apply_seconds"),
                        ("sync", "broker_writer_sync_seconds"),
                        ("daemon_send", "broker_ws_send_seconds")):
        count = delta(f"{name}_count")
        if count <= 0:
            continue
        figures[f"{stage}_mean_ms"] = round(1000 * delta(f"{name}_sum") / count, 3)
        figures[f"{stage}_p99_ms_at_most"] = bound_ms(name, 0.99 * count)
    for stage in ("apply", "sync"):
        batches = delta(f"broker_writer_{stage}_seconds_count")
        if f"broker_writer_{stage}_cpu_seconds" in after and batches > 0:
            figures[f"{stage}_cpu_mean_ms"] = round(
                1000 * delta(f"broker_writer_{stage}_cpu_seconds") / batches, 3)
    if all(f"{stage}_mean_ms" in figures for stage in ("commit", "apply", "sync")):
        # Each batch is observed once in all three (the same count).
        figures["handover_mean_ms"] = round(1000 * (
            delta("broker_writer_commit_seconds_sum") - delta("broker_writer_apply_seconds_sum")
            - delta("broker_writer_sync_seconds_sum")) / commits, 3)
    pauses = delta("broker_gc_pause_seconds_count")
    if "broker_gc_pause_seconds_count" in after:
        figures["gc_pauses"] = int(pauses)
        figures["gc_pause_total_ms"] = round(1000 * delta("broker_gc_pause_seconds_sum"), 1)
        figures["gc_pause_longest_ms_at_most"] = (
            0.0 if pauses == 0 else bound_ms("broker_gc_pause_seconds", pauses))
    return figures


def run(args: argparse.Namespace) -> int:
    """Run what the options ask for; the exit status.

    0; 1 when a traffic run (any phase of a latency curve) lost messages;
    2 for refused options, a failed run, a curve with a failed point or a
    failed peer (its JSON is still written). A peer's losses do not count:
    the peer rows are there to compare, and MQTT at QoS 1 drops by design.
    """
    try:
        if args.latency_at is not None:
            for option, given in (("--rate", args.rate is not None),
                                  ("--profile", args.profile is not None),
                                  ("--idle", args.idle), ("--history", args.history),
                                  ("--connect", args.connect)):
                if given:
                    raise ValueError(f"--latency-at runs a curve of its own; give it without "
                                     f"{option}")
            fractions = parse_fractions(args.latency_at)
        cafile = check_tls(args)
        skipped = check_peers(args)
        if args.connect:
            counts = parse_counts(args.connect)
            report = trio.run(lambda: connect_storm(counts, args.profile, args.presence,
                                                    tls=args.tls))
        elif args.idle:
            counts = parse_counts(args.idle)
            report = trio.run(lambda: idle_memory(counts, tls=args.tls))
        elif args.history:
            report = trio.run(history_latency, parse_counts(args.history), 300,
                              args.history_dir)
        elif args.latency_at is not None:
            spec = spec_from(args)
            report = trio.run(lambda: latency_curve(
                spec, fractions, procs=args.procs, url=args.url, config=args.config,
                echo=not args.no_echo, tls=args.tls, cafile=cafile))
            print(format_curve(report))
        else:
            spec = spec_from(args)
            report = trio.run(lambda: run_traffic(
                spec, procs=args.procs, url=args.url, config=args.config,
                echo=not args.no_echo, profile=args.profile, tls=args.tls, cafile=cafile))
            print(format_table(report))
            if args.peer:
                report["peers"] = run_peers(args.peer, spec, args.procs, skipped)
                print(format_peers(report))
    except (ValueError, RuntimeError) as exc:
        print(f"broker loadtest: {exc}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, BaseExceptionGroup) as exc:
        # The broker at --url is not there, or not trusted (raised alone, or by
        # the set-up's concurrent requests in a group).
        failed = _http_error(exc)
        if failed is None:
            raise
        print(f"broker loadtest: the broker did not answer: {_reason(failed)}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if report.get("failed_points") or any("failed" in p for p in report.get("peers", ())):
        return 2
    return 1 if report.get("lost_all_phases", report.get("lost")) else 0


def _http_error(exc: BaseException) -> httpx.HTTPError | None:
    """`exc` if it is an HTTP error, or the first of a group whose errors all are; else None."""
    if isinstance(exc, httpx.HTTPError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_http_error(inner) for inner in exc.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


def _reason(exc: BaseException) -> str:
    """What went wrong, in one line: the first exception in `exc`'s chain that says
    something. A failed TLS handshake reaches us as httpx's ConnectError without a
    message, raised from httpcore's, which hides the SSL error as its suppressed
    context: the walk follows the context even then."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if str(cause):
            return f"{type(cause).__name__}: {cause}"
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__


def check_tls(args: argparse.Namespace) -> str | None:
    """Refuse `--tls` and `--ca-file` where they do not apply; the CA file the clients trust.

    Raises ValueError.
    """
    if args.tls:
        for option, given in (("--url", args.url), ("--peer", args.peer),
                              ("--history", args.history)):
            if given:
                raise ValueError(f"--tls starts a daemon of its own with a throwaway "
                                 f"certificate; give it without {option}" + (
                                     " (for a TLS broker at --url, give --ca-file)"
                                     if option == "--url" else ""))
    if args.ca_file is None:
        return None
    if not (args.url or "").startswith("https://"):
        raise ValueError("--ca-file is for a broker at --url https://...; a daemon the run "
                         "starts uses --tls")
    for option, given in (("--idle", args.idle), ("--connect", args.connect),
                          ("--history", args.history)):
        if given:
            raise ValueError(f"--ca-file is for a traffic run against --url; {option} starts "
                             "a daemon of its own")
    try:
        client_context(str(args.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"--ca-file {args.ca_file}: not a readable PEM CA file ({exc})") from None
    return str(args.ca_file)


def check_peers(args: argparse.Namespace) -> dict[str, str]:
    """Refuse `--peer` with what it does not model, before anything starts; the peers to skip.

    Returns peer -> why it is skipped (its binary is missing). Raises
    ValueError for options a peer run cannot mirror, RuntimeError when a
    package a peer needs is not installed.
    """
    if not args.peer:
        return {}
    for option, given in (("--latency-at", args.latency_at is not None),
                          ("--idle", args.idle), ("--history", args.history),
                          ("--connect", args.connect)):
        if given:
            raise ValueError(f"--peer compares a traffic run; give it without {option}")
    peer_topology(spec_from(args))
    return {peer: why for peer in dict.fromkeys(args.peer)
            if (why := unavailable(peer)) is not None}


def run_peers(peers: list[str], spec: LoadSpec, procs: int,
              skipped: dict[str, str]) -> list[dict[str, Any]]:
    """Each peer's report, in order; a skipped or failed peer says why instead."""
    reports: list[dict[str, Any]] = []
    for peer in dict.fromkeys(peers):
        if peer in skipped:
            print(f"loadtest: --peer {peer} skipped: {skipped[peer]}", file=sys.stderr)
            reports.append({"system": peer, "skipped": skipped[peer]})
            continue
        print(f"loadtest: the same topology against {peer}", file=sys.stderr)
        try:
            reports.append(run_peer(peer, spec, procs=procs, progress=Progress(peer)))
        except RuntimeError as exc:
            print(f"loadtest: --peer {peer} failed: {exc}", file=sys.stderr)
            reports.append({"system": peer, "failed": str(exc)})
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker.loadtest",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))

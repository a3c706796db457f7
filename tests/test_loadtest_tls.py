"""`broker loadtest` over TLS: `--tls` (its own daemon and echo server serve TLS with a
throwaway CA) and `--ca-file` (a TLS broker at `--url`), and the options it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from broker.config import Settings
from broker.loadtest import command
from broker.loadtest.command import run_traffic
from broker.loadtest.scenarios import idle_memory
from broker.loadtest.storm import connect_storm
from broker.loadtest.topology import LoadSpec
from broker.server import BrokerServer
from tests.helpers.loadtest import REQUIRED_KEYS, SUBPROCESS_DEADLINE_S, run_loadtest
from tests.helpers.tls import Certificates, make_certificates, serving_tls


async def test_loadtest_tls_runs_its_own_daemon_and_echo_over_tls(tmp_path: Path) -> None:
    """`--tls`: the daemon listens on https://, the echo phase and the broker phase run over
    wss:// with clients that trust the run's CA alone, and nothing is lost."""
    output, report = await run_loadtest(
        tmp_path / "result.json", "--agents", "6", "--channel-size", "3", "--senders", "2",
        "--window", "4", "--messages", "60", "--procs", "2", "--tls")
    assert REQUIRED_KEYS <= report.keys()
    assert report["url"].startswith("https://127.0.0.1:") and report["tls"] is True
    assert report["sends_acked"] == 60 and report["echo_messages"] == 60
    assert report["deliveries"] == report["expected_deliveries"] == 60 * 2
    assert report["lost"] == 0 and report["errors"] == 0
    assert "over TLS" in output


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def settings(settings: Settings, certs: Certificates) -> Settings:
    return serving_tls(settings, certs)


async def test_loadtest_ca_file_trusts_a_tls_broker_at_url(
    server: BrokerServer, certs: Certificates,
) -> None:
    """`--url https://... --ca-file`: set-up, sockets and /metrics all trust that CA."""
    assert server.url is not None and server.url.startswith("https://")
    spec = LoadSpec(agents=4, channel_size=2, senders=2, window=2, duration=None, messages=40)
    with trio.fail_after(90):
        report = await run_traffic(spec, procs=0, url=server.url, echo=False,
                                   cafile=str(certs.cafile))
    assert report["tls"] is True
    assert report["sends_acked"] == 40 and report["lost"] == 0 and report["errors"] == 0
    assert report["commits"] > 0  # scraped from /metrics over TLS


async def test_loadtest_without_the_ca_refuses_the_broker_in_one_line(
    server: BrokerServer, capsys: pytest.CaptureFixture[str],
) -> None:
    """A certificate the clients cannot verify ends the run with status 2 and one line."""
    assert server.url is not None
    status = await trio.to_thread.run_sync(
        command.main, ["--url", server.url, "--messages", "1", "--no-echo"])
    assert status == 2
    err = capsys.readouterr().err
    assert "broker loadtest: the broker did not answer:" in err
    assert "CERTIFICATE_VERIFY_FAILED" in err and "Traceback" not in err


@pytest.mark.parametrize(("options", "message"), [
    (["--tls", "--url", "https://127.0.0.1:1"], "give it without --url (for a TLS broker at"),
    (["--tls", "--peer", "jetstream"], "give it without --peer"),
    (["--tls", "--history", "10"], "give it without --history"),
    (["--ca-file", "ca.pem"], "--ca-file is for a broker at --url"),
    (["--url", "https://127.0.0.1:1", "--ca-file", "/nonexistent/ca.pem"], "no such file"),
])
def test_loadtest_tls_options_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    options: list[str], message: str,
) -> None:
    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run started")

    monkeypatch.setattr(command, "run_traffic", no_run)
    assert command.main(options) == 2
    assert message in capsys.readouterr().err


async def test_loadtest_tls_connect_storm_and_idle_connections() -> None:
    """`--connect` and `--idle` with `--tls`: every agent's socket opens over TLS."""
    with trio.fail_after(SUBPROCESS_DEADLINE_S):
        storm = await connect_storm([6], tls=True)
        idle = await idle_memory([6], tls=True)
    (step,) = storm["steps"]
    assert storm["tls"] is True and step["agents"] == 6 and step["frames"] >= 6
    (opened,) = idle["steps"]
    assert idle["tls"] is True and opened["connections"] == 6 and opened["rss_mib"] > 0

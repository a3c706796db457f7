"""`broker loadtest` over TLS: `--tls` (its own daemon and echo server serve TLS with a
throwaway CA) and `--ca-file` (a TLS broker at `--url`), and the options it refuses."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trio

from broker.loadtest import command
from broker.loadtest.command import run_traffic
from broker.loadtest.scenarios import idle_memory
from broker.loadtest.storm import connect_storm
from broker.loadtest.tls import client_context
from broker.loadtest.topology import LoadSpec
from tests.helpers.daemon import serve
from tests.helpers.loadtest import REQUIRED_KEYS, run_loadtest
from tests.helpers.tls import Certificates, make_certificates

# Two daemons, each with a handful of agents connecting over TLS, on a busy machine.
SCENARIOS_DEADLINE_S = 120


async def test_loadtest_tls_runs_its_own_daemon_and_echo_over_tls(tmp_path: Path) -> None:
    """`--tls`: the daemon listens on https://, the echo phase and the broker phase run over
    wss:// with clients that trust the run's CA alone, and nothing is lost."""
    output, report = await run_loadtest(
        tmp_path / "result.json", "--agents", "6", "--channel-size", "3", "--senders", "2",
        "--window", "4", "--messages", "60", "--procs", "2", "--tls")
    assert REQUIRED_KEYS <= report.keys()
    assert report["url"].startswith("https://127.0.0.1:") and report["tls"] is True
    assert report["echo_url"].startswith("wss://127.0.0.1:")
    assert report["sends_acked"] == 60 and report["echo_messages"] == 60
    assert report["deliveries"] == report["expected_deliveries"] == 60 * 2
    assert report["lost"] == 0 and report["errors"] == 0
    assert "over TLS" in output


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


async def test_loadtest_ca_file_trusts_a_tls_broker_at_url(
    tmp_path: Path, certs: Certificates,
) -> None:
    """`--url https://... --ca-file`: set-up, sockets and /metrics all trust that CA."""
    spec = LoadSpec(agents=4, channel_size=2, senders=2, window=2, duration=None, messages=40)
    with trio.fail_after(90):
        async with serve(tmp_path / "data", tls=certs.settings()) as server:
            assert server.url is not None and server.url.startswith("https://")
            report = await run_traffic(spec, procs=0, url=server.url, echo=False,
                                       cafile=str(certs.cafile))
    assert report["tls"] is True
    assert report["sends_acked"] == 40 and report["lost"] == 0 and report["errors"] == 0
    assert report["commits"] > 0  # scraped from /metrics over TLS


async def test_loadtest_without_the_ca_refuses_the_broker_in_one_line(
    tmp_path: Path, certs: Certificates, capsys: pytest.CaptureFixture[str],
) -> None:
    """A certificate the clients cannot verify ends the run with status 2 and one line."""
    with trio.fail_after(90):
        async with serve(tmp_path / "data", tls=certs.settings()) as server:
            assert server.url is not None
            status = await trio.to_thread.run_sync(
                command.main, ["--url", server.url, "--messages", "1", "--no-echo"],
                abandon_on_cancel=True)
    assert status == 2
    err = capsys.readouterr().err
    assert "broker loadtest: the broker did not answer:" in err
    assert "CERTIFICATE_VERIFY_FAILED" in err and "Traceback" not in err


@pytest.mark.parametrize(("options", "message"), [
    (["--tls", "--url", "https://127.0.0.1:1"], "give it without --url (for a TLS broker at"),
    (["--tls", "--peer", "jetstream"], "give it without --peer"),
    (["--tls", "--history", "10"], "give it without --history"),
    (["--ca-file", "ca.pem"], "--ca-file is for a broker at --url https://"),
    (["--url", "http://127.0.0.1:1", "--ca-file", "ca.pem"], "is for a broker at --url https://"),
    (["--url", "https://127.0.0.1:1", "--ca-file", "ca.pem", "--idle", "5"],
     "--idle starts a daemon of its own"),
    (["--url", "https://127.0.0.1:1", "--ca-file", "/nonexistent/ca.pem"],
     "not a readable PEM CA file"),
    (["--url", "https://127.0.0.1:1", "--ca-file", "NOT_PEM"], "not a readable PEM CA file"),
])
def test_loadtest_tls_options_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    options: list[str], message: str,
) -> None:
    """Each refusal is one line and status 2, before any daemon or run starts."""
    def no_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run started")

    for scenario in ("run_traffic", "latency_curve", "idle_memory", "connect_storm",
                     "history_latency"):
        monkeypatch.setattr(command, scenario, no_run)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate\n")
    options = [str(not_pem) if option == "NOT_PEM" else option for option in options]
    assert command.main(options) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_loadtest_http_errors_of_concurrent_requests_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Set-up's concurrent requests fail together (an exception group): still one line."""
    async def failing(*args: object, **kwargs: object) -> None:
        raise ExceptionGroup("set-up", [httpx.ReadError("connection reset"),
                                        httpx.ReadError("connection reset")])

    monkeypatch.setattr(command, "run_traffic", failing)
    assert command.main(["--messages", "1"]) == 2
    err = capsys.readouterr().err
    assert "broker loadtest: the broker did not answer: ReadError: connection reset" in err


def test_client_context_trusts_the_run_ca_alone(certs: Certificates) -> None:
    """The run's clients verify the certificate and the host name against its CA only;
    without a CA file, against the system's, as broker.client does."""
    context = client_context(str(certs.cafile))
    assert len(context.get_ca_certs()) == 1
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    system = client_context(None)
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname


async def test_run_traffic_refuses_tls_with_a_url() -> None:
    spec = LoadSpec(agents=2, channel_size=2, senders=1, duration=None, messages=1)
    with pytest.raises(ValueError, match="not with a url"):
        await run_traffic(spec, procs=0, url="https://127.0.0.1:1", tls=True)


async def test_loadtest_tls_connect_storm_and_idle_connections() -> None:
    """`--connect` and `--idle` with `--tls`: their daemons listen on https:// and every
    agent's socket opens over TLS."""
    with trio.fail_after(SCENARIOS_DEADLINE_S):
        storm = await connect_storm([6], tls=True)
        idle = await idle_memory([6], tls=True)
    (step,) = storm["steps"]
    assert step["url"].startswith("https://") and storm["tls"] is True
    assert step["agents"] == 6 and step["frames"] >= 6
    (opened,) = idle["steps"]
    assert idle["url"].startswith("https://") and idle["tls"] is True
    assert opened["connections"] == 6 and opened["rss_mib"] > 0


async def test_loadtest_tls_overrides_a_config_that_asks_for_client_certificates(
    tmp_path: Path, certs: Certificates,
) -> None:
    """`--tls --config` with a `[http.tls]` of its own (client certificates required): the
    run's daemon serves the run's certificate and asks no client for one."""
    config = tmp_path / "broker.toml"
    config.write_text(f'[http.tls]\ncertfile = "{certs.certfile}"\nkeyfile = "{certs.keyfile}"\n'
                      f'client_cafile = "{certs.cafile}"\n')
    spec = LoadSpec(agents=4, channel_size=2, senders=2, window=2, duration=None, messages=20)
    with trio.fail_after(SCENARIOS_DEADLINE_S):
        report = await run_traffic(spec, procs=0, config=config, echo=False, tls=True)
    assert report["url"].startswith("https://") and report["sends_acked"] == 20
    assert report["lost"] == 0 and report["errors"] == 0

"""`broker serve` as a process: settings from TOML and flags, start, answer, stop on SIGTERM,
refuse a port in use."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from broker.cli import build_parser, settings_for
from broker.config import ConfigError, load_settings
from tests.helpers.daemon import refused_start, run_daemon

PROCESS_DEADLINE_S = 30


def test_serve_toml_settings_flags_override(tmp_path: Path) -> None:
    """TOML settings, and flags override them."""
    config = tmp_path / "broker.toml"
    config.write_text(
        'data_dir = "/var/lib/broker"\n'
        "[http]\nport = 9000\nmax_body_bytes = 2048\n"
        '[engine]\nsynchronous = "NORMAL"\n'
    )
    settings = load_settings(config)
    assert (settings.http.port, settings.http.max_body_bytes) == (9000, 2048)
    assert settings.engine.synchronous == "NORMAL"
    args = build_parser().parse_args(
        ["serve", "--config", str(config), "--port", "0", "--data-dir", str(tmp_path)])
    overridden = settings_for(args)
    assert (overridden.http.port, overridden.data_dir) == (0, str(tmp_path))
    assert overridden.http.max_body_bytes == 2048


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[http]\nprot = 1\n", "prot"),
        ("[http]\nport = 70000\n", "$.http.port"),
        ("[http]\nmax_body_bytes = 0\n", "$.http.max_body_bytes"),
        ('[engine]\nsynchronous = "SOMETIMES"\n', "$.engine.synchronous"),
        ("[http\n", "not valid TOML"),
    ],
)
def test_serve_bad_configuration_names_problem(tmp_path: Path, text: str, fragment: str) -> None:
    """A bad configuration names the problem."""
    config = tmp_path / "broker.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert fragment in str(info.value)
    assert str(config) in str(info.value)


def test_serve_bad_configuration_exits_2(tmp_path: Path) -> None:
    """A bad configuration exits 2 with one line."""
    config = tmp_path / "broker.toml"
    config.write_text("[http]\nport = -1\n")
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--config", str(config)],
        capture_output=True, text=True, timeout=PROCESS_DEADLINE_S, check=False,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "$.http.port" in done.stderr


async def test_serve_answers_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    with trio.fail_after(PROCESS_DEADLINE_S):
        async with run_daemon(tmp_path / "data") as daemon:
            process, url = daemon.process, daemon.url
            async with httpx.AsyncClient(base_url=url) as client:
                created = await client.post("/v1/workspaces", json={"name": "cli"})
                assert created.status_code == 201
                assert (await client.get("/readyz")).status_code == 200
                # Once started, the daemon froze its start-up objects out of the collector's
                # reach (broker.gc_tuning); it happens just after it listens, so wait for it.
                while True:
                    text = (await client.get("/metrics")).text
                    found = re.search(r"^broker_gc_frozen_objects (\S+)$", text, re.MULTILINE)
                    assert found, text
                    if float(found.group(1)) > 0:
                        break
                    await trio.sleep(0.05)
                assert float(found.group(1)) > 10_000
                # ...and timed that full collection (the hook was in place before it).
                full = re.search(r'^broker_gc_pause_seconds_count\{generation="2"\} (\S+)$', text,
                                 re.MULTILINE)
                assert full and float(full.group(1)) >= 1, text
            process.send_signal(signal.SIGTERM)
            output = await daemon.finished()
            assert await process.wait() == 0, output.decode()
    assert b"stopped" in output
    assert (tmp_path / "data" / "broker.db").exists()


@pytest.mark.parametrize("workers", [1, 2], ids=["1proc", "2workers"])
async def test_serve_on_the_port_of_a_running_daemon_exits_2(tmp_path: Path, workers: int) -> None:
    """A second daemon (its own data directory) on the port a `--workers 2` daemon serves
    stops at start, in either process model: one line on stderr naming the address and
    the other daemon, exit 2, its database never opened; the first daemon keeps the port."""
    with trio.fail_after(2 * PROCESS_DEADLINE_S):
        async with run_daemon(tmp_path / "first", workers=2) as daemon:
            port = int(daemon.url.rsplit(":", 1)[1])
            done = await refused_start(tmp_path / "second", port=port, workers=workers)
            async with httpx.AsyncClient(base_url=daemon.url) as client:
                created = await client.post("/v1/workspaces", json={"name": "first"})
                assert created.status_code == 201
    assert (done.returncode, done.stderr.decode()) == (
        2, f"broker: cannot listen on 127.0.0.1:{port}: another broker daemon holds port "
           f"{port}\n"), done
    assert not (tmp_path / "second" / "broker.db").exists()


@pytest.mark.parametrize("workers", [1, 2], ids=["1proc", "2workers"])
async def test_serve_on_a_port_another_program_listens_on_exits_2(
    tmp_path: Path, workers: int,
) -> None:
    """A port that a program other than a broker listens on (no SO_REUSEPORT) stops the start
    in either process model: one line with the kernel's reason, exit 2, no database."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with trio.fail_after(PROCESS_DEADLINE_S):
            done = await refused_start(tmp_path / "data", port=port, workers=workers)
    assert (done.returncode, done.stderr.decode()) == (
        2, f"broker: cannot listen on 127.0.0.1:{port}: address already in use\n"), done
    assert not (tmp_path / "data" / "broker.db").exists()

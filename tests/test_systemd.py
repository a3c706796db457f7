"""The notify protocol against a datagram socket made by the test, and the unit file."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from broker.systemd import SystemdNotifier, run_watchdog, watchdog_interval

ROOT = Path(__file__).resolve().parent.parent


async def test_notify_ready_and_stopping_reach_socket(tmp_path: Path) -> None:
    """READY and STOPPING reach the socket."""
    path = str(tmp_path / "notify.sock")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        notifier = SystemdNotifier(path)
        assert await notifier.ready("serving on 127.0.0.1:1")
        assert await notifier.stopping()
        with trio.fail_after(5):
            first = (await sock.recv(4096)).decode().split("\n")
            second = (await sock.recv(4096)).decode().split("\n")
        notifier.close()
    assert first[0] == "READY=1" and "STATUS=serving on 127.0.0.1:1" in first
    assert f"MAINPID={os.getpid()}" in first
    assert second == ["STOPPING=1", "STATUS=stopping"]


async def test_notify_abstract_socket_names_supported() -> None:
    """Abstract socket names are supported."""
    name = f"broker-test-{os.getpid()}"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind("\0" + name)
        notifier = SystemdNotifier("@" + name)
        assert await notifier.notify("STATUS=hi")
        with trio.fail_after(5):
            assert await sock.recv(100) == b"STATUS=hi"
        notifier.close()


async def test_notify_without_socket_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET, nothing is sent."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert await notifier.ready("x") is False
    assert notifier.sent == 0


async def test_watchdog_pings_from_the_event_loop(tmp_path: Path, autojump_clock: object) -> None:
    path = str(tmp_path / "wd.sock")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        notifier = SystemdNotifier(path)
        async with trio.open_nursery() as nursery:
            await nursery.start(run_watchdog, notifier, 5.0)
            pings = [await sock.recv(100) for _ in range(3)]
            nursery.cancel_scope.cancel()
        notifier.close()
    assert pings == [b"WATCHDOG=1"] * 3


def test_watchdog_interval_is_half_the_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


def unit_for_this_machine(tmp_path: Path) -> Path:
    """The shipped unit with ExecStart pointing at this checkout's broker (verify checks it)."""
    broker = str(Path(sys.executable).parent / "broker")  # the venv's console script
    text = (ROOT / "deploy" / "broker.service").read_text()
    unit = tmp_path / "agent-broker.service"
    unit.write_text(text.replace("/opt/agent-broker/bin/broker", broker))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_unit_passes_verify_and_security_rating(tmp_path: Path) -> None:
    unit = unit_for_this_machine(tmp_path)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True, text=True, timeout=60)
    assert security.returncode == 0, security.stderr
    line = [x for x in security.stdout.splitlines() if "Overall exposure level" in x][0]
    score = float(line.split(":")[1].split()[0])
    assert score <= 2.0, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_unit_tls_credentials_pass_verify(tmp_path: Path) -> None:
    """The unit's commented TLS lines (LoadCredential=, %d) are valid once uncommented."""
    unit = unit_for_this_machine(tmp_path)
    text = unit.read_text()
    tls_lines = [line for line in text.splitlines()
                 if line.startswith(("#LoadCredential=", "#Environment=BROKER_HTTP_TLS_"))]
    assert len(tls_lines) == 3, tls_lines
    for line in tls_lines:
        text = text.replace(line, line[1:])
    unit.write_text(text)
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert verify.stderr.strip() == "", verify.stderr

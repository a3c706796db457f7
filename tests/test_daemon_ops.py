"""Daemon operations: configuration layering, systemd notify, graceful stop, admin commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from broker.cli import build_parser, main, settings_for
from broker.client import connect
from broker.config import SECRET_NAME, load_settings
from tests.helpers.daemon import run_daemon, run_server

DEADLINE_S = 60


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True,
                          text=True, timeout=DEADLINE_S, env=dict(os.environ, **(env or {})))


def test_config_layering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file, then the environment, then the flags."""
    config = tmp_path / "broker.toml"
    config.write_text("[http]\nport = 9000\nmax_body_bytes = 2048\n"
                      "[engine.limits]\nmailbox_depth = 7\n")
    monkeypatch.setenv("BROKER_HTTP_PORT", "9100")
    monkeypatch.setenv("BROKER_ENGINE_LIMITS_MAILBOX_DEPTH", "8")
    monkeypatch.setenv("BROKER_LOG_LEVEL", "WARNING")
    from_env = load_settings(config)
    assert (from_env.http.port, from_env.http.max_body_bytes) == (9100, 2048)
    assert from_env.engine.limits.mailbox_depth == 8 and from_env.log_level == "WARNING"
    args = build_parser().parse_args(
        ["serve", "--config", str(config), "--port", "9200", "--log-level", "DEBUG"])
    flags = settings_for(args)
    assert (flags.http.port, flags.log_level) == (9200, "DEBUG")
    assert flags.engine.limits.mailbox_depth == 8


@pytest.mark.parametrize(
    ("toml", "env", "fragment"),
    [
        ("[http]\nprot = 1\n", {}, "prot"),
        ("", {"BROKER_HTTP_PORT": "70000"}, "BROKER_HTTP_PORT"),
        ("", {"BROKER_HTTP_PROT": "1"}, "BROKER_HTTP_PROT: no such setting"),
        ("", {"BROKER_ENGINE_SYNCHRONOUS": "SOMETIMES"}, "BROKER_ENGINE_SYNCHRONOUS"),
        ("[engine]\nreaders = 0\n", {}, "$.engine.readers"),
    ],
)
def test_daemon_bad_configuration_exits_2(
    tmp_path: Path, toml: str, env: dict[str, str], fragment: str
) -> None:
    """A bad configuration exits 2 with one line."""
    config = tmp_path / "broker.toml"
    config.write_text(toml)
    done = run_cli("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"), env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and fragment in done.stderr, done.stderr
    assert not (tmp_path / "d" / "broker.db").exists()


def test_daemon_unwritable_data_dir_exits_2(tmp_path: Path) -> None:
    """An unwritable data dir exits 2."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    done = run_cli("serve", "--data-dir", str(blocker / "data"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "cannot be written" in done.stderr


@pytest.mark.parametrize("content", [b"SQLite format 3\x00" + b"\xff" * 5000, b"hello" * 2000])
def test_daemon_refuses_foreign_or_corrupt_database(tmp_path: Path, content: bytes) -> None:
    """A foreign or corrupt database is refused, untouched."""
    (tmp_path / "broker.db").write_bytes(content)
    done = run_cli("serve", "--port", "0", "--data-dir", str(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "broker.db" in done.stderr
    assert (tmp_path / "broker.db").read_bytes() == content


def test_config_secret_names_are_masked() -> None:
    """Secret names are masked."""
    for name in ("secret", "signing_secret", "api_key", "token", "password"):
        assert SECRET_NAME.search(name), name
    for name in ("max_body_bytes", "keys_per_page", "host", "token_grace_seconds"):
        assert not SECRET_NAME.search(name), name


def test_config_show_prints_the_effective_settings(tmp_path: Path) -> None:
    done = run_cli("config", "show", "--port", "1234", env={"BROKER_ENGINE_READERS": "3"})
    assert done.returncode == 0, done.stderr
    assert '"port": 1234' in done.stdout and '"readers": 3' in done.stdout


async def test_daemon_notify_graceful_stop_quiet_logs(tmp_path: Path) -> None:
    """Notify, graceful stop and quiet logs."""
    data = tmp_path / "data"
    with trio.fail_after(DEADLINE_S):
        env = {"WATCHDOG_USEC": "200000"}
        async with run_daemon(data, env=env) as daemon:
            sock = daemon.notifications
            async with httpx.AsyncClient(base_url=daemon.url) as http:
                created = (await http.post("/v1/workspaces", json={"name": "ops"})).json()
                key = created["data"]["api_key"]
                agent = (await http.post("/v1/agents", json={"name": "a"},
                         headers={"Authorization": f"Bearer {key}"})).json()["data"]
            pings = 0
            while pings < 2:
                pings += (await sock.recv(4096)) == b"WATCHDOG=1"
            closed: list[int | None] = []
            sent = trio.Event()
            async with trio.open_nursery() as nursery:
                async def hold() -> None:
                    async with connect(daemon.ws_url, agent["token"],
                                       reconnect=False) as client:
                        await client.request("message.send", channel="general",
                                             text="a very private body")
                        sent.set()
                        async for _ in client.deliveries():
                            pass  # ends when the server closes the socket
                        closed.append(client.close_code)

                nursery.start_soon(hold)
                await sent.wait()  # connected, and a write committed
                daemon.process.send_signal(signal.SIGTERM)
                assert await daemon.process.wait() == 0
            stopping = b""
            while b"STOPPING=1" not in stopping:
                stopping = await sock.recv(4096)
    assert closed == [1001]
    wal = data / "broker.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0  # checkpointed on the way out
    log = daemon.output.decode()
    # READY=1 named the URL the daemon listened on (the helper took it from there).
    assert f"broker listening on {daemon.url}" in log
    assert "stopped" in log
    assert key not in log and agent["token"] not in log and "a very private body" not in log


async def test_daemon_second_on_same_directory_refused(tmp_path: Path) -> None:
    """A second daemon on the same directory is refused."""
    with trio.fail_after(DEADLINE_S):
        async with run_daemon(tmp_path) as daemon:
            second = await trio.run_process(
                [sys.executable, "-m", "broker", "serve", "--port", "0",
                 "--data-dir", str(tmp_path)], capture_stdout=True, capture_stderr=True,
                check=False)
            daemon.kill()
    assert second.returncode == 2
    err = second.stderr.decode()
    assert err.count("\n") == 1 and "already opened for writing" in err


def test_admin_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path)]
    assert main(["workspace", "create", "acme", *data]) == 0
    assert '"api_key": "rk_live_' in capsys.readouterr().out
    assert main(["agent", "register", "--workspace", "acme", "bob", *data]) == 0
    assert '"token": "at_live_' in capsys.readouterr().out
    assert main(["agent", "register", "--workspace", "nope", "bob", *data]) == 2
    assert "workspace_not_found" in capsys.readouterr().err
    assert main(["stats", *data]) == 0
    out = capsys.readouterr().out
    assert '"workspaces": 1' in out and '"agents": 1' in out
    assert main(["check", *data]) == 0
    assert '"ok": true' in capsys.readouterr().out
    objects = tmp_path / "files" / "objects" / "1"
    objects.mkdir(parents=True)
    (objects / "42.abc").write_bytes(b"file bytes")
    backup_dir = tmp_path / "backup"
    assert main(["backup", str(backup_dir), *data]) == 0
    assert (backup_dir / "files" / "objects" / "1" / "42.abc").read_bytes() == b"file bytes"
    assert main(["check", "--data-dir", str(backup_dir)]) == 0  # a restorable data dir
    assert '"ok": true' in capsys.readouterr().out
    assert main(["stats", "--data-dir", str(backup_dir)]) == 0
    assert '"agents": 1' in capsys.readouterr().out
    assert main(["backup", str(backup_dir), *data]) == 2  # never overwrites
    assert main(["check", "--data-dir", str(tmp_path / "empty")]) == 2


def test_config_example_loads() -> None:
    """The example configuration loads."""
    example = Path(__file__).resolve().parent.parent / "deploy" / "broker.toml"
    settings = load_settings(example, environ={})
    assert settings.data_dir == "/var/lib/agent-broker"
    assert settings.engine.limits.mailbox_depth == 10000


async def test_daemon_resets_presence_left_by_crash(tmp_path: Path) -> None:
    """Presence left online by a crash is reset at start."""
    from broker.config import HttpSettings, ServerSettings, Settings
    from broker.engine.agents import SetAgentStatus
    from broker.engine.engine import Engine
    from tests.helpers.engine import make_world

    data = tmp_path / "data"
    async with Engine.open(data) as engine:
        world = await make_world(engine, agents=("alice", "bob"))
        await engine.submit(SetAgentStatus(workspace_id=world.workspace_id,
                                           agent_id=world.agents["alice"], status="online"))
    settings = Settings(data_dir=str(data), http=HttpSettings(host="127.0.0.1", port=0),
                        server=ServerSettings(workers=1))
    with trio.fail_after(DEADLINE_S):
        async with run_server(settings) as server:
            statuses = await server.engine.read(
                lambda c: dict(c.execute("SELECT name, status FROM agents").fetchall()))
            server.stop()
    assert statuses == {"alice": "offline", "bob": "offline"}

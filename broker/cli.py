"""The `broker` command (also `python -m broker`).

    broker serve             run the daemon in the foreground
    broker config show       print the effective configuration (secrets masked)
    broker backup DIR        online copy of the database and files into a new data dir
    broker check             integrity check and schema version
    broker stats             counts and sizes, read-only (daemon may run)
    broker workspace create NAME           (daemon stopped; prints the key)
    broker agent register --workspace W N  (daemon stopped; prints the token)
    broker mcp --url URL --token T         MCP on stdio, bridged to the daemon's /mcp
    broker mcp config --editor E           an editor's MCP configuration snippet

Logging is configured here and nowhere else (a gateway process of
`serve --workers` configures its own the same way); under systemd, stdout goes to
the journal, which adds the time. `serve` speaks the systemd notify
protocol when $NOTIFY_SOCKET is set: READY=1 once the port listens (in
every gateway process, with `--workers`) and the writer runs, STOPPING=1
when a stop begins, WATCHDOG=1 from the event loop.

Exit status: 0 on success and after a clean stop (SIGINT or SIGTERM; a
second signal stops at once), 1 when `check` finds a problem or a gateway
process of `serve` died (the daemon never runs half alive), 2 for a bad
configuration (a TLS file that cannot be used included), an unusable data
directory, a port it cannot listen on (in use: `broker: cannot listen on
127.0.0.1:8787: address already in use`; by another broker: `... another
broker daemon holds port 8787`), or a database the broker
refuses to open (each reported as one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio

from broker.config import MAX_WORKERS, ConfigError, Settings, load_settings, masked
from broker.engine.backup import backup, check
from broker.engine.engine import DATABASE_FILE, Engine
from broker.engine.errors import BrokerError, StartupError
from broker.engine.stats import database_stats
from broker.engine.workspaces import CreateWorkspace, RegisterAgent, workspace_by_name
from broker.filestore import OBJECTS_DIR
from broker.gc_tuning import settle_heap
from broker.http.tls import check_tls
from broker.loadtest.command import add_arguments as add_loadtest_arguments
from broker.loadtest.command import run as run_loadtest
from broker.mcp.command import add_arguments as add_mcp_arguments
from broker.mcp.command import run as run_mcp
from broker.server import BrokerServer
from broker.systemd import SystemdNotifier, run_watchdog, watchdog_interval
from broker.workers.writer_side import WorkerDied

log = logging.getLogger("broker")

EXIT_PROBLEM = 1
EXIT_USAGE = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_json = msgspec.json.Encoder()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML configuration file")
    common.add_argument("--data-dir", type=Path, help="data directory (default ./data)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the broker in the foreground")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8787; 0 = any)")
    serve.add_argument("--log-level", choices=LOG_LEVELS, help="log level (default INFO)")
    serve.add_argument("--workers", type=int, help="gateway processes beside the writer "
                       "(default: the number of cores; 0 or 1: one process)")

    config = commands.add_parser("config", help="configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", parents=[common],
                                      help="print the effective configuration")
    show.add_argument("--host")
    show.add_argument("--port", type=int)
    show.add_argument("--log-level", choices=LOG_LEVELS)
    show.add_argument("--workers", type=int)

    copy = commands.add_parser("backup", parents=[common],
                               help="online copy of the database and files into DIR")
    copy.add_argument("path", type=Path)
    commands.add_parser("check", parents=[common], help="integrity check and schema version")
    commands.add_parser("stats", parents=[common], help="counts and sizes")

    workspace = commands.add_parser("workspace", help="workspaces")
    ws_commands = workspace.add_subparsers(dest="workspace_command", required=True)
    create = ws_commands.add_parser("create", parents=[common], help="create a workspace")
    create.add_argument("name")

    agent = commands.add_parser("agent", help="agents")
    agent_commands = agent.add_subparsers(dest="agent_command", required=True)
    register = agent_commands.add_parser("register", parents=[common], help="register an agent")
    register.add_argument("--workspace", required=True, help="workspace name")
    register.add_argument("--type", default="agent", choices=["agent", "human", "system"])
    register.add_argument("name")

    loadtest = commands.add_parser("loadtest", help="load generator and benchmarks "
                                   "(BENCHMARKS.md)")
    add_loadtest_arguments(loadtest)
    add_mcp_arguments(commands.add_parser("mcp", help="MCP on stdio for editors (docs/mcp.md)"))
    return parser


def settings_for(args: argparse.Namespace) -> Settings:
    """The settings from file and environment with the command-line options applied over them."""
    settings = load_settings(args.config)
    http = settings.http
    if getattr(args, "host", None) is not None:
        http = msgspec.structs.replace(http, host=args.host)
    port = getattr(args, "port", None)
    if port is not None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port {port}: must be between 0 and 65535")
        http = msgspec.structs.replace(http, port=port)
    server = settings.server
    workers = getattr(args, "workers", None)
    if workers is not None:
        if not 0 <= workers <= MAX_WORKERS:
            raise ConfigError(f"--workers {workers}: must be between 0 and {MAX_WORKERS}")
        server = msgspec.structs.replace(server, workers=workers)
    data_dir = settings.data_dir if args.data_dir is None else str(args.data_dir)
    level = getattr(args, "log_level", None) or settings.log_level
    return msgspec.structs.replace(settings, http=http, server=server, data_dir=data_dir,
                                   log_level=level)


def usable_data_dir(settings: Settings) -> Path:
    """The data directory, created if missing; ConfigError if it cannot be written."""
    path = Path(settings.data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"data_dir {path}: cannot be written ({exc.strerror or exc})"
        ) from None
    return path


def database_path(settings: Settings) -> Path:
    path = Path(settings.data_dir) / DATABASE_FILE
    if not path.exists():
        raise ConfigError(f"{path}: no database here (wrong --data-dir?)")
    return path


async def serve(settings: Settings, notifier: SystemdNotifier | None = None) -> None:
    """Run the server until SIGINT or SIGTERM, then stop gracefully; a second signal cancels."""
    notifier = notifier or SystemdNotifier()
    server = BrokerServer(settings)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            interval = watchdog_interval()
            if interval is not None:
                nursery.start_soon(run_watchdog, notifier, interval)

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not server.stopping:
                        log.info("received %s; stopping gracefully", name)
                        await notifier.stopping()
                        server.stop()
                    else:
                        log.warning("received %s again; stopping now", name)
                        nursery.cancel_scope.cancel()

            async def run_server(*, task_status: trio.TaskStatus[None]) -> None:
                await server.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # ends the signal watcher and the watchdog

            nursery.start_soon(watch_signals)
            await nursery.start(run_server)
            settle_heap()  # start-up is over: what exists now lives as long as the daemon
            await notifier.ready(f"serving on {server.url}")
    notifier.close()


async def with_engine(settings: Settings, job: Callable[[Engine], Awaitable[Any]]) -> Any:
    """Run `job` against a writer of our own (the daemon must not be running)."""
    async with Engine.open(usable_data_dir(settings), settings.engine) as engine:
        return await job(engine)


async def create_workspace(settings: Settings, name: str) -> Any:
    return await with_engine(settings, lambda engine: engine.submit(CreateWorkspace(name)))


async def register_agent(settings: Settings, workspace: str, name: str, kind: str) -> Any:
    async def job(engine: Engine) -> Any:
        found = await engine.read(workspace_by_name, workspace)
        return await engine.submit(RegisterAgent(
            workspace_id=int(found.id), name=name, type=kind))

    return await with_engine(settings, job)


def print_json(value: Any) -> None:
    sys.stdout.write(msgspec.json.format(_json.encode(value)).decode() + "\n")


def run_backup(settings: Settings, target: Path) -> None:
    """Write a restorable data directory at `target`: the database, then the file objects.

    In that order every file the copied database calls complete already has
    its bytes in place (bytes are written before their row, never rewritten);
    see the README's backup section for the deletion-retention caveat.
    """
    source = database_path(settings)
    if target.exists() and any(target.iterdir()):
        raise ConfigError(f"{target}: exists and is not empty; refusing to overwrite it")
    target.mkdir(parents=True, exist_ok=True)
    tty = sys.stderr.isatty()

    def progress(remaining: int, total: int) -> None:
        if tty and total:
            done = total - remaining
            sys.stderr.write(f"\rbackup: {done}/{total} pages ({100 * done // total}%)")
            sys.stderr.flush()

    pages = backup(source, target / DATABASE_FILE, progress)
    if tty:
        sys.stderr.write("\n")
    objects = Path(settings.data_dir) / "files" / OBJECTS_DIR
    copied = 0
    if objects.is_dir():
        shutil.copytree(objects, target / "files" / OBJECTS_DIR)
        copied = sum(1 for p in (target / "files" / OBJECTS_DIR).rglob("*") if p.is_file())
    print(f"backup: {pages} database pages and {copied} file objects copied to {target}; "
          f"restore with --data-dir {target}")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stdout, level=level,
        format="%(levelname)s %(name)s: %(message)s",
    )


def dispatch(args: argparse.Namespace) -> int:
    settings = settings_for(args)
    if args.command == "serve":
        usable_data_dir(settings)
        check_tls(settings.http.tls)  # here too: before any process of the daemon starts
        configure_logging(settings.log_level)
        trio.run(serve, settings)
    elif args.command == "config":
        print_json(masked(settings))
    elif args.command == "backup":
        run_backup(settings, args.path)
    elif args.command == "check":
        report = check(database_path(settings))
        print_json({"path": report.path, "ok": report.ok,
                    "schema_version": report.schema_version,
                    "expected_version": report.expected_version,
                    "integrity": report.integrity,
                    "foreign_key_violations": report.foreign_key_violations})
        return 0 if report.ok else EXIT_PROBLEM
    elif args.command == "stats":
        print_json(database_stats(database_path(settings)))
    elif args.command == "workspace":
        print_json(trio.run(create_workspace, settings, args.name))
    elif args.command == "agent":
        print_json(trio.run(register_agent, settings, args.workspace, args.name, args.type))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "loadtest":
        return run_loadtest(args)
    if args.command == "mcp":
        return run_mcp(args)
    try:
        return dispatch(args)
    except (ConfigError, StartupError, BrokerError, FileExistsError) as exc:
        print(f"broker: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except WorkerDied as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except BaseExceptionGroup as group:
        # a startup failure inside the server's nurseries arrives wrapped
        died = group.subgroup(WorkerDied)
        if died is not None:
            # no half-alive daemon: a gateway process died, so did the daemon
            print(f"broker: {one_line(first_leaf(died))}", file=sys.stderr)
            return EXIT_PROBLEM
        refused = group.subgroup((StartupError, ConfigError, BrokerError))
        if refused is None:
            raise
        print(f"broker: {one_line(first_leaf(refused))}", file=sys.stderr)
        return EXIT_USAGE


def one_line(exc: BaseException) -> str:
    if isinstance(exc, BrokerError):
        return f"{exc.code}: {exc.message}"
    return " ".join(str(exc).split())


def first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


if __name__ == "__main__":
    sys.exit(main())

"""The `broker` command (also `python -m broker`).

`broker serve` runs the daemon in the foreground: the engine and the HTTP
server on one port. Logging is configured here and nowhere else; under
systemd, stdout goes to the journal, which adds the time.

Exit status: 0 after a clean stop (SIGINT or SIGTERM), 2 for a bad
configuration or a data directory the broker refuses to open.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
import trio

from broker.config import ConfigError, Settings, load_settings
from broker.engine.errors import StartupError
from broker.server import BrokerServer

log = logging.getLogger("broker")

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the broker in the foreground")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8787; 0 = any)")
    serve.add_argument("--data-dir", type=Path, help="directory of the database (default ./data)")
    serve.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )
    return parser


def settings_for(args: argparse.Namespace) -> Settings:
    """The file's settings with the command-line options applied over them."""
    settings = load_settings(args.config)
    http = settings.http
    if args.host is not None:
        http = msgspec.structs.replace(http, host=args.host)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            raise ConfigError(f"--port {args.port}: must be between 0 and 65535")
        http = msgspec.structs.replace(http, port=args.port)
    data_dir = settings.data_dir if args.data_dir is None else str(args.data_dir)
    return msgspec.structs.replace(settings, http=http, data_dir=data_dir)


async def serve(settings: Settings) -> None:
    """Run the server until SIGINT or SIGTERM, then stop gracefully; a second signal cancels."""
    server = BrokerServer(settings)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not server.stopping:
                        log.info("received %s; stopping gracefully", name)
                        server.stop()
                    else:
                        log.warning("received %s again; stopping now", name)
                        nursery.cancel_scope.cancel()

            nursery.start_soon(watch_signals)
            await server.run()
            nursery.cancel_scope.cancel()


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stdout, level=level,
        format="%(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_for(args)
        except ConfigError as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return EXIT_USAGE
        configure_logging(args.log_level)
        try:
            trio.run(serve, settings)
        except StartupError as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return 0
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

"""The `broker mcp` command: the stdio bridge, and `broker mcp config` for editors.

    broker mcp [--url URL] [--token TOKEN]        stdio <-> the daemon's /mcp
    broker mcp config --editor E [--url] [--token]  print E's configuration snippet

The URL and token default to $BROKER_URL and $BROKER_TOKEN (the URL to
http://127.0.0.1:8787); `/mcp` is added to a URL that does not end with it.
`config` puts a token in the snippet only when given `--token`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import trio

from broker.mcp.bridge import Bridge, Unreachable
from broker.mcp.editors import CONFIG_FILES, EDITORS, snippet

DEFAULT_URL = "http://127.0.0.1:8787"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", help="the daemon's URL (default $BROKER_URL, "
                            f"else {DEFAULT_URL})")
    connection.add_argument("--token", help="the agent token or workspace key to put in the "
                            "snippet (default none: the editor's $BROKER_TOKEN)")
    parser.add_argument("--url", help="the daemon's URL (default $BROKER_URL, "
                        f"else {DEFAULT_URL})")
    parser.add_argument("--token", help="the agent token or workspace key (default $BROKER_TOKEN)")
    parser.add_argument("--log-level", default="WARNING",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level on stderr (default WARNING)")
    commands = parser.add_subparsers(dest="mcp_command")
    config = commands.add_parser("config", parents=[connection],
                                 help="print an editor's MCP configuration snippet")
    config.add_argument("--editor", required=True, choices=EDITORS)


def endpoint(url: str | None) -> str:
    base = (url or os.environ.get("BROKER_URL") or DEFAULT_URL).rstrip("/")
    return base if base.endswith("/mcp") else f"{base}/mcp"


def run(args: argparse.Namespace) -> int:
    if args.mcp_command == "config":
        url = (args.url or os.environ.get("BROKER_URL") or DEFAULT_URL).rstrip("/")
        # Only a token given on the command line goes into the snippet: one from
        # $BROKER_TOKEN stays where it is, and so does the editor's.
        if args.token is None:
            print("broker mcp config: BROKER_TOKEN left out: broker mcp takes the token from "
                  "the editor's environment (or pass --token to put it in)", file=sys.stderr)
        print(f"# {CONFIG_FILES[args.editor]}")
        print(snippet(args.editor, url, args.token))
        return 0
    token = args.token or os.environ.get("BROKER_TOKEN")
    if not token:
        print("broker mcp: no token (--token or $BROKER_TOKEN)", file=sys.stderr)
        return 2
    # stdout carries the protocol: every log line goes to stderr.
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="broker mcp: %(levelname)s %(name)s: %(message)s")
    try:
        trio.run(Bridge(endpoint(args.url), token).run)
    except Unreachable as exc:
        print(f"broker mcp: {exc}", file=sys.stderr)
        return 1
    return 0

"""`broker mcp config --editor NAME`: the snippet of that editor's MCP configuration file.

Each editor spawns `broker mcp` (the stdio bridge, broker.mcp.bridge) with
the daemon's URL in its environment, and the agent's token when one is
given; without one, the bridge takes the BROKER_TOKEN the editor inherits.
The snippet is printed, never written: the file may hold other servers, and
the token is a credential the user decides where to keep (docs/mcp.md).
"""

from __future__ import annotations

import json

EDITORS = ("claude-code", "cursor", "codex", "vscode")
# Where each editor reads the snippet from (project scope; each also has a user scope).
CONFIG_FILES = {
    "claude-code": ".mcp.json",
    "cursor": ".cursor/mcp.json",
    "codex": "~/.codex/config.toml",
    "vscode": ".vscode/mcp.json",
}
SERVER_NAME = "broker"


def snippet(editor: str, url: str, token: str | None, command: str = "broker") -> str:
    """The configuration for `editor` that runs `command mcp` against `url` as `token`.

    token: None leaves BROKER_TOKEN out of the snippet's environment, so the
    bridge takes the one the editor inherits (a placeholder pasted as is would
    override it). Raises ValueError for an unknown editor.
    """
    env = {"BROKER_URL": url}
    if token is not None:
        env["BROKER_TOKEN"] = token
    server = {"command": command, "args": ["mcp"], "env": env}
    if editor in ("claude-code", "cursor"):
        return json.dumps({"mcpServers": {SERVER_NAME: server}}, indent=2)
    if editor == "vscode":
        return json.dumps({"servers": {SERVER_NAME: {"type": "stdio", **server}}}, indent=2)
    if editor == "codex":
        pairs = ", ".join(f"{key} = {json.dumps(value)}" for key, value in env.items())
        return "\n".join([
            f"[mcp_servers.{SERVER_NAME}]",
            f"command = {json.dumps(command)}",
            'args = ["mcp"]',
            f"env = {{ {pairs} }}",
        ])
    raise ValueError(f"unknown editor {editor!r}: one of {', '.join(EDITORS)}")

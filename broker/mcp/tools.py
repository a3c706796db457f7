"""The MCP tool table, made from the operation table: one tool per operation, plus the wait.

A tool's name is Relaycast's MCP name where Relaycast has one
(`message.post` for the operation `message.send`), else the operation's
own name; its input schema is the operation's input Struct as msgspec
describes it; its description is a line of `DESCRIPTIONS`, written for an
LLM choosing a tool, or else the first line of the handler's docstring. So a
new operation gets its tool with no code here. Relaycast's legacy names
(`post_message`, `check_inbox`, ...) are accepted on calls and never listed, as Relaycast does.

Who sees which tools follows the operation's `auth`: an agent token sees
the agent's and the open ones, a workspace key the workspace's and the
open ones. `message.inbox.wait` is the one tool with no operation: it
waits on the fanout hub (broker.mcp.watch).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import msgspec

from broker.http.routes import ROUTES
from broker.operations import OPERATIONS
from broker.operations.registry import Operation

# Relaycast's MCP names for our operations (its tools list); the rest keep their own name.
RELAYCAST_NAMES: dict[str, str] = {
    "message.send": "message.post",
    "thread.reply": "message.reply",
    "thread.get": "message.get_thread",
    "dm.send": "message.dm.send",
    "dm.conversations": "message.dm.list",
    "group_dm.send": "message.dm.send_group",
    "reaction.add": "message.reaction.add",
    "reaction.remove": "message.reaction.remove",
    "search": "message.search",
    "inbox.get": "message.inbox.check",
    "message.read": "message.inbox.mark_read",
    "message.readers": "message.inbox.get_readers",
}

# Relaycast's legacy names, accepted on calls (never listed).
LEGACY_ALIASES: dict[str, str] = {
    "register": "agent.register",
    "list_agents": "agent.list",
    "create_channel": "channel.create",
    "list_channels": "channel.list",
    "join_channel": "channel.join",
    "leave_channel": "channel.leave",
    "invite_to_channel": "channel.invite",
    "set_channel_topic": "channel.set_topic",
    "archive_channel": "channel.archive",
    "post_message": "message.post",
    "get_messages": "message.list",
    "reply_to_thread": "message.reply",
    "get_thread": "message.get_thread",
    "send_dm": "message.dm.send",
    "get_dms": "message.dm.list",
    "send_group_dm": "message.dm.send_group",
    "add_reaction": "message.reaction.add",
    "remove_reaction": "message.reaction.remove",
    "search_messages": "message.search",
    "check_inbox": "message.inbox.check",
    "mark_read": "message.inbox.mark_read",
    "get_readers": "message.inbox.get_readers",
    "upload_file": "file.upload",
    "create_webhook": "webhook.create",
    "list_webhooks": "webhook.list",
    "delete_webhook": "webhook.delete",
    "trigger_webhook": "webhook.trigger",
    "create_subscription": "subscription.create",
    "list_subscriptions": "subscription.list",
    "get_subscription": "subscription.get",
    "delete_subscription": "subscription.delete",
    # Relaycast's two-level names of an older release.
    "inbox.check": "message.inbox.check",
    "inbox.mark_read": "message.inbox.mark_read",
    "inbox.get_readers": "message.inbox.get_readers",
    "dm.list": "message.dm.list",
    "dm.send_group": "message.dm.send_group",
}

# The tool that is not an operation.
WAIT_TOOL = "message.inbox.wait"
# The longest a wait may block, and its default (seconds).
MAX_WAIT_SECONDS = 300.0
DEFAULT_WAIT_SECONDS = 60.0

# One line per operation, keyed by operation name: what an LLM reads to pick a tool.
DESCRIPTIONS: dict[str, str] = {
    "workspace.create": "Create a workspace (answers its workspace key once).",
    "workspace.lookup": "Find a workspace by name.",
    "workspace.get": "Show this workspace.",
    "workspace.update": "Change this workspace's settings.",
    "workspace.delete": "Delete this workspace and everything in it.",
    "agent.register": "Register an agent in the workspace (answers its token once).",
    "agent.list": "List the workspace's agents.",
    "agent.get": "Show one agent by name.",
    "agent.me": "Show the calling agent.",
    "agent.presence": "List which agents are online.",
    "agent.update": "Change an agent's description, type or metadata.",
    "agent.rotate_token": "Give an agent a new token (the old one works for a grace period).",
    "agent.deactivate": "Deactivate an agent: its token stops working.",
    "agent.heartbeat": "Tell the broker this agent is alive (sets it online).",
    "agent.disconnect": "Set this agent offline.",
    "channel.create": "Create a channel (the creator joins it).",
    "channel.list": "List the workspace's channels.",
    "channel.get": "Show one channel.",
    "channel.members": "List a channel's members.",
    "channel.join": "Join a channel.",
    "channel.leave": "Leave a channel.",
    "channel.invite": "Add an agent to a channel.",
    "channel.update": "Change a channel's topic or metadata.",
    "channel.set_topic": "Set a channel's topic.",
    "channel.archive": "Archive a channel: no more posts.",
    "channel.mute": "Mute a channel: only mentions are delivered.",
    "channel.unmute": "Unmute a channel.",
    "channel.read_status": "Show how far each member has read a channel.",
    "message.send": "Post a message to a channel you are in.",
    "message.list": "List a channel's recent messages (newest last).",
    "message.get": "Show one message.",
    "thread.reply": "Reply in the thread of a message.",
    "thread.get": "Show a message and its thread's replies.",
    "message.read": "Mark a message as read (acks its delivery to you).",
    "message.readers": "List who has read a message.",
    "reaction.add": "Add an emoji reaction to a message.",
    "reaction.remove": "Remove your emoji reaction from a message.",
    "reaction.list": "List a message's reactions.",
    "dm.send": "Send a direct message to one agent.",
    "dm.conversations": "List your DM conversations.",
    "dm.messages": "List the messages of a DM conversation.",
    "group_dm.create": "Create a group DM with several agents.",
    "group_dm.send": "Send a message to a group DM.",
    "group_dm.add_participant": "Add an agent to a group DM.",
    "group_dm.remove_participant": "Remove an agent from a group DM.",
    "inbox.get": "Check your inbox: unread channels, mentions, unread DMs, reactions.",
    "search": "Search the messages you can see.",
    "delivery.list": "List your deliveries (unacked ones in order).",
    "agent.deliveries": "List an agent's deliveries (the workspace owner's view).",
    "mailbox.list": "Summarize every agent's mailbox: presence, delivery counts, oldest unacked.",
    "agent.mailbox": "Summarize one agent's mailbox.",
    "delivery.ack_one": "Acknowledge one delivery.",
    "delivery.ack_up_to": "Acknowledge every delivery up to a seq.",
    "delivery.fail": "Give a delivery back as failed (it is retried or dead-lettered).",
    "delivery.defer": "Defer a delivery until a later time.",
    "file.upload": "Start a file upload: answers the URL to PUT the bytes to.",
    "file.complete": "Finish a file upload.",
    "file.get": "Show one file.",
    "file.list": "List files.",
    "file.delete": "Delete a file you uploaded.",
    "subscription.create": "Subscribe a webhook URL to the workspace's events.",
    "subscription.list": "List webhook subscriptions.",
    "subscription.get": "Show one webhook subscription.",
    "subscription.delete": "Delete a webhook subscription.",
    "subscription.dead_letters": "List a subscription's dead-lettered events.",
    "subscription.replay": "Send a subscription's dead-lettered events again.",
    "webhook.create": "Create an inbound webhook that posts to a channel.",
    "webhook.list": "List inbound webhooks.",
    "webhook.delete": "Delete an inbound webhook.",
    "webhook.trigger": "Post to a channel through an inbound webhook.",
}

WAIT_DESCRIPTION = (
    "Wait until a message is delivered to you (or the timeout passes) and return what is "
    "unacked; ack: true acknowledges what it returns.")


class WaitInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`message.inbox.wait`'s arguments.

    timeout_seconds: how long to wait for a first delivery (at most MAX_WAIT_SECONDS).
    after_seq: only deliveries past this seq (the `next_after_seq` of a previous wait).
    ack: acknowledge every delivery returned.
    limit: the most deliveries returned.
    """

    timeout_seconds: float = DEFAULT_WAIT_SECONDS
    after_seq: int | None = None
    ack: bool = False
    limit: int = 50


@dataclass(frozen=True)
class Tool:
    """One tool: its name, description, input type and the operation it runs (None: the wait)."""

    name: str
    description: str
    input: type[Any]
    operation: Operation[Any] | None

    @property
    def read_only(self) -> bool:
        """Whether the tool only reads (its REST route is a GET). Not the wait: with
        `ack: true` it acknowledges what it returns, and an editor may run a read-only
        tool without asking."""
        return self.operation is not None and _METHODS.get(self.operation.name) == "GET"

    @property
    def destructive(self) -> bool:
        """Whether the tool deletes (its REST route is a DELETE)."""
        return self.operation is not None and _METHODS.get(self.operation.name) == "DELETE"

    def visible_to(self, agent: bool) -> bool:
        """Whether an agent token (agent=True) or a workspace key sees this tool."""
        if self.operation is None:
            return agent
        auth = self.operation.auth
        return auth in ("any", "none") or auth == ("agent" if agent else "workspace")

    @property
    def input_schema(self) -> dict[str, Any]:
        schema = _schemas.get(self.input)
        if schema is None:
            schema = _schemas[self.input] = _input_schema(self.input)
        return schema


# Each operation's REST method: what the tool annotations (read only, destructive) say.
_METHODS = {route.operation: route.method for route in ROUTES}


def tool_name(operation: str) -> str:
    """The tool name of an operation."""
    return RELAYCAST_NAMES.get(operation, operation)


@cache
def tools() -> dict[str, Tool]:
    """Every tool by name, in the operation table's order, the wait last."""
    table: dict[str, Tool] = {}
    for name, op in OPERATIONS.items():
        table[tool_name(name)] = Tool(tool_name(name), _description(op), op.input, op)
    table[WAIT_TOOL] = Tool(WAIT_TOOL, WAIT_DESCRIPTION, WaitInput, None)
    return table


def resolve(name: str) -> Tool | None:
    """The tool called `name` or by one of its legacy names; None when there is none."""
    table = tools()
    return table.get(name) or table.get(LEGACY_ALIASES.get(name, ""))


def _description(op: Operation[Any]) -> str:
    if op.name in DESCRIPTIONS:
        return DESCRIPTIONS[op.name]
    doc = (op.handler.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else op.name


_schemas: dict[type[Any], dict[str, Any]] = {}


def _input_schema(input: type[Any]) -> dict[str, Any]:
    """The JSON schema of a Struct as an MCP `inputSchema`: an object at the top, its
    nested types under `$defs`."""
    (ref,), components = msgspec.json.schema_components([input], ref_template="#/$defs/{name}")
    name = ref["$ref"].rsplit("/", 1)[1]
    schema: dict[str, Any] = dict(components.pop(name))
    schema.pop("title", None)
    schema.setdefault("properties", {})
    if components:
        schema["$defs"] = components
    return schema

"""How a tool result reads: structured content for programs, a few short lines for an LLM.

The structured content is the operation's wire object (the REST `data`),
an object at the top as MCP asks (a list goes under `items`). The text is
written for a model to read: a message is one line `#plan alice: text (id
...)`, a list is one line per item, anything else is its JSON. The unread
notice (`notice`) is one line that every tool result of an agent carries
while it has unread messages, so an agent learns of them whatever it does.
"""

from __future__ import annotations

from typing import Any

import msgspec

from protocol import objects as ob

# A list rendered as text shows at most this many lines (the structured content has all).
MAX_TEXT_LINES = 50
# A message's text is cut to this many characters in a one-line rendering.
MAX_LINE_TEXT = 300


def structured(result: Any) -> dict[str, Any]:
    """The result as a JSON object (None: `{}`; a list: `{"items": [...]}`)."""
    value = _builtins(result)
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    return {"items": value}


def text(result: Any) -> str:
    """A short rendering of a tool's result for a model to read."""
    value = _builtins(result)
    if value is None:
        return "done"
    if isinstance(value, dict) and isinstance(value.get("deliveries"), list):
        lines = [_line(item) for item in value["deliveries"][:MAX_TEXT_LINES]] or [
            "no new deliveries"]
        lines.append(f"next_after_seq: {value.get('next_after_seq')}"
                     + (" (acked)" if value.get("acked") else ""))
        return "\n".join(lines)
    if isinstance(value, list):
        if not value:
            return "(none)"
        lines = [_line(item) for item in value[:MAX_TEXT_LINES]]
        if len(value) > MAX_TEXT_LINES:
            lines.append(f"... {len(value) - MAX_TEXT_LINES} more")
        return "\n".join(lines)
    return _line(value)


def _builtins(result: Any) -> Any:
    """The result as JSON values, as the REST answer carries it (a `Raw` payload included)."""
    return msgspec.json.decode(msgspec.json.encode(result))


def message_line(message: dict[str, Any]) -> str:
    """`#plan alice: text (id 123)`, `DM alice: text (id ...)`, a reply says `in thread ...`."""
    where = (f"#{message['channel_name']}" if message.get("channel_name")
             else "DM" if message.get("conversation_id") else "")
    body = str(message.get("text", ""))
    if len(body) > MAX_LINE_TEXT:
        body = body[:MAX_LINE_TEXT] + "..."
    thread = f", in thread {message['thread_id']}" if message.get("thread_id") else ""
    author = message.get("agent_name") or "?"
    return f"{where} {author}: {body} (id {message.get('id')}{thread})".strip()


def _line(value: Any) -> str:
    if isinstance(value, dict):
        if "text" in value and "agent_name" in value and "id" in value:
            return message_line(value)
        message = value.get("message")
        if isinstance(message, dict) and "text" in message:
            seq = f"seq {value['seq']}: " if "seq" in value else ""
            return seq + message_line(message)
    return msgspec.json.encode(value).decode()


def notice(inbox: ob.Inbox) -> str | None:
    """`3 unread: 1 mention in #plan, 2 DMs from ben`; None when nothing is unread."""
    parts: list[str] = []
    total = 0
    mentions: dict[str, int] = {}
    for mention in inbox.mentions:
        mentions[mention.channel_name] = mentions.get(mention.channel_name, 0) + 1
    for name, count in mentions.items():
        parts.append(f"{count} mention{'s' if count > 1 else ''} in #{name}")
    for channel in inbox.unread_channels:
        total += channel.unread_count
        if channel.channel_name not in mentions:
            parts.append(f"{channel.unread_count} in #{channel.channel_name}")
    for dm in inbox.unread_dms:
        total += dm.unread_count
        plural = "s" if dm.unread_count > 1 else ""
        if dm.type == "group":
            parts.append(f"{dm.unread_count} group DM{plural} in {dm.name or dm.conversation_id}")
        else:
            parts.append(f"{dm.unread_count} DM{plural} from {dm.from_ or '?'}")
    if total == 0:
        return None
    return f"{total} unread: {', '.join(parts)}"

"""The one prompt (`prompts/list`): how an agent works with this broker's tools, short."""

from __future__ import annotations

import mcp_types as types

PROMPT_NAME = "agent-guide"

GUIDE = """You are connected to a message broker shared with other agents.

- Start with message.inbox.check: unread channels, mentions and DMs.
- To wait for work without polling, call message.inbox.wait (timeout_seconds up to 300).
  It returns your unacked deliveries; pass ack: true to acknowledge what it returns, or
  pass its next_after_seq to the next wait.
- Read a channel with message.list; post with message.post; answer a message in its thread
  with message.reply (message_id of the message you answer), so the conversation stays together.
- Direct messages: message.dm.send (to: the agent's name).
- Mark a message you handled with message.inbox.mark_read: that also acknowledges its delivery.
- Every tool result ends with a line like "3 unread: ..." while you have unread messages:
  read them before you finish.
"""


def prompt_messages() -> list[types.PromptMessage]:
    return [types.PromptMessage(role="user", content=types.TextContent(type="text", text=GUIDE))]

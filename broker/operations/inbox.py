"""The inbox and search: an agent's reads across every channel and conversation it is in.

Search also takes the workspace key, which searches the whole workspace.
"""

from __future__ import annotations

from typing import Any

from broker.engine import inbox, search
from broker.engine.engine import Engine
from broker.operations.registry import Call, agent_of, caller_of, operation
from protocol import objects as ob
from protocol import requests as rq


@operation("inbox.get", rq.Inbox, auth="agent", output=ob.Inbox)
async def get_inbox(engine: Engine, call: Call, req: rq.Inbox) -> Any:
    workspace_id, agent_id = agent_of(call)
    return await engine.read(inbox.inbox, workspace_id, agent_id, req.limit)


@operation("search", rq.Search, auth="any", output=list[ob.SearchResult])
async def search_messages(engine: Engine, call: Call, req: rq.Search) -> Any:
    """Full-text search of the messages the caller may read (the workspace key: all of them)."""
    workspace_id, agent_id = caller_of(call)
    return await engine.read(search.search_messages, workspace_id, agent_id, req.q,
                             req.channel, req.from_, req.limit)

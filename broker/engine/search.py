"""Full-text search over message text, within the caller's workspace and what it may read.

The FTS5 index `messages_fts` (kept in sync with `messages` by triggers)
finds the candidates; the same visibility rule as every other read keeps the
results to messages the agent could be delivered: the channels it is a
member of, and the conversations it is an active participant of (see
`channel_queries.require_visible_message`); the workspace's owner (OWNER)
searches every channel and conversation of its workspace. Results are ranked by bm25,
best first; `relevance_score` is the negated rank, so higher is better.

Query syntax: the query is first given to FTS5 as written, so agents that
know it get phrases, prefixes (`deploy*`), `OR`, `NOT` and `NEAR`. Agent
text is full of things FTS5 refuses (`foo:bar` reads as a column filter,
`C++`, a lone `"`), and an error there would teach nothing; so when FTS5
rejects the syntax, the query is searched again as plain words: each
whitespace-separated token quoted as a phrase, all of them required. Only
an empty query, or one longer than MAX_QUERY_CHARS, is `invalid_query`.
"""

from __future__ import annotations

from typing import cast

import apsw
import msgspec

from broker.engine.channel_queries import OWNER, require_readable_channel
from broker.engine.errors import BrokerError
from broker.engine.history import load_messages, page_limit
from broker.engine.lookups import require_agent
from protocol.objects import SearchResult

DEFAULT_RESULTS = 20
MAX_RESULTS = 100
MAX_QUERY_CHARS = 1000

_SEARCH = (
    "SELECT m.id, bm25(messages_fts) FROM messages_fts"
    " JOIN messages m ON m.id = messages_fts.rowid"
    " WHERE messages_fts MATCH ?1 AND m.workspace_id = ?2"
    " AND (?3 IS NULL OR m.channel_id = ?3) AND (?4 IS NULL OR m.agent_id = ?4)"
    " AND (?5 IS NULL"
    "      OR EXISTS (SELECT 1 FROM channel_members cm"
    "              WHERE cm.channel_id = m.channel_id AND cm.agent_id = ?5)"
    "      OR EXISTS (SELECT 1 FROM conversation_participants p"
    "              WHERE p.conversation_id = m.conversation_id AND p.agent_id = ?5"
    "              AND p.left_at IS NULL))"
    " ORDER BY bm25(messages_fts), m.id DESC LIMIT ?6"
)


def as_plain_words(query: str) -> str:
    """The query as FTS5 phrases: every whitespace-separated token quoted, all required."""
    return " ".join('"' + token.replace('"', '""') + '"' for token in query.split())


def search_messages(
    conn: apsw.Connection, workspace_id: int, agent_id: int | None, query: str,
    channel: str | None = None, author: str | None = None, limit: int | None = None,
) -> list[SearchResult]:
    """Messages the agent (or OWNER: the whole workspace) may read that match `query`, best first.

    channel: only this channel (the agent must be a member).
    author: only messages by the agent of this name (deactivated ones too).
    limit: default DEFAULT_RESULTS, at most MAX_RESULTS.
    Raises invalid_query, invalid_limit, agent_not_found (caller or author),
    channel_not_found, not_a_member.
    """
    size = page_limit(limit, DEFAULT_RESULTS, MAX_RESULTS)
    text = query.strip()
    if not text or len(text) > MAX_QUERY_CHARS:
        raise BrokerError("invalid_query",
                          f"a search query is 1-{MAX_QUERY_CHARS} characters and not blank")
    if "\x00" in text:
        # FTS5 reads the query only up to a NUL: the rest would go unsearched
        raise BrokerError("invalid_query", "a search query may not contain NUL")
    if agent_id is not OWNER:
        require_agent(conn, workspace_id, agent_id)
    channel_id: int | None = None
    if channel is not None:
        channel_id = require_readable_channel(conn, workspace_id, agent_id, channel).id
    author_id: int | None = None
    if author is not None:
        row = conn.execute(
            "SELECT id FROM agents WHERE workspace_id = ? AND name = ?", (workspace_id, author)
        ).fetchone()
        if row is None:
            raise BrokerError("agent_not_found", f"agent {author!r} not found")
        author_id = int(row[0])

    def run(match: str) -> list[apsw.SQLiteValues]:
        return conn.execute(
            _SEARCH,
            (match, workspace_id, channel_id, author_id, agent_id, size),
        ).fetchall()

    try:
        rows = run(text)
    except apsw.SQLError:
        try:
            rows = run(as_plain_words(text))
        except apsw.SQLError as exc:
            raise BrokerError("invalid_query", f"the query cannot be searched: {exc}") from None
    ranks = {cast(int, r[0]): cast(float, r[1]) for r in rows}
    return [
        SearchResult(**msgspec.structs.asdict(m), relevance_score=-ranks[int(m.id)])
        for m in load_messages(conn, list(ranks))
    ]

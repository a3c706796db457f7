"""Reading messages back: the one place that turns message rows into wire objects.

Every read path (channel history, thread, DM history, search, get one
message) selects message ids, then calls `load_messages`, which fetches the
rows and their reactions, attachments and read counts in a fixed number of
queries, whatever the page size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import apsw
import msgspec

from broker.engine import validation
from broker.engine.errors import BrokerError
from protocol.objects import Attachment, Message, ReactionGroup, iso

_encoder = msgspec.json.Encoder()
_dict_decoder = msgspec.json.Decoder(dict[str, object])
_list_decoder = msgspec.json.Decoder(list[str])

# Page sizes: the default and the largest a caller may ask for.
DEFAULT_LIMIT = 50
MAX_LIMIT = 100


def page_limit(limit: int | None, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    """A validated page size: None means the default; outside 1..maximum is refused."""
    if limit is None:
        return default
    if not 1 <= limit <= maximum:
        raise BrokerError("invalid_limit", f"limit must be between 1 and {maximum}")
    return limit


def cursor(value: str | None) -> int | None:
    """A `before` / `after` cursor (a message id, exclusive; it need not exist)."""
    return None if value is None else validation.parse_id(value, "invalid_cursor", "cursor")


# Top-level messages of one channel or conversation in an id range; each
# partial index (messages_channel, messages_conversation) covers exactly these
# rows. The column comes from this table, never from input.
_PAGE_SQL = {
    column: f"SELECT id FROM messages WHERE {column} = ? AND thread_id IS NULL"
    " AND id > ? AND id < ?"
    for column in ("channel_id", "conversation_id")
}


def top_level_page(
    conn: apsw.Connection, column: Literal["channel_id", "conversation_id"], owner_id: int,
    after: int | None, before: int | None, size: int,
) -> list[Message]:
    """A page newest first: the newest `size` below `before`, or the oldest above `after`."""
    sql = _PAGE_SQL[column]
    bounds = (owner_id, -1 if after is None else after, 2**63 - 1 if before is None else before)
    if after is not None:
        ids = [r[0] for r in conn.execute(sql + " ORDER BY id LIMIT ?", (*bounds, size))]
        ids.reverse()
    else:
        ids = [r[0] for r in conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*bounds, size))]
    return load_messages(conn, cast("list[int]", ids))


def load_messages(conn: apsw.Connection, ids: Sequence[int]) -> list[Message]:
    """The messages with these ids, as wire objects, in the order of `ids`.

    Ids that do not exist are skipped; the caller has already decided that
    the reader may see every id it passes.
    """
    if not ids:
        return []
    id_list = _encoder.encode(list(ids)).decode()
    rows = conn.execute(
        "SELECT m.id, m.channel_id, c.name, m.conversation_id, m.agent_id, a.name, m.text,"
        " m.data, m.thread_id, m.mentions, m.mode, m.reply_count, m.created_at,"
        " (SELECT count(*) FROM read_receipts r WHERE r.message_id = m.id)"
        " FROM messages m LEFT JOIN channels c ON c.id = m.channel_id"
        " LEFT JOIN agents a ON a.id = m.agent_id"
        " WHERE m.id IN (SELECT value FROM json_each(?))",
        (id_list,),
    ).fetchall()
    attachments: dict[int, list[Attachment]] = {}
    for message_id, file_id, filename, content_type, size in conn.execute(
        "SELECT x.message_id, f.id, f.filename, f.content_type, f.size_bytes"
        " FROM message_attachments x JOIN files f ON f.id = x.file_id"
        " WHERE x.message_id IN (SELECT value FROM json_each(?)) ORDER BY x.message_id, x.position",
        (id_list,),
    ):
        attachments.setdefault(cast(int, message_id), []).append(
            Attachment(file_id=str(file_id), filename=cast(str, filename),
                       content_type=cast(str, content_type), size_bytes=cast(int, size))
        )
    reactions: dict[int, list[ReactionGroup]] = {}
    for message_id, emoji, count, names in conn.execute(
        "SELECT r.message_id, r.emoji, count(*), json_group_array(a.name)"
        " FROM reactions r JOIN agents a ON a.id = r.agent_id"
        " WHERE r.message_id IN (SELECT value FROM json_each(?))"
        " GROUP BY r.message_id, r.emoji ORDER BY r.message_id, min(r.id)",
        (id_list,),
    ):
        reactions.setdefault(cast(int, message_id), []).append(
            ReactionGroup(emoji=cast(str, emoji), count=cast(int, count),
                          agents=_list_decoder.decode(cast(str, names)))
        )
    by_id: dict[int, Message] = {}
    for (message_id, channel_id, channel_name, conversation_id, agent_id, agent_name, text,
         data, thread_id, mentions, mode, reply_count, created_at, read_count) in rows:
        mid = cast(int, message_id)
        files = attachments.get(mid, [])
        by_id[mid] = Message(
            id=str(mid),
            channel_id=None if channel_id is None else str(channel_id),
            channel_name=cast("str | None", channel_name),
            conversation_id=None if conversation_id is None else str(conversation_id),
            agent_id=None if agent_id is None else str(agent_id),
            agent_name=cast("str | None", agent_name),
            text=cast(str, text),
            data=None if data is None else _dict_decoder.decode(cast(str, data)),
            thread_id=None if thread_id is None else str(thread_id),
            attachments=files,
            has_attachments=bool(files),
            mentions=[] if mentions is None else _list_decoder.decode(cast(str, mentions)),
            injection_mode=cast("Literal['wait', 'steer']", mode),
            reply_count=cast(int, reply_count),
            reactions=reactions.get(mid, []),
            read_by_count=cast(int, read_count),
            created_at=iso(cast(int, created_at)) or "",
        )
    return [by_id[i] for i in ids if i in by_id]

"""The SQLite schema, migrated step by step through `pragma user_version`.

Each step runs in its own transaction together with the version bump, so a
crash mid-migration leaves the file at the previous version, never between.
A file with a newer version than this code knows is refused, untouched.

Times are integer milliseconds since the Unix epoch. Ids are 64-bit integers
from `broker.engine.ids` (decimal strings on the wire). Secrets (workspace
keys, agent tokens) are stored only as SHA-256 digests.

Hot paths and their keys:
- the mailbox of an agent is a range scan of `deliveries` by (agent_id, seq),
  its marks (last seq, ack mark, unsettled count) one narrow `mailboxes` row;
- mark read finds a delivery by (message_id, agent_id);
- expiry probes each mailbox with unsettled rows at its lowest pending seq
  (expiry times rise with seq), so no index on `expires_at`;
- a channel send reads `channel_members` by channel, a join reads it by agent;
- a history page is a range scan of messages by (channel_id | conversation_id
  | thread_id, id).
"""

from __future__ import annotations

import apsw

from broker.engine.errors import StartupError

_V1 = """
CREATE TABLE workspaces (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    key_hash      BLOB NOT NULL UNIQUE,
    system_prompt TEXT,
    metadata      TEXT NOT NULL DEFAULT '{}',
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER
);

CREATE TABLE agents (
    id                  INTEGER PRIMARY KEY,
    workspace_id        INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    name                TEXT NOT NULL,
    type                TEXT NOT NULL DEFAULT 'agent',
    persona             TEXT,
    metadata            TEXT NOT NULL DEFAULT '{}',
    token_hash          BLOB NOT NULL UNIQUE,
    -- after a rotation the old token keeps working until prev_token_expires_at
    prev_token_hash     BLOB,
    prev_token_expires_at INTEGER,
    status              TEXT NOT NULL DEFAULT 'offline',
    last_seen           INTEGER,
    deactivated_at      INTEGER,
    -- delivery sequence: last allocated seq (high-water mark, never reused,
    -- survives pruning), cumulative ack, and count of unacked deliveries
    last_seq            INTEGER NOT NULL DEFAULT 0,
    acked_seq           INTEGER NOT NULL DEFAULT 0,
    pending_count       INTEGER NOT NULL DEFAULT 0,
    created_at          INTEGER NOT NULL,
    UNIQUE (workspace_id, name)
);
CREATE INDEX agents_prev_token ON agents(prev_token_hash) WHERE prev_token_hash IS NOT NULL;

CREATE TABLE channels (
    id           INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    topic        TEXT,
    metadata     TEXT NOT NULL DEFAULT '{}',
    created_by   INTEGER REFERENCES agents(id) ON DELETE SET NULL,
    archived_at  INTEGER,
    created_at   INTEGER NOT NULL,
    UNIQUE (workspace_id, name)
);

CREATE TABLE channel_members (
    channel_id   INTEGER NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
    agent_id     INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    role         TEXT NOT NULL DEFAULT 'member',
    muted        INTEGER NOT NULL DEFAULT 0,
    last_read_id INTEGER,
    last_read_at INTEGER,
    joined_at    INTEGER NOT NULL,
    PRIMARY KEY (channel_id, agent_id)
) WITHOUT ROWID;
CREATE INDEX channel_members_agent ON channel_members(agent_id, channel_id);

-- 1:1 DMs (kind 'dm', the pair stored sorted and unique) and group DMs
CREATE TABLE conversations (
    id           INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    kind         TEXT NOT NULL CHECK (kind IN ('dm', 'group')),
    name         TEXT,
    agent_lo     INTEGER,
    agent_hi     INTEGER,
    created_by   INTEGER REFERENCES agents(id) ON DELETE SET NULL,
    created_at   INTEGER NOT NULL,
    CHECK (kind = 'group' OR (agent_lo IS NOT NULL AND agent_lo < agent_hi))
);
CREATE UNIQUE INDEX conversations_pair ON conversations(workspace_id, agent_lo, agent_hi)
    WHERE kind = 'dm';

CREATE TABLE conversation_participants (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    agent_id        INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    joined_at       INTEGER NOT NULL,
    left_at         INTEGER,
    last_read_id    INTEGER,
    last_read_at    INTEGER,
    PRIMARY KEY (conversation_id, agent_id)
) WITHOUT ROWID;
CREATE INDEX conversation_participants_agent
    ON conversation_participants(agent_id, conversation_id);

-- A message lives in exactly one channel or one conversation; a thread reply
-- has thread_id = the id of its root message.
CREATE TABLE messages (
    id              INTEGER PRIMARY KEY,
    workspace_id    INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    channel_id      INTEGER REFERENCES channels(id) ON DELETE CASCADE,
    conversation_id INTEGER REFERENCES conversations(id) ON DELETE CASCADE,
    agent_id        INTEGER REFERENCES agents(id) ON DELETE SET NULL,
    thread_id       INTEGER,
    text            TEXT NOT NULL,
    data            TEXT,
    mode            TEXT NOT NULL DEFAULT 'wait',
    mentions        TEXT,
    reply_count     INTEGER NOT NULL DEFAULT 0,
    last_reply_at   INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER,
    CHECK ((channel_id IS NULL) <> (conversation_id IS NULL))
);
CREATE INDEX messages_channel ON messages(channel_id, id)
    WHERE channel_id IS NOT NULL AND thread_id IS NULL;
CREATE INDEX messages_conversation ON messages(conversation_id, id)
    WHERE conversation_id IS NOT NULL AND thread_id IS NULL;
CREATE INDEX messages_thread ON messages(thread_id, id) WHERE thread_id IS NOT NULL;
CREATE INDEX messages_workspace ON messages(workspace_id, id);
-- Every message of a channel or conversation, replies included, and every
-- message of an author: unread counts (inbox) are range scans of the first
-- two, and deleting a channel, conversation or agent (workspace deletion)
-- finds the rows its foreign keys cascade to without scanning the table.
CREATE INDEX messages_channel_all ON messages(channel_id, id) WHERE channel_id IS NOT NULL;
CREATE INDEX messages_conversation_all ON messages(conversation_id, id)
    WHERE conversation_id IS NOT NULL;
CREATE INDEX messages_agent ON messages(agent_id, id) WHERE agent_id IS NOT NULL;

-- Full-text index over message text, kept in sync by triggers.
CREATE VIRTUAL TABLE messages_fts USING fts5(
    text, content='messages', content_rowid='id', tokenize='unicode61'
);
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
END;

CREATE TABLE files (
    id           INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    uploader_id  INTEGER REFERENCES agents(id) ON DELETE SET NULL,
    filename     TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size_bytes   INTEGER NOT NULL,
    state        TEXT NOT NULL DEFAULT 'pending'
                 CHECK (state IN ('pending', 'complete', 'deleted')),
    storage_key  TEXT,
    expires_at   INTEGER,
    created_at   INTEGER NOT NULL,
    completed_at INTEGER,
    deleted_at   INTEGER
);
CREATE INDEX files_workspace ON files(workspace_id, id);
-- storage_key is set only once the bytes are durably in place, and cleared
-- when the sweep releases them (broker.engine.files); the sweep visits
-- pending uploads by expiry and deleted files that still hold bytes.
CREATE UNIQUE INDEX files_storage_key ON files(storage_key) WHERE storage_key IS NOT NULL;
CREATE INDEX files_pending_expiry ON files(expires_at) WHERE state = 'pending';
CREATE INDEX files_deleted_bytes ON files(deleted_at)
    WHERE state = 'deleted' AND storage_key IS NOT NULL;

-- Secrets the server generates for itself on first use (the key that signs
-- file upload and download URLs); never sent to clients.
CREATE TABLE server_secrets (
    name       TEXT PRIMARY KEY,
    value      BLOB NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE message_attachments (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    file_id    INTEGER NOT NULL REFERENCES files(id),
    position   INTEGER NOT NULL,
    PRIMARY KEY (message_id, file_id)
) WITHOUT ROWID;
CREATE INDEX message_attachments_file ON message_attachments(file_id);

-- The event log: one row per durable event (message.created, thread.reply,
-- dm.received, group_dm.received, message.reacted, message.read, ...). The
-- payload is encoded once; every delivery of the event points at it.
CREATE TABLE message_log (
    id           INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    type         TEXT NOT NULL,
    message_id   INTEGER,
    channel_id   INTEGER,
    conversation_id INTEGER,
    agent_id     INTEGER,
    payload      BLOB NOT NULL,
    created_at   INTEGER NOT NULL
);
CREATE INDEX message_log_workspace ON message_log(workspace_id, id);
CREATE INDEX message_log_created ON message_log(created_at);

-- One row per (recipient, event). seq is per agent, allocated from
-- agents.last_seq (mailboxes.last_seq since version 3) inside the writing
-- transaction: gap-free, strictly increasing, never reused.
CREATE TABLE deliveries (
    agent_id     INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    seq          INTEGER NOT NULL,
    -- no foreign key on purpose: enforcing one would scan deliveries for
    -- every pruned log row; retention prunes deliveries before their log rows
    log_id       INTEGER NOT NULL,
    message_id   INTEGER,
    state        TEXT NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'delivered', 'acked', 'failed', 'dead_lettered')),
    attempts     INTEGER NOT NULL DEFAULT 0,
    error        TEXT,
    retryable    INTEGER,
    available_at INTEGER,
    expires_at   INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    delivered_at INTEGER,
    acked_at     INTEGER,
    updated_at   INTEGER,
    PRIMARY KEY (agent_id, seq)
) WITHOUT ROWID;
CREATE INDEX deliveries_message ON deliveries(message_id, agent_id) WHERE message_id IS NOT NULL;
CREATE INDEX deliveries_expiry ON deliveries(expires_at)
    WHERE state IN ('queued', 'delivered', 'failed');
-- a row enters this index when it settles (on ack, not on send), so the
-- retention sweep finds old settled rows without scanning the table
CREATE INDEX deliveries_settled ON deliveries(created_at)
    WHERE state IN ('acked', 'dead_lettered');

CREATE TABLE read_receipts (
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    agent_id   INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    read_at    INTEGER NOT NULL,
    PRIMARY KEY (message_id, agent_id)
) WITHOUT ROWID;

CREATE TABLE reactions (
    id         INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    agent_id   INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    emoji      TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (message_id, agent_id, emoji)
);
CREATE INDEX reactions_agent ON reactions(agent_id);

-- An idempotency key is scoped to the agent that sent it; request_hash is a
-- digest of the normalized request so that a reused key with another
-- payload can be told apart from a replay.
CREATE TABLE idempotency_keys (
    agent_id     INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    key          TEXT NOT NULL,
    operation    TEXT NOT NULL,
    request_hash BLOB NOT NULL,
    response     BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (agent_id, key)
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);

CREATE TABLE webhook_subscriptions (
    id           INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    url          TEXT NOT NULL,
    events       TEXT NOT NULL,
    filters      TEXT NOT NULL DEFAULT '{}',
    headers      TEXT NOT NULL DEFAULT '{}',
    -- the signing key, kept as given (an HMAC needs it); never returned after creation
    secret       TEXT,
    active       INTEGER NOT NULL DEFAULT 1,
    created_at   INTEGER NOT NULL
);
CREATE INDEX webhook_subscriptions_workspace ON webhook_subscriptions(workspace_id) WHERE active;

-- Transactional outbox: an event waiting for webhook dispatch, written in
-- the same transaction as the fact it reports.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY,
    workspace_id    INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    subscription_id INTEGER NOT NULL REFERENCES webhook_subscriptions(id) ON DELETE CASCADE,
    log_id          INTEGER,
    type            TEXT NOT NULL,
    payload         BLOB NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    -- HTTP status of the last attempt (NULL: no answer, e.g. a timeout)
    last_status     INTEGER,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER
);
CREATE INDEX outbox_due ON outbox(next_attempt_at) WHERE state = 'pending';
-- dead letters and counts by subscription; also what ON DELETE CASCADE needs
CREATE INDEX outbox_subscription ON outbox(subscription_id, state, id);
-- pruning delivered rows by age
CREATE INDEX outbox_delivered ON outbox(updated_at) WHERE state = 'delivered';

-- Inbound hooks: POST /v1/hooks/{id} with the token posts into the channel
-- as the hook's own system agent (not a channel member, so it receives no
-- deliveries). The wh_live_ token is stored only as its SHA-256 digest.
CREATE TABLE inbound_webhooks (
    id           INTEGER PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    channel_id   INTEGER NOT NULL REFERENCES channels(id) ON DELETE CASCADE,
    agent_id     INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    token_hash   BLOB NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL
);
CREATE INDEX inbound_webhooks_workspace ON inbound_webhooks(workspace_id, id);

-- Relaycast node tokens (nt_live_...): the credential an agent's SDK
-- fetches before it opens /v1/node/ws; stored hashed, short-lived.
CREATE TABLE node_tokens (
    token_hash   BLOB PRIMARY KEY,
    workspace_id INTEGER NOT NULL REFERENCES workspaces(id) ON DELETE CASCADE,
    agent_id     INTEGER NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    expires_at   INTEGER NOT NULL,
    created_at   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX node_tokens_agent ON node_tokens(agent_id, expires_at);
"""

# Deleting a workspace marks it (deleted_at) and renames it out of the way
# in one small command; its rows are purged afterwards in bounded steps
# (broker.engine.maintenance.PurgeWorkspace). The purge finds the marked
# workspaces by the partial index, and a workspace's group conversations by
# the second index (the pair index covers only 1:1 DMs).
#
# Deleting a parent row makes SQLite look for its children through every
# foreign key that points at it (to cascade, set NULL or refuse); without an
# index on the child column that look-up scans the whole child table, all
# workspaces included, once per deleted row: a purge step deleting 1000
# agents read every read receipt of the daemon 1000 times. So every foreign
# key's child column has an index (a test checks the whole schema). The
# created_by and uploader_id indexes are partial: the look-up is by a value,
# never NULL. What they cost on the hot paths: one more index entry per
# read receipt (mark read) and per outbox row (a send with subscriptions);
# the others are written only on rare writes (create a channel, conversation,
# file, hook, subscription or node token).
#
# An agent's dead letters are listed through their own partial index: the
# list walked every kept acked row of the agent (7 days of them) to find a
# few. A row enters it only when it is dead-lettered.
_V2 = """
ALTER TABLE workspaces ADD COLUMN deleted_at INTEGER;
CREATE INDEX workspaces_deleted ON workspaces(deleted_at) WHERE deleted_at IS NOT NULL;
CREATE INDEX conversations_workspace ON conversations(workspace_id, id);
CREATE INDEX read_receipts_agent ON read_receipts(agent_id);
CREATE INDEX channels_created_by ON channels(created_by) WHERE created_by IS NOT NULL;
CREATE INDEX conversations_created_by ON conversations(created_by) WHERE created_by IS NOT NULL;
CREATE INDEX files_uploader ON files(uploader_id) WHERE uploader_id IS NOT NULL;
CREATE INDEX inbound_webhooks_agent ON inbound_webhooks(agent_id);
CREATE INDEX inbound_webhooks_channel ON inbound_webhooks(channel_id);
CREATE INDEX webhook_subscriptions_workspace_all ON webhook_subscriptions(workspace_id);
CREATE INDEX outbox_workspace ON outbox(workspace_id);
CREATE INDEX node_tokens_workspace ON node_tokens(workspace_id);
CREATE INDEX deliveries_dead_lettered ON deliveries(agent_id, seq) WHERE state = 'dead_lettered';
"""

# An agent's delivery marks move to a narrow table of their own: every send
# advanced `last_seq` and `pending_count` of each recipient by rewriting its
# whole `agents` row (token hashes, persona, metadata: a few to tens of rows
# per page), and every ack its `acked_seq`; a `mailboxes` row is four
# integers, hundreds to a page, so a send's recipients share a page or two
# and a commit writes fewer of them to the WAL (BENCHMARKS.md, Tuning,
# session 7). Every agent has exactly one mailbox row: the trigger makes it
# with the agent, the foreign key removes it with the agent. The marks keep
# their meaning: `last_seq` the highest seq allocated (never reused, survives
# pruning), `acked_seq` the cumulative ack mark, `pending_count` the agent's
# unsettled deliveries.
_V3 = """
CREATE TABLE mailboxes (
    agent_id      INTEGER PRIMARY KEY REFERENCES agents(id) ON DELETE CASCADE,
    last_seq      INTEGER NOT NULL DEFAULT 0,
    acked_seq     INTEGER NOT NULL DEFAULT 0,
    pending_count INTEGER NOT NULL DEFAULT 0
);
INSERT INTO mailboxes(agent_id, last_seq, acked_seq, pending_count)
    SELECT id, last_seq, acked_seq, pending_count FROM agents;
ALTER TABLE agents DROP COLUMN last_seq;
ALTER TABLE agents DROP COLUMN acked_seq;
ALTER TABLE agents DROP COLUMN pending_count;
CREATE TRIGGER agents_mailbox AFTER INSERT ON agents BEGIN
    INSERT INTO mailboxes(agent_id) VALUES (new.id);
END;
"""

# The expiry sweep finds what expired by each mailbox's lowest pending row
# (broker.engine.maintenance): its index on `expires_at` goes, and with it
# an entry every delivery gained when written, rewrote when pushed (the
# index's condition reads `state`) and lost when settled (BENCHMARKS.md,
# Tuning, session 12).
_V4 = """
DROP INDEX deliveries_expiry;
"""

# Each entry migrates from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (_V1, _V2, _V3, _V4)
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: apsw.Connection) -> int:
    """The file's `pragma user_version`; raises StartupError for a file that is not SQLite."""
    try:
        row = conn.execute("pragma user_version").fetchone()
        # user_version lives in the header and reads as 0 on an empty file
        # or on garbage shorter than a page; reading the schema proves the
        # file really is a database.
        conn.execute("select count(*) from sqlite_schema").fetchone()
    except (apsw.NotADBError, apsw.CorruptError) as exc:
        raise StartupError(f"{conn.filename}: not a SQLite database ({exc})") from exc
    assert row is not None
    version = int(row[0])
    return version


def check_version(conn: apsw.Connection) -> int:
    """The file's schema version; StartupError if it is not SQLite or newer than this code."""
    version = schema_version(conn)
    if version > SCHEMA_VERSION:
        raise StartupError(
            f"{conn.filename}: schema version {version} is newer than this broker "
            f"understands ({SCHEMA_VERSION}); upgrade the broker or use another data directory"
        )
    return version


def migrate(conn: apsw.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION, one transaction per step; returns the version.

    Raises StartupError for a foreign file or one written by a newer broker.
    """
    version = check_version(conn)
    while version < SCHEMA_VERSION:
        with conn:
            conn.execute(MIGRATIONS[version])
            version += 1
            conn.execute(f"pragma user_version = {version}")
    return version

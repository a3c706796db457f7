"""Gateway settings: every limit and timeout of the WebSocket sessions, named and configurable."""

from __future__ import annotations

from typing import Annotated

import msgspec

from broker.engine.node_tokens import DEFAULT_NODE_TOKEN_TTL_S
from broker.gateway.frame_queue import DEFAULT_QUEUE_FRAMES
from protocol.codec import DEFAULT_MAX_FRAME_BYTES

Seconds = Annotated[float, msgspec.Meta(gt=0)]


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits and timeouts of `/v1/ws` and `/v1/node/ws` sessions."""

    # Frames a session's frame queue holds for a slow socket before it stops
    # taking live deliveries (it catches up from the database once the
    # client drains). The name predates the queue's: it stays, since it is
    # a configuration key.
    outbox_frames: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_QUEUE_FRAMES
    # A client whose socket accepts nothing for this long is closed with 4008.
    slow_client_timeout_seconds: Seconds = 60.0
    # Inbound frames above this close the socket with 1009.
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=64)] = DEFAULT_MAX_FRAME_BYTES
    # Native sessions: the server pings this often and closes with 4408 when
    # nothing (a pong or any frame) arrives within pong_timeout of a ping.
    ping_interval_seconds: Seconds = 25.0
    pong_timeout_seconds: Seconds = 20.0
    # Relaycast sockets are not pinged (the SDK does not answer server pings;
    # it sends its own ping or node.heartbeat every 30 s): they are closed
    # with 4408 after this long without any frame.
    idle_timeout_seconds: Seconds = 90.0
    # An agent online with no socket (it heartbeats over REST, as Relaycast
    # clients do every 30 s) is set offline once its last heartbeat is this
    # old: three missed heartbeats, like idle_timeout for sockets.
    heartbeat_timeout_seconds: Seconds = 90.0
    # Presence transitions are coalesced: a session that asked for presence
    # gets at most one `presence` frame per interval, listing the agents
    # whose state changed, so a workspace of N agents connecting costs O(N)
    # frames, not one frame per connect to every session (O(N^2)).
    presence_interval_seconds: Seconds = 1.0
    # Data frames go out through the connection's transport, as one write
    # per flush straight to the socket when it takes them, where the server
    # hands one over (broker.gateway.transport: HTTP/1.1, over TLS through
    # hypercorn's TLS stream, never straight to the socket); false:
    # one ASGI `websocket.send` per frame everywhere.
    direct_writes: bool = True
    # How long a close frame may take before the connection is reset.
    close_grace_seconds: Seconds = 5.0
    # Deliveries read per page while replaying from the database.
    replay_page: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 500
    # What one session may owe its client: requests running plus the answers
    # (replies, pongs, error replies) queued and not yet written. At this
    # bound the socket is not read until the client reads.
    max_requests_in_flight: Annotated[int, msgspec.Meta(ge=1)] = 64
    node_token_ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_NODE_TOKEN_TTL_S
    # Sockets one agent may hold open (native and node sockets alike); the
    # next is closed with 4429. 0: no cap.
    max_sessions_per_agent: Annotated[int, msgspec.Meta(ge=0)] = 8
    # Sockets of every kind (observers too); the next is closed with 1013. 0: no cap.
    max_sessions: Annotated[int, msgspec.Meta(ge=0)] = 20_000

"""Who is calling: a bearer token resolved to a Principal, and whether it may call an operation.

The token's prefix says its kind: `rk_live_` a workspace key, `at_live_` an
agent token (a rotated-out token keeps working for the grace period). A
missing token is `unauthorized`; a token of unknown kind, or one that
matches nothing, is `invalid_token` (both 401). A valid token of the wrong
kind for the operation is `forbidden` (403). Shared by the REST binding and
the WebSocket gateway, so both refuse the same way.
"""

from __future__ import annotations

import time

from broker.engine import secrets
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.workspaces import Principal, agent_by_token, workspace_by_key
from broker.operations.registry import Auth

# A token longer than this is not one we minted; refuse it before hashing.
MAX_TOKEN_CHARS = 512


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header (None when absent).

    Raises BrokerError("invalid_token") when the header is not a bearer token.
    """
    if authorization is None or not authorization.strip():
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise BrokerError("invalid_token", "the Authorization header must be 'Bearer <token>'")
    return token


async def resolve_token(engine: Engine, token: str | None) -> Principal:
    """The workspace or agent that `token` belongs to.

    Raises BrokerError "unauthorized" (no token) or "invalid_token".
    """
    if token is None:
        raise BrokerError("unauthorized", "this route needs 'Authorization: Bearer <token>'")
    principal: Principal | None = None
    if len(token) <= MAX_TOKEN_CHARS:
        if token.startswith(secrets.WORKSPACE_KEY_PREFIX):
            principal = await engine.read(workspace_by_key, token)
        elif token.startswith(secrets.AGENT_TOKEN_PREFIX):
            principal = await engine.read(agent_by_token, token, int(time.time() * 1000))
    if principal is None:
        raise BrokerError("invalid_token", "the token is not a valid workspace key or agent token")
    return principal


def authorize(auth: Auth, principal: Principal | None) -> None:
    """Check that `principal` may call an operation that needs `auth`.

    Raises BrokerError "unauthorized" when a token is needed and missing, or
    "forbidden" when the token is of the wrong kind.
    """
    if auth == "none":
        return
    if principal is None:
        raise BrokerError("unauthorized", "this route needs 'Authorization: Bearer <token>'")
    if auth == "agent" and principal.agent_id is None:
        raise BrokerError(
            "forbidden", "this route needs an agent token (at_live_...), not a workspace key"
        )
    if auth == "workspace" and principal.agent_id is not None:
        raise BrokerError(
            "forbidden", "this route needs the workspace key (rk_live_...), not an agent token"
        )

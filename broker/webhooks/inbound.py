"""The REST binding of `webhook.trigger`: POST /v1/hooks/{webhook_id}.

It is bound here rather than in broker.http.routes because its credential
is not a workspace key or an agent token but the hook's own `wh_live_`
token, which the generic binding does not resolve. The SDK sends it as
`Authorization: Bearer wh_live_...`; senders that can only be given a URL
(GitHub, Stripe and the like) may put it in `?token=`. Whether the token is
right is decided inside the trigger's transaction, so a wrong token posts
nothing. A body with none of the fields Relaycast knows (text, message,
payload, blocks) is taken whole as the payload.

The route sits behind the same limits as the REST operations: from an
address with too many refused tokens it answers 429 before it looks at
the token, a refused hook token counts towards that block, and a request
with a good token is counted, before its body is read, against the hook's
workspace and against the hook itself (the bucket of its own agent, at
the per-agent rate), so a refused request writes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from broker.auth import bearer_token
from broker.config import Settings
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.inbound_hooks import hook_caller
from broker.http.app import (
    error_response,
    idempotency_key,
    parse_body,
    read_body,
    success_response,
)
from broker.operations.registry import Call, invoke
from broker.ratelimit import UNLIMITED, RateLimited, RateLimiter, Verdict, client_address

log = logging.getLogger(__name__)

TRIGGER_PATH = "/v1/hooks/{webhook_id}"
# The fields of Relaycast's WebhookTriggerRequest that carry the content.
CONTENT_FIELDS = frozenset({"text", "message", "payload", "blocks"})


def hook_token(request: Request) -> str | None:
    """The bearer token, else `?token=`; None when neither is given."""
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        token = request.query_params.get("token") or None
    return token


def inbound_routes(
    engine: Engine, settings: Settings, limiter: RateLimiter | None = None
) -> list[BaseRoute]:
    """The route that posts an inbound hook's body into its channel.

    limiter: the rate limits shared with the REST operations (None: none).
    """
    limiter = limiter or RateLimiter(UNLIMITED)

    async def trigger(request: Request) -> Response:
        limits: Verdict | None = None
        try:
            address = client_address(request.scope)
            presented = bool(request.headers.get("authorization")
                             or request.query_params.get("token"))
            with limiter.guarding_tokens(address, presented=presented):
                token = hook_token(request)
                if token is None:
                    raise BrokerError(
                        "unauthorized", "this route needs 'Authorization: Bearer wh_live_...'"
                    )
                caller = await engine.read(
                    hook_caller, str(request.path_params["webhook_id"]), token)
            limits = limiter.take_request("webhook.trigger", caller.workspace_id,
                                          caller.agent_id, address)
            body = parse_body(await read_body(request, settings.http.max_body_bytes))
            fields: dict[str, Any] = body if CONTENT_FIELDS & body.keys() or not body else {
                "payload": body}
            fields = {**fields, "webhook_id": request.path_params["webhook_id"], "token": token}
            result = await invoke(
                engine, "webhook.trigger", Call(None, idempotency_key(request)), fields
            )
        except RateLimited as exc:
            return error_response(exc.code, exc.message, headers=exc.verdict.headers())
        except BrokerError as exc:
            return error_response(exc.code, exc.message)
        except Exception:
            log.exception("request POST %s (webhook.trigger) failed", TRIGGER_PATH)
            return error_response("internal_error", "the broker failed to handle this request")
        response = success_response(result, 201)
        if limits is not None:
            response.headers.update(limits.headers())
        return response

    return [Route(TRIGGER_PATH, trigger, methods=["POST"], name=f"POST {TRIGGER_PATH}")]

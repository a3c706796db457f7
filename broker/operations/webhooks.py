"""The webhook operations, registered in the operation table (broker.operations).

Subscriptions, their dead letters, and inbound hooks, all for the workspace
key; and `webhook.trigger`, which carries its own credential (the hook's
`wh_live_` token) and is bound to REST by broker.webhooks.inbound.

Creating a subscription asks the SSRF guard first (it needs DNS, which a
writer command must not do): a refused destination is `destination_refused`
and nothing is stored.
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker.engine import webhooks as hooks
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.history import page_limit
from broker.operations import Call, operation
from broker.webhooks.dispatcher import notify, policy_for
from protocol import requests as rq


class CreateSubscription(rq.Request):
    url: str
    events: list[str]
    filter: hooks.SubscriptionFilter | None = None
    headers: dict[str, str] | None = None
    secret: str | None = None


class NoInput(rq.Request):
    pass


class SubscriptionRef(rq.Request):
    subscription_id: str


class ListDeadLetters(rq.Request):
    subscription_id: str
    limit: int | None = None
    before: str | None = None


class ReplayDeadLetters(rq.Request):
    subscription_id: str
    ids: list[str] | None = None


class CreateInboundWebhook(rq.Request):
    channel: str
    name: str | None = None


class InboundWebhookRef(rq.Request):
    webhook_id: str


class TriggerInboundWebhook(rq.Request):
    """Relaycast `WebhookTriggerRequest`, plus the hook's id and token."""

    webhook_id: str
    token: str | None = None
    text: str | None = None
    message: str | None = None
    source: str | None = None
    author: str | None = None
    payload: dict[str, Any] | None = None
    blocks: list[Any] | None = None


def _workspace(call: Call) -> int:
    if call.principal is None:
        raise BrokerError("unauthorized", "this operation needs a token")
    return call.principal.workspace_id


# -- outbound subscriptions -------------------------------------------------------------


@operation("subscription.create", CreateSubscription, auth="workspace",
           output=hooks.SubscriptionCreated)
async def create_subscription(engine: Engine, call: Call, req: CreateSubscription) -> Any:
    workspace_id = _workspace(call)
    url = hooks.webhook_url(req.url)  # malformed before refused: the clearer error first
    await policy_for(engine).check_url(url)
    created = await engine.submit(hooks.CreateSubscription(
        workspace_id=workspace_id, url=url, events=req.events, filter=req.filter,
        headers=req.headers, secret=req.secret))
    return created


@operation("subscription.list", NoInput, auth="workspace", output=list[hooks.EventSubscription])
async def list_subscriptions(engine: Engine, call: Call, req: NoInput) -> Any:
    return await engine.read(hooks.list_subscriptions, _workspace(call))


@operation("subscription.get", SubscriptionRef, auth="workspace", output=hooks.EventSubscription)
async def get_subscription(engine: Engine, call: Call, req: SubscriptionRef) -> Any:
    return await engine.read(hooks.get_subscription, _workspace(call), req.subscription_id)


@operation("subscription.delete", SubscriptionRef, auth="workspace", output=None)
async def delete_subscription(engine: Engine, call: Call, req: SubscriptionRef) -> Any:
    await engine.submit(hooks.DeleteSubscription(
        workspace_id=_workspace(call), subscription_id=req.subscription_id))
    return None


@operation("subscription.dead_letters", ListDeadLetters, auth="workspace",
           output=list[hooks.DeadLetter])
async def list_dead_letters(engine: Engine, call: Call, req: ListDeadLetters) -> Any:
    return await engine.read(
        hooks.list_dead_letters, _workspace(call), req.subscription_id, page_limit(req.limit),
        req.before,
    )


@operation("subscription.replay", ReplayDeadLetters, auth="workspace", output=hooks.ReplayResult)
async def replay_dead_letters(engine: Engine, call: Call, req: ReplayDeadLetters) -> Any:
    result = await engine.submit(hooks.ReplayDeadLetters(
        workspace_id=_workspace(call), subscription_id=req.subscription_id, ids=req.ids))
    notify(engine)
    return result


# -- inbound hooks --------------------------------------------------------------------


@operation("webhook.create", CreateInboundWebhook, auth="workspace",
           output=hooks.InboundWebhookCreated)
async def create_inbound_webhook(engine: Engine, call: Call, req: CreateInboundWebhook) -> Any:
    return await engine.submit(hooks.CreateInboundWebhook(
        workspace_id=_workspace(call), channel=req.channel, name=req.name))


@operation("webhook.list", NoInput, auth="workspace", output=list[hooks.InboundWebhook])
async def list_inbound_webhooks(engine: Engine, call: Call, req: NoInput) -> Any:
    return await engine.read(hooks.list_inbound_webhooks, _workspace(call))


@operation("webhook.delete", InboundWebhookRef, auth="workspace", output=None)
async def delete_inbound_webhook(engine: Engine, call: Call, req: InboundWebhookRef) -> Any:
    await engine.submit(hooks.DeleteInboundWebhook(
        workspace_id=_workspace(call), webhook_id=req.webhook_id))
    return None


@operation("webhook.trigger", TriggerInboundWebhook, auth="none", output=hooks.HookTriggered)
async def trigger_inbound_webhook(engine: Engine, call: Call, req: TriggerInboundWebhook) -> Any:
    fields = msgspec.structs.asdict(req)
    return await engine.submit(hooks.TriggerInboundWebhook(
        **fields, idempotency_key=call.idempotency_key))

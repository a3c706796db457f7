"""The webhook operations: outbound subscriptions, their dead letters, and inbound hooks.

Subscriptions and inbound hooks are managed with the workspace key;
`webhook.trigger` carries its own credential (the hook's `wh_live_` token)
and is bound to REST by broker.webhooks.inbound.

Creating a subscription asks the SSRF guard first (it needs DNS, which a
writer command must not do): a refused destination is `destination_refused`
and nothing is stored.
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker.engine import inbound_hooks
from broker.engine import webhooks as subscriptions
from broker.engine.engine import Engine
from broker.engine.history import page_limit
from broker.operations.registry import Call, operation, workspace_of
from broker.webhooks.dispatcher import notify, policy_for
from protocol import requests as rq

# -- outbound subscriptions -------------------------------------------------------------


@operation("subscription.create", rq.NewSubscription, auth="workspace",
           output=subscriptions.SubscriptionCreated)
async def create_subscription(engine: Engine, call: Call, req: rq.NewSubscription) -> Any:
    workspace_id = workspace_of(call)
    url = subscriptions.webhook_url(req.url)  # malformed before refused: the clearer error first
    await policy_for(engine).check_url(url)
    created = await engine.submit(subscriptions.CreateSubscription(
        workspace_id=workspace_id, url=url, events=req.events, filter=req.filter,
        headers=req.headers, secret=req.secret))
    return created


@operation("subscription.list", rq.Empty, auth="workspace",
           output=list[subscriptions.EventSubscription])
async def list_subscriptions(engine: Engine, call: Call, req: rq.Empty) -> Any:
    return await engine.read(subscriptions.list_subscriptions, workspace_of(call))


@operation("subscription.get", rq.SubscriptionRef, auth="workspace",
           output=subscriptions.EventSubscription)
async def get_subscription(engine: Engine, call: Call, req: rq.SubscriptionRef) -> Any:
    return await engine.read(subscriptions.get_subscription, workspace_of(call),
                             req.subscription_id)


@operation("subscription.delete", rq.SubscriptionRef, auth="workspace", output=None)
async def delete_subscription(engine: Engine, call: Call, req: rq.SubscriptionRef) -> Any:
    await engine.submit(subscriptions.DeleteSubscription(
        workspace_id=workspace_of(call), subscription_id=req.subscription_id))
    return None


@operation("subscription.dead_letters", rq.ListDeadLetters, auth="workspace",
           output=list[subscriptions.DeadLetter])
async def list_dead_letters(engine: Engine, call: Call, req: rq.ListDeadLetters) -> Any:
    return await engine.read(
        subscriptions.list_dead_letters, workspace_of(call), req.subscription_id,
        page_limit(req.limit), req.before,
    )


@operation("subscription.replay", rq.DeadLetterReplay, auth="workspace",
           output=subscriptions.ReplayResult)
async def replay_dead_letters(engine: Engine, call: Call, req: rq.DeadLetterReplay) -> Any:
    result = await engine.submit(subscriptions.ReplayDeadLetters(
        workspace_id=workspace_of(call), subscription_id=req.subscription_id, ids=req.ids))
    notify(engine)
    return result


# -- inbound hooks --------------------------------------------------------------------


@operation("webhook.create", rq.NewInboundWebhook, auth="workspace",
           output=inbound_hooks.InboundWebhookCreated)
async def create_inbound_webhook(engine: Engine, call: Call, req: rq.NewInboundWebhook) -> Any:
    return await engine.submit(inbound_hooks.CreateInboundWebhook(
        workspace_id=workspace_of(call), channel=req.channel, name=req.name))


@operation("webhook.list", rq.Empty, auth="workspace", output=list[inbound_hooks.InboundWebhook])
async def list_inbound_webhooks(engine: Engine, call: Call, req: rq.Empty) -> Any:
    return await engine.read(inbound_hooks.list_inbound_webhooks, workspace_of(call))


@operation("webhook.delete", rq.InboundWebhookRef, auth="workspace", output=None)
async def delete_inbound_webhook(engine: Engine, call: Call, req: rq.InboundWebhookRef) -> Any:
    await engine.submit(inbound_hooks.DeleteInboundWebhook(
        workspace_id=workspace_of(call), webhook_id=req.webhook_id))
    return None


@operation("webhook.trigger", rq.InboundWebhookTrigger, auth="none",
           output=inbound_hooks.HookTriggered)
async def trigger_inbound_webhook(
    engine: Engine, call: Call, req: rq.InboundWebhookTrigger
) -> Any:
    fields = msgspec.structs.asdict(req)
    return await engine.submit(inbound_hooks.TriggerInboundWebhook(
        **fields, idempotency_key=call.idempotency_key))

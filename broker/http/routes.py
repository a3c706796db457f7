"""The REST binding: (method, path) -> operation name, as the Relaycast SDK calls them.

Paths follow `@relaycast/sdk@6.0.2` (dist/relay.js and dist/agent.js). A path
parameter is named after the input field it fills (`{channel}`,
`{message_id}`, ...), so path, query and body merge into one input dict
without renaming. Status: 201 for creates, 204 for deletes with nothing to
say (the SDK returns undefined for 204), 200 otherwise.

Order matters only where a literal segment and a parameter compete
(`/v1/agents/presence` before `/v1/agents/{name}`).
"""

from __future__ import annotations

from typing import NamedTuple


class RestRoute(NamedTuple):
    method: str
    path: str
    operation: str
    status: int = 200


ROUTES: tuple[RestRoute, ...] = (
    # workspaces
    RestRoute("POST", "/v1/workspaces", "workspace.create", 201),
    # agents
    RestRoute("POST", "/v1/agents", "agent.register", 201),
    # channels
    RestRoute("POST", "/v1/channels", "channel.create", 201),
    RestRoute("POST", "/v1/channels/{channel}/join", "channel.join"),
    # messages
    RestRoute("POST", "/v1/channels/{channel}/messages", "message.send", 201),
    # files (the bytes move on /v1/files/{file_id}/content: broker.http.files)
    RestRoute("POST", "/v1/files/upload", "file.upload", 201),
    RestRoute("GET", "/v1/files", "file.list"),
    RestRoute("GET", "/v1/files/{file_id}", "file.get"),
    RestRoute("POST", "/v1/files/{file_id}/complete", "file.complete"),
    RestRoute("DELETE", "/v1/files/{file_id}", "file.delete", 204),
    # webhooks: outbound subscriptions, their dead letters, inbound hooks
    # (POST /v1/hooks/{webhook_id} carries its own token: broker.webhooks.inbound)
    RestRoute("POST", "/v1/subscriptions", "subscription.create", 201),
    RestRoute("GET", "/v1/subscriptions", "subscription.list"),
    RestRoute("GET", "/v1/subscriptions/{subscription_id}", "subscription.get"),
    RestRoute("DELETE", "/v1/subscriptions/{subscription_id}", "subscription.delete", 204),
    RestRoute("GET", "/v1/subscriptions/{subscription_id}/dead-letters",
              "subscription.dead_letters"),
    RestRoute("POST", "/v1/subscriptions/{subscription_id}/dead-letters/replay",
              "subscription.replay"),
    RestRoute("POST", "/v1/webhooks", "webhook.create", 201),
    RestRoute("GET", "/v1/webhooks", "webhook.list"),
    RestRoute("DELETE", "/v1/webhooks/{webhook_id}", "webhook.delete", 204),
)

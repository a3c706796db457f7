"""The REST binding: (method, path) -> operation name, as the Relaycast SDK calls them.

Paths follow `@relaycast/sdk@6.0.2` (dist/relay.js and dist/agent.js). A path
parameter is named after the input field it fills (`{channel}`,
`{message_id}`, ...), so path, query and body merge into one input dict
without renaming. Status: 201 for creates, 200 otherwise; an operation that
returns nothing answers 204 (the SDK returns undefined for it).

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
    RestRoute("GET", "/v1/workspaces/by-name/{name}", "workspace.lookup"),
    RestRoute("GET", "/v1/workspace", "workspace.get"),
    RestRoute("PATCH", "/v1/workspace", "workspace.update"),
    RestRoute("DELETE", "/v1/workspace", "workspace.delete"),
    # agents
    RestRoute("POST", "/v1/agents", "agent.register", 201),
    RestRoute("GET", "/v1/agents", "agent.list"),
    RestRoute("GET", "/v1/agents/presence", "agent.presence"),
    RestRoute("POST", "/v1/agents/heartbeat", "agent.heartbeat"),
    RestRoute("POST", "/v1/agents/disconnect", "agent.disconnect"),
    RestRoute("GET", "/v1/agents/{name}", "agent.get"),
    RestRoute("PATCH", "/v1/agents/{name}", "agent.update"),
    RestRoute("DELETE", "/v1/agents/{name}", "agent.deactivate"),
    RestRoute("POST", "/v1/agents/{name}/rotate-token", "agent.rotate_token"),
    RestRoute("GET", "/v1/agents/{name}/mailbox", "agent.mailbox"),
    RestRoute("GET", "/v1/agents/{name}/deliveries", "agent.deliveries"),
    RestRoute("GET", "/v1/agent", "agent.me"),
    # channels
    RestRoute("POST", "/v1/channels", "channel.create", 201),
    RestRoute("GET", "/v1/channels", "channel.list"),
    RestRoute("GET", "/v1/channels/{channel}", "channel.get"),
    RestRoute("PATCH", "/v1/channels/{channel}", "channel.update"),
    RestRoute("DELETE", "/v1/channels/{channel}", "channel.archive"),
    RestRoute("PATCH", "/v1/channels/{channel}/topic", "channel.set_topic"),
    RestRoute("POST", "/v1/channels/{channel}/join", "channel.join"),
    RestRoute("POST", "/v1/channels/{channel}/leave", "channel.leave"),
    RestRoute("POST", "/v1/channels/{channel}/invite", "channel.invite"),
    RestRoute("GET", "/v1/channels/{channel}/members", "channel.members"),
    RestRoute("POST", "/v1/channels/{channel}/mute", "channel.mute"),
    RestRoute("POST", "/v1/channels/{channel}/unmute", "channel.unmute"),
    RestRoute("GET", "/v1/channels/{channel}/read-status", "channel.read_status"),
    # messages and threads
    RestRoute("POST", "/v1/channels/{channel}/messages", "message.send", 201),
    RestRoute("GET", "/v1/channels/{channel}/messages", "message.list"),
    RestRoute("GET", "/v1/messages/{message_id}", "message.get"),
    RestRoute("POST", "/v1/messages/{message_id}/replies", "thread.reply", 201),
    RestRoute("GET", "/v1/messages/{message_id}/replies", "thread.get"),
    # reactions and reads
    RestRoute("POST", "/v1/messages/{message_id}/reactions", "reaction.add", 201),
    RestRoute("GET", "/v1/messages/{message_id}/reactions", "reaction.list"),
    RestRoute("DELETE", "/v1/messages/{message_id}/reactions/{emoji}", "reaction.remove", 204),
    RestRoute("POST", "/v1/messages/{message_id}/read", "message.read"),
    RestRoute("GET", "/v1/messages/{message_id}/readers", "message.readers"),
    # DMs and group DMs
    RestRoute("POST", "/v1/dm", "dm.send", 201),
    RestRoute("GET", "/v1/dm/conversations", "dm.conversations"),
    RestRoute("POST", "/v1/dm/group", "group_dm.create", 201),
    RestRoute("GET", "/v1/dm/{conversation_id}/messages", "dm.messages"),
    RestRoute("POST", "/v1/dm/{conversation_id}/messages", "group_dm.send", 201),
    RestRoute("POST", "/v1/dm/{conversation_id}/participants", "group_dm.add_participant"),
    RestRoute("DELETE", "/v1/dm/{conversation_id}/participants/{agent_name}",
              "group_dm.remove_participant"),
    # inbox and search
    RestRoute("GET", "/v1/inbox", "inbox.get"),
    RestRoute("GET", "/v1/search", "search"),
    # the delivery mailbox
    RestRoute("GET", "/v1/deliveries", "delivery.list"),
    RestRoute("GET", "/v1/mailboxes", "mailbox.list"),
    RestRoute("POST", "/v1/deliveries/ack", "delivery.ack_up_to"),
    RestRoute("POST", "/v1/deliveries/{delivery_id}/ack", "delivery.ack_one"),
    RestRoute("POST", "/v1/deliveries/{delivery_id}/fail", "delivery.fail"),
    RestRoute("POST", "/v1/deliveries/{delivery_id}/defer", "delivery.defer"),
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

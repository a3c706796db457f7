"""Webhooks in the engine: the transactional outbox, filters, subscriptions, inbound hooks.

Also home of the helpers the other webhook tests share: `Receiver`, a local
HTTP endpoint on 127.0.0.1 port 0 that records what it gets and answers
from a script.
"""

from __future__ import annotations

import base64
from typing import Any, cast

import msgspec
import pytest
import trio

from broker.engine import inbound_hooks, webhook_deliveries
from broker.engine import webhooks as wh
from broker.engine.channels import CreateChannel, JoinChannel, LeaveChannel, MuteChannel
from broker.engine.conversations import CreateGroupDm, SendDm, SendGroupDm
from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.events import record_event
from broker.engine.reactions import AddReaction
from broker.engine.reads import MarkRead
from broker.engine.threads import ReplyToThread
from broker.engine.writer import Tx
from tests.helpers.engine import World
from tests.helpers.webhooks import send, subscribe

# -- a local receiver -------------------------------------------------------------------


# -- helpers ------------------------------------------------------------------------------


def outbox(engine: Engine) -> list[tuple[Any, ...]]:
    return engine.writer.connection.execute(
        "SELECT id, subscription_id, type, payload, state, log_id FROM outbox ORDER BY id"
    ).fetchall()


def count(engine: Engine, table: str) -> int:
    row = engine.writer.connection.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


# -- the transactional outbox ----------------------------------------------------------


async def test_outbox_row_commits_with_message(engine: Engine, world: World) -> None:
    """The outbox row commits with the message."""
    sub = await subscribe(engine, world, ["message.created"])
    message = await send(engine, world, "alice", "hello")
    rows = outbox(engine)
    assert len(rows) == 1
    _, subscription_id, event_type, payload, state, log_id = rows[0]
    assert (str(subscription_id), event_type, state) == (sub.id, "message.created", "pending")
    log = engine.writer.connection.execute(
        "SELECT payload FROM message_log WHERE id = ?", (log_id,)).fetchone()
    assert log is not None and bytes(log[0]) == bytes(payload)
    assert msgspec.json.decode(payload)["data"]["id"] == message.id


class _RecordThenFail(msgspec.Struct, frozen=True):
    """A command that records an event, then fails: nothing of it may remain."""

    workspace_id: int

    def apply(self, tx: Tx) -> None:
        record_event(tx, workspace_id=self.workspace_id, event_type="message.created",
                     data={"text": "never"}, recipients=[])
        raise BrokerError("boom", "failed after recording")


async def test_outbox_no_row_for_failed_command(engine: Engine, world: World) -> None:
    """A failed command leaves no outbox row."""
    await subscribe(engine, world, ["message.created"])
    async with trio.open_nursery() as nursery:
        # In one batch with a good send: the failure must not take it along.
        nursery.start_soon(send, engine, world, "alice", "kept")

        async def failing() -> None:
            with pytest.raises(BrokerError, match="boom"):
                await engine.submit(_RecordThenFail(world.workspace_id))

        nursery.start_soon(failing)
    rows = outbox(engine)
    assert [msgspec.json.decode(r[3])["data"]["text"] for r in rows] == ["kept"]
    assert count(engine, "message_log") == 1


async def test_outbox_no_subscription_no_row(engine: Engine, world: World) -> None:
    """No subscription, no row."""
    await subscribe(engine, world, ["dm.received"])
    await send(engine, world, "alice", "nobody listens to channel messages")
    assert outbox(engine) == []


async def test_outbox_enqueues_every_kind_of_fact(engine: Engine, world: World) -> None:
    """Every kind of fact is enqueued."""
    await subscribe(engine, world, ["*"])
    wid, a = world.workspace_id, world.agents
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=a["alice"], name="ops"))
    await engine.submit(JoinChannel(workspace_id=wid, agent_id=a["bob"], channel="ops"))
    root = await send(engine, world, "alice", "root", channel="ops")
    await engine.submit(ReplyToThread(workspace_id=wid, agent_id=a["bob"], message_id=root.id,
                                      text="reply"))
    await engine.submit(AddReaction(workspace_id=wid, agent_id=a["bob"], message_id=root.id,
                                    emoji="+1"))
    await engine.submit(MarkRead(workspace_id=wid, agent_id=a["bob"], message_id=root.id))
    await engine.submit(SendDm(workspace_id=wid, agent_id=a["alice"], to="bob", text="psst"))
    group = await engine.submit(CreateGroupDm(workspace_id=wid, agent_id=a["alice"],
                                              participants=["bob", "carol"]))
    await engine.submit(SendGroupDm(workspace_id=wid, agent_id=a["alice"],
                                    conversation_id=group.id, text="all"))
    await engine.submit(LeaveChannel(workspace_id=wid, agent_id=a["bob"], channel="ops"))
    types = [r[2] for r in outbox(engine)]
    for expected in ("channel.created", "member.joined", "message.created", "thread.reply",
                     "message.reacted", "message.read", "dm.received", "group_dm.created",
                     "group_dm.received", "member.left"):
        assert expected in types, (expected, types)


async def test_outbox_filters_in_sql(
    engine: Engine, world: World
) -> None:
    """Channel and mention filters are applied in SQL."""
    wid, a = world.workspace_id, world.agents
    await engine.submit(CreateChannel(workspace_id=wid, agent_id=a["alice"], name="ops"))
    ops = await subscribe(engine, world, ["message.created"],
                          filter=wh.SubscriptionFilter(channel="#ops"))
    bob = await subscribe(engine, world, ["message.created", "dm.received"],
                          filter=wh.SubscriptionFilter(mentions="@bob"))
    both = await subscribe(engine, world, ["message.created"],
                           filter=wh.SubscriptionFilter(channel="general", mentions="bob"))
    await send(engine, world, "alice", "in ops", channel="ops")
    await send(engine, world, "alice", "hey @bob in ops", channel="ops")
    await send(engine, world, "alice", "hey @bob in general")
    await send(engine, world, "alice", "plain general")
    await engine.submit(SendDm(workspace_id=wid, agent_id=a["alice"], to="carol",
                               text="@bob is out"))
    got: dict[str, list[str]] = {ops.id: [], bob.id: [], both.id: []}
    for _, subscription_id, _, payload, _, _ in outbox(engine):
        got[str(subscription_id)].append(msgspec.json.decode(payload)["data"]["text"])
    assert got[ops.id] == ["in ops", "hey @bob in ops"]
    assert got[bob.id] == ["hey @bob in ops", "hey @bob in general", "@bob is out"]
    assert got[both.id] == ["hey @bob in general"]


async def test_outbox_ids_are_unique_and_ahead_of_the_allocator(
    engine: Engine, world: World
) -> None:
    for _ in range(3):
        await subscribe(engine, world, ["message.created"])
    await send(engine, world, "alice", "one")
    later = await send(engine, world, "alice", "two")
    ids = [r[0] for r in outbox(engine)]
    assert len(ids) == len(set(ids)) == 6
    # The block of the first send was reserved: the next ids come after it.
    assert max(ids[:3]) < int(later.id)


async def test_outbox_muted_members_and_deleted_subscriptions(engine: Engine, world: World) -> None:
    """Muted members and deleted subscriptions."""
    sub = await subscribe(engine, world, ["message.created"])
    await engine.submit(MuteChannel(workspace_id=world.workspace_id, agent_id=world.agents["bob"],
                                    channel="general"))
    await send(engine, world, "alice", "muted members do not matter to webhooks")
    assert len(outbox(engine)) == 1
    await engine.submit(wh.DeleteSubscription(workspace_id=world.workspace_id,
                                              subscription_id=sub.id))
    assert outbox(engine) == []  # cascaded
    await send(engine, world, "alice", "after the delete")
    assert outbox(engine) == []


# -- subscriptions: validation -----------------------------------------------------------


@pytest.mark.parametrize(("fields", "code"), [
    ({"url": "ftp://example.com/x"}, "invalid_url"),
    ({"url": "not a url"}, "invalid_url"),
    ({"url": "http:///nohost"}, "invalid_url"),
    ({"url": "https://user:pw@example.com/"}, "invalid_url"),
    ({"url": "https://example.com:99999/"}, "invalid_url"),
    ({"url": "https://example.com/" + "a" * 3000}, "invalid_url"),
    ({"events": []}, "invalid_events"),
    ({"events": ["message.created", "message.exploded"]}, "invalid_event_type"),
    # In Relaycast's list, but nothing here edits a message: a subscriber would wait forever.
    ({"events": ["message.updated"]}, "invalid_event_type"),
    ({"filter": wh.SubscriptionFilter(channel="Not A Channel")}, "invalid_filter"),
    ({"filter": wh.SubscriptionFilter(mentions="no spaces allowed")}, "invalid_filter"),
    ({"headers": {"Content-Type": "text/plain"}}, "invalid_headers"),
    ({"headers": {"X-Relay-Signature": "sha256=forged"}}, "invalid_headers"),
    ({"headers": {"webhook-signature": "v1,forged"}}, "invalid_headers"),
    ({"headers": {"X-Evil": "a\r\nHost: other"}}, "invalid_headers"),
    ({"headers": {"bad name": "x"}}, "invalid_headers"),
    ({"headers": {"X-A": "1", "x-a": "2"}}, "invalid_headers"),
    ({"headers": {f"X-H{i}": "v" for i in range(wh.MAX_HEADERS + 1)}}, "headers_too_large"),
    ({"headers": {"X-Big": "v" * (wh.MAX_HEADER_VALUE_CHARS + 1)}}, "headers_too_large"),
    ({"headers": {f"X-H{i}": "v" * 1000 for i in range(10)}}, "headers_too_large"),
    ({"secret": "short"}, "invalid_secret"),
    ({"secret": "whsec_not*base64*at*all"}, "invalid_secret"),
    ({"secret": "whsec_" + base64.b64encode(b"tiny").decode()}, "invalid_secret"),
])
async def test_subscribe_refuses_bad_stores_nothing(
    engine: Engine, world: World, fields: dict[str, Any], code: str
) -> None:
    """Bad subscriptions are refused and store nothing."""
    request: dict[str, Any] = {"url": "https://example.com/hook", "events": ["message.created"],
                               **fields}
    with pytest.raises(BrokerError) as caught:
        await engine.submit(wh.CreateSubscription(workspace_id=world.workspace_id, **request))
    assert caught.value.code == code
    assert count(engine, "webhook_subscriptions") == 0


async def test_subscription_secret_generated_never_listed(engine: Engine, world: World) -> None:
    """A secret is generated and never listed."""
    created = await subscribe(engine, world, ["message.created"],
                              headers={"Authorization": "Bearer abc"})
    assert created.secret.startswith("whsec_")
    assert len(wh.standard_key(created.secret)) == wh.GENERATED_KEY_BYTES
    listed = await engine.read(wh.list_subscriptions, world.workspace_id)
    assert [s.id for s in listed] == [created.id]
    assert "secret" not in msgspec.json.decode(msgspec.json.encode(listed[0]))
    assert listed[0].headers == {"Authorization": "Bearer abc"}
    with pytest.raises(BrokerError) as caught:
        await engine.read(wh.get_subscription, world.workspace_id + 1, created.id)
    assert caught.value.code == "subscription_not_found"


# -- delivery state ----------------------------------------------------------------------


async def test_outbox_attempts_and_dead_letter_replay(
    engine: Engine, world: World
) -> None:
    """Attempts move rows, and replay brings dead letters back."""
    sub = await subscribe(engine, world, ["message.created"])
    await send(engine, world, "alice", "one")
    await send(engine, world, "alice", "two")
    first, second = (r[0] for r in outbox(engine))
    assert await engine.submit(webhook_deliveries.RecordDeliveryAttempt(
        outbox_id=first, attempts=0, outcome="retry", status=500, error="HTTP 500",
        retry_delay_ms=60_000)) == "pending"
    # A stale report (attempts moved on) changes nothing.
    assert await engine.submit(webhook_deliveries.RecordDeliveryAttempt(
        outbox_id=first, attempts=0, outcome="delivered", status=200)) is None
    assert await engine.submit(webhook_deliveries.RecordDeliveryAttempt(
        outbox_id=first, attempts=1, outcome="dead", status=410, error="HTTP 410")) == "dead"
    assert await engine.submit(webhook_deliveries.RecordDeliveryAttempt(
        outbox_id=second, attempts=0, outcome="delivered", status=204)) == "delivered"
    dead = await engine.read(wh.list_dead_letters, world.workspace_id, sub.id, 10)
    assert [(d.id, d.attempts, d.last_status) for d in dead] == [(str(first), 2, 410)]
    assert msgspec.json.decode(dead[0].event)["data"]["text"] == "one"
    replayed = await engine.submit(wh.ReplayDeadLetters(workspace_id=world.workspace_id,
                                                        subscription_id=sub.id))
    assert replayed.replayed == 1
    state = engine.writer.connection.execute(
        "SELECT state, attempts FROM outbox WHERE id = ?", (first,)).fetchone()
    assert state == ("pending", 0)
    batch = await engine.read(webhook_deliveries.due_deliveries, 2**62, [], [], 10)
    assert [r.id for r in batch.rows] == [first]
    assert await engine.submit(webhook_deliveries.PruneDeliveredWebhooks(before_ms=2**62)) == 1


async def test_due_rows_skip_busy_rows_and_saturated_subscriptions(
    engine: Engine, world: World
) -> None:
    a = await subscribe(engine, world, ["message.created"])
    b = await subscribe(engine, world, ["message.created"])
    for i in range(3):
        await send(engine, world, "alice", f"m{i}")
    rows = outbox(engine)
    busy = [rows[0][0]]
    batch = await engine.read(webhook_deliveries.due_deliveries, 2**62, busy, [int(a.id)], 10)
    assert {r.subscription_id for r in batch.rows} == {int(b.id)}
    assert busy[0] not in [r.id for r in batch.rows]


# -- inbound hooks --------------------------------------------------------------------


async def test_inbound_hook_posts_atomically_as_own_agent(
    engine: Engine, world: World
) -> None:
    """An inbound hook posts atomically as its own agent."""
    await subscribe(engine, world, ["message.created", "webhook.received"])
    hook = await engine.submit(inbound_hooks.CreateInboundWebhook(
        workspace_id=world.workspace_id, channel="general", name="GitHub CI"))
    assert hook.token.startswith("wh_live_")
    assert hook.url == f"/v1/hooks/{hook.webhook_id}"
    stored = engine.writer.connection.execute(
        "SELECT token_hash FROM inbound_webhooks").fetchone()
    assert stored is not None and hook.token.encode() not in bytes(stored[0])

    posted = await engine.submit(inbound_hooks.TriggerInboundWebhook(
        webhook_id=hook.webhook_id, token=hook.token, text="build green", source="ci"))
    conn = engine.writer.connection
    row = conn.execute("SELECT agent_id, text, data FROM messages WHERE id = ?",
                       (int(posted.message_id),)).fetchone()
    assert row is not None and row[1] == "build green"
    assert msgspec.json.decode(cast(str, row[2]))["source"] == "ci"
    agent = conn.execute("SELECT name, type FROM agents WHERE id = ?", (row[0],)).fetchone()
    assert agent == (hook.agent_name, "system")
    # Every member got a delivery; the hook's agent is a member of nothing.
    delivered = {r[0] for r in conn.execute(
        "SELECT agent_id FROM deliveries WHERE message_id = ?", (int(posted.message_id),))}
    assert delivered == set(world.agents.values())
    assert conn.execute("SELECT count(*) FROM channel_members WHERE agent_id = ?",
                        (row[0],)).fetchone() == (0,)
    assert sorted(r[2] for r in outbox(engine)) == ["message.created", "webhook.received"]


async def test_inbound_hook_wrong_token_posts_nothing(engine: Engine, world: World) -> None:
    """A wrong hook token posts nothing."""
    hook = await engine.submit(inbound_hooks.CreateInboundWebhook(workspace_id=world.workspace_id,
                                                       channel="general"))
    other = await engine.submit(inbound_hooks.CreateInboundWebhook(workspace_id=world.workspace_id,
                                                        channel="general", name="other"))
    for webhook_id, token in ((hook.webhook_id, other.token), (hook.webhook_id, "wh_live_x"),
                              (hook.webhook_id, "rk_live_x"), ("123", hook.token),
                              ("nope", hook.token)):
        with pytest.raises(BrokerError) as caught:
            await engine.submit(inbound_hooks.TriggerInboundWebhook(
                webhook_id=webhook_id, token=token, text="forged"))
        assert caught.value.code == "invalid_token"
    assert count(engine, "messages") == 0
    await engine.submit(inbound_hooks.DeleteInboundWebhook(workspace_id=world.workspace_id,
                                                webhook_id=hook.webhook_id))
    with pytest.raises(BrokerError) as caught:
        await engine.submit(inbound_hooks.TriggerInboundWebhook(
            webhook_id=hook.webhook_id, token=hook.token, text="after delete"))
    assert caught.value.code == "invalid_token"
    assert [h.name for h in await engine.read(inbound_hooks.list_inbound_webhooks,
                                              world.workspace_id)] == ["other"]


async def test_inbound_hook_retry_with_key_posts_once(
    engine: Engine, world: World
) -> None:
    """A retried trigger with an idempotency key posts once."""
    hook = await engine.submit(inbound_hooks.CreateInboundWebhook(workspace_id=world.workspace_id,
                                                       channel="general"))
    first, second = [
        await engine.submit(inbound_hooks.TriggerInboundWebhook(
            webhook_id=hook.webhook_id, token=hook.token, text="once", idempotency_key="k1"))
        for _ in range(2)
    ]
    assert first == second
    assert count(engine, "messages") == 1
    with pytest.raises(BrokerError) as caught:
        await engine.submit(inbound_hooks.TriggerInboundWebhook(
            webhook_id=hook.webhook_id, token=hook.token, text="other", idempotency_key="k1"))
    assert caught.value.code == "idempotency_key_reused"

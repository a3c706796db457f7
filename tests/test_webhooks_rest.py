"""Webhooks over REST on a live server: subscriptions, dead letters, inbound hooks, bad input,
and one event end to end from a REST send to a local receiver, signed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apsw
import httpx
import pytest
import trio

from broker.config import ConfigError, HttpSettings, ServerSettings, Settings, load_settings
from broker.engine.config import EngineConfig
from broker.server import BrokerServer
from broker.webhooks.settings import WebhookSettings
from broker.webhooks.signing import verify_relay, verify_standard
from tests.helpers.daemon import run_daemon, run_server
from tests.helpers.rest import RestWorld, call, make_rest_world
from tests.helpers.webhooks import Receiver, serving

WEBHOOKS = WebhookSettings(
    allow_hosts=("127.0.0.1",), poll_interval_seconds=0.05, backoff_base_seconds=0.05,
    jitter=0, max_attempts=3, request_timeout_seconds=5,
)


@pytest.fixture
def settings(tmp_path: Path, engine_config: EngineConfig) -> Settings:
    return Settings(
        data_dir=str(tmp_path / "data"), engine=engine_config, server=ServerSettings(workers=1),
        http=HttpSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=0.5),
        webhooks=WEBHOOKS,
    )


@pytest.fixture
async def world(client: httpx.AsyncClient) -> RestWorld:
    return await make_rest_world(client)


def count(server: BrokerServer, table: str) -> int:
    row = server.engine.writer.connection.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


async def wait_outbox(server: BrokerServer, state: str, n: int = 1) -> None:
    while True:
        row = server.engine.writer.connection.execute(
            "SELECT count(*) FROM outbox WHERE state = ?", (state,)).fetchone()
        if row is not None and row[0] >= n:
            return
        await trio.sleep(0.01)


# -- subscriptions ------------------------------------------------------------------------


async def test_subscription_lifecycle(client: httpx.AsyncClient, world: RestWorld) -> None:
    created = await call(client, "POST", "/v1/subscriptions", world.key, json={
        "events": ["message.created", "thread.reply"], "url": "http://127.0.0.1:9/hook",
        "filter": {"channel": "general"}, "headers": {"X-Team": "ops"},
        "secret": "a-shared-secret"})
    assert created.status == 201, created.body
    sub = created.data
    assert sub["secret"] == "a-shared-secret"
    assert sub["filter"] == {"channel": "general"} and sub["is_active"] is True
    listed = await call(client, "GET", "/v1/subscriptions", world.key)
    assert listed.status == 200
    (item,) = listed.data
    assert "secret" not in item
    assert {k: item[k] for k in ("id", "events", "filter", "url", "headers", "is_active")} == {
        "id": sub["id"], "events": ["message.created", "thread.reply"],
        "filter": {"channel": "general"}, "url": "http://127.0.0.1:9/hook",
        "headers": {"X-Team": "ops"}, "is_active": True}
    one = await call(client, "GET", f"/v1/subscriptions/{sub['id']}", world.key)
    assert one.data["id"] == sub["id"] and "secret" not in one.data
    assert (await call(client, "DELETE", f"/v1/subscriptions/{sub['id']}", world.key)).status \
        == 204
    gone = await call(client, "GET", f"/v1/subscriptions/{sub['id']}", world.key)
    assert (gone.status, gone.code) == (404, "subscription_not_found")
    again = await call(client, "DELETE", f"/v1/subscriptions/{sub['id']}", world.key)
    assert (again.status, again.code) == (404, "subscription_not_found")


async def test_subscriptions_need_the_workspace_key(
    client: httpx.AsyncClient, world: RestWorld
) -> None:
    body = {"events": ["message.created"], "url": "http://127.0.0.1:9/hook"}
    as_agent = await call(client, "POST", "/v1/subscriptions", world.tokens["alice"], json=body)
    assert (as_agent.status, as_agent.code) == (403, "forbidden")
    anonymous = await call(client, "POST", "/v1/subscriptions", json=body)
    assert anonymous.status == 401
    other = await make_rest_world(client, name="other")
    mine = await call(client, "POST", "/v1/subscriptions", world.key, json=body)
    theirs = await call(client, "GET", f"/v1/subscriptions/{mine.data['id']}", other.key)
    assert (theirs.status, theirs.code) == (404, "subscription_not_found")


@pytest.mark.parametrize(("body", "code"), [
    ({"url": "javascript:alert(1)"}, "invalid_url"),
    ({"url": "http://"}, "invalid_url"),
    ({"url": "http://10.0.0.5/hook"}, "destination_refused"),
    ({"url": "http://169.254.169.254/latest/meta-data/"}, "destination_refused"),
    ({"url": "http://localhost:8080/hook"}, "destination_refused"),
    ({"url": "http://[::1]:8080/hook"}, "destination_refused"),
    ({"url": "http://192.168.0.10/hook"}, "destination_refused"),
    # IPv6 forms that carry 169.254.169.254 (or loopback) to a translator or tunnel
    ({"url": "http://[64:ff9b::a9fe:a9fe]/"}, "destination_refused"),
    ({"url": "http://[64:ff9b:1::a9fe:a9fe]/"}, "destination_refused"),
    ({"url": "http://[2002:a9fe:a9fe::]/"}, "destination_refused"),
    ({"url": "http://[::ffff:a9fe:a9fe]/"}, "destination_refused"),
    ({"url": "http://[::169.254.169.254]/"}, "destination_refused"),
    ({"url": "http://[::10.0.0.1]:8080/"}, "destination_refused"),
    ({"url": "http://[2001:0:4136:e378:8000:63bf:5601:5601]/"}, "destination_refused"),
    ({"events": ["message.created", "no.such.event"]}, "invalid_event_type"),
    ({"events": []}, "invalid_events"),
    ({"events": None}, "invalid_request"),
    ({"headers": {"X-Big": "x" * 5000}}, "headers_too_large"),
    ({"headers": {f"X-N{i}": "v" for i in range(50)}}, "headers_too_large"),
    ({"headers": {"Content-Type": "text/plain"}}, "invalid_headers"),
    ({"headers": {"X-Relay-Signature": "sha256=00"}}, "invalid_headers"),
    ({"headers": {"X-Num": 5}}, "invalid_request"),
    ({"filter": {"channel": "general", "sender": "x"}}, "invalid_request"),
    ({"secret": "short"}, "invalid_secret"),
])
async def test_subscriptions_bad_400_store_nothing(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld, body: dict[str, Any],
    code: str,
) -> None:
    """Bad subscriptions get 400 and store nothing."""
    request = {"events": ["message.created"], "url": "http://127.0.0.1:9/hook", **body}
    reply = await call(client, "POST", "/v1/subscriptions", world.key, json=request)
    assert (reply.status, reply.code) == (400, code), reply.body
    assert (await call(client, "GET", "/v1/subscriptions", world.key)).data == []
    assert count(server, "webhook_subscriptions") == 0


# -- end to end -------------------------------------------------------------------------


async def test_rest_send_reaches_receiver_signed(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """A REST send reaches the receiver, signed."""
    async with serving(Receiver()) as receiver:
        sub = await call(client, "POST", "/v1/subscriptions", world.key, json={
            "events": ["message.created"], "url": receiver.url})
        secret = sub.data["secret"]
        sent = await call(client, "POST", "/v1/channels/general/messages",
                          world.tokens["alice"], json={"text": "to the outside"})
        assert sent.status == 201
        (got,) = await receiver.wait_for(1)
        await wait_outbox(server, "delivered")
    body = got.json()
    assert body["type"] == "message.created" and body["data"]["id"] == sent.data["id"]
    assert body["workspace_id"] == world.workspace_id
    assert verify_relay(secret, got.body, got.headers["x-relay-signature"])
    assert verify_standard(secret, got.headers, got.body)


async def test_dead_letters_are_listed_and_replayed(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    async with serving(Receiver(statuses=[410])) as receiver:
        sub = (await call(client, "POST", "/v1/subscriptions", world.key, json={
            "events": ["message.created"], "url": receiver.url})).data
        await call(client, "POST", "/v1/channels/general/messages", world.tokens["alice"],
                   json={"text": "refused once"})
        await wait_outbox(server, "dead")
        path = f"/v1/subscriptions/{sub['id']}/dead-letters"
        (letter,) = (await call(client, "GET", path, world.key)).data
        assert letter["type"] == "message.created" and letter["last_status"] == 410
        assert letter["event"]["data"]["text"] == "refused once"
        listed = await call(client, "GET", f"/v1/subscriptions/{sub['id']}", world.key)
        assert listed.data["dead_letters"] == 1
        replay = await call(client, "POST", path + "/replay", world.key, json={})
        assert replay.data == {"subscription_id": sub["id"], "replayed": 1}
        await receiver.wait_for(2)
        await wait_outbox(server, "delivered")
    assert (await call(client, "GET", path, world.key)).data == []


# -- inbound hooks --------------------------------------------------------------------


async def test_inbound_hook_posts_into_its_channel(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """An inbound hook posts into its channel."""
    created = await call(client, "POST", "/v1/webhooks", world.key,
                         json={"channel": "general", "name": "CI"})
    assert created.status == 201, created.body
    hook = created.data
    assert hook["token"].startswith("wh_live_") and hook["url"] == f"/v1/hooks/{hook['webhook_id']}"
    (listed,) = (await call(client, "GET", "/v1/webhooks", world.key)).data
    assert listed["id"] == hook["webhook_id"] and "token" not in listed

    posted = await call(client, "POST", hook["url"], hook["token"],
                        json={"text": "deploy finished @bob", "source": "ci"})
    assert posted.status == 201, posted.body
    assert posted.data["channel"] == "general" and posted.data["source"] == "ci"
    # Any other body is taken whole as the payload; ?token= works too.
    bare = await call(client, "POST", hook["url"], params={"token": hook["token"]},
                      json={"action": "opened", "number": 7})
    assert bare.status == 201 and bare.data["text"].startswith("Webhook CI: {")
    rows = server.engine.writer.connection.execute(
        "SELECT m.text, a.name, m.mentions FROM messages m JOIN agents a ON a.id = m.agent_id"
        " JOIN channels c ON c.id = m.channel_id WHERE c.name = 'general' ORDER BY m.id"
    ).fetchall()
    assert [tuple(r) for r in rows] == [
        ("deploy finished @bob", "hook.CI", '["bob"]'), (bare.data["text"], "hook.CI", None)]


async def test_inbound_hook_wrong_token_401(
    server: BrokerServer, client: httpx.AsyncClient, world: RestWorld
) -> None:
    """A wrong hook token is 401 and posts nothing."""
    hook = (await call(client, "POST", "/v1/webhooks", world.key,
                       json={"channel": "general"})).data
    before = count(server, "messages")
    for token in (None, "wh_live_wrong", world.key, world.tokens["alice"]):
        reply = await call(client, "POST", hook["url"], token, json={"text": "forged"})
        assert reply.status == 401, (token, reply.body)
        assert reply.code in ("unauthorized", "invalid_token")
    unknown = await call(client, "POST", "/v1/hooks/12345", hook["token"], json={"text": "x"})
    assert (unknown.status, unknown.code) == (401, "invalid_token")
    assert count(server, "messages") == before
    assert (await call(client, "DELETE", f"/v1/webhooks/{hook['webhook_id']}",
                       world.key)).status == 204
    after = await call(client, "POST", hook["url"], hook["token"], json={"text": "late"})
    assert after.status == 401
    assert count(server, "messages") == before


async def test_inbound_hook_missing_channel_404(
    client: httpx.AsyncClient, world: RestWorld
) -> None:
    """A hook on a missing channel is 404."""
    reply = await call(client, "POST", "/v1/webhooks", world.key, json={"channel": "nope"})
    assert (reply.status, reply.code) == (404, "channel_not_found")


# -- configuration --------------------------------------------------------------------


def test_allow_hosts_come_from_the_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[webhooks]\nallow_hosts = ["10.0.0.0/8"]\nmax_attempts = 4\n')
    assert load_settings(config).webhooks.allow_hosts == ("10.0.0.0/8",)
    # the environment takes precedence over the file (broker.config)
    monkeypatch.setenv("BROKER_WEBHOOKS_ALLOW_HOSTS", "127.0.0.1, hooks.internal")
    settings = load_settings(config)
    assert settings.webhooks.allow_hosts == ("127.0.0.1", "hooks.internal")
    assert settings.webhooks.max_attempts == 4
    monkeypatch.setenv("BROKER_WEBHOOKS_ALLOW_HOSTS", "10.0.0.0/99")
    with pytest.raises(ConfigError, match="BROKER_WEBHOOKS_ALLOW_HOSTS"):
        load_settings(config)
    config.write_text('[webhooks]\nconcurrency = 2\nper_subscription_concurrency = 3\n')
    monkeypatch.delenv("BROKER_WEBHOOKS_ALLOW_HOSTS")
    with pytest.raises(ConfigError):
        load_settings(config)


# -- a graceful stop ------------------------------------------------------------------


async def test_dispatcher_stop_skips_hanging_endpoint(settings: Settings) -> None:
    """A stop does not wait on a hanging endpoint."""
    # The request would take request_timeout (5 s); the stop takes the grace (0.5 s).
    async with serving(Receiver(hang=True)) as receiver:
        with trio.fail_after(settings.webhooks.request_timeout_seconds):
            async with run_server(settings) as server:
                assert server.url is not None
                async with httpx.AsyncClient(base_url=server.url) as client:
                    world = await make_rest_world(client)
                    await call(client, "POST", "/v1/subscriptions", world.key, json={
                        "events": ["message.created"], "url": receiver.url})
                    await call(client, "POST", "/v1/channels/general/messages",
                               world.tokens["alice"], json={"text": "in flight at stop"})
                await receiver.wait_for(1)
                server.stop()
    # The attempt was cut short: the event is still pending, for the next start.
    conn = apsw.Connection(str(Path(settings.data_dir) / "broker.db"))
    try:
        assert conn.execute("SELECT state, attempts FROM outbox").fetchall() == [("pending", 0)]
    finally:
        conn.close()


# -- kill -9 between commit and dispatch ---------------------------------------------


async def test_dispatcher_events_survive_kill_9(tmp_path: Path) -> None:
    """Events survive kill -9 between commit and dispatch."""
    fast = "poll_interval_seconds = 0.05\nbackoff_base_seconds = 0.05\njitter = 0\n"
    off, on = tmp_path / "off.toml", tmp_path / "on.toml"
    off.write_text(f"[webhooks]\nenabled = false\n{fast}")
    on.write_text(f"[webhooks]\n{fast}")
    env = {"BROKER_WEBHOOKS_ALLOW_HOSTS": "127.0.0.1"}
    data = tmp_path / "data"
    with trio.fail_after(60):
        async with serving(Receiver(hang=True)) as receiver:
            # 1: committed with no dispatcher running, then SIGKILL.
            async with run_daemon(data, "--config", str(off), env=env) as daemon, \
                    httpx.AsyncClient(base_url=daemon.url) as client:
                world = await make_rest_world(client)
                sub = await call(client, "POST", "/v1/subscriptions", world.key, json={
                    "events": ["message.created"], "url": receiver.url})
                first = await call(client, "POST", "/v1/channels/general/messages",
                                   world.tokens["alice"], json={"text": "before the kill"})
                assert first.status == 201
                daemon.kill()
                await daemon.process.wait()
            # 2: sent, never answered, SIGKILL before the outcome is recorded.
            async with run_daemon(data, "--config", str(on), env=env) as daemon:
                await receiver.wait_for(1)
                daemon.kill()
                await daemon.process.wait()
            receiver.hang = False
            # 3: delivered after the restart.
            async with run_daemon(data, "--config", str(on), env=env) as daemon, \
                    httpx.AsyncClient(base_url=daemon.url) as client:
                await receiver.wait_for(2)
                path = f"/v1/subscriptions/{sub.data['id']}"
                while True:  # the daemon is another process: poll its counts
                    if not (await call(client, "GET", path, world.key)).data["pending"]:
                        break
                    await trio.sleep(0.02)
    hung, delivered = receiver.requests[:2]
    assert delivered.json()["data"]["id"] == first.data["id"]
    assert delivered.headers["x-relay-delivery"] == hung.headers["x-relay-delivery"]


@pytest.mark.parametrize(("params", "code"), [
    ({"before": "abc"}, "invalid_cursor"),
    ({"before": ""}, "invalid_cursor"),
    ({"before": "-1"}, "invalid_cursor"),
    ({"before": "9999999999999999999"}, "invalid_cursor"),
    ({"limit": 0}, "invalid_limit"),
    ({"limit": "many"}, "invalid_request"),
])
async def test_dead_letters_list_refuses_a_malformed_cursor(
    client: httpx.AsyncClient, world: RestWorld, params: dict[str, Any], code: str,
) -> None:
    """A cursor that is not a dead letter id is a 400, not the whole list."""
    sub = await call(client, "POST", "/v1/subscriptions", world.key,
                     json={"events": ["message.created"], "url": "http://127.0.0.1:9/hook"})
    path = f"/v1/subscriptions/{sub.data['id']}/dead-letters"
    reply = await call(client, "GET", path, world.key, params=params)
    assert (reply.status, reply.code) == (400, code), reply.body
    assert (await call(client, "GET", path, world.key, params={"before": "1"})).data == []

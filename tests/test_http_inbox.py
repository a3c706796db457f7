"""REST: inbox, search and the delivery mailbox."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.rest import call, make_rest_world

GENERAL = "/v1/channels/general/messages"


async def test_inbox_counts_unread_and_mentions(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client)
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    sent = await call(client, "POST", GENERAL, alice, json={"text": "ping @bob"})
    await call(client, "POST", "/v1/dm", alice, json={"to": "bob", "text": "dm"})
    await call(client, "POST", f"/v1/messages/{sent.data['id']}/reactions", bob,
               json={"emoji": "ok"})
    box = await call(client, "GET", "/v1/inbox", bob)
    assert box.status == 200
    assert [(c["channel_name"], c["unread_count"]) for c in box.data["unread_channels"]] == [
        ("general", 1)]
    assert [m["id"] for m in box.data["mentions"]] == [sent.data["id"]]
    assert [(d["from"], d["unread_count"]) for d in box.data["unread_dms"]] == [("alice", 1)]
    reactions = (await call(client, "GET", "/v1/inbox", alice, params={"limit": 5})).data
    assert [(r["emoji"], r["agent_name"]) for r in reactions["recent_reactions"]] == [
        ("ok", "bob")]
    bad = await call(client, "GET", "/v1/inbox", bob, params={"limit": 0})
    assert (bad.status, bad.code) == (400, "invalid_limit")


async def test_search_finds_what_the_agent_may_read(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client)
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    await call(client, "POST", GENERAL, alice, json={"text": "deploy the rocket"})
    await call(client, "POST", "/v1/channels", alice, json={"name": "secret"})
    await call(client, "POST", "/v1/channels/secret/messages", alice,
               json={"text": "rocket codes"})
    mine = await call(client, "GET", "/v1/search", alice, params={"q": "rocket"})
    assert mine.status == 200
    assert sorted(r["text"] for r in mine.data) == ["deploy the rocket", "rocket codes"]
    assert all("relevance_score" in r for r in mine.data)
    theirs = await call(client, "GET", "/v1/search", bob, params={"q": "rocket"})
    assert [r["text"] for r in theirs.data] == ["deploy the rocket"]
    by_author = await call(client, "GET", "/v1/search", bob,
                           params={"q": "rocket", "from": "carol"})
    assert by_author.data == []
    in_channel = await call(client, "GET", "/v1/search", alice,
                            params={"q": "rocket", "channel": "secret", "limit": 1})
    assert [r["text"] for r in in_channel.data] == ["rocket codes"]
    empty = await call(client, "GET", "/v1/search", alice, params={"q": " "})
    assert (empty.status, empty.code) == (400, "invalid_query")
    no_q = await call(client, "GET", "/v1/search", alice)
    assert (no_q.status, no_q.code) == (400, "invalid_request")


async def test_deliveries_list_ack_fail_defer(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    texts = ["one", "two", "three", "four"]
    for text in texts:
        await call(client, "POST", GENERAL, alice, json={"text": text})
    listed = await call(client, "GET", "/v1/deliveries", bob)
    assert listed.status == 200
    items = listed.data
    assert [i["seq"] for i in items] == [1, 2, 3, 4]
    assert [i["message"]["text"] for i in items] == texts
    assert items[0]["status"] == "queued"
    assert items[0]["type"] == "message.created"
    assert items[0]["payload"]["data"]["text"] == "one"
    first, second, third, _ = (i["id"] for i in items)

    acked = await call(client, "POST", f"/v1/deliveries/{first}/ack", bob)
    assert acked.status == 200
    assert (acked.data["state"], acked.data["changed"]) == ("acked", True)
    again = await call(client, "POST", f"/v1/deliveries/{first}/ack", bob)
    assert again.data["changed"] is False

    failed = await call(client, "POST", f"/v1/deliveries/{second}/fail", bob,
                        json={"error": "boom", "retryable": True})
    assert failed.data["state"] == "failed"
    only_failed = await call(client, "GET", "/v1/deliveries", bob, params={"status": "failed"})
    assert [i["id"] for i in only_failed.data] == [second]

    deferred = await call(client, "POST", f"/v1/deliveries/{third}/defer", bob,
                          json={"available_at": "2000-01-01T00:00:00Z", "reason": "later"})
    assert deferred.status == 200
    assert deferred.data["state"] == "queued"
    listed = await call(client, "GET", "/v1/deliveries", bob, params={"limit": 2})
    assert [i["seq"] for i in listed.data] == [2, 3]
    assert listed.data[1]["available_at"] == "2000-01-01T00:00:00.000Z"

    # The cumulative ack holds what bob failed or deferred; those are acked one by one.
    cumulative = await call(client, "POST", "/v1/deliveries/ack", bob, json={"up_to_seq": 99})
    assert cumulative.data == {"acked": 1, "acked_seq": 1, "changed": True}
    held = (await call(client, "GET", "/v1/deliveries", bob)).data
    assert [(i["id"], i["status"]) for i in held] == [(second, "failed"), (third, "queued")]
    for one in (second, third):
        await call(client, "POST", f"/v1/deliveries/{one}/ack", bob)
    assert (await call(client, "GET", "/v1/deliveries", bob)).data == []


async def test_delivery_errors(client: httpx.AsyncClient) -> None:
    world = await make_rest_world(client, agents=("alice", "bob"))
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    await call(client, "POST", GENERAL, alice, json={"text": "x"})
    (item,) = (await call(client, "GET", "/v1/deliveries", bob)).data
    stolen = await call(client, "POST", f"/v1/deliveries/{item['id']}/ack", alice)
    assert (stolen.status, stolen.code) == (404, "delivery_not_found")
    garbage = await call(client, "POST", "/v1/deliveries/garbage/fail", bob, json={})
    assert (garbage.status, garbage.code) == (404, "delivery_not_found")
    when = await call(client, "POST", f"/v1/deliveries/{item['id']}/defer", bob,
                      json={"available_at": "next tuesday"})
    assert (when.status, when.code) == (400, "invalid_available_at")
    no_when = await call(client, "POST", f"/v1/deliveries/{item['id']}/defer", bob, json={})
    assert (no_when.status, no_when.code) == (400, "invalid_request")
    negative = await call(client, "POST", "/v1/deliveries/ack", bob, json={"up_to_seq": -1})
    assert (negative.status, negative.code) == (400, "invalid_seq")
    status = await call(client, "GET", "/v1/deliveries", bob, params={"status": "bogus"})
    assert (status.status, status.code) == (400, "invalid_request")
    long_error = await call(client, "POST", f"/v1/deliveries/{item['id']}/fail", bob,
                            json={"error": "e" * 5000})
    assert (long_error.status, long_error.code) == (400, "invalid_error")


async def test_deliveries_list_acked_and_dead_lettered_newest_first(
    client: httpx.AsyncClient,
) -> None:
    """The final states of the Relaycast contract are listed, newest first, paged with `before`."""
    world = await make_rest_world(client, agents=("alice", "bob"))
    alice, bob = world.tokens["alice"], world.tokens["bob"]
    for text in ("one", "two", "three", "four", "five"):
        await call(client, "POST", GENERAL, alice, json={"text": text})
    ids = [i["id"] for i in (await call(client, "GET", "/v1/deliveries", bob)).data]
    await call(client, "POST", f"/v1/deliveries/{ids[3]}/fail", bob,
               json={"error": "poison", "retryable": False})
    await call(client, "POST", "/v1/deliveries/ack", bob, json={"up_to_seq": 3})

    acked = await call(client, "GET", "/v1/deliveries", bob, params={"status": "acked"})
    assert acked.status == 200, acked.body
    assert [(i["seq"], i["status"]) for i in acked.data] == [
        (3, "acked"), (2, "acked"), (1, "acked")]
    assert [i["message"]["text"] for i in acked.data] == ["three", "two", "one"]
    first = await call(client, "GET", "/v1/deliveries", bob,
                       params={"status": "acked", "limit": 2})
    assert [i["seq"] for i in first.data] == [3, 2]
    rest = await call(client, "GET", "/v1/deliveries", bob,
                      params={"status": "acked", "limit": 2, "before": first.data[-1]["id"]})
    assert [i["seq"] for i in rest.data] == [1]
    dead = await call(client, "GET", "/v1/deliveries", bob, params={"status": "dead_lettered"})
    assert [(i["id"], i["status"]) for i in dead.data] == [(ids[3], "dead_lettered")]
    # The pending list is unchanged: only what is still unacked.
    pending = await call(client, "GET", "/v1/deliveries", bob)
    assert [i["seq"] for i in pending.data] == [5]
    # Alice received nothing: her lists are empty, not bob's.
    theirs = await call(client, "GET", "/v1/deliveries", alice, params={"status": "acked"})
    assert theirs.data == []


@pytest.mark.parametrize(("params", "code"), [
    ({"limit": 0}, "invalid_limit"),
    ({"limit": -1}, "invalid_limit"),
    ({"limit": 1001}, "invalid_limit"),
    ({"limit": "abc"}, "invalid_request"),
    ({"limit": 1.5}, "invalid_request"),
    ({"status": "bogus"}, "invalid_request"),
    ({"status": "acked", "limit": 0}, "invalid_limit"),
    ({"status": "failed", "limit": 0}, "invalid_limit"),
    ({"after_seq": "abc"}, "invalid_request"),
    ({"after_seq": -1}, "invalid_seq"),
    ({"status": "acked", "before": "abc"}, "invalid_cursor"),
    ({"status": "acked", "before": "1"}, "invalid_cursor"),
    ({"status": "acked", "before": "1:99999999999999999999"}, "invalid_cursor"),
    ({"status": "acked", "after_seq": 1}, "invalid_cursor"),
    ({"before": "1:1"}, "invalid_cursor"),
])
async def test_deliveries_list_refuses_bad_queries_while_deliveries_wait(
    client: httpx.AsyncClient, params: dict[str, object], code: str,
) -> None:
    """A bad page size or cursor is a 400, never an empty mailbox (limit=0 used to be `[]`)."""
    world = await make_rest_world(client, agents=("alice", "bob"))
    await call(client, "POST", GENERAL, world.tokens["alice"], json={"text": "waiting"})
    reply = await call(client, "GET", "/v1/deliveries", world.tokens["bob"], params=params)
    assert (reply.status, reply.code) == (400, code), reply.body


async def test_deliveries_cursor_of_another_agents_mailbox_is_refused(
    client: httpx.AsyncClient,
) -> None:
    world = await make_rest_world(client, agents=("alice", "bob", "carol"))
    alice, bob, carol = (world.tokens[n] for n in ("alice", "bob", "carol"))
    await call(client, "POST", GENERAL, alice, json={"text": "x"})
    (item,) = (await call(client, "GET", "/v1/deliveries", bob)).data
    await call(client, "POST", "/v1/deliveries/ack", carol, json={"up_to_seq": 1})
    stolen = await call(client, "GET", "/v1/deliveries", carol,
                        params={"status": "acked", "before": item["id"]})
    assert (stolen.status, stolen.code) == (400, "invalid_cursor")
    # Huge seqs and after_seq past every seq are answered, not a 500.
    far = await call(client, "GET", "/v1/deliveries", bob, params={"after_seq": 2**70})
    assert (far.status, far.data) == (200, [])
    huge = await call(client, "POST", f"/v1/deliveries/{world.agents['bob']}:{2**63}/ack", bob)
    assert (huge.status, huge.code) == (404, "delivery_not_found")

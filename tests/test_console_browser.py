"""The web console in a real browser (Playwright driving the system's chromium).

Lean on purpose: one browser for the session, a few scenarios per page load.
Screenshots of the main views go to build/console-screenshots/ (gitignored);
two of them are committed under docs/ for the README.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from broker.client import connect
from broker.config import HttpSettings, ServerSettings, Settings
from broker.engine.config import EngineConfig
from broker.server import BrokerServer
from broker.webhooks.settings import WebhookSettings
from tests.helpers.browser import BrowserThread, require_browser, screenshot
from tests.helpers.daemon import run_server
from tests.helpers.realtime import ws_url
from tests.helpers.rest import RestWorld, call, make_rest_world, uploaded
from tests.helpers.webhooks import Receiver, serving

KEY_STORAGE = "broker.console.key"
DEADLINE_S = 60
XSS = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2"> hi'
LONG = "long " * 1900 + "x" * 500  # ends with a word longer than any screen

WEBHOOKS = WebhookSettings(
    allow_hosts=("127.0.0.1",), poll_interval_seconds=0.05, backoff_base_seconds=0.05,
    jitter=0, max_attempts=3, request_timeout_seconds=5,
)


@pytest.fixture(scope="session")
def browser() -> Iterator[BrowserThread]:
    require_browser()
    thread = BrowserThread()
    thread.start()
    yield thread
    thread.close()


@pytest.fixture
def settings(tmp_path: Path, engine_config: EngineConfig, workers: int) -> Settings:
    return Settings(
        data_dir=str(tmp_path / "data"), engine=engine_config,
        server=ServerSettings(workers=workers),
        http=HttpSettings(host="127.0.0.1", port=0, shutdown_grace_seconds=0.5),
        webhooks=WEBHOOKS,
    )


@pytest.fixture
async def world(client: httpx.AsyncClient) -> RestWorld:
    world = await make_rest_world(client)
    for name in ("bob", "carol"):
        joined = await call(client, "POST", "/v1/channels/general/join", world.tokens[name])
        assert joined.status == 200, joined.body
    return world


@pytest.fixture
async def page(browser: BrowserThread) -> AsyncIterator[Any]:
    page = await browser.new_page()
    try:
        yield page
    finally:
        await browser.close_page(page)


def stored_key(page: Any) -> Any:
    return page.evaluate(f"sessionStorage.getItem({KEY_STORAGE!r})")


async def post(client: httpx.AsyncClient, token: str, text: str, **body: Any) -> dict[str, Any]:
    sent = await call(client, "POST", "/v1/channels/general/messages", token,
                      json={"text": text, **body})
    assert sent.status == 201, sent.body
    return dict(sent.data)


# -- sign in by form, history, threads, reactions, attachments, live, markup as text ----------


@pytest.mark.both_process_models
async def test_console_form_refuses_bad_keys_then_shows_history_threads_and_live_messages(
    browser: BrowserThread, page: Any, server: BrokerServer, client: httpx.AsyncClient,
    world: RestWorld, caplog: pytest.LogCaptureFixture,
) -> None:
    """Sign in by form (a wrong key and an agent token are refused, nothing stored); the
    channel's history with a thread, a reaction, an attachment, a long text and markup shown
    as text; then a message sent over the native WebSocket, a reply and a reaction arrive live.
    The key never appears in a log line.
    """
    from playwright.sync_api import expect

    caplog.set_level(logging.DEBUG)

    alice, bob = world.tokens["alice"], world.tokens["bob"]
    file = await uploaded(client, alice, b"the quarterly numbers\n", filename="numbers.txt")
    first = await post(client, alice, "first: deploying at noon", attachments=[file["id"]])
    await call(client, "POST", f"/v1/messages/{first['id']}/replies", bob,
               json={"text": "ack from bob"})
    await call(client, "POST", f"/v1/messages/{first['id']}/reactions", bob,
               json={"emoji": "rocket"})
    await post(client, bob, XSS)
    await post(client, alice, LONG)
    url = server.url

    def sign_in() -> None:
        page.goto(url)
        expect(page.locator("#signin-form")).to_be_visible()
        page.fill("#key-input", "rk_live_not-a-real-key")
        page.click("#signin-submit")
        expect(page.locator("#signin-error")).to_contain_text("refused this key")
        assert stored_key(page) is None
        page.fill("#key-input", world.tokens["carol"])
        page.press("#key-input", "Enter")
        expect(page.locator("#signin-error")).to_contain_text("not a workspace key")
        assert stored_key(page) is None
        page.fill("#key-input", world.key)
        page.click("#signin-submit")
        expect(page.locator("#app")).to_be_visible()
        expect(page.locator("#workspace-name")).to_have_text("acme")
        expect(page.locator("#connection")).to_have_text("live")
        assert stored_key(page) == world.key

    def history() -> None:
        messages = page.locator("#pane-body .messages > li.message")
        expect(messages).to_have_count(3)
        first_node = page.locator(f'li.message[data-id="{first["id"]}"]')
        expect(first_node.locator(".text")).to_have_text("first: deploying at noon")
        expect(first_node.locator('.reaction[data-emoji="rocket"] .count')).to_have_text("1")
        # The attachment links to the file's signed URL, which gives the bytes.
        link = first_node.locator("a.attachment")
        expect(link).to_have_attribute("href", re.compile(r"/v1/files/\d+/content\?token="))
        body = page.evaluate("(href) => fetch(href).then((r) => r.text())",
                             link.get_attribute("href"))
        assert body == "the quarterly numbers\n"
        # Markup in a message is shown as its characters; nothing of it runs.
        xss = messages.nth(1).locator(".text")
        expect(xss).to_have_text(XSS)
        assert page.evaluate("window.__pwned") is None
        assert page.locator("#pane-body script, #pane-body img").count() == 0
        # The thread opens in place.
        toggle = first_node.locator(".replies-toggle")
        expect(toggle).to_have_text("1 reply")
        toggle.click()
        expect(first_node.locator(".replies .text")).to_have_text(["ack from bob"])
        # A long text is folded until asked for.
        long_text = messages.nth(2).locator(".text")
        assert len(long_text.text_content() or "") == 801  # 800 and an ellipsis
        screenshot(page, "conversations")
        messages.nth(2).get_by_role("button", name=re.compile("Show all")).click()
        expect(long_text).to_have_text(LONG)
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280

    def live_arrived(text: str) -> None:
        expect(page.locator("#pane-body .messages > li.message .text").last).to_have_text(text)

    def reply_and_reaction_arrived() -> None:
        first_node = page.locator(f'li.message[data-id="{first["id"]}"]')
        expect(first_node.locator(".replies .text")).to_have_text(
            ["ack from bob", "second reply, live"])
        expect(first_node.locator(".replies-toggle")).to_have_text("2 replies")
        expect(first_node.locator('.reaction[data-emoji="eyes"] .count')).to_have_text("1")
        assert page.errors == []

    with trio.fail_after(DEADLINE_S):
        await browser.run(sign_in)
        await browser.run(history)
        async with connect(ws_url(server), alice) as agent:
            await agent.request("message.send", channel="general", text="over the socket")
            await browser.run(live_arrived, "over the socket")
        await call(client, "POST", f"/v1/messages/{first['id']}/replies", bob,
                   json={"text": "second reply, live"})
        await call(client, "POST", f"/v1/messages/{first['id']}/reactions",
                   world.tokens["carol"], json={"emoji": "eyes"})
        await browser.run(reply_and_reaction_arrived)

        def phone() -> None:
            page.set_viewport_size({"width": 390, "height": 844})
            expect(page.locator("#channel-list")).to_be_visible()
            # Readable at phone width: nothing wider than the screen (long words wrap).
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            screenshot(page, "conversations-phone")

        await browser.run(phone)
    assert caplog.records and world.key not in caplog.text


# -- sign in by fragment, presence, mailboxes, rotate and deactivate ---------------------


async def test_console_fragment_sign_in_presence_flips_live_and_agent_actions_confirm(
    browser: BrowserThread, page: Any, server: BrokerServer, client: httpx.AsyncClient,
    world: RestWorld,
) -> None:
    """The key in the fragment signs in and leaves the address bar at once; bob's presence
    flips when he connects (through the socket alone: the page's REST refreshes are cut);
    the mailbox shows his pending delivery; rotate shows the new token once; deactivate
    asks first, and Cancel changes nothing."""
    from playwright.sync_api import expect

    await post(client, world.tokens["alice"], "for bob's mailbox")
    url = server.url

    def sign_in_and_open_agents() -> None:
        page.goto(f"{url}/#key={world.key}")
        expect(page.locator("#app")).to_be_visible()
        assert "#" not in page.url and world.key not in page.url
        assert stored_key(page) == world.key
        page.click("#tab-agents")
        bob_row = page.locator('tr[data-agent="bob"]')
        expect(bob_row.locator(".presence")).to_have_text("offline")
        expect(bob_row.locator('[data-field="pending"]')).to_have_text("1")
        # From here on only the socket can change what the table shows.
        page.route(re.compile(r".*/v1/(mailboxes|agents)(\?.*)?$"), lambda route: route.abort())

    def bob_online() -> None:
        expect(page.locator('tr[data-agent="bob"] .presence')).to_have_text("online")

    def bob_offline() -> None:
        expect(page.locator('tr[data-agent="bob"] .presence')).to_have_text("offline")
        page.unroute(re.compile(r".*/v1/(mailboxes|agents)(\?.*)?$"))
        screenshot(page, "agents")

    def rotate() -> str:
        page.get_by_role("button", name="Rotate bob's token").click()
        expect(page.locator("#confirm")).to_be_visible()
        page.click("#confirm-ok")
        secret = page.locator("#secret-value")
        expect(secret).to_have_text(re.compile(r"^at_live_"))
        token = secret.text_content() or ""
        page.get_by_role("button", name="Done").click()
        expect(page.locator("#secret")).to_be_hidden()
        expect(page.locator("#secret-value")).to_have_text("")  # shown once
        return token

    def deactivate_carol(confirm: bool) -> None:
        page.get_by_role("button", name="Deactivate carol").click()
        expect(page.locator("#confirm-title")).to_have_text("Deactivate carol?")
        page.get_by_role("button", name="Cancel" if not confirm else "Deactivate").last.click()
        row = page.locator('tr[data-agent="carol"]')
        if confirm:
            expect(row).to_have_count(0)
        else:
            expect(row).to_have_count(1)

    with trio.fail_after(DEADLINE_S):
        await browser.run(sign_in_and_open_agents)
        async with connect(ws_url(server), world.tokens["bob"]):
            await browser.run(bob_online)
        await browser.run(bob_offline)
        token = await browser.run(rotate)
        me = await call(client, "GET", "/v1/agent", token)
        assert (me.status, me.data["name"]) == (200, "bob")
        await browser.run(deactivate_carol, False)
        assert (await call(client, "GET", "/v1/agent", world.tokens["carol"])).status == 200
        await browser.run(deactivate_carol, True)
        gone = await call(client, "GET", "/v1/agent", world.tokens["carol"])
        assert (gone.status, gone.code) == (401, "invalid_token")


# -- webhooks: a dead letter replayed from the page; the health charts --------------------


async def wait_outbox(server: BrokerServer, state: str) -> None:
    while True:
        row = server.engine.writer.connection.execute(
            "SELECT count(*) FROM outbox WHERE state = ?", (state,)).fetchone()
        if row is not None and row[0] >= 1:
            return
        await trio.sleep(0.02)


async def test_console_replays_a_dead_letter_and_draws_health(
    browser: BrowserThread, page: Any, server: BrokerServer, client: httpx.AsyncClient,
    world: RestWorld,
) -> None:
    """A dead letter is listed with its failure and replayed from the page (the receiver
    gets the event again); the health charts draw from /metrics."""
    from playwright.sync_api import expect

    url = server.url
    with trio.fail_after(DEADLINE_S):
        async with serving(Receiver(statuses=[410])) as receiver:
            created = await call(client, "POST", "/v1/subscriptions", world.key, json={
                "events": ["message.created"], "url": receiver.url})
            sub = created.data
            await post(client, world.tokens["alice"], "refused once")
            await wait_outbox(server, "dead")

            def replay() -> None:
                page.goto(f"{url}/#key={world.key}")
                page.click("#tab-webhooks")
                card = page.locator(f'[data-subscription="{sub["id"]}"]')
                expect(card.locator('[data-field="dead_letters"]')).to_have_text("1 dead letters")
                letter = card.locator("tr[data-dead-letter]")
                expect(letter).to_have_count(1)
                expect(letter).to_contain_text("HTTP 410")
                screenshot(page, "webhooks")
                letter.get_by_role("button", name=re.compile("^Replay dead letter")).click()
                page.click("#confirm-ok")
                expect(page.locator("#notice")).to_have_text("Replayed 1 event.")
                expect(card.locator('[data-field="dead_letters"]')).to_have_text("0 dead letters")

            await browser.run(replay)
            second = await receiver.wait_for(2)
        assert second[1].json()["data"]["text"] == "refused once"

        def health_open() -> None:
            page.click("#tab-health")
            expect(page.locator("figure.chart")).to_have_count(6)
            # The chart arithmetic, on known input: a p99 inside a bucket, a rate.
            checked = page.evaluate("""async () => {
                const m = await import("/console/health.js");
                const text = [
                  "# TYPE broker_writer_commit_seconds histogram",
                  'broker_writer_commit_seconds_bucket{le="0.001"} 50.0',
                  'broker_writer_commit_seconds_bucket{le="0.01"} 100.0',
                  'broker_writer_commit_seconds_bucket{le="+Inf"} 100.0',
                  "broker_writer_messages_total 30.0",
                ].join("\\n");
                const parsed = m.parseMetrics(text);
                const buckets = parsed.broker_writer_commit_seconds_bucket.map(
                  (r) => ({le: Number(r.labels.le === "+Inf" ? Infinity : r.labels.le),
                           count: r.value}));
                const none = buckets.map((b) => ({le: b.le, count: 0}));
                return [m.quantile(none, buckets, 0.99), m.quantile(buckets, buckets, 0.99),
                        parsed.broker_writer_messages_total[0].value];
            }""")
            assert checked[0] == pytest.approx(0.001 + 0.009 * (99 - 50) / 50)
            assert checked[1:] == [None, 30]

        def health_drawn() -> None:
            sends = page.locator('figure[data-chart="sends"]')
            expect(sends.locator("output")).not_to_have_text("—")
            expect(page.locator('figure[data-chart="pending"] output')).not_to_have_text("—")
            page.wait_for_function(  # a few seconds of history for the screenshot
                "document.querySelector('figure[data-chart=\"sends\"] polyline')"
                ".getAttribute('points').split(' ').length >= 4")
            screenshot(page, "health")

        await browser.run(health_open)
        for n in range(6):  # a few seconds of uneven traffic for the charts
            for _ in range(1 + n % 3):
                await post(client, world.tokens["alice"], f"load {n}")
            await trio.sleep(0.7)
        await browser.run(health_drawn)


# -- the daemon goes away and comes back; the workspace is deleted --------------------------


async def test_console_reconnects_after_a_restart_and_signs_out_when_the_workspace_goes(
    browser: BrowserThread, page: Any, tmp_path: Path, engine_config: EngineConfig,
) -> None:
    """The page shows the daemon away, reconnects with backoff when it is back (a message
    sent after the restart arrives live), and signs out, saying why, once the workspace is
    deleted (its key refused)."""
    from playwright.sync_api import expect

    def settings(port: int) -> Settings:
        return Settings(data_dir=str(tmp_path / "data"), engine=engine_config,
                        server=ServerSettings(workers=1),
                        http=HttpSettings(host="127.0.0.1", port=port,
                                          shutdown_grace_seconds=0.5))

    with trio.fail_after(DEADLINE_S):
        async with run_server(settings(0)) as first:
            assert first.url is not None and first.port is not None
            port, url = first.port, first.url
            async with httpx.AsyncClient(base_url=url) as client:
                world = await make_rest_world(client)

            def signed_in() -> None:
                page.goto(f"{url}/#key={world.key}")
                expect(page.locator("#connection")).to_have_text("live")

            await browser.run(signed_in)

        def away() -> None:
            expect(page.locator("#connection")).to_have_text(re.compile("daemon unreachable"))

        await browser.run(away)
        async with run_server(settings(port)) as second, \
                httpx.AsyncClient(base_url=url) as client:
            assert second.port == port

            def back() -> None:
                expect(page.locator("#connection")).to_have_text("live", timeout=20_000)

            await browser.run(back)
            await post(client, world.tokens["alice"], "after the restart")

            def arrived() -> None:
                expect(page.locator("#pane-body .messages > li.message .text").last) \
                    .to_have_text("after the restart")

            await browser.run(arrived)
            deleted = await call(client, "DELETE", "/v1/workspace", world.key)
            assert deleted.status == 200

            def signed_out() -> None:
                expect(page.locator("#signin")).to_be_visible()
                expect(page.locator("#signin-error")).to_contain_text("no longer accepts")
                assert stored_key(page) is None
                # The deleted workspace's key is refused by the form too.
                page.fill("#key-input", world.key)
                page.click("#signin-submit")
                expect(page.locator("#signin-error")).to_contain_text("refused this key")
                assert stored_key(page) is None

            await browser.run(signed_out)


# -- many channels and a long history, paged; DMs and group DMs; search; the keyboard -----


async def test_console_pages_many_channels_and_history_shows_dms_and_searches(
    browser: BrowserThread, page: Any, server: BrokerServer, client: httpx.AsyncClient,
    world: RestWorld,
) -> None:
    """61 channels show 50 at a time (and filter); a 60-message history shows 50, then the
    rest on "Load older"; a DM and a group DM are listed and open, and a new DM arrives
    live; search finds a message and opens its channel; the views' tabs take arrow keys."""
    from playwright.sync_api import expect

    alice, bob = world.tokens["alice"], world.tokens["bob"]
    async with trio.open_nursery() as nursery:
        for n in range(60):
            nursery.start_soon(call, client, "POST", "/v1/channels", world.key,
                               {"name": f"room-{n:02}"})
    for n in range(60):
        await post(client, alice, "needle in the history" if n == 0 else f"message {n}")
    dm = await call(client, "POST", "/v1/dm", alice, json={"to": "bob", "text": "psst, bob"})
    group = await call(client, "POST", "/v1/dm/group", alice,
                       json={"participants": ["bob", "carol"], "name": "the three"})
    assert (dm.status, group.status) == (201, 201), (dm.body, group.body)
    said = await call(client, "POST", f"/v1/dm/{group.data['id']}/messages", alice,
                      json={"text": "hello, you two"})
    assert said.status == 201, said.body
    url = server.url

    def channels_and_history() -> None:
        page.goto(f"{url}/#key={world.key}")
        channels = page.locator("#channel-list button.pick")
        expect(channels).to_have_count(50)
        more = page.locator("#channels-more")
        expect(more).to_have_text("Show more (11 left)")
        more.click()
        expect(channels).to_have_count(61)
        page.fill("#channel-filter", "room-4")
        expect(channels).to_have_count(10)
        page.fill("#channel-filter", "")
        messages = page.locator("#pane-body .messages > li.message")
        expect(messages).to_have_count(50)
        expect(messages.last.locator(".text")).to_have_text("message 59")
        page.get_by_role("button", name="Load older").click()
        expect(messages).to_have_count(60)
        expect(messages.first.locator(".text")).to_have_text("needle in the history")
        expect(page.get_by_role("button", name="Load older")).to_be_hidden()

    def dms() -> None:
        listed = page.locator("#dm-list button.pick")
        expect(listed).to_have_count(2)
        page.locator(f'[data-conversation="{group.data["id"]}"]').click()
        expect(page.locator("#pane-header h2")).to_have_text("the three")
        expect(page.locator("#pane-body li.message .text")).to_have_text(["hello, you two"])
        page.locator(f'[data-conversation="{dm.data["conversation_id"]}"]').click()
        expect(page.locator("#pane-body li.message .text")).to_have_text(["psst, bob"])

    def dm_arrived() -> None:
        expect(page.locator("#pane-body li.message .text")).to_have_text(
            ["psst, bob", "back at you"])

    def search_and_keyboard() -> None:
        page.fill("#search-input", "needle")
        page.press("#search-input", "Enter")
        result = page.locator("#pane-body li.result")
        expect(result).to_have_count(1)
        expect(result.locator(".text")).to_have_text("needle in the history")
        result.get_by_role("button", name="#general").click()
        expect(page.locator("#pane-header h2")).to_have_text("#general")
        page.focus("#tab-conversations")
        page.keyboard.press("ArrowRight")
        expect(page.locator("#tab-agents")).to_be_focused()
        expect(page.locator("#view-agents")).to_be_visible()
        page.keyboard.press("End")
        expect(page.locator("#view-health")).to_be_visible()
        assert page.errors == []

    with trio.fail_after(DEADLINE_S):
        await browser.run(channels_and_history)
        await browser.run(dms)
        again = await call(client, "POST", "/v1/dm", bob,
                           json={"to": "alice", "text": "back at you"})
        assert again.status == 201, again.body
        await browser.run(dm_arrived)
        await browser.run(search_and_keyboard)

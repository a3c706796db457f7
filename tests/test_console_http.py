"""The web console over plain HTTP: the page and its files, their headers and content
types, 404s for anything else (no way out of the table of files), and the counters
its health charts read from /metrics."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from importlib import resources

import httpx
import pytest

from broker.console import CONTENT_SECURITY_POLICY, load_static
from tests.helpers.rest import call, make_rest_world

STATIC = resources.files("broker.console").joinpath("static")


def assert_strict_headers(response: httpx.Response) -> None:
    headers = response.headers
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    policy = dict(part.strip().split(" ", 1) for part in CONTENT_SECURITY_POLICY.split(";"))
    assert policy["script-src"] == "'self'" and "unsafe" not in CONTENT_SECURITY_POLICY
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"


async def test_console_page_is_served_at_root_with_strict_headers(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert_strict_headers(response)
    assert response.content == STATIC.joinpath("index.html").read_bytes()
    # A second fetch with the ETag is a 304 with no body.
    again = await client.get("/", headers={"If-None-Match": response.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    assert_strict_headers(again)
    head = await client.head("/")
    assert (head.status_code, head.content) == (200, b"")


@pytest.mark.parametrize(("name", "content_type"), [
    ("main.js", "text/javascript; charset=utf-8"),
    ("conversations.js", "text/javascript; charset=utf-8"),
    ("console.css", "text/css; charset=utf-8"),
])
async def test_console_files_have_their_content_type(
    client: httpx.AsyncClient, name: str, content_type: str,
) -> None:
    response = await client.get(f"/console/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.content == STATIC.joinpath(name).read_bytes()
    assert_strict_headers(response)


@pytest.mark.parametrize("path", [
    "/console/nope.js",
    "/console/",
    "/console/index.htm",
    "/console/..%2F__init__.py",
    "/console/%2e%2e/__init__.py",
    "/console/../__init__.py",
    "/console/static",
    "/console/%2e%2e%2f%2e%2e%2fpyproject.toml",
    "/index.html",
    "/console/main.js/",
])
async def test_console_unknown_paths_are_404_and_never_reach_the_filesystem(
    client: httpx.AsyncClient, path: str,
) -> None:
    # Sent as written: httpx would otherwise resolve the dot segments itself.
    request = client.build_request("GET", "/")
    request.url = request.url.copy_with(raw_path=path.encode())
    response = await client.send(request)
    assert response.status_code == 404, path
    assert response.json()["error"]["code"] == "not_found"
    assert b"import" not in response.content  # no Python source, whatever the path


async def test_console_root_refuses_other_methods(client: httpx.AsyncClient) -> None:
    response = await client.post("/", content=b"{}")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


class _Page(HTMLParser):
    """Collects the page's scripts, styles and any inline handler or script."""

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.inline += [f"{tag} {name}" for name, _ in attrs if name.startswith("on")]
        if tag == "script":
            if named.get("src"):
                self.sources.append(str(named["src"]))
            else:
                self.inline.append("script without src")
        if tag == "link" and named.get("rel") == "stylesheet":
            self.sources.append(str(named["href"]))
        if tag == "style":
            self.inline.append("style element")


async def test_console_page_has_no_inline_script_and_every_file_it_names_is_served(
    client: httpx.AsyncClient,
) -> None:
    """The CSP forbids inline script, so the page has none; its modules import only
    files the console serves."""
    page = _Page()
    page.feed((await client.get("/")).text)
    assert page.inline == []
    assert page.sources == ["/console/console.css", "/console/main.js"]
    files = load_static()
    for name in (n for n in files if n.endswith(".js")):
        source = files[name].body.decode()
        for imported in re.findall(r'from "\./([^"]+)"', source):
            assert imported in files, f"{name} imports {imported}, which is not served"
    for source in page.sources:
        assert (await client.get(source)).status_code == 200


def test_console_scripts_never_parse_text_as_markup() -> None:
    """Message texts are set with textContent; no script assigns markup anywhere."""
    for name, file in load_static().items():
        if name.endswith(".js"):
            source = file.body.decode()
            for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                         "eval(", "new Function"):
                assert sink not in source, f"{name} uses {sink}"


async def test_metrics_count_committed_messages_and_deliveries(
    client: httpx.AsyncClient,
) -> None:
    """The health charts' sends/s and deliveries/s come from these counters."""
    world = await make_rest_world(client, agents=("alice", "bob", "carol"))
    for name in ("alice", "bob", "carol"):
        await call(client, "POST", "/v1/channels/general/join", world.tokens[name])
    members = await call(client, "GET", "/v1/channels/general/members", world.key)
    assert len(members.data) == 3

    async def counters() -> tuple[float, float]:
        text = (await client.get("/metrics")).text
        messages = re.search(r"^broker_writer_messages_total (\S+)$", text, re.MULTILINE)
        deliveries = re.search(r"^broker_writer_deliveries_total (\S+)$", text, re.MULTILINE)
        assert messages and deliveries
        return float(messages[1]), float(deliveries[1])

    before = await counters()
    alice = world.tokens["alice"]
    # One channel message to two other members, one DM: two messages, three deliveries.
    sent = await call(client, "POST", "/v1/channels/general/messages", alice,
                      json={"text": "counted"})
    assert sent.status == 201, sent.body
    dm = await call(client, "POST", "/v1/dm", alice, json={"to": "bob", "text": "a dm"})
    assert dm.status == 201, dm.body
    refused = await call(client, "POST", "/v1/channels/nowhere/messages", alice,
                         json={"text": "lost"})
    assert refused.status == 404
    after = await counters()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 3)

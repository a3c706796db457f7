"""Who talks to whom in a load run, and how it is set up on the broker (over REST).

Agents a0..a(N-1) form channels of K consecutive agents (c0 holds a0..a(K-1),
...), and each agent has a DM partner (a0 with a1, a2 with a3, ...). The S
senders are spread round-robin over the channels, so every channel gets
traffic before any gets a second sender. A sender's n-th message (n from 0)
is a DM to its partner for a `dm_share` of its messages (spread evenly by
n, so the split is exact and every process can recompute it), otherwise a
message to its channel. Intended recipients are therefore known from
(sender, n) alone, which is what makes the loss count exact.
"""

from __future__ import annotations

import math
import secrets
import ssl
from collections.abc import Iterator

import httpx
import msgspec
import trio

from broker.loadtest.tls import client_context

# REST requests in flight while the topology is built.
SETUP_CONCURRENCY = 32
SETUP_TIMEOUT_S = 60.0


class LoadSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The shape of one run (the command-line options that matter to the workers)."""

    agents: int = 100
    channel_size: int = 10
    senders: int = 10
    window: int = 8
    duration: float | None = 10.0
    messages: int | None = None
    rate: float | None = None
    dm_share: float = 0.0
    text_bytes: int = 32
    msgpack: bool = False
    # Deliveries in `deliver.batch` frames (the Python client's default).
    batch: bool = True
    request_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.agents < 1 or self.channel_size < 1 or self.senders < 1 or self.window < 1:
            raise ValueError("agents, channel size, senders and window must be at least 1")
        if self.senders > self.agents:
            raise ValueError(f"{self.senders} senders but only {self.agents} agents")
        if (self.duration is None) == (self.messages is None):
            raise ValueError("give exactly one of duration and messages")
        if not 0.0 <= self.dm_share <= 1.0:
            raise ValueError("dm_share is a fraction between 0 and 1")
        if self.dm_share > 0 and self.agents < 2:
            raise ValueError("DMs need at least 2 agents")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")

    @property
    def channels(self) -> int:
        return math.ceil(self.agents / self.channel_size)


class Agent(msgspec.Struct, frozen=True, array_like=True):
    name: str
    token: str


class Topology(msgspec.Struct, frozen=True, kw_only=True):
    """A built topology: every agent's token, and the spec it was built from."""

    spec: LoadSpec
    http_url: str
    workspace: str
    agents: list[Agent]
    # The CA every client of the run trusts (`--tls`, `--ca-file`; None: the defaults).
    cafile: str | None = None

    @property
    def ws_url(self) -> str:
        return websocket_url(self.http_url)

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of this run's clients (see `cafile`)."""
        return client_context(self.cafile)

    @property
    def tls(self) -> bool:
        """The broker serves TLS (an https:// URL)."""
        return self.http_url.startswith("https://")

    def channel_of(self, agent: int) -> int:
        return agent // self.spec.channel_size

    def channel_name(self, channel: int) -> str:
        return f"c{channel}"

    def members(self, channel: int) -> range:
        size = self.spec.channel_size
        return range(channel * size, min((channel + 1) * size, self.spec.agents))

    def partner(self, agent: int) -> int:
        other = agent ^ 1
        return other if other < self.spec.agents else agent - 1

    def senders(self) -> list[int]:
        """Agent indexes of the senders, spread round-robin over the channels."""
        chosen: list[int] = []
        channels = self.spec.channels
        position = 0
        while len(chosen) < self.spec.senders:
            for channel in range(channels):
                members = self.members(channel)
                if position < len(members):
                    chosen.append(members[position])
                    if len(chosen) == self.spec.senders:
                        break
            position += 1
        return chosen

    def recipients(self, sender: int, dm: bool) -> Iterator[int]:
        """The agents that must receive a message of `sender` (a DM or a channel message)."""
        if dm:
            yield self.partner(sender)
        else:
            for member in self.members(self.channel_of(sender)):
                if member != sender:
                    yield member


def websocket_url(http_url: str) -> str:
    """The native WebSocket endpoint of a broker at `http_url` (http -> ws, https -> wss)."""
    for scheme, ws_scheme in (("https://", "wss://"), ("http://", "ws://")):
        if http_url.startswith(scheme):
            return ws_scheme + http_url[len(scheme):].rstrip("/") + "/v1/ws"
    raise ValueError(f"{http_url!r}: expected an http:// or https:// URL")


def is_dm(n: int, share: float) -> bool:
    """Whether message n of a sender is a DM: exactly `share` of them, spread evenly."""
    return math.floor((n + 1) * share) > math.floor(n * share)


def dm_mask(count: int, share: float) -> int:
    """The message numbers below `count` that are DMs, as a bitmap integer."""
    if share <= 0:
        return 0
    if share >= 1:
        return (1 << count) - 1
    mask = 0
    for n in range(count):
        if is_dm(n, share):
            mask |= 1 << n
    return mask


async def build_topology(http_url: str, spec: LoadSpec, *, channels: bool = True,
                         cafile: str | None = None) -> Topology:
    """Create a fresh workspace, the agents, channels and memberships through the REST API.

    With channels=False only the agents are created. cafile: the CA that
    an https:// broker's certificate chains to (None: the system's).

    Raises httpx.HTTPError, or RuntimeError with the broker's error body when a call is refused.
    """
    workspace = f"loadtest-{secrets.token_hex(4)}"
    limiter = trio.CapacityLimiter(SETUP_CONCURRENCY)
    limits = httpx.Limits(max_connections=SETUP_CONCURRENCY)
    with trio.fail_after(SETUP_TIMEOUT_S + spec.agents * 0.05):
        async with httpx.AsyncClient(base_url=http_url, timeout=SETUP_TIMEOUT_S,
                                     limits=limits,
                                     verify=client_context(cafile)) as http:

            async def call(method: str, path: str, token: str | None, body: object,
                           idempotent: bool = False) -> object:
                headers = {"authorization": f"Bearer {token}"} if token else {}
                tries = 3 if idempotent else 1
                async with limiter:
                    for attempt in range(1, tries + 1):
                        try:
                            response = await http.request(method, path, json=body,
                                                          headers=headers)
                            break
                        except httpx.RemoteProtocolError:
                            # A kept-alive connection the server closed as the
                            # request went out; only a repeatable call is sent again.
                            if attempt == tries:
                                raise
                answer = response.json()
                if not answer.get("ok"):
                    raise RuntimeError(f"{method} {path}: {response.status_code} {answer}")
                return answer["data"]

            created = await call("POST", "/v1/workspaces", None, {"name": workspace})
            assert isinstance(created, dict)
            key = str(created["api_key"])
            tokens: list[str] = [""] * spec.agents

            async def register(i: int) -> None:
                data = await call("POST", "/v1/agents", key, {"name": f"a{i}"})
                assert isinstance(data, dict)
                tokens[i] = str(data["token"])

            async with trio.open_nursery() as nursery:
                for i in range(spec.agents):
                    nursery.start_soon(register, i)
            topology = Topology(spec=spec, http_url=http_url, workspace=workspace,
                                agents=[Agent(f"a{i}", t) for i, t in enumerate(tokens)],
                                cafile=cafile)

            async def make_channel(channel: int) -> None:
                name = topology.channel_name(channel)
                first, *rest = topology.members(channel)
                await call("POST", "/v1/channels", tokens[first], {"name": name})
                async with trio.open_nursery() as joins:
                    for member in rest:
                        joins.start_soon(call, "POST", f"/v1/channels/{name}/join",
                                         tokens[member], {}, True)

            if channels:
                async with trio.open_nursery() as nursery:
                    for channel in range(spec.channels):
                        nursery.start_soon(make_channel, channel)
    return topology

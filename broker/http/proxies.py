"""Client addresses behind reverse proxies: whose forwarding headers are believed.

Any client can send `X-Forwarded-For: 10.9.8.7`, so these headers are
believed only from a peer listed in `http.trusted_proxies`; from anyone
else they are ignored and the TCP peer is the client. Everything keyed by
client address (the anonymous rate limit, the refused-token throttle) reads
`scope["client"]`, which `TrustedProxies` rewrites before the app sees the
request, for HTTP and WebSocket alike.

Why not hypercorn's ProxyFixMiddleware: it believes the headers from every
peer (a count of hops, no address check), keeps the quotes and brackets of
`Forwarded: for="[2001:db8::1]:4711"`, and takes a malformed header as it
comes.

How a trusted peer's headers are read: `Forwarded` (RFC 7239) when present,
else `X-Forwarded-For` with `X-Forwarded-Proto`. The chain of addresses is
walked from the right (the nearest hop, written by the trusted peer) to the
left, over trusted proxies, and the first untrusted address is the client:
what a client wrote itself to the left of that is never read, so a proxy
that appends to the header (nginx's `$proxy_add_x_forwarded_for`) cannot be
used to spoof. A hop reported as `unknown` or by an obfuscated name stops
the walk at the proxy that reported it. A malformed header from a trusted
peer (a bad address in the part that is read, broken quoting, an unknown
protocol) is refused: 400 `invalid_forwarded`, since the client cannot be
told. The scheme (`https` behind a TLS-terminating proxy) is read along the
same walk but apart from the address: each hop read that names a protocol
sets it, so the hop nearest the client that names one wins, and a hop with
a protocol and no address (`Forwarded: proto=https`, or `X-Forwarded-Proto`
without `X-Forwarded-For`) sets the scheme and leaves the client the peer.
`X-Forwarded-Proto` belongs to the hops of `X-Forwarded-For` one to one when
both list as many; otherwise only its last value is read, as the nearest
hop's. Every protocol read is checked, with or without an address.

A peer with no IP address is trusted too: the daemon serves clients on TCP
only, so a Unix socket peer is one of its own processes (a gateway passing
a request on to gateway 0's private socket, `broker.mcp.forward`,
names the client it resolved in `Forwarded`). So the middleware is always
installed; with no trusted proxies a TCP request passes straight through.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from broker.http.errors import encode_error

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PAIR = re.compile(rf"[ \t]*({_TOKEN})=({_TOKEN}|\"(?:[^\"\\]|\\.)*\")[ \t]*")
_QUOTED_PAIR = re.compile(r"\\(.)")
_OBFUSCATED = re.compile(r"_[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}|_[A-Za-z0-9._-]+")
# scheme by (forwarded protocol, ASGI scope type)
SCHEMES = {"http": ("http", "ws"), "https": ("https", "wss"),
           "ws": ("http", "ws"), "wss": ("https", "wss")}


class MalformedForwarding(ValueError):
    """A forwarding header of a trusted proxy that cannot be read."""


def parse_forwarded(value: str) -> list[dict[str, str]]:
    """The elements of a `Forwarded` header (RFC 7239), each {parameter (lower case): value}.

    Raises MalformedForwarding for anything outside the grammar (broken
    quoting, a pair without `=`, a parameter given twice in one element).
    """
    elements: list[dict[str, str]] = []
    element: dict[str, str] = {}
    pos = 0
    while True:
        pair = _PAIR.match(value, pos)
        if pair is not None:
            name, raw = pair.group(1).lower(), pair.group(2)
            if name in element:
                raise MalformedForwarding(f"Forwarded: {name}= twice in one element")
            element[name] = _QUOTED_PAIR.sub(r"\1", raw[1:-1]) if raw.startswith('"') else raw
            pos = pair.end()
        else:
            while pos < len(value) and value[pos] in " \t":
                pos += 1
        if pos == len(value):
            elements.append(element)
            return elements
        if value[pos] == ";":
            pos += 1
        elif value[pos] == ",":
            elements.append(element)
            element = {}
            pos += 1
        else:
            raise MalformedForwarding(f"Forwarded: cannot read {value[pos:pos + 20]!r}")


def node_address(node: str) -> IPAddress | None:
    """The address of a node (`192.0.2.1`, `192.0.2.1:80`, `[2001:db8::1]:80`, `2001:db8::1`).

    None for `unknown` and obfuscated names (`_hidden`). Raises MalformedForwarding
    for anything else.
    """
    node = node.strip()
    host, port = node, ""
    if node.startswith("["):
        host, bracket, port = node[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise MalformedForwarding(f"{node!r} is not a node")
        port = port[1:]
    elif node.count(":") == 1:
        host, _, port = node.partition(":")
    if port and (_PORT.fullmatch(port) is None or (port.isdigit() and int(port) > 65535)):
        raise MalformedForwarding(f"{node!r} has a bad port")
    if host.lower() == "unknown" or _OBFUSCATED.fullmatch(host):
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise MalformedForwarding(f"{node!r} is not an address") from None


FORWARDING_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-forwarded-proto")


def forwarded_by_us(scope: Scope,
                    headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` for passing the request of `scope` on to another of the daemon's
    processes over its Unix socket: the forwarding headers the client sent (already
    read, or ignored, here) dropped, and one `Forwarded` naming the client this process
    resolved and the scheme it used, which the receiving process believes.
    """
    kept = [(name, value) for name, value in headers if name.lower() not in FORWARDING_HEADERS]
    client = scope.get("client")
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"),
                                                scope.get("scheme", "http"))
    element = f"proto={scheme}"
    if client and client[0]:
        element = f'for="{_node(client[0])}";{element}'
    kept.append((b"forwarded", element.encode("latin-1")))
    return kept


def _node(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "unknown"
    return f"[{address}]" if address.version == 6 else str(address)


class TrustedProxies:
    """ASGI middleware: the client address and scheme from the forwarding headers of a
    trusted peer (`trusted`: addresses or networks, as `http.trusted_proxies`)."""

    def __init__(self, app: ASGIApp, trusted: Sequence[str]) -> None:
        self.app = app
        self.networks = [ipaddress.ip_network(entry.strip(), strict=False) for entry in trusted]

    def trusts(self, address: IPAddress) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def forwarded_for(self, headers: Sequence[tuple[bytes, bytes]],
                      peer: IPAddress | None) -> tuple[IPAddress | None, str | None]:
        """(client address, its protocol or None) from a trusted peer's headers
        (`peer` None: a Unix socket peer; the client is None when the headers name none).

        Raises MalformedForwarding.
        """
        found: dict[bytes, list[str]] = {}
        for name, value in headers:
            if name in (b"forwarded", b"x-forwarded-for", b"x-forwarded-proto"):
                found.setdefault(name, []).append(value.decode("latin-1"))
        hops: list[tuple[str | None, str | None]]
        if b"forwarded" in found:
            elements = parse_forwarded(",".join(found[b"forwarded"]))
            hops = [(element.get("for"), element.get("proto")) for element in elements]
        else:
            chain = [node for value in found.get(b"x-forwarded-for", [])
                     for node in value.split(",") if node.strip()]
            protos = [proto.strip() for value in found.get(b"x-forwarded-proto", [])
                      for proto in value.split(",") if proto.strip()]
            if len(protos) == len(chain):
                hops = list(zip(chain, protos, strict=True))
            else:
                # Not one protocol per hop: only the nearest proxy's is read, with its hop
                # (no address at all: a hop that names no client, as `Forwarded: proto=`).
                hops = [(node, None) for node in chain] or [(None, None)]
                hops[-1] = (hops[-1][0], protos[-1] if protos else None)
        client: IPAddress | None = peer
        proto = None
        # The address and the protocol are read apart: each hop read gives the client's
        # protocol when it names one, and the address when it names one.
        for node, hop_proto in reversed(hops):
            if hop_proto is not None:
                proto = hop_proto.lower()
                if proto not in SCHEMES:
                    raise MalformedForwarding(f"{hop_proto!r} is not a protocol of this server")
            if node is None:
                break
            address = node_address(node)
            if address is None:
                break
            client = address
            if not self.trusts(address):
                break
        return client, proto

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        peer = scope.get("client")
        address: IPAddress | None = None
        if peer:  # a Unix socket has no peer address: trusted (see the module's comment)
            if not self.networks:
                await self.app(scope, receive, send)
                return
            try:
                address = ipaddress.ip_address(peer[0])
            except ValueError:
                await self.app(scope, receive, send)
                return
            if not self.trusts(address):
                await self.app(scope, receive, send)
                return
        try:
            client, proto = self.forwarded_for(scope["headers"], address)
        except MalformedForwarding as exc:
            log.debug("refused a request from proxy %s: %s", peer[0] if peer else "unix", exc)
            await _refuse(scope, receive, send, str(exc))
            return
        scope = dict(scope)
        if client is not None:
            scope["client"] = (str(client), 0)
        if proto is not None:
            scope["scheme"] = SCHEMES[proto][kind == "websocket"]
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, reason: str) -> None:
    """400 invalid_forwarded (a WebSocket handshake gets it as its denial response)."""
    body = encode_error("invalid_forwarded",
                        f"the proxy's forwarding headers cannot be read: {reason}")
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": 400, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})

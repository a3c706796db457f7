"""The SSRF guard: which addresses a webhook may be sent to.

A webhook URL comes from a workspace-key holder, and the broker calls it
from inside the network it runs in; without a guard, a subscription could
make the broker call its own admin endpoints, a database on the private
network or a cloud metadata service. So every address that is not globally
routable (loopback, private, link-local, CGNAT, unique-local, reserved,
unspecified; this covers the metadata addresses 169.254.169.254,
fd00:ec2::254 and 100.100.100.200) and every multicast address is refused,
unless allow-listed by host name, address or network. An IPv6 address that
embeds an IPv4 address (IPv4-mapped, -translated or -compatible, NAT64,
6to4, Teredo, ISATAP) is judged by that IPv4 address too: a translator or a
tunnel would deliver to it.

The check runs twice: when the subscription is made (the literal host, and
what it resolves to right then), and at delivery time inside the HTTP
client's connect (`GuardedBackend`): the name is resolved, every address is
checked, and the socket is opened to the very address that was checked, so
a name that re-resolves to a private address between a check and the
connect (DNS rebinding) gains nothing, while the URL, Host header, TLS SNI
and certificate check keep the name. A name with one forbidden address
among several is refused as a whole. Proxies from the environment are not
used (they would connect on our behalf, unchecked).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from urllib.parse import urlsplit

import httpcore
import httpx
import trio

from broker.engine.errors import BrokerError

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Names that mean "this machine" or a metadata service whatever DNS says.
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "metadata.google.internal",
                         "metadata", "instance-data"})
LOCAL_SUFFIXES = (".localhost",)
# How long a subscription request waits for DNS before letting the name through.
SUBSCRIBE_RESOLVE_TIMEOUT_S = 2.0


class DestinationRefused(BrokerError):
    """The host is, or resolves to, an address the guard refuses (code destination_refused)."""

    def __init__(self, message: str) -> None:
        super().__init__("destination_refused", message)


def parse_allow_entry(entry: str) -> str | IPNetwork:
    """An allow-list entry: a CIDR network, an address (as a /32 or /128), or a host name.

    Raises ValueError for an empty entry or a malformed network.
    """
    value = entry.strip().lower().rstrip(".")
    if not value:
        raise ValueError("an allow_hosts entry must not be empty")
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        if "/" in value:
            raise ValueError(f"allow_hosts entry {entry!r} is not a valid network") from None
        return value


# IPv6 prefixes that carry an IPv4 address in their last 32 bits and reach
# it through a translator: IPv4-mapped, IPv4-translated (SIIT, RFC 2765),
# IPv4-compatible (deprecated, still routed by some stacks) and the
# well-known NAT64 prefix (RFC 6052). Such an address is judged by its IPv4
# address alone.
_TRANSLATED = (
    ipaddress.IPv6Network("::ffff:0:0/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("::/96"),
    ipaddress.IPv6Network("64:ff9b::/96"),
)
# ISATAP (RFC 5214): under any /64, the interface id 0000:5efe or 0200:5efe
# (the universal/local and group bits may vary) followed by the IPv4
# address of the tunnel's end, which a router of the site delivers to.
_ISATAP_MASK = 0xFCFF_FFFF
_ISATAP_ID = 0x0000_5EFE
# The local-use NAT64 prefix (RFC 8215): the operator chooses where the IPv4
# address sits in it (RFC 6052 allows several positions) and it is never
# globally routed, so the whole prefix is refused unless allow-listed.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(address: IPv6Address) -> tuple[IPv4Address, ...]:
    """The IPv4 addresses an IPv6 address carries, as a packet to it may end up there.

    IPv4-mapped, IPv4-translated, IPv4-compatible, NAT64 64:ff9b::/96 and
    ISATAP (interface id 0000:5efe or 0200:5efe): the last 32 bits; 6to4
    (2002::/16): bits 16-47; Teredo (2001::/32): the server (bits 32-63) and
    the client (the last 32 bits, inverted). Empty for any other address.
    """
    if any(address in net for net in _TRANSLATED):
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    if address.sixtofour is not None:
        return (address.sixtofour,)
    if address.teredo is not None:
        return address.teredo
    if (int(address) >> 32) & _ISATAP_MASK == _ISATAP_ID:
        return (ipaddress.IPv4Address(int(address) & 0xFFFFFFFF),)
    return ()


def _judged(address: IPAddress) -> tuple[IPAddress, ...]:
    """The addresses the guard judges for `address`: all must be allowed."""
    if isinstance(address, ipaddress.IPv4Address):
        return (address,)
    inner = embedded_ipv4(address)
    if inner and any(address in net for net in _TRANSLATED):
        return inner  # a translation: the IPv4 address is the destination
    return (address, *inner)  # 6to4, Teredo, ISATAP: the tunnel and its endpoint


def _plain_forbidden(address: IPAddress) -> bool:
    return address.is_multicast or not address.is_global


def forbidden(address: IPAddress) -> bool:
    """True for an address a webhook may not reach unless allow-listed.

    An IPv6 address that embeds an IPv4 address (see embedded_ipv4) is
    forbidden when that IPv4 address is, so 64:ff9b::a9fe:a9fe or
    2002:a9fe:a9fe:: cannot reach 169.254.169.254 through a translator or tunnel.
    """
    if isinstance(address, ipaddress.IPv6Address) and address in _LOCAL_NAT64:
        return True
    return any(_plain_forbidden(a) for a in _judged(address))


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


class DestinationPolicy:
    """Decides whether a host may be called, from the allow list.

    allow_hosts: host names (exact, case-insensitive), addresses and CIDR networks.
    """

    def __init__(self, allow_hosts: Iterable[str] = ()) -> None:
        self.names: set[str] = set()
        self.networks: list[IPNetwork] = []
        for entry in allow_hosts:
            parsed = parse_allow_entry(entry)
            if isinstance(parsed, str):
                self.names.add(parsed)
            else:
                self.networks.append(parsed)

    def allows_address(self, address: IPAddress) -> bool:
        """True if the address is not forbidden, or the allow list covers it.

        An allow-listed IPv6 address or network covers its addresses as they
        are; otherwise each address that forbidden() judges (the embedded
        IPv4 address of an IPv4-mapped or NAT64 one, say) must be allowed.
        """
        if not forbidden(address):
            return True
        if self._listed(address):
            return True
        if isinstance(address, ipaddress.IPv6Address) and address in _LOCAL_NAT64:
            return False
        return all(not _plain_forbidden(a) or self._listed(a) for a in _judged(address))

    def _listed(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks if address.version == net.version)

    def allows_name(self, host: str) -> bool:
        return _normal(host) in self.names

    def check_host(self, host: str) -> None:
        """Refuse a literal forbidden address or a local name that is not allow-listed.

        Raises DestinationRefused.
        """
        name = _normal(host)
        if name in self.names:
            return
        literal = _literal(name)
        if literal is not None:
            if not self.allows_address(literal):
                raise DestinationRefused(
                    f"{host} is a loopback, private, link-local or metadata address; "
                    "allow-list it in webhooks.allow_hosts to use it"
                )
            return
        if name in LOCAL_NAMES or name.endswith(LOCAL_SUFFIXES):
            raise DestinationRefused(
                f"{host} names this machine or a metadata service; allow-list it in "
                "webhooks.allow_hosts to use it"
            )

    async def resolve(self, host: str, port: int) -> str:
        """The address to connect to for host:port, after checking every address it resolves to.

        Raises DestinationRefused, or OSError (socket.gaierror) when the name
        does not resolve.
        """
        self.check_host(host)
        name = _normal(host)
        literal = _literal(name)
        if literal is not None:
            return str(literal)
        infos = await trio.socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        addresses: list[IPAddress] = []
        for info in infos:
            address = _literal(str(info[4][0]))
            if address is not None and address not in addresses:
                addresses.append(address)
        if not addresses:
            raise OSError(f"{host} resolved to no address")
        if name not in self.names:
            refused = [a for a in addresses if not self.allows_address(a)]
            if refused:
                raise DestinationRefused(
                    f"{host} resolves to {refused[0]}, a loopback, private, link-local or "
                    "metadata address; allow-list it in webhooks.allow_hosts to use it"
                )
        return str(addresses[0])

    async def check_url(self, url: str) -> None:
        """The subscription-time check: the literal host, and its addresses if it resolves now.

        A name that does not resolve yet is let through: the check before each
        delivery applies anyway. Raises DestinationRefused.
        """
        parts = urlsplit(url)
        host = parts.hostname or ""
        self.check_host(host)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with trio.move_on_after(SUBSCRIBE_RESOLVE_TIMEOUT_S):
            try:
                await self.resolve(host, port)
            except OSError:
                pass


def _normal(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend, with every TCP connect checked by the policy first."""

    def __init__(self, policy: DestinationPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(
        # The signature is httpcore's interface, timeout included.
        self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        address = await self.policy.resolve(host, port)
        return await self._inner.connect_tcp(
            address, port, timeout=timeout, local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise DestinationRefused("webhooks are not delivered over Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore pool whose connects go through GuardedBackend.

    The same mapping as httpx's own AsyncHTTPTransport, which offers no way
    to choose the network backend. httpcore's exceptions are not mapped to
    httpx's: the dispatcher treats every failure to get an answer alike.
    """

    def __init__(self, policy: DestinationPolicy, max_connections: int,
                 max_keepalive_connections: int, keepalive_expiry: float = 5.0) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            keepalive_expiry=keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        response = await self._pool.handle_async_request(httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=request.url.raw_scheme, host=request.url.raw_host,
                             port=request.url.port, target=request.url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        ))
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(
            status_code=response.status, headers=response.headers,
            stream=_ResponseStream(response.stream), extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()

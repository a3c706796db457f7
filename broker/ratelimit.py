"""Rate limits: requests per minute per workspace, per agent and per client address.

Why GCRA and not a library: the candidates on PyPI do not fit an event
loop that must never block or spawn. `limits` keeps its in-memory counters
alive with `threading.Timer`s and reads `time.time()` itself (no injected
clock); `pyrate-limiter`'s in-memory bucket keeps one timestamp per request
in the window (30,000 floats for one busy workspace) and evicts through a
leaker thread; `token-bucket` has no eviction, so a flood of distinct
addresses grows its table forever. The generic cell rate algorithm needs
one integer per key (the "theoretical arrival time", TAT), is exact with
integer nanoseconds, takes its clock as an argument, and a key whose TAT
has passed is the same as no key at all, which is what makes eviction safe.
That one integer is also what lets every process of the daemon share the
buckets in a fixed table of shared memory (`SharedLimits`).

A limit of L per minute is a bucket of L requests that refills one request
every 60/L seconds: a client may burst L at once, then L per minute.

`RateLimiter` is a plain object owned by the server (the REST app and the
WebSocket gateway share it) that also counts sockets against the caps. In
one process it keeps its buckets and counts in dicts; with gateway
processes (`--workers N`) each gateway's limiter works on the tables the
writer process made (`broker.shared_tables`), so every limit and cap is
the daemon's, however the kernel spreads connections over the gateways.
Nothing here awaits: a check is a few dict operations on the event loop, or
a lookup of a few microseconds in the shared tables under their lock.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Annotated, Any, Generic, TypeVar

import msgspec

from broker.engine.errors import BrokerError
from broker.shared_tables import WINDOW, SharedCounter, SharedRegion, SlotTable

log = logging.getLogger(__name__)

NS_PER_MINUTE = 60_000_000_000
# Keys one bucket table keeps at most. Idle keys are dropped first; past
# this bound the least recently used go too (they start again full, which
# only errs towards letting a request through). 100,000 keys are a few MB.
DEFAULT_MAX_KEYS = 100_000
# A table is swept of idle keys when it doubles past its size after the last
# sweep (and at least this big), or when it reaches max_keys: amortized O(1)
# per new key.
MIN_SWEEP_SIZE = 1024
# Operations never refused nor counted: refusing them makes things worse (an
# unacked delivery is pushed again, an agent that cannot read its mailbox
# cannot drain it). A heartbeat is liveness, like a ping: refused, it would
# mark a busy agent offline. Giving a delivery back (fail, defer) is not
# here: each one is a writer command that reschedules the row, so a loop of
# them is load like any other write and is counted.
NEVER_LIMITED = frozenset({
    "delivery.ack_one", "delivery.ack_up_to", "delivery.list", "agent.heartbeat",
})
# The most sockets the shared socket table is sized for, whatever `gateway.max_sessions`
# says (a daemon holds at most its open-files limit of sockets): 2**21 slots, 32 MiB.
MAX_COUNTED_SOCKETS = 1 << 20
# What a refusal's limit is counted by, in its message (by reason).
_PER = {"anonymous": "client address (requests without a token)"}
# Reasons a request or a socket was refused, as /metrics labels them.
REASONS = ("workspace", "agent", "anonymous", "auth_failures", "sessions_per_agent", "sessions")

PerMinute = Annotated[int, msgspec.Meta(ge=0)]
# Where a bucket keeps one key's TAT (see _Gcra.look).
Place = TypeVar("Place")


class RateLimitSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Requests per minute; 0 turns that limit off."""

    # Every request made with the workspace's key or any of its agents' tokens.
    workspace_per_minute: PerMinute = 30_000
    # Every request made with one agent's token (REST and its sockets).
    agent_per_minute: PerMinute = 6_000
    # Unauthenticated routes (workspace create, lookup), per client address.
    anonymous_per_minute: PerMinute = 60
    # Refused tokens per client address; past this, every request that
    # carries a token is refused until the bucket refills.
    auth_failures_per_minute: PerMinute = 10


# Every limit off (an app or gateway built without settings).
UNLIMITED = RateLimitSettings(workspace_per_minute=0, agent_per_minute=0, anonymous_per_minute=0,
                              auth_failures_per_minute=0)


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one check against one bucket (a snapshot)."""

    allowed: bool
    limit: int
    # Requests that would still pass right now.
    remaining: int
    # Seconds until the bucket is full again.
    reset_seconds: float
    # Seconds until one request would pass (0 when allowed).
    retry_after_seconds: float = 0.0

    @property
    def retry_after_ms(self) -> int:
        return math.ceil(self.retry_after_seconds * 1000)

    def headers(self) -> dict[str, str]:
        """`X-RateLimit-*` (and `Retry-After` when refused), in whole seconds rounded up."""
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_seconds)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_seconds)))
        return headers


class RateLimited(BrokerError):
    """A request refused by a rate limit: code `rate_limit_exceeded`, with its verdict."""

    def __init__(self, verdict: Verdict, message: str) -> None:
        super().__init__("rate_limit_exceeded", message)
        self.verdict = verdict


class RefusalStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Refusals since start, by reason (see REASONS), and keys held by the tables."""

    workspace: int
    agent: int
    anonymous: int
    auth_failures: int
    sessions_per_agent: int
    sessions: int
    # None: another process reports them (RateLimiter.statistics).
    tracked_keys: int | None


class _Gcra(Generic[Place]):
    """One limit (L per minute) by GCRA: the verdicts; subclasses keep the TATs.

    `look` finds a key's TAT and where it is kept, `count` records one
    request there: a caller that checks several buckets before it counts in
    any (RateLimiter.take_request) finds each key once. Times are integer
    nanoseconds.
    """

    def __init__(self, per_minute: int) -> None:
        if per_minute <= 0:
            raise ValueError("a bucket needs a limit above 0")
        self.limit = per_minute
        # Rounded up, so a burst of exactly `limit` fits in `window`.
        self.interval = -(-NS_PER_MINUTE // per_minute)
        self.window = self.interval * per_minute

    def look(self, key: object, now: int) -> tuple[Verdict, Place]:
        """The verdict on one more request for `key` at `now`, and where its TAT is kept."""
        raise NotImplementedError

    def count(self, place: Place, now: int) -> None:
        """Count one request at `now` at `place` (from `look`, whose verdict allowed it)."""
        raise NotImplementedError

    def peek(self, key: object, now: int) -> Verdict:
        """What `take` would answer, without counting the request."""
        return self.look(key, now)[0]

    def take(self, key: object, now: int) -> Verdict:
        """Count one request for `key` at `now` if it passes; the verdict either way."""
        verdict, place = self.look(key, now)
        if verdict.allowed:
            self.count(place, now)
        return verdict

    def _verdict(self, tat: int, now: int) -> Verdict:
        tat = max(tat, now)
        after = tat + self.interval
        allowed_at = after - self.window
        if allowed_at > now:
            return Verdict(allowed=False, limit=self.limit, remaining=0,
                           reset_seconds=(tat - now) / 1e9,
                           retry_after_seconds=(allowed_at - now) / 1e9)
        return Verdict(allowed=True, limit=self.limit,
                       remaining=(now + self.window - after) // self.interval,
                       reset_seconds=(after - now) / 1e9)


class Bucket(_Gcra[tuple[object, int]]):
    """One limit over many keys, in this process's memory (one process serves the port)."""

    def __init__(self, per_minute: int, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        super().__init__(per_minute)
        self.max_keys = max_keys
        self._tat: dict[object, int] = {}
        self._sweep_at = MIN_SWEEP_SIZE

    def __len__(self) -> int:
        return len(self._tat)

    def look(self, key: object, now: int) -> tuple[Verdict, tuple[object, int]]:
        tat = self._tat.get(key, now)
        return self._verdict(tat, now), (key, tat)

    def count(self, place: tuple[object, int], now: int) -> None:
        key, tat = place
        # Re-inserted at the end: the table's order is least recently used first.
        self._tat.pop(key, None)
        if len(self._tat) >= min(self._sweep_at, self.max_keys):
            self._sweep(now)  # before the insert, so the table never exceeds max_keys
        self._tat[key] = max(tat, now) + self.interval

    def _sweep(self, now: int) -> None:
        """Drop idle keys (TAT passed: the same as a full bucket), then the oldest over the cap.

        At the cap, room is made for a quarter of max_keys new keys, so a
        table full of busy keys is swept once per max_keys/4 new keys, not at each.
        """
        at_cap = len(self._tat) >= self.max_keys
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now}
        excess = len(self._tat) - (self.max_keys - max(1, self.max_keys // 4))
        if at_cap and excess > 0:
            for key in list(self._tat)[:excess]:
                del self._tat[key]
        self._sweep_at = max(MIN_SWEEP_SIZE, 2 * len(self._tat))


class SharedBucket(_Gcra[tuple[int, int, int]]):
    """One limit over many keys, in a table every process of the daemon shares.

    Call it under the region's lock (`SharedLimits.region.locked()`), with
    `look` and `count` of one request under one hold. A key whose window of
    slots is full of busy keys takes the slot of the one nearest to a full
    bucket, which then starts again full: that only errs towards letting a
    request through.
    """

    def __init__(self, per_minute: int, table: SlotTable) -> None:
        super().__init__(per_minute)
        self.table = table

    def __len__(self) -> int:
        return self.table.used.value

    def look(self, key: object, now: int) -> tuple[Verdict, tuple[int, int, int]]:
        hashed = self.table.key_of(key)
        slot, tat = self.table.find(hashed, idle=lambda tat: tat <= now, evict=lambda tat: tat)
        tat = now if tat is None else tat
        return self._verdict(tat, now), (slot, hashed, tat)

    def count(self, place: tuple[int, int, int], now: int) -> None:
        slot, hashed, tat = place
        self.table.write(slot, hashed, max(tat, now) + self.interval)


def client_address(scope: object) -> str:
    """The key of the client that opened an ASGI connection: its IP address, IPv6 by /64.

    `scope["client"]`: the TCP peer, or the client a trusted proxy named
    (`http.trusted_proxies`, broker.http.proxies); forwarding headers from
    anyone else are never read. An IPv6 host usually holds a whole /64, so
    that is one key.
    """
    client = scope.get("client") if isinstance(scope, dict) else None
    host = client[0] if client else None
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _slots_for(keys: int) -> int:
    """Slots for a table of up to `keys` keys: a power of two, at most about half full."""
    return max(WINDOW, 1 << (2 * max(keys, 1) - 1).bit_length())


class SharedLimits:
    """The rate limits' tables and the socket counts, in one region every process maps.

    With gateway processes (`--workers N`) the writer process creates it
    (`create`) before it starts them and hands each `region.fd`; a gateway
    attaches (`attach`) with the same settings, from which the layout
    follows: a header (the slot counts, which `attach` checks, and a random
    salt for the keys), the socket count, a table per limit (workspaces,
    agents, anonymous, auth_failures; slots for twice max_keys), then the
    sockets by agent (slots for twice `gateway.max_sessions`, or max_keys
    when that is 0, counting at most MAX_COUNTED_SOCKETS sockets). Pages are
    allocated as keys first touch them.
    """

    LIMITS = ("workspaces", "agents", "anonymous", "auth_failures")
    _HEADER = struct.Struct("<qq16s")

    def __init__(self, region: SharedRegion, key_slots: int, socket_slots: int,
                 *, owner: bool) -> None:
        """owner: this process made the region, and reports what the tables hold."""
        self.region, self.owner = region, owner
        view = region.view
        salt: bytes = self._HEADER.unpack_from(view, 0)[2]
        self.sockets = SharedCounter(view, self._HEADER.size)
        offset = self._HEADER.size + SharedCounter.SIZE
        self.tables: dict[str, SlotTable] = {}
        for name in self.LIMITS:
            self.tables[name] = SlotTable(view, offset, key_slots, salt)
            offset += SlotTable.size(key_slots)
        self.sockets_by_agent = SlotTable(view, offset, socket_slots, salt)

    @classmethod
    def layout(cls, max_sessions: int, max_keys: int) -> tuple[int, int, int]:
        """Slots of each limit's table, slots of the socket table, and the region's bytes."""
        sockets = min(max_sessions or max_keys, MAX_COUNTED_SOCKETS)
        key_slots, socket_slots = _slots_for(max_keys), _slots_for(sockets)
        size = (cls._HEADER.size + SharedCounter.SIZE
                + len(cls.LIMITS) * SlotTable.size(key_slots) + SlotTable.size(socket_slots))
        return key_slots, socket_slots, size

    @classmethod
    def create(cls, max_sessions: int, max_keys: int = DEFAULT_MAX_KEYS) -> SharedLimits:
        """A new region for these settings (`gateway.max_sessions`, keys per limit)."""
        key_slots, socket_slots, size = cls.layout(max_sessions, max_keys)
        region = SharedRegion.create(size)
        cls._HEADER.pack_into(region.view, 0, key_slots, socket_slots, os.urandom(16))
        return cls(region, key_slots, socket_slots, owner=True)

    @classmethod
    def attach(cls, fd: int, max_sessions: int, max_keys: int = DEFAULT_MAX_KEYS) -> SharedLimits:
        """The region behind `fd` (which it then owns), made by `create` with the same
        settings. Raises ValueError (and closes `fd`) when its layout is another."""
        key_slots, socket_slots, size = cls.layout(max_sessions, max_keys)
        region = SharedRegion.attach(fd, size)
        made = cls._HEADER.unpack_from(region.view, 0)[:2]
        if made != (key_slots, socket_slots):
            region.close()
            raise ValueError(f"the shared region has {made} slots, not {(key_slots, socket_slots)}:"
                             " the processes of one daemon disagree on its layout")
        return cls(region, key_slots, socket_slots, owner=False)

    def close(self) -> None:
        """Unmap the region (see SharedRegion.close)."""
        self.region.close()


class _LocalSockets:
    """Sockets admitted and not yet ended, in this process: all, and by agent."""

    def __init__(self) -> None:
        self._total = 0
        self._by_agent: Counter[int] = Counter()

    def total(self) -> int:
        return self._total

    def of(self, agent_id: int) -> int:
        return self._by_agent[agent_id]

    def add(self, agent_id: int | None, delta: int) -> None:
        self._total += delta
        if agent_id is not None:
            self._by_agent[agent_id] += delta
            if self._by_agent[agent_id] <= 0:
                del self._by_agent[agent_id]


class _SharedSockets:
    """Sockets admitted and not yet ended, over every process. Call under the region's lock.

    An agent whose window of slots is full of agents with sockets is counted
    in this process alone (logged): a socket is admitted and released by
    the same process, so its release takes back what its admission counted
    and no count drifts; that agent's sockets on other gateways are then
    not seen here.
    """

    def __init__(self, shared: SharedLimits) -> None:
        self._total, self._table = shared.sockets, shared.sockets_by_agent
        self._here_only: Counter[int] = Counter()

    def total(self) -> int:
        return self._total.value

    def of(self, agent_id: int) -> int:
        return (self._find(self._table.key_of(agent_id))[1] or 0) + self._here_only[agent_id]

    def add(self, agent_id: int | None, delta: int) -> None:
        self._total.add(delta)
        if agent_id is None:
            return
        if delta < 0 and self._here_only[agent_id] > 0:
            self._here_only[agent_id] += delta
            if self._here_only[agent_id] <= 0:
                del self._here_only[agent_id]
            return
        hashed = self._table.key_of(agent_id)
        slot, count = self._find(hashed)
        if count is not None or (slot >= 0 and delta > 0):
            self._table.write(slot, hashed, max(0, (count or 0) + delta))
        elif delta > 0:
            log.warning("agent %d: no room in the shared table to count its sockets; "
                        "counted in this process alone", agent_id)
            self._here_only[agent_id] += delta

    def _find(self, hashed: int) -> tuple[int, int | None]:
        return self._table.find(hashed, idle=lambda count: count <= 0)


class RateLimiter:
    """Every rate limit and socket cap of the daemon, and the count of refusals by reason.

    settings: the limits; clock: seconds (monotonic, the same in every
    process; tests pass a fake one); max_keys: the bound of each key table
    in dicts; shared: the tables every process of the daemon shares (None:
    this process serves the port alone, and keeps them in dicts; given, their
    size is the one SharedLimits was made with, and max_keys is not used).
    """

    def __init__(
        self, settings: RateLimitSettings | None = None,
        clock: Callable[[], float] = time.monotonic, max_keys: int = DEFAULT_MAX_KEYS,
        shared: SharedLimits | None = None,
    ) -> None:
        self.settings = settings = settings or RateLimitSettings()
        self.clock = clock
        self.shared = shared

        def bucket(table: str, per_minute: int) -> Bucket | SharedBucket | None:
            if per_minute <= 0:
                return None
            if shared is not None:
                return SharedBucket(per_minute, shared.tables[table])
            return Bucket(per_minute, max_keys)

        self.workspaces = bucket("workspaces", settings.workspace_per_minute)
        self.agents = bucket("agents", settings.agent_per_minute)
        self.anonymous = bucket("anonymous", settings.anonymous_per_minute)
        self.auth_failures = bucket("auth_failures", settings.auth_failures_per_minute)
        self._sockets = _LocalSockets() if shared is None else _SharedSockets(shared)
        self._locked: Callable[[], AbstractContextManager[None]] = (
            nullcontext if shared is None else shared.region.locked)
        self._refusals = dict.fromkeys(REASONS, 0)

    def _now(self) -> int:
        return int(self.clock() * 1e9)

    def refused(self, reason: str) -> None:
        """Count one refusal (reasons: REASONS)."""
        self._refusals[reason] += 1

    def take_request(
        self, operation: str, workspace_id: int | None, agent_id: int | None, address: str,
    ) -> Verdict | None:
        """Count one request of `operation` by a workspace (and agent), or by an address.

        workspace_id None: an unauthenticated request, counted by `address`.
        Returns the tightest verdict of the buckets that apply (None: no
        limit applies). Raises RateLimited when one refuses; then nothing is
        counted in any bucket.
        """
        if operation in NEVER_LIMITED:
            return None
        checks: list[tuple[str, _Gcra[Any], object]] = []
        if workspace_id is None:
            if self.anonymous is not None:
                checks.append(("anonymous", self.anonymous, address))
        else:
            if self.workspaces is not None:
                checks.append(("workspace", self.workspaces, workspace_id))
            if agent_id is not None and self.agents is not None:
                checks.append(("agent", self.agents, agent_id))
        if not checks:
            return None
        now = self._now()
        with self._locked():
            looks = [(reason, bucket, bucket.look(key, now)) for reason, bucket, key in checks]
            refusals = [(verdict, reason) for reason, _, (verdict, _) in looks
                        if not verdict.allowed]
            if not refusals:
                for _, bucket, (_, place) in looks:
                    bucket.count(place, now)
                return min((verdict for _, _, (verdict, _) in looks), key=lambda v: v.remaining)
        verdict, reason = max(refusals, key=lambda r: r[0].retry_after_seconds)
        self.refused(reason)
        raise RateLimited(verdict, f"rate limit exceeded: {verdict.limit} requests per"
                          f" minute per {_PER.get(reason, reason)};"
                          f" retry in {verdict.retry_after_ms} ms")

    def check_auth(self, address: str) -> None:
        """Refuse a request that carries a token from an address with too many refused tokens.

        Raises RateLimited (counted as `auth_failures`).
        """
        if self.auth_failures is None:
            return
        with self._locked():
            verdict = self.auth_failures.peek(address, self._now())
        if not verdict.allowed:
            self.refused("auth_failures")
            raise RateLimited(verdict, "too many refused tokens from this address; retry in"
                              f" {verdict.retry_after_ms} ms")

    def auth_failed(self, address: str) -> None:
        """Count a refused token from `address`."""
        if self.auth_failures is not None:
            with self._locked():
                self.auth_failures.take(address, self._now())

    @contextmanager
    def guarding_tokens(self, address: str, presented: bool = True,
                        refusal: str = "invalid_token") -> Iterator[None]:
        """Around reading a credential that `address` presented (`presented`: it did).

        Refused first (RateLimited) while the address is blocked, so the
        answer cannot tell a good credential from a bad one; a BrokerError
        with code `refusal` raised inside counts towards the block.
        """
        if presented:
            self.check_auth(address)
        try:
            yield
        except BrokerError as exc:
            if exc.code == refusal:
                self.auth_failed(address)
            raise

    def admit_socket(self, agent_id: int | None, max_sockets: int,
                     max_per_agent: int) -> str | None:
        """Take a place for one socket (of `agent_id`, if an agent's) under the caps (0: none).

        None, or why there is no place, counted as a refusal: "sessions"
        (the daemon holds `max_sockets`) or "sessions_per_agent". The
        caller gives the place back with `release_socket` when the socket ends.
        """
        sockets = self._sockets
        with self._locked():
            if max_sockets and sockets.total() >= max_sockets:
                reason = "sessions"
            elif agent_id is not None and max_per_agent \
                    and sockets.of(agent_id) >= max_per_agent:
                reason = "sessions_per_agent"
            else:
                sockets.add(agent_id, 1)
                return None
        self.refused(reason)
        return reason

    def release_socket(self, agent_id: int | None) -> None:
        """Give back the place `admit_socket` took."""
        with self._locked():
            self._sockets.add(agent_id, -1)

    def sockets(self) -> int:
        """Sockets admitted and not yet released (over every process, when shared)."""
        with self._locked():
            return self._sockets.total()

    def statistics(self) -> RefusalStatistics:
        """This process's refusals, and the keys the tables hold: None in a process
        that shares tables it did not make (the one that made them reports them)."""
        tables = (self.workspaces, self.agents, self.anonymous, self.auth_failures)
        tracked: int | None = sum(len(table) for table in tables if table is not None)
        if self.shared is not None and not self.shared.owner:
            tracked = None
        return RefusalStatistics(**self._refusals, tracked_keys=tracked)

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

A limit of L per minute is a bucket of L requests that refills one request
every 60/L seconds: a client may burst L at once, then L per minute.

`RateLimiter` is a plain object owned by the server (one per gateway
process, enforcing the limits on what that process serves: docs/operations.md,
"Processes"; the REST app and the WebSocket gateway share it). Nothing here
blocks or awaits: every check is a few dict operations on the event loop.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import msgspec

from broker.engine.errors import BrokerError

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
# Reasons a request or a socket was refused, as /metrics labels them.
REASONS = ("workspace", "agent", "anonymous", "auth_failures", "sessions_per_agent", "sessions")

PerMinute = Annotated[int, msgspec.Meta(ge=0)]


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
    tracked_keys: int


class Bucket:
    """One limit (L per minute) over many keys, by GCRA. Times are integer nanoseconds."""

    def __init__(self, per_minute: int, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if per_minute <= 0:
            raise ValueError("a bucket needs a limit above 0")
        self.limit = per_minute
        # Rounded up, so a burst of exactly `limit` fits in `window`.
        self.interval = -(-NS_PER_MINUTE // per_minute)
        self.window = self.interval * per_minute
        self.max_keys = max_keys
        self._tat: dict[object, int] = {}
        self._sweep_at = MIN_SWEEP_SIZE

    def __len__(self) -> int:
        return len(self._tat)

    def peek(self, key: object, now: int) -> Verdict:
        """What `take` would answer, without counting the request."""
        return self._verdict(self._tat.get(key, now), now)

    def take(self, key: object, now: int) -> Verdict:
        """Count one request for `key` at `now` if it passes; the verdict either way."""
        tat = self._tat.get(key, now)
        verdict = self._verdict(tat, now)
        if verdict.allowed:
            # Re-inserted at the end: the table's order is least recently used first.
            self._tat.pop(key, None)
            if len(self._tat) >= min(self._sweep_at, self.max_keys):
                self._sweep(now)  # before the insert, so the table never exceeds max_keys
            self._tat[key] = max(tat, now) + self.interval
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


class RateLimiter:
    """Every rate limit of the daemon, and the count of refusals by reason.

    settings: the limits; clock: seconds (monotonic; tests pass a fake one);
    max_keys: the bound of each key table.
    """

    def __init__(
        self, settings: RateLimitSettings | None = None,
        clock: Callable[[], float] = time.monotonic, max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.settings = settings = settings or RateLimitSettings()
        self.clock = clock

        def bucket(per_minute: int) -> Bucket | None:
            return Bucket(per_minute, max_keys) if per_minute > 0 else None

        self.workspaces = bucket(settings.workspace_per_minute)
        self.agents = bucket(settings.agent_per_minute)
        self.anonymous = bucket(settings.anonymous_per_minute)
        self.auth_failures = bucket(settings.auth_failures_per_minute)
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
        checks: list[tuple[str, Bucket, object]] = []
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
        refusals = [(verdict, reason) for reason, bucket, key in checks
                    if not (verdict := bucket.peek(key, now)).allowed]
        if refusals:
            verdict, reason = max(refusals, key=lambda r: r[0].retry_after_seconds)
            self.refused(reason)
            raise RateLimited(verdict, f"rate limit exceeded: {verdict.limit} requests per"
                              f" minute per {reason}; retry in {verdict.retry_after_ms} ms")
        verdicts = [bucket.take(key, now) for _, bucket, key in checks]
        return min(verdicts, key=lambda v: v.remaining)

    def check_auth(self, address: str) -> None:
        """Refuse a request that carries a token from an address with too many refused tokens.

        Raises RateLimited (counted as `auth_failures`).
        """
        if self.auth_failures is None:
            return
        verdict = self.auth_failures.peek(address, self._now())
        if not verdict.allowed:
            self.refused("auth_failures")
            raise RateLimited(verdict, "too many refused tokens from this address; retry in"
                              f" {verdict.retry_after_ms} ms")

    def auth_failed(self, address: str) -> None:
        """Count a refused token from `address`."""
        if self.auth_failures is not None:
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

    def statistics(self) -> RefusalStatistics:
        tables = (self.workspaces, self.agents, self.anonymous, self.auth_failures)
        return RefusalStatistics(
            **self._refusals,
            tracked_keys=sum(len(table) for table in tables if table is not None),
        )

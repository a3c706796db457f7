"""The webhook dispatcher: an actor that delivers the outbox at least once.

The outbox table is the queue. Rows are written by the writer in the same
transaction as the facts they report (broker.engine.outbox), so the
dispatcher keeps no durable state of its own: it reads due `pending` rows
through the reader pool, POSTs each one, and reports every attempt as a
writer command (`RecordDeliveryAttempt`): delivered, retry later, or dead.
A row is marked only after its attempt, so a daemon killed in between sends
it again after the restart (at least once; receivers deduplicate on
`webhook-id` / `X-Relay-Delivery`, stable across attempts).

Isolation. At most `concurrency` requests are in flight, and at most
`per_subscription_concurrency` per subscription; a saturated subscription's
rows are skipped in SQL, so one slow or failing endpoint can hold only its
own slots, and every request is bounded by `request_timeout_seconds`.
Rows of one subscription may be delivered out of order.

Waking. The dispatcher never polls at a fixed tick: it sleeps until a
commit wrote outbox rows (the writer's `OUTBOX_WRITTEN` commit signal,
raised by `enqueue_webhooks` and by a dead-letter replay), until a delivery
of its own finished (a slot is free), or until the earliest retry it read
from the table falls due. With nothing pending and nothing written it does
not touch the database at all.
"""

from __future__ import annotations

import logging
import math
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import httpcore
import httpx
import msgspec
import trio

from broker.engine.engine import Engine
from broker.engine.errors import BrokerError
from broker.engine.outbox import OUTBOX_WRITTEN
from broker.engine.webhook_deliveries import (
    DueBatch,
    DueDelivery,
    PruneDeliveredWebhooks,
    RecordDeliveryAttempt,
    due_deliveries,
)
from broker.webhooks.destinations import DestinationPolicy, DestinationRefused, GuardedTransport
from broker.webhooks.settings import WebhookSettings
from broker.webhooks.signing import delivery_headers
from protocol.objects import iso

log = logging.getLogger(__name__)

# After a stop, deliveries in flight get this long to finish and be recorded.
DEFAULT_STOP_GRACE_S = 5.0
# Keep-alive connections kept open at most, over all endpoints.
MAX_KEEPALIVE_CONNECTIONS = 32
# Statuses worth another attempt; other 4xx (and 3xx: redirects are not
# followed) are final, the receiver refused the event.
RETRYABLE_STATUSES = frozenset({408, 429})
# A longest Retry-After honoured, whatever the cap says.
MAX_RETRY_AFTER_S = 24 * 3600.0

Outcome = Literal["delivered", "retry", "dead"]
# Why an attempt failed, as counted in the statistics and in /metrics:
# status (the receiver answered non-2xx), timeout (no status line within
# request_timeout_seconds), connection (could not connect, or the connection
# broke), refused (the SSRF guard refused the destination at connect time),
# internal (a bug here; logged with its traceback).
FailureReason = Literal["status", "timeout", "connection", "refused", "internal"]

# What the guarded transport lets through unmapped (httpx maps these for its own).
_TRANSPORT_ERRORS: tuple[type[Exception], ...] = (
    httpx.HTTPError, OSError, httpcore.TimeoutException, httpcore.NetworkError,
    httpcore.ProtocolError, httpcore.UnsupportedProtocol, httpcore.ProxyError,
)


class _Event(msgspec.Struct):
    type: str
    data: msgspec.Raw


class WebhookBody(msgspec.Struct):
    """What a subscription receives: `{type, workspace_id, timestamp, data}`."""

    type: str
    workspace_id: str
    timestamp: str
    data: msgspec.Raw


_event_decoder = msgspec.json.Decoder(_Event)
_encoder = msgspec.json.Encoder()


def webhook_body(row: DueDelivery) -> bytes:
    """The body of a row: the event's data as stored, its time as the timestamp.

    The same bytes on every attempt, so a signature over them is stable too
    (only the Standard Webhooks timestamp changes per attempt).
    """
    event = _event_decoder.decode(row.payload)
    return _encoder.encode(WebhookBody(
        type=row.type, workspace_id=str(row.workspace_id), timestamp=iso(row.created_at) or "",
        data=event.data,
    ))


def retry_delay(failed_attempts: int, settings: WebhookSettings, rng: random.Random) -> float:
    """Seconds to wait after the `failed_attempts`-th failed attempt (1-based).

    `min(cap, base * multiplier ** (n - 1))`, times a factor drawn from
    [1 - jitter, 1 + jitter], capped again.
    """
    cap = settings.backoff_cap_seconds
    try:
        delay = min(cap, settings.backoff_base_seconds
                    * settings.backoff_multiplier ** max(0, failed_attempts - 1))
    except OverflowError:
        delay = cap
    if settings.jitter:
        delay *= rng.uniform(1 - settings.jitter, 1 + settings.jitter)
    return min(settings.backoff_cap_seconds, delay)


def retry_after_seconds(value: str | None) -> float | None:
    """A `Retry-After: <seconds>` value (HTTP dates are ignored), bounded."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt came to, before the retry policy is applied."""

    ok: bool
    final: bool
    status: int | None
    error: str | None
    retry_after: float | None = None
    reason: FailureReason | None = None  # None when ok


def classify(status: int, retry_after: str | None = None) -> AttemptResult:
    """2xx delivered; 408, 429 and 5xx retried; anything else final."""
    if 200 <= status < 300:
        return AttemptResult(True, False, status, None)
    retryable = status in RETRYABLE_STATUSES or status >= 500
    return AttemptResult(
        False, not retryable, status, f"HTTP {status}",
        retry_after_seconds(retry_after) if status in (429, 503) else None, "status",
    )


@dataclass(frozen=True)
class DispatcherStatistics:
    """What `WebhookDispatcher.statistics()` returns: a snapshot, counts since start.

    running: between `run`'s start and its wind-down. in_flight: requests
    under way now; busy_subscriptions: subscriptions with one or more of them.
    attempts: requests started. delivered, retried, dead_lettered: attempts
    recorded with that outcome. failed_status, failed_timeout,
    failed_connection, failed_refused, failed_internal: failed attempts by
    reason (see FailureReason); refused is failed_refused under its old name.
    scans: looks at the outbox table (queries for due rows); wakeups: times
    the scheduler woke from a wait (a commit signal, a finished delivery, a
    retry falling due, a stop).
    """

    running: bool
    in_flight: int
    busy_subscriptions: int
    attempts: int
    delivered: int
    retried: int
    dead_lettered: int
    refused: int
    failed_status: int
    failed_timeout: int
    failed_connection: int
    failed_refused: int
    failed_internal: int
    scans: int
    wakeups: int


class WebhookDispatcher:
    """Delivers pending outbox rows. Start with `await nursery.start(dispatcher.run)`.

    engine: where the outbox lives. settings: schedule, limits, allow list.
    transport: an httpx transport to use instead of the guarded one (tests
    only: it bypasses the dispatch-time SSRF guard). rng: the jitter's source.
    """

    def __init__(
        self, engine: Engine, settings: WebhookSettings | None = None, *,
        policy: DestinationPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None, stop_grace_seconds: float = DEFAULT_STOP_GRACE_S,
    ) -> None:
        self.engine = engine
        self.settings = settings or WebhookSettings()
        self.policy = policy or DestinationPolicy(self.settings.allow_hosts)
        self.stop_grace_seconds = stop_grace_seconds
        self._transport = transport
        self._rng = rng or random.Random()
        self._client: httpx.AsyncClient | None = None
        self._wake = trio.Event()
        self._stopping = False
        self._running = False
        self._in_flight: set[int] = set()
        self._per_subscription: dict[int, int] = {}
        self.attempts = 0
        self.delivered = 0
        self.retried = 0
        self.dead_lettered = 0
        self.failures: dict[FailureReason, int] = {
            "status": 0, "timeout": 0, "connection": 0, "refused": 0, "internal": 0,
        }
        self.scans = 0
        self.wakeups = 0

    # -- control -------------------------------------------------------------------

    @property
    def refused(self) -> int:
        """Attempts the SSRF guard refused at connect time."""
        return self.failures["refused"]

    def notify(self) -> None:
        """Look at the outbox now (safe to call any time; the writer calls it after a
        commit that wrote outbox rows)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop taking rows; `run` returns once the deliveries in flight end (or the grace)."""
        self._stopping = True
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._running

    def statistics(self) -> DispatcherStatistics:
        """A frozen snapshot of the counts and of what is in flight now."""
        failures = self.failures
        return DispatcherStatistics(
            running=self._running, in_flight=len(self._in_flight),
            busy_subscriptions=len(self._per_subscription), attempts=self.attempts,
            delivered=self.delivered, retried=self.retried, dead_lettered=self.dead_lettered,
            refused=failures["refused"], failed_status=failures["status"],
            failed_timeout=failures["timeout"], failed_connection=failures["connection"],
            failed_refused=failures["refused"], failed_internal=failures["internal"],
            scans=self.scans, wakeups=self.wakeups,
        )

    async def run(
        self, stop_trigger: Callable[[], Awaitable[object]] | None = None, *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver until `stop()` (or until `stop_trigger()` returns), then wind down.

        In-flight deliveries get `stop_grace_seconds` to finish; a delivery cut
        short stays pending and is sent again after the restart.
        """
        settings = self.settings
        transport = self._transport or GuardedTransport(
            self.policy, max_connections=settings.concurrency,
            max_keepalive_connections=min(settings.concurrency, MAX_KEEPALIVE_CONNECTIONS),
        )
        # Registered for the dispatcher's lifetime, here and not in a task of
        # its own: a commit that wrote outbox rows wakes the scheduler (see
        # the module docstring), and one committed right after started()
        # must find the callback in place, or its rows wait for another wake.
        stop_watching = self.engine.writer.on_commit(OUTBOX_WRITTEN, self.notify)
        try:
            async with httpx.AsyncClient(
                transport=transport, timeout=httpx.Timeout(settings.request_timeout_seconds),
                follow_redirects=False, trust_env=False,
            ) as client, trio.open_nursery() as helpers:
                self._client = client
                if stop_trigger is not None:
                    helpers.start_soon(self._stop_after, stop_trigger)
                helpers.start_soon(self._prune_delivered)
                async with trio.open_nursery() as deliveries:
                    self._running = True
                    task_status.started()
                    log.info("webhook dispatcher: running (concurrency %d, %d per subscription)",
                             settings.concurrency, settings.per_subscription_concurrency)
                    try:
                        await self._schedule(deliveries)
                    finally:
                        self._running = False
                        deliveries.cancel_scope.deadline = (
                            trio.current_time() + self.stop_grace_seconds
                        )
                helpers.cancel_scope.cancel()
        finally:
            stop_watching()
        log.info("webhook dispatcher: stopped")

    async def _stop_after(self, stop_trigger: Callable[[], Awaitable[object]]) -> None:
        await stop_trigger()
        self.stop()

    # -- scheduling -----------------------------------------------------------------

    async def _schedule(self, deliveries: trio.Nursery) -> None:
        settings = self.settings
        while not self._stopping:
            # A fresh event before the look, so a notify() during it is not lost.
            self._wake = trio.Event()
            next_due_ms: int | None = None
            free = settings.concurrency - len(self._in_flight)
            if free > 0:
                now_ms = int(time.time() * 1000)
                self.scans += 1
                batch: DueBatch = await self.engine.read(
                    due_deliveries, now_ms, sorted(self._in_flight), self._saturated(),
                    settings.fetch_batch,
                )
                for row in batch.rows:
                    if len(self._in_flight) >= settings.concurrency:
                        break
                    if self._per_subscription.get(row.subscription_id, 0) >= (
                        settings.per_subscription_concurrency
                    ):
                        continue
                    self._take(row)
                    deliveries.start_soon(self._deliver, row)
                next_due_ms = batch.next_due_ms
                if len(batch.rows) == settings.fetch_batch and (
                    len(self._in_flight) < settings.concurrency
                ):
                    continue  # more rows may be due: look again at once
            await self._wait_woken(next_due_ms)

    async def _wait_woken(self, next_due_ms: int | None) -> None:
        """Wait for a wake-up (commit signal, free slot, stop) or the next retry's due time.

        No due time known: nothing is pending but what is in flight, and
        whatever changes that wakes us, so the wait has no timeout.
        """
        timeout = math.inf
        if next_due_ms is not None:
            timeout = max(0.0, next_due_ms / 1000 - time.time())
        with trio.move_on_after(timeout):
            await self._wake.wait()
        self.wakeups += 1

    def _saturated(self) -> list[int]:
        limit = self.settings.per_subscription_concurrency
        return sorted(s for s, n in self._per_subscription.items() if n >= limit)

    def _take(self, row: DueDelivery) -> None:
        self._in_flight.add(row.id)
        self._per_subscription[row.subscription_id] = (
            self._per_subscription.get(row.subscription_id, 0) + 1
        )

    def _release(self, row: DueDelivery) -> None:
        self._in_flight.discard(row.id)
        left = self._per_subscription.get(row.subscription_id, 1) - 1
        if left > 0:
            self._per_subscription[row.subscription_id] = left
        else:
            self._per_subscription.pop(row.subscription_id, None)
        self._wake.set()

    # -- one delivery -----------------------------------------------------------------

    async def _deliver(self, row: DueDelivery) -> None:
        """Attempt `row` once and record the outcome; the slot is freed only after that.

        This is the per-delivery failure boundary: an unexpected error is
        logged and recorded as a failed attempt, so it is retried with
        backoff instead of in a hot loop, and the dispatcher keeps running.
        """
        try:
            try:
                result = await self._attempt(row)
            except Exception as exc:
                log.exception("webhook dispatcher: delivery %d to subscription %d failed",
                              row.id, row.subscription_id)
                result = AttemptResult(False, False, None, f"internal error: {exc!r}",
                                       reason="internal")
            await self._record(row, result)
        finally:
            self._release(row)

    async def _attempt(self, row: DueDelivery) -> AttemptResult:
        client = self._client
        assert client is not None
        body = webhook_body(row)
        headers = delivery_headers(
            event_type=row.type, event_time=iso(row.created_at) or "", delivery_id=row.id,
            attempt=row.attempts + 1, body=body, secret=row.secret, now_s=int(time.time()),
            extra=row.headers,
        )
        self.attempts += 1
        timeout = self.settings.request_timeout_seconds
        with trio.move_on_after(timeout) as scope:
            try:
                request = client.build_request("POST", row.url, content=body, headers=headers)
                response = await client.send(request, stream=True)
                # The body is never read: a status line is all a receiver owes us.
                await response.aclose()
            except DestinationRefused as exc:
                return AttemptResult(False, True, None, f"destination_refused: {exc.message}",
                                     reason="refused")
            except _TRANSPORT_ERRORS as exc:
                reason: FailureReason = "connection"
                if isinstance(exc, httpx.TimeoutException | httpcore.TimeoutException):
                    reason = "timeout"
                return AttemptResult(False, False, None, _describe(exc), reason=reason)
        if scope.cancelled_caught:
            return AttemptResult(False, False, None, f"timeout: no answer within {timeout:g}s",
                                 reason="timeout")
        return classify(response.status_code, response.headers.get("retry-after"))

    async def _record(self, row: DueDelivery, result: AttemptResult) -> None:
        outcome: Outcome
        delay_s = 0.0
        error = result.error
        if result.reason is not None:
            self.failures[result.reason] += 1
        if result.ok:
            outcome = "delivered"
        elif result.final:
            outcome = "dead"
        elif row.attempts + 1 >= self.settings.max_attempts:
            outcome = "dead"
            error = f"gave up after {row.attempts + 1} attempts; last: {error}"
        else:
            outcome = "retry"
            delay_s = retry_delay(row.attempts + 1, self.settings, self._rng)
            if result.retry_after is not None:
                delay_s = max(delay_s, result.retry_after)
        try:
            state = await self.engine.submit(RecordDeliveryAttempt(
                outbox_id=row.id, attempts=row.attempts, outcome=outcome, status=result.status,
                error=error, retry_delay_ms=int(delay_s * 1000),
            ))
        except BrokerError as exc:
            # The writer is closing or failed to commit: the row stays pending
            # and is attempted again (after a restart, if it comes to that).
            log.warning("webhook dispatcher: could not record delivery %d: %s", row.id, exc)
            return
        if state is None:
            return  # deleted or replayed meanwhile
        if outcome == "delivered":
            self.delivered += 1
        elif outcome == "dead":
            self.dead_lettered += 1
            log.warning("webhook dispatcher: delivery %d to subscription %d is a dead letter: %s",
                        row.id, row.subscription_id, error)
        else:
            self.retried += 1
            log.info("webhook dispatcher: delivery %d to subscription %d failed (%s); "
                     "attempt %d in %.1fs", row.id, row.subscription_id, error,
                     row.attempts + 2, delay_s)

    # -- housekeeping -------------------------------------------------------------------

    async def _prune_delivered(self) -> None:
        settings = self.settings
        batch = PruneDeliveredWebhooks(before_ms=0).limit
        while True:
            await trio.sleep(settings.prune_interval_seconds)
            before_ms = int((time.time() - settings.delivered_retention_seconds) * 1000)
            while True:
                try:
                    pruned = await self.engine.submit(PruneDeliveredWebhooks(before_ms=before_ms))
                except BrokerError as exc:
                    log.warning("webhook dispatcher: pruning failed: %s", exc)
                    break
                if pruned < batch:
                    break


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- the dispatcher of an engine (for the operations: SSRF policy, wake-ups) ----------

_dispatchers: weakref.WeakKeyDictionary[Engine, WebhookDispatcher] = (
    weakref.WeakKeyDictionary()
)
_default_policy = DestinationPolicy()


def attach(engine: Engine, dispatcher: WebhookDispatcher) -> None:
    """Make `dispatcher` the one the webhook operations of `engine` consult.

    The operations get only the engine; this is how they find the allow list
    and whom to wake. Keyed weakly: it goes away with the engine.
    """
    _dispatchers[engine] = dispatcher


def dispatcher_for(engine: Engine) -> WebhookDispatcher | None:
    return _dispatchers.get(engine)


def policy_for(engine: Engine) -> DestinationPolicy:
    """The SSRF policy for `engine`: its dispatcher's, or allow nothing private."""
    dispatcher = _dispatchers.get(engine)
    return _default_policy if dispatcher is None else dispatcher.policy


def notify(engine: Engine) -> None:
    """Wake `engine`'s dispatcher, if it has one."""
    dispatcher = _dispatchers.get(engine)
    if dispatcher is not None:
        dispatcher.notify()

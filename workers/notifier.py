"""The notifier: delivers order events to storefronts' webhooks, off the critical path.

``settle.lua`` queues an event in ``og:notify`` when it settles an order, so commits never wait
for a webhook. One notifier leads (a Redis lease; the others stand by) and hands every event to
its destination's :class:`Lane`. Each lane has its own circuit breaker: a failed or slow
delivery counts against it, and once it opens, or while the lane has a backlog, events go to the
lane's deferred stream instead of being attempted. The lane replays that stream head first -- one
probe while half-open, in batches once closed -- with jittered backoff between failing rounds,
and buries events that kept failing for ``notify_give_up_s`` in the notification dead list.

Delivery is at least once: an event is deleted only after a 2xx (or after it was written to its
lane or the dead list), and a new leader starts again from what is left. Receivers deduplicate by
``event_id`` and check ``Ordergate-Signature`` (workers.signing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Coroutine
from typing import Any

import httpx

from ordergate.buffer.connection import cancel_and_wait, is_cluster
from ordergate.buffer.keys import Keys
from ordergate.buffer.notifications import Event, NotificationStreams
from ordergate.buffer.webhooks import Webhook, get_webhook, redacted
from ordergate.workers.backoff import backoff, sleep_or_stop
from ordergate.workers.breaker import CircuitBreaker, State
from ordergate.workers.config import WorkerConfig
from ordergate.workers.errors import BreakerOpen, LeaseLost, WebhookFailed
from ordergate.workers.publicnet import public_only
from ordergate.workers.signing import HEADER, sign

log = logging.getLogger(__name__)

USER_AGENT = "ordergate-webhooks/1"


class Lane:
    """One destination (a storefront's webhook): its breaker, deliveries and deferred stream."""

    HOOK_CACHE_S = 5.0

    def __init__(self, notifier: Notifier, storefront_id: str, backlog: int = 0) -> None:
        self.n = notifier
        self.storefront_id = storefront_id
        self.breaker = CircuitBreaker(
            f"webhook:{storefront_id}", notifier.config.breaker, on_change=_log_change
        )
        self.backlog = backlog  # events in the deferred stream or on their way there
        self.inflight = 0
        self.delivered = 0
        self.failed = 0
        self.last_error = ""
        self._to_defer: list[Event] = []
        self._deferring = False
        self._defer_wake = asyncio.Event()
        self._replay_wake = asyncio.Event()
        self._hook: Webhook | None = None
        self._hook_at = -1e9
        notifier.spawn(self._deferrer())
        notifier.spawn(self._replayer())
        if backlog:
            self._replay_wake.set()

    @property
    def concurrency(self) -> int:
        return self.n.config.notify_concurrency

    def submit(self, event: Event) -> None:
        """Deliver now, or defer (never waits: the dispatcher serves every lane)."""
        if self.backlog or self.inflight >= self.concurrency or not self.breaker.allows():
            self._defer(event)
        else:
            self.inflight += 1
            self.n.spawn(self._direct(event))

    @property
    def held(self) -> int:
        """Events this lane holds in memory: in flight, or waiting to be written deferred."""
        return self.inflight + len(self._to_defer)

    def snapshot(self) -> dict[str, Any]:
        b = self.breaker.snapshot()
        return {
            "breaker": b.state.name.lower(),
            "calls": b.calls,
            "failure_rate": round(b.failure_rate, 3),
            "slow_rate": round(b.slow_rate, 3),
            "open_for_s": round(b.open_for_s, 2),
            "inflight": self.inflight,
            "deferred": self.backlog,
            "delivered": self.delivered,
            "failed": self.failed,
            "last_error": self.last_error,
        }

    def _defer(self, event: Event) -> None:
        self.backlog += 1
        self._to_defer.append(event)
        self._defer_wake.set()

    async def _deferrer(self) -> None:
        """Writes deferrals one batch at a time, so the lane keeps the order they came in."""
        while True:
            await self._defer_wake.wait()
            self._defer_wake.clear()
            batch, self._to_defer = self._to_defer, []
            self.n.released()
            if batch:
                self._deferring = True
                try:
                    await self.n.streams.defer(batch)
                finally:
                    self._deferring = False
                self._replay_wake.set()

    async def _direct(self, event: Event) -> None:
        try:
            error = await self._attempt(event)
        finally:
            self.inflight -= 1
            self.n.released()
        if error is None:
            await self.n.streams.delivered([event], deferred=False)
            return
        if error:
            await self.n.streams.failed(event, error)
        self._defer(event)

    async def _attempt(self, event: Event) -> str | None:
        """None when delivered, "" when the breaker refused it, else the error."""
        try:
            await self.breaker.call(lambda: self._post(event))
        except BreakerOpen:
            return ""
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the destination counts
            self.failed += 1
            self.last_error = _describe(exc)
            return self.last_error
        self.delivered += 1
        return None

    async def _post(self, event: Event) -> None:
        hook = await self._webhook()
        if hook is None:
            raise WebhookFailed(f"storefront {self.storefront_id!r} has no webhook registered")
        body = event.payload()
        response = await self.n.http.post(
            hook.url,
            content=body,
            headers={
                "Content-Type": "application/json",
                HEADER: sign(hook.secret, body),
                "Ordergate-Event-Id": event.event_id,
                "User-Agent": USER_AGENT,
            },
        )
        if not 200 <= response.status_code < 300:
            raise WebhookFailed(f"HTTP {response.status_code} from {redacted(hook.url)}")

    async def _webhook(self) -> Webhook | None:
        now = time.monotonic()
        if now - self._hook_at > self.HOOK_CACHE_S:
            self._hook = await get_webhook(self.n.redis, self.n.keys, self.storefront_id)
            self._hook_at = now
        return self._hook

    async def _replayer(self) -> None:
        """Replays the deferred stream head first whenever the breaker lets calls through."""
        attempt = 0
        while True:
            if not self.backlog:
                await self._replay_wake.wait()
                self._replay_wake.clear()
                continue
            state = self.breaker.state
            if state is State.OPEN:
                await self._pause(max(self.breaker.snapshot().open_for_s, 0.01))
                continue
            if not self.breaker.allows():  # a probe is out
                await self._pause(0.05)
                continue
            size = 1 if state is State.HALF_OPEN else max(1, self.concurrency - self.inflight)
            events = await self.n.streams.lane_head(self.storefront_id, size)
            if not events:
                if not self._to_defer and not self._deferring:
                    self.backlog = 0  # nothing on its way: the count drifted (e.g. a requeue)
                await self._pause(0.05)
                continue
            results = await asyncio.gather(*(self._attempt(e) for e in events))
            done = [e for e, r in zip(events, results, strict=True) if r is None]
            failed = [(e, r) for e, r in zip(events, results, strict=True) if r]
            await self.n.streams.delivered(done, deferred=True)
            self.backlog -= len(done)
            if not failed:
                attempt = 0
                continue
            for event, error in failed:
                await self.n.streams.failed(event, error)
            attempt += 1
            await self._bury_expired(failed[-1][1])
            await self._pause(backoff(attempt, self.n.config.notify_backoff_max_s, base=0.1))

    async def _bury_expired(self, error: str) -> None:
        """Events deferred longer than notify_give_up_s ago, while the destination still fails."""
        cutoff = time.time_ns() // 1000 - int(self.n.config.notify_give_up_s * 1e6)
        while True:
            head = await self.n.streams.lane_head(self.storefront_id, 500)
            expired = [e for e in head if e.deferred_at_us < cutoff]
            if not expired:
                return
            await self.n.streams.bury(expired, error)
            self.backlog -= len(expired)
            log.warning(
                "webhook %s: %d events failed for %.0f s; moved to the notification dead list",
                self.storefront_id,
                len(expired),
                self.n.config.notify_give_up_s,
            )
            if len(expired) < len(head):
                return

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._replay_wake.wait(), seconds)
        self._replay_wake.clear()


class Notifier:
    """One per worker process; the one holding the lease delivers."""

    STANDBY_POLL_S = 1.0
    LEASE_MS = 5000  # a dead leader's lanes resume within this (plus a standby poll)

    def __init__(self, config: WorkerConfig, redis: Any) -> None:
        self.config = config
        self.redis = redis
        self.keys = Keys(config.key_prefix, is_cluster(redis))
        self.streams = NotificationStreams(redis, self.keys, config.shards)
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lanes: dict[str, Lane] = {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
        transport = httpx.AsyncHTTPTransport(limits=limits)
        if not config.webhook_allow_private:
            public_only(transport)
        self.http = httpx.AsyncClient(
            transport=transport,
            timeout=httpx.Timeout(config.notify_timeout_s + 1),
            follow_redirects=False,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._fault: asyncio.Future[None] | None = None
        self._room = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Lead when the lease is free, stand by otherwise, until ``stop``; closes the client."""
        attempt = 0
        try:
            while not stop.is_set():
                try:
                    if await self.streams.hold_lease(self.token, self.LEASE_MS):
                        attempt = 0
                        await self._lead(stop)
                        continue
                except Exception as exc:  # noqa: BLE001 - Redis away: stand by and retry
                    attempt += 1
                    log.warning("notifier: %s; retrying", _describe(exc))
                pause = backoff(attempt, 5.0) if attempt else self.STANDBY_POLL_S
                await sleep_or_stop(stop, pause)
        finally:
            await self.http.aclose()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a lane's task; a failure in one (Redis gone) ends this leadership term."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._fault is not None and not self._fault.done():
            self._fault.set_exception(exc)

    def lane(self, storefront_id: str, backlog: int = 0) -> Lane:
        lane = self.lanes.get(storefront_id)
        if lane is None:
            lane = self.lanes[storefront_id] = Lane(self, storefront_id, backlog)
        return lane

    async def _lead(self, stop: asyncio.Event) -> None:
        log.info("notifier %s leads", self.token)
        self._fault = asyncio.get_running_loop().create_future()
        beat = asyncio.create_task(self._keep_lease_and_report(stop))
        dispatch = asyncio.create_task(self._dispatch(stop))
        tasks = {beat, dispatch}
        if self.keys.cluster:  # each lane writes its own events' stream: gather them
            tasks.add(asyncio.create_task(self._gather(stop)))
        try:
            for storefront_id, n in (await self.streams.lane_lengths()).items():
                self.lane(storefront_id, n)
            done, _ = await asyncio.wait({*tasks, self._fault}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            if not await cancel_and_wait([*tasks, *self._tasks]):
                log.error("notifier %s: a task would not end; left behind", self.token)
            self._tasks.clear()
            self.lanes.clear()
            if not self._fault.done():
                self._fault.cancel()
            with contextlib.suppress(Exception):
                await self.redis.delete(self.keys.notify_state())
            log.info("notifier %s stops leading", self.token)

    async def _dispatch(self, stop: asyncio.Event) -> None:
        last = "0-0"
        block = min(self.config.read_block_ms, 1000)
        while not stop.is_set():
            await self._room_to_hold()
            for event in await self.streams.read_new(last, 500, block):
                last = event.entry_id
                self.lane(event.storefront_id).submit(event)

    GATHER_IDLE_S = 0.05

    async def _gather(self, stop: asyncio.Event) -> None:
        """On a cluster: the lanes' event streams into og:notify, polled every GATHER_IDLE_S
        while they are empty (no XREAD waits on streams of several slots)."""
        while not stop.is_set():
            if not await self.streams.gather_lanes(500):
                await sleep_or_stop(stop, self.GATHER_IDLE_S)

    def _held(self) -> int:
        return sum(lane.held for lane in self.lanes.values())

    async def _room_to_hold(self) -> None:
        """Wait while the lanes hold more than ``notify_max_held`` events in memory (they are
        writing deferrals or delivering): each lane calls ``released`` as its count drops."""
        while True:
            self._room.clear()
            if self._held() <= self.config.notify_max_held:
                return
            await self._room.wait()

    def released(self) -> None:
        self._room.set()

    async def _keep_lease_and_report(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not await self.streams.hold_lease(self.token, self.LEASE_MS):
                raise LeaseLost(self.token)
            state = {
                "leader": self.token,
                "at": time.time(),
                "lanes": {sf: lane.snapshot() for sf, lane in sorted(self.lanes.items())},
            }
            await self.redis.set(self.keys.notify_state(), json.dumps(state), ex=10)
            await sleep_or_stop(stop, 1.0)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _log_change(name: str, old: State, new: State) -> None:
    level = logging.WARNING if new is State.OPEN else logging.INFO
    log.log(level, "breaker %s: %s -> %s", name, old.name.lower(), new.name.lower())

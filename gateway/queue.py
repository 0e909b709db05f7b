"""GET /v1/queue/{ticket} (and its Server-Sent Events twin): a customer's place in the queue.

No API key: the ticket is the credential. A waiting order is answered from the ticket (its
queue and lane numbers) and the lanes' state (one shared Redis read, see ``DrainView``); only a
settled order costs a read: of its status record, and for a committed one of its Postgres row.
Answers carry an ETag and honour If-None-Match, and ``poll_after_seconds`` grows with the
position so a long queue polls slowly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ordergate.buffer.connection import cancel_and_wait, memory_used
from ordergate.buffer.keys import Keys
from ordergate.buffer.position import DrainState, place_in_line, read_drain_state
from ordergate.buffer.status import read_status
from ordergate.gateway.committed import read_committed
from ordergate.gateway.config import GatewayConfig
from ordergate.gateway.errors import OrderStoreUnavailable, TicketNotFound, TooManyStreams
from ordergate.gateway.state import GatewayState
from ordergate.sharding.ids import shard_of_order_id

log = logging.getLogger(__name__)
_encoder = msgspec.json.Encoder()
JSON = "application/json"
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "ETag"}
SSE_CHECK_S = 1.0
SSE_KEEPALIVE_S = 15.0


class QueueStatus(msgspec.Struct, frozen=True):
    status: str  # queued | processing | committed | rejected | dead_lettered
    position: int
    eta_seconds: int | None
    eta_reason: str | None
    poll_after_seconds: int | None
    updated_at: dt.datetime
    queue_number: int
    ahead_at_admission: int
    order_id: str

    @property
    def final(self) -> bool:
        return self.poll_after_seconds is None


class DrainView:
    """The lanes' state, followed live: every gateway process keeps it in memory.

    The lanes publish on ``og:drain:changed`` whenever a batch is taken or settled and at
    every heartbeat; on each notice this view re-reads the state (one read however many notices
    queued up), and re-reads every second anyway. So a poll costs no Redis round trip and sees
    what a read would have seen a millisecond earlier. While the subscription is down, polls
    read the state themselves instead (concurrent ones share one read that starts after they
    arrived), so an answer is never staler than the request.
    """

    REFRESH_S = 1.0

    def __init__(self, redis: Any, keys: Keys, shards: int) -> None:
        self._redis = redis
        self._keys = keys
        self._shards = shards
        self._state: DrainState | None = None
        self._live = False
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[DrainState]] = []
        self._reading = False
        self._closing = False
        self._memory: float | None = None  # used_memory / maxmemory, when maxmemory is set
        self._memory_at = 0.0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        self._closing = True  # redis-py may turn a cancellation into a connection error or lose
        if self._task is not None:  # it (buffer.connection): the flag ends the loop too
            await cancel_and_wait([self._task], give_up_s=float("inf"))

    def memory_ratio(self) -> float | None:
        """Redis's used memory over its maxmemory (checked about once a second), if known."""
        return self._memory if self._live else None

    async def _check_memory(self) -> None:
        if time.monotonic() - self._memory_at < self.REFRESH_S:
            return
        self._memory_at = time.monotonic()
        self._memory = await memory_used(self._redis)

    def current(self) -> DrainState | None:
        """The followed state, or None while the subscription is down."""
        return self._state if self._live else None

    async def get(self) -> DrainState:
        state = self.current()
        if state is not None:
            return state
        waiter: asyncio.Future[DrainState] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if not self._reading:
            self._reading = True
            asyncio.get_running_loop().create_task(self._pump())
        return await waiter

    async def _follow(self) -> None:
        attempt = 0
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self._keys.drain_changes())
                self._state = await read_drain_state(
                    self._redis, self._keys, self._shards
                )  # after SUBSCRIBE
                self._memory_at = 0.0
                await self._check_memory()
                self._live, attempt = True, 0
                while not self._closing:
                    notice = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self.REFRESH_S
                    )
                    while notice is not None:  # fold every queued notice into one read
                        notice = await pubsub.get_message(ignore_subscribe_messages=True)
                    self._state = await read_drain_state(self._redis, self._keys, self._shards)
                    await self._check_memory()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: polls read for themselves
                self._live = False
                if self._closing:
                    return
                attempt += 1
                if attempt == 1:
                    log.warning("not following the drain state (%r); polls read it directly", exc)
                await asyncio.sleep(min(5.0, 0.1 * 2**attempt))
            finally:
                self._live = False
                await _close_quietly(pubsub)

    async def _pump(self) -> None:
        try:
            while self._waiters:
                round_, self._waiters = self._waiters, []
                try:
                    state = await read_drain_state(self._redis, self._keys, self._shards)
                except Exception as exc:  # noqa: BLE001 - handed to each caller
                    for w in round_:
                        if not w.done():
                            w.set_exception(exc)
                    continue
                for w in round_:
                    if not w.done():
                        w.set_result(state)
        finally:
            self._reading = False


async def _close_quietly(pubsub: Any) -> None:
    try:
        await asyncio.wait_for(pubsub.aclose(), 2)
    except Exception:  # noqa: BLE001
        pass


def poll_after(position: int, eta: int | None) -> int:
    """Near the front 1-2 s, far back up to 30 s: a million waiting browsers stay affordable."""
    if eta is not None:
        return min(30, max(1, round(eta / 10)))
    return min(30, 2 + position // 2000)


async def answer(state: GatewayState, raw_ticket: str) -> QueueStatus:
    """The queue status behind a ticket; TicketNotFound for unknown or expired tickets."""
    ticket = await state.tickets.read(raw_ticket)
    if ticket is None:
        raise TicketNotFound("this is not a queue ticket of this gateway")
    drain = await state.drain_view.get()
    seq, config = ticket.seq, state.config
    shard = shard_of_order_id(ticket.order_id, config.shards)
    if shard is not None and _unsettled(drain, shard, ticket.storefront, seq, ticket.lane_seq):
        return _waiting(
            ticket.order_id,
            seq,
            ticket.lane_seq,
            ticket.ahead,
            ticket.accepted_at_ms * 1000,
            drain,
            config,
            ticket.storefront,
        )
    record = (
        await read_status(state.redis, state.keys, shard, ticket.order_id, ticket.storefront)
        if shard is not None
        else None
    )
    if record is None and shard is not None:
        # Settled, and no record of an exception: committed. Its row says when (and so when
        # the ticket expires); while Postgres is out of reach, the lane's last settlement will do.
        try:
            committed = await read_committed(state, shard, ticket.order_id)
        except OrderStoreUnavailable:
            lane = drain.lane(shard)
            at = lane.settled_at_us or ticket.accepted_at_ms * 1000
            settled_at = dt.datetime.fromtimestamp(at / 1e6, tz=dt.UTC)
            seq = ticket.seq
        else:
            if committed is None:
                raise TicketNotFound("this queue ticket has expired") from None
            age = dt.datetime.now(dt.UTC) - committed.committed_at
            if age.total_seconds() > config.ticket_ttl_s:
                raise TicketNotFound("this queue ticket has expired")
            settled_at, seq = committed.committed_at, committed.seq
        return _settled("committed", settled_at, seq, ticket.ahead, ticket.order_id)
    if record is None:
        raise TicketNotFound("this queue ticket has expired")
    if not record.final:
        # Settled and then re-queued by an operator: its place is under its new number.
        return _waiting(
            record.order_id,
            record.seq,
            record.lane_seq,
            record.ahead,
            record.accepted_at_us,
            drain,
            config,
            record.storefront_id,
        )
    settled_at = record.settled_at or record.accepted_at
    age = dt.datetime.now(dt.UTC) - settled_at
    if age.total_seconds() > config.ticket_ttl_s:
        raise TicketNotFound("this queue ticket has expired")
    return _settled(record.status, settled_at, record.seq, record.ahead, record.order_id)


def _unsettled(drain: DrainState, shard: int, storefront: str, seq: int, lane_seq: int) -> bool:
    """Whether the order is still waiting, by its sub-lane's watermark (every order of it
    numbered up to ``w:<sf>`` is settled), or the lane's for a ticket from before sub-lanes."""
    lane = drain.lane(shard)
    sub = lane.subs.get(storefront) if storefront else None
    if storefront and lane_seq:
        return sub is None or lane_seq > sub.watermark
    return seq > lane.watermark


def _settled(status: str, at: dt.datetime, seq: int, ahead: int, order_id: str) -> QueueStatus:
    """A final answer: nothing ahead, nothing left to poll for."""
    return QueueStatus(
        status=status,
        position=0,
        eta_seconds=0,
        eta_reason=None,
        poll_after_seconds=None,
        updated_at=at,
        queue_number=seq,
        ahead_at_admission=ahead,
        order_id=order_id,
    )


def _waiting(
    order_id: str,
    seq: int,
    lane_seq: int,
    ahead: int,
    accepted_us: int,
    drain: DrainState,
    config: GatewayConfig,
    storefront: str = "",
) -> QueueStatus:
    shard = shard_of_order_id(order_id, config.shards) or 0
    place = place_in_line(seq, lane_seq, shard, drain, config.drain_stale_s, storefront=storefront)
    changed = max(accepted_us, drain.settled_at_us)  # the position last moved then
    return QueueStatus(
        status=place.status,
        position=place.position,
        eta_seconds=place.eta_seconds,
        eta_reason=place.eta_reason,
        poll_after_seconds=poll_after(place.position, place.eta_seconds),
        updated_at=dt.datetime.fromtimestamp(changed / 1e6, tz=dt.UTC),
        queue_number=seq,
        ahead_at_admission=ahead,
        order_id=order_id,
    )


def _etag(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=8).hexdigest() + '"'


_HEADERS = [
    (b"cache-control", b"no-cache"),
    *((k.lower().encode(), v.encode()) for k, v in CORS.items()),
]
_JSON_HEADERS = [*_HEADERS, (b"content-type", JSON.encode())]


class QueueStatusEndpoint:
    """GET /v1/queue/{ticket} as a bare ASGI endpoint: the most-polled route skips Starlette's
    Request and Response objects (errors still reach the app's problem handlers)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        state: GatewayState = scope["app"].state.gateway
        status = await answer(state, scope["path_params"]["ticket"])
        body = _encoder.encode(status)
        etag = _etag(body).encode()
        for name, value in scope["headers"]:
            if name == b"if-none-match" and etag in (m.strip() for m in value.split(b",")):
                headers = [*_HEADERS, (b"etag", etag)]
                await send({"type": "http.response.start", "status": 304, "headers": headers})
                await send({"type": "http.response.body", "body": b""})
                return
        headers = [*_JSON_HEADERS, (b"etag", etag), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def queue_events(request: Request) -> Response:
    """The same answers as Server-Sent Events, one ``status`` event per change, until final."""
    state: GatewayState = request.app.state.gateway
    ticket = request.path_params["ticket"]
    first = await answer(state, ticket)  # unknown tickets get a plain 404, not a stream
    config, streams = state.config, state.streams
    if streams[ticket] >= config.sse_per_ticket or streams.total() >= config.sse_streams:
        raise TooManyStreams(
            f"this gateway holds {streams[ticket]} event streams of this ticket and"
            f" {streams.total()} in all (at most {config.sse_per_ticket} and"
            f" {config.sse_streams}); poll GET /v1/queue/{{ticket}} instead",
            headers={"Retry-After": "30", **CORS},
        )
    streams[ticket] += 1
    lifetime = config.sse_max_s

    async def events() -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        current: QueueStatus | None = first
        last_body = b""
        started = quiet_since = time.monotonic()
        while True:
            if current is not None:
                body = _encoder.encode(current)
                if body != last_body:
                    last_body, quiet_since = body, time.monotonic()
                    yield b"id: " + _etag(body).strip('"').encode() + b"\nevent: status\ndata: "
                    yield body + b"\n\n"
                if current.final:
                    return
            if time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            if time.monotonic() - started > lifetime:
                return  # EventSource reconnects by itself
            await asyncio.sleep(SSE_CHECK_S)  # pacing between checks, not synchronisation
            if await request.is_disconnected():
                return
            try:
                current = await answer(state, ticket)
            except TicketNotFound as exc:
                yield b"event: gone\ndata: " + _encoder.encode({"detail": exc.detail}) + b"\n\n"
                return
            except Exception:  # noqa: BLE001 - Redis hiccup: keep the stream, try again
                current = None

    return _CountedStream(
        streams,
        ticket,
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **CORS},
    )


class _CountedStream(StreamingResponse):
    """A stream counted among its ticket's until it ends, however it ends (even unstarted)."""

    def __init__(self, streams: Counter[str], ticket: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._streams, self._ticket = streams, ticket

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._streams[self._ticket] -= 1
            if self._streams[self._ticket] <= 0:
                del self._streams[self._ticket]

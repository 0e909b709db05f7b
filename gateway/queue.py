"""GET /v1/queue/{ticket} (and its Server-Sent Events twin): a customer's place in the queue.

No API key: the ticket is the credential. A waiting order is answered from the ticket (its
queue number) and the drain's state (one shared Redis read, see ``DrainView``); only a settled
order costs a read of its status record. Answers carry an ETag and honour If-None-Match, and
``poll_after_seconds`` grows with the position so a long queue polls slowly.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from buffer.keys import Keys
from buffer.position import DrainState, place_in_line, read_drain_state
from buffer.status import read_status
from gateway.errors import TicketNotFound
from gateway.state import GatewayState
from ordergate.settings import Settings
from sharding.ids import shard_of_order_id

_encoder = msgspec.json.Encoder()
JSON = "application/json"
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "ETag"}
SSE_CHECK_S = 1.0
SSE_MAX_S = 3600.0
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
    """The drain's state as of a moment after the caller asked, shared by concurrent callers.

    A caller never gets a read that started before it arrived (so a position is never older
    than the request), yet under load one Redis round trip serves every request that came in
    while the previous one was in flight.
    """

    def __init__(self, redis: Any, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._waiters: list[asyncio.Future[DrainState]] = []
        self._reading = False

    async def get(self) -> DrainState:
        waiter: asyncio.Future[DrainState] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if not self._reading:
            self._reading = True
            asyncio.get_running_loop().create_task(self._pump())
        return await waiter

    async def _pump(self) -> None:
        try:
            while self._waiters:
                round_, self._waiters = self._waiters, []
                try:
                    state = await read_drain_state(self._redis, self._keys)
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
    seq, settings = ticket.seq, state.settings
    if seq > drain.settled:
        return _waiting(
            ticket.order_id, seq, ticket.ahead, ticket.accepted_at_ms * 1000, drain, settings
        )
    shard = shard_of_order_id(ticket.order_id, settings.shards)
    record = (
        await read_status(state.redis, state.keys, shard, ticket.order_id)
        if shard is not None
        else None
    )
    if record is None:
        raise TicketNotFound("this queue ticket has expired")
    if not record.final:
        # Settled and then re-queued by an operator: its place is under its new number.
        accepted_us = int(record.accepted_at.timestamp() * 1e6)
        return _waiting(record.order_id, record.seq, record.ahead, accepted_us, drain, settings)
    settled_at = record.settled_at or record.accepted_at
    age = dt.datetime.now(dt.UTC) - settled_at
    if age.total_seconds() > settings.ticket_ttl_s:
        raise TicketNotFound("this queue ticket has expired")
    return QueueStatus(
        status=record.status,
        position=0,
        eta_seconds=0,
        eta_reason=None,
        poll_after_seconds=None,
        updated_at=settled_at,
        queue_number=record.seq,
        ahead_at_admission=record.ahead,
        order_id=record.order_id,
    )


def _waiting(
    order_id: str, seq: int, ahead: int, accepted_us: int, drain: DrainState, settings: Settings
) -> QueueStatus:
    place = place_in_line(seq, drain, settings.drain_stale_s)
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


async def queue_status(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    status = await answer(state, request.path_params["ticket"])
    body = _encoder.encode(status)
    etag = _etag(body)
    headers = {"ETag": etag, "Cache-Control": "no-cache", **CORS}
    match = request.headers.get("if-none-match")
    if match and etag in (m.strip() for m in match.split(",")):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=JSON, headers=headers)


async def queue_events(request: Request) -> Response:
    """The same answers as Server-Sent Events, one ``status`` event per change, until final."""
    state: GatewayState = request.app.state.gateway
    ticket = request.path_params["ticket"]
    first = await answer(state, ticket)  # unknown tickets get a plain 404, not a stream

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
            if time.monotonic() - started > SSE_MAX_S:
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

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **CORS},
    )

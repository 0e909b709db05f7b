"""POST /v1/orders (admit) and GET /v1/orders/{order_id} (status)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import re
import time
from typing import Any, NoReturn

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ordergate.buffer.admission import Admission, Outcome, RateLimit
from ordergate.buffer.errors import BufferUnavailable
from ordergate.buffer.idempotency import FINGERPRINT_BYTES
from ordergate.buffer.message import admission_args, row_summary
from ordergate.buffer.order import ORDER_ENCODER
from ordergate.buffer.position import DrainState, seconds_until_room
from ordergate.buffer.status import Change, read_status
from ordergate.gateway import metrics
from ordergate.gateway.auth import authorization_of
from ordergate.gateway.committed import read_committed
from ordergate.gateway.errors import (
    BufferFull,
    NotFound,
    OrderIdReused,
    OrderInFlight,
    PayloadTooLarge,
    RateLimited,
    ShareExhausted,
    UnsupportedMediaType,
)
from ordergate.gateway.limits import header_fields, seconds
from ordergate.gateway.state import GatewayState
from ordergate.gateway.validation import parse_order
from ordergate.sharding.ids import new_nonce, shard_of_order_id
from ordergate.sharding.routing import shard_for

_encoder = msgspec.json.Encoder()
JSON = "application/json"


class Receipt(msgspec.Struct, frozen=True):
    order_id: str
    status: str
    status_url: str
    storefront_order_id: str
    accepted_at: dt.datetime
    queue_number: int
    ahead_at_admission: int
    ticket: str  # the customer's credential for queue_url and wait_url
    queue_url: str
    wait_url: str


class OrderStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    order_id: str
    storefront_order_id: str
    status: str
    accepted_at: dt.datetime
    committed_at: dt.datetime | None = None
    rejected_at: dt.datetime | None = None
    reason: str | None = None
    timeline: list[Change] = []
    ticket: str | None = None
    wait_url: str | None = None


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == JSON or (media.startswith("application/") and media.endswith("+json"))


async def _receive_body(receive: Any, limit: int) -> bytes:
    """The body straight from ASGI ``receive`` (no Request.stream generator on the hot path)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def base_url(request: Request, state: GatewayState) -> str:
    """Where customers reach this gateway: ``public_url`` if set, else as this request did."""
    return _base_url(request.scope, state, request.headers.get("host"))


def _base_url(scope: Any, state: GatewayState, host: str | None) -> str:
    """``public_url`` when set (the Host header is then never used); else the Host header if it
    is a plain host[:port], else the address the request came in on."""
    if state.config.public_url:
        return state.config.public_url.rstrip("/")
    if host is None or not _HOST.fullmatch(host):
        address, port = scope.get("server") or ("127.0.0.1", None)
        host = address if port is None else f"{address}:{port}"
    return f"{scope['scheme']}://{host}"


_HOST = re.compile(
    r"(?:[A-Za-z0-9-]{1,63}\.)*[A-Za-z0-9-]{1,63}(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?"
)


def _refuse_full(
    drain: DrainState | None, bound: int, headers: dict[str, str] | None = None
) -> NoReturn:
    retry = seconds_until_room(drain, bound)
    raise BufferFull(
        f"the buffer holds {bound} orders not yet committed; nothing was accepted."
        f" Retry in {retry} s with the same storefront_order_id",
        headers={"Retry-After": str(retry), **(headers or {})},
    )


def _refuse(
    state: GatewayState, storefront: str, admission: Admission, drain: DrainState | None
) -> NoReturn:
    """The 429 of an order admission refused for its storefront's rate or share, or the bound."""
    limit = admission.limit
    fields = header_fields(limit) if limit is not None else {}
    bound = state.config.max_buffered
    if admission.outcome is Outcome.RATE_LIMITED:
        state.refusals.count(storefront, "rate")
        assert limit is not None
        retry = max(1, seconds(limit.reset_ms))
        raise RateLimited(
            f"storefront {storefront!r} may send {limit.quota} orders at once, refilled over"
            f" {limit.window_s} s; nothing was accepted. Retry in {retry} s with the same"
            " storefront_order_id",
            headers={"Retry-After": str(retry), **fields},
        )
    if admission.outcome is Outcome.OVER_SHARE:
        state.refusals.count(storefront, "share")
        retry = seconds_until_room(drain, bound)
        raise ShareExhausted(
            f"the buffer is near its bound of {bound} orders and storefront {storefront!r}"
            f" holds {admission.held} of them, its share being {admission.share}; nothing was"
            f" accepted. Retry in {retry} s with the same storefront_order_id",
            headers={"Retry-After": str(retry), **fields},
        )
    state.refusals.count(storefront, "full")
    _refuse_full(drain, bound, fields)


async def _storefront(state: GatewayState, authorization: str | None, seconds: float) -> str:
    """The API key's storefront, or 503 once ``seconds`` have passed: while Redis stalls, a key
    not in the cache must not hold the request until the client's socket timeout (5 s)."""
    storefront = state.auth.cached(authorization)
    if storefront is not None:
        return storefront
    try:
        async with asyncio.timeout(seconds):
            return await state.auth.storefront(authorization)
    except TimeoutError:
        raise BufferUnavailable("Redis did not answer the API key lookup in time") from None


_REFUSALS = (Outcome.FULL, Outcome.RATE_LIMITED, Outcome.OVER_SHARE)


class CreateOrderEndpoint:
    """POST /v1/orders as a bare ASGI endpoint, the hottest route: no Starlette middleware,
    routing, Request or Response object on the way (``GatewayApp`` dispatches here first). Errors
    still become problem+json through the app's own exception handlers."""

    def __init__(self, handlers: dict[Any, Any]) -> None:
        self._handlers = handlers

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        try:
            status, body, location, limit = await create_order(scope, receive)
        except ClientDisconnect:
            return  # nobody to answer; an order admitted meanwhile is found again by its retry
        except Exception as exc:
            metrics.count_refusal(exc)
            handler = next(
                (self._handlers[c] for c in type(exc).__mro__ if c in self._handlers), None
            )
            if handler is None:
                raise
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
            return
        metrics.ADMISSION.observe(time.perf_counter() - started)
        (metrics.ACCEPTED if status == 202 else metrics.DUPLICATE).inc()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"location", location.encode()),
        ]
        if limit is not None:
            headers += [(k.lower().encode(), v.encode()) for k, v in header_fields(limit).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def create_order(scope: Any, receive: Any) -> tuple[int, bytes, str, RateLimit | None]:
    """Admit one order: (202 new | 200 already admitted, the receipt, its status URL, the
    storefront's rate limit as admission left it)."""
    state: GatewayState = scope["app"].state.gateway
    config = state.config
    headers: dict[bytes, bytes] = dict(scope["headers"])  # one pass; names arrive lower-case
    # One deadline for the waits on Redis, both: the API key lookup (if not cached), admission.
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = config.admission_timeout_s
    storefront = await _storefront(state, authorization_of(scope["headers"]), deadline)
    deadline -= loop.time() - started
    content_type = headers.get(b"content-type")
    if not _is_json(content_type.decode("latin-1") if content_type else None):
        raise UnsupportedMediaType("send the order as 'Content-Type: application/json'")
    encoding = headers.get(b"content-encoding", b"identity").strip().lower()
    if encoding != b"identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding.decode('latin-1')!r} is not accepted: send the order"
            " uncompressed (it is at most max_body_bytes)"
        )
    limit = config.max_body_bytes
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"the body is {length.decode()} bytes; the limit is {limit}")
    order = parse_order(await _receive_body(receive, limit))

    bound = config.max_buffered
    followed = state.drain_view.current()
    if bound and followed is not None and followed.depth >= bound:
        state.refusals.count(storefront, "full")
        _refuse_full(followed, bound)  # shed without a Redis round trip
    memory = state.drain_view.memory_ratio()
    if config.memory_guard and memory is not None and memory >= config.memory_guard:
        raise BufferUnavailable(
            f"the buffer is near its memory limit ({memory:.0%} of Redis maxmemory)",
            retry_after=5,
        )
    sfo = order.storefront_order_id
    shard = shard_for(storefront, sfo, config.shards)
    canonical = ORDER_ENCODER.encode(order)
    fingerprint = hashlib.blake2b(canonical, digest_size=FINGERPRINT_BYTES).digest()
    nonce = new_nonce()
    accepted_at_us = time.time_ns() // 1000
    admission = await state.admitter.admit(
        shard,
        storefront,
        sfo,
        admission_args(
            nonce, storefront, sfo, accepted_at_us, fingerprint, canonical, row_summary(order)
        ),
        timeout=deadline,
    )
    rate_limit = admission.limit
    if admission.outcome in _REFUSALS:
        _refuse(state, storefront, admission, followed)
    if admission.outcome is Outcome.MISMATCH:
        raise OrderIdReused(
            f"storefront_order_id {sfo!r} was already used for order {admission.order_id} "
            "with a different body",
            headers=header_fields(rate_limit) if rate_limit else None,
            order_id=admission.order_id,
        )
    if admission.outcome is Outcome.INFLIGHT:
        raise OrderInFlight(
            f"order {sfo!r} is being admitted by another request; retry shortly",
            headers={"Retry-After": "1", **(header_fields(rate_limit) if rate_limit else {})},
            order_id=admission.order_id,
        )
    order_id = admission.order_id
    ticket = await state.tickets.issue(
        order_id,
        admission.seq,
        admission.ahead,
        admission.accepted_at_us,
        admission.lane_seq,
        storefront,
    )
    host = headers.get(b"host")
    base = _base_url(scope, state, host.decode("latin-1") if host else None)
    receipt = Receipt(
        order_id=order_id,
        status="queued",
        status_url=f"/v1/orders/{order_id}",
        storefront_order_id=sfo,
        accepted_at=dt.datetime.fromtimestamp(admission.accepted_at_us / 1e6, tz=dt.UTC),
        queue_number=admission.seq,
        ahead_at_admission=admission.ahead,
        ticket=ticket,
        queue_url=f"{base}/v1/queue/{ticket}",
        wait_url=f"{base}/wait/{ticket}",
    )
    created = admission.outcome is Outcome.ADMITTED
    return (202 if created else 200), _encoder.encode(receipt), receipt.status_url, rate_limit


async def get_order(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    storefront = await state.auth.storefront(authorization_of(request.scope["headers"]))
    order_id: str = request.path_params["order_id"]
    shard = shard_of_order_id(order_id, state.config.shards)
    if shard is None:
        raise NotFound(f"no order {order_id!r}")
    record = await read_status(state.redis, state.keys, shard, order_id, storefront)
    if record is not None:
        if record.storefront_id != storefront:
            raise NotFound(f"no order {order_id!r}")  # never reveal another storefront's orders
        ticket = await state.tickets.issue(
            order_id,
            record.seq,
            record.ahead,
            record.accepted_at_us,
            record.lane_seq,
            storefront,
        )
        code = record.status
        lane = (await state.drain_view.get()).lane(shard)
        if code == "queued" and lane.processing(record.seq, storefront, record.lane_seq):
            code = "processing"
        status = OrderStatus(
            order_id=order_id,
            storefront_order_id=record.storefront_order_id,
            status=code,
            accepted_at=record.accepted_at,
            committed_at=record.committed_at,
            rejected_at=record.rejected_at,
            reason=record.reason,
            timeline=record.timeline,
            ticket=ticket,
            wait_url=f"{base_url(request, state)}/wait/{ticket}",
        )
    else:
        status = await _from_postgres(state, shard, order_id, storefront)
    return Response(_encoder.encode(status), media_type=JSON)


async def _from_postgres(state: GatewayState, shard: int, order_id: str, storefront: str) -> Any:
    """A committed order has no status record in Redis: its Postgres row tells its status."""
    committed = await read_committed(state, shard, order_id, storefront)
    if committed is None:
        raise NotFound(f"no order {order_id!r}")
    return OrderStatus(
        order_id=order_id,
        storefront_order_id=committed.storefront_order_id,
        status="committed",
        accepted_at=committed.accepted_at,
        committed_at=committed.committed_at,
        timeline=committed.timeline,
    )

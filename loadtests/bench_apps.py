"""The baselines ordergate is measured against, each a small Starlette app.

* ``plain`` (a): ``POST /v1/orders`` decodes the order with msgspec (ordergate's own ``Order``
  type and limits) and answers 202 -- the framework's ceiling. It also serves
  ``GET /v1/queue/{ticket}`` with a fixed JSON body of the real answer's shape, the baseline of
  the queue endpoint (e).
* ``naive`` (b): decodes, then one ``INSERT`` per order into the partitioned ``orders`` table
  through an asyncpg pool, committed on its own (fsync on, synchronous_commit on): what one
  writes without a buffer.
* ``arq`` (f): decodes, then one arq ``enqueue_job`` per order: the usual Python answer.

Each runs under uvicorn exactly as ``ordergate serve`` runs the gateway (uvloop, httptools, no
access log, ``--processes`` uvicorn workers). Configuration comes from ``OGBENCH_*`` variables
set by ``loadtests/bench.py``, which starts these as

    python -m loadtests.bench_apps plain|naive|arq --port PORT [--processes N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ordergate.buffer.order import ORDER_DECODER
from ordergate.sharding.ids import new_order_id
from ordergate.sharding.routing import shard_for

STOREFRONT = "shop-a"
SHARDS = 8


class Accepted(msgspec.Struct, frozen=True):
    status: str
    storefront_order_id: str


_encoder = msgspec.json.Encoder()


def _decode(body: bytes) -> Any:
    try:
        return ORDER_DECODER.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return Response(str(exc).encode(), status_code=422)


def _accepted(sfo: str) -> Response:
    return Response(
        _encoder.encode(Accepted("accepted", sfo)), status_code=202, media_type="application/json"
    )


def create_plain_app() -> Starlette:
    """(a): decode and answer 202; and the fixed queue answer of (e)'s baseline."""
    body_file = os.environ.get("OGBENCH_QUEUE_BODY")
    queue_body = json.loads(Path(body_file).read_text()) if body_file else {}

    async def create_order(request: Request) -> Response:
        order = _decode(await request.body())
        if isinstance(order, Response):
            return order
        return _accepted(order.storefront_order_id)

    async def queue_status(request: Request) -> JSONResponse:
        return JSONResponse(queue_body)

    return Starlette(
        routes=[
            Route("/v1/orders", create_order, methods=["POST"]),
            Route("/v1/queue/{ticket}", queue_status, methods=["GET"]),
        ]
    )


_INSERT = (
    "INSERT INTO orders (shard, order_id, storefront_id, storefront_order_id, customer_id,"
    " customer_email, currency, total_minor, item_count, seq, accepted_at, body)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, $10, $11)"
)


def create_naive_app() -> Starlette:
    """(b): one autocommitted INSERT per order, through an asyncpg pool."""
    import asyncpg

    url = os.environ["OGBENCH_DATABASE_URL"]
    size = int(os.environ.get("OGBENCH_PG_POOL", "16"))
    pools: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pools.append(await asyncpg.create_pool(url, min_size=size, max_size=size))
        try:
            yield
        finally:
            await pools[0].close()

    async def create_order(request: Request) -> Response:
        body = await request.body()
        order = _decode(body)
        if isinstance(order, Response):
            return order
        sfo = order.storefront_order_id
        shard = shard_for(STOREFRONT, sfo, SHARDS)
        await pools[0].execute(
            _INSERT,
            shard,
            new_order_id(shard),
            STOREFRONT,
            sfo,
            order.customer.id,
            order.customer.email,
            order.currency,
            order.total_minor,
            len(order.items),
            dt.datetime.now(dt.UTC),
            body.decode(),
        )
        return _accepted(sfo)

    return Starlette(
        routes=[Route("/v1/orders", create_order, methods=["POST"])], lifespan=lifespan
    )


def create_arq_app() -> Starlette:
    """(f): one arq ``enqueue_job`` per order (its Redis runs appendfsync always)."""
    from arq.connections import RedisSettings, create_pool

    # Pool cap above the connections of a run and its warm-up (redis-py's default is 100).
    settings = RedisSettings.from_dsn(os.environ["OGBENCH_REDIS_URL"])
    settings.max_connections = 512
    pools: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pools.append(await create_pool(settings))
        try:
            yield
        finally:
            await pools[0].aclose()

    async def create_order(request: Request) -> Response:
        body = await request.body()
        order = _decode(body)
        if isinstance(order, Response):
            return order
        await pools[0].enqueue_job("store_order", body)
        return _accepted(order.storefront_order_id)

    return Starlette(
        routes=[Route("/v1/orders", create_order, methods=["POST"])], lifespan=lifespan
    )


FACTORIES = {"plain": "create_plain_app", "naive": "create_naive_app", "arq": "create_arq_app"}


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description="Serve one baseline app of loadtests/bench.py.")
    p.add_argument("kind", choices=sorted(FACTORIES))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--processes", type=int, default=1)
    args = p.parse_args(argv)
    uvicorn.run(  # as ordergate.cli.cmd_serve runs the gateway
        f"loadtests.bench_apps:{FACTORIES[args.kind]}",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=args.processes if args.processes > 1 else None,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

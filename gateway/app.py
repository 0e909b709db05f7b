"""``create_app(config)``: the gateway's Starlette application."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.routing import Route

from ordergate.buffer.admission import Admitter
from ordergate.buffer.connection import cancel_and_wait, connect_redis, is_cluster
from ordergate.buffer.deployment import check_databases
from ordergate.buffer.errors import BufferUnavailable
from ordergate.buffer.keys import Keys
from ordergate.buffer.streams import ensure_streams
from ordergate.gateway import (
    dashboard,
    health,
    metrics,
    openapi,
    ops,
    orders,
    problems,
    queue,
    waiting,
)
from ordergate.gateway.auth import Authenticator, sync_known
from ordergate.gateway.config import GatewayConfig
from ordergate.gateway.errors import NotFound
from ordergate.gateway.state import GatewayState
from ordergate.gateway.tickets import Tickets
from ordergate.sharding.databases import describe

log = logging.getLogger(__name__)


async def _send_refusals(state: GatewayState, stop: asyncio.Event) -> None:
    """Add this process's 429s per storefront to Redis once a second (``storefronts list``),
    and once more when ``stop`` is set. Stopped by the event, not by a cancel, which a redis-py
    command completing in the same loop turn can swallow (see ordergate.statusview)."""
    while True:
        stopping = stop.is_set()
        if not stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        try:
            await state.refusals.flush(state.redis, state.keys)
        except (RedisError, OSError) as exc:  # kept, and sent with the next second's
            log.debug("cannot send the refusal counts yet: %r", exc)
        if stopping:
            return


def create_app(config: GatewayConfig) -> GatewayApp:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redis = await connect_redis(config.redis_url, socket_timeout=5.0, max_connections=64)
        keys = Keys(config.key_prefix, cluster=is_cluster(redis))
        admitter = Admitter(redis, keys, config.admission)
        state = GatewayState(
            config,
            keys,
            redis,
            admitter,
            Authenticator(redis, keys, config.auth_cache_s),
            Tickets(redis, keys, config.ticket_secret),
            queue.DrainView(redis, keys, config.shards),
        )
        app.state.gateway = state
        try:
            try:
                await ensure_streams(redis, keys, config.shards)
                await state.tickets.secret()  # now, not on the first receipt (Redis may stall)
                await sync_known(
                    redis, keys, config.shards
                )  # keys made before the set of storefronts
            except RedisError as exc:  # start anyway: admission answers 503 until Redis is back
                log.error("Redis unreachable at startup (%r); answering 503 until it is", exc)
            await _check_database(config)
        except BaseException:  # another deployment's shard count or prefix: do not start
            await redis.aclose()
            raise
        await admitter.start()
        state.drain_view.start()
        state.pg = [None] * len(config.database_urls)
        pg_tasks = [
            asyncio.create_task(_connect_postgres(state, i))
            for i in range(len(config.database_urls))
        ]
        stop_refusals = asyncio.Event()
        refusals_task = asyncio.create_task(_send_refusals(state, stop_refusals))
        try:
            yield
        finally:
            for task in pg_tasks:
                task.cancel()
            stop_refusals.set()
            done, _ = await asyncio.wait([refusals_task], timeout=5.0)
            if not done:  # Redis stalls: the counts of the last second are lost, not the exit
                await cancel_and_wait([refusals_task])
            await asyncio.gather(*pg_tasks, refusals_task, return_exceptions=True)
            await state.drain_view.close()
            await admitter.close()
            for pool in state.pg:
                if pool is not None:
                    await pool.close()
            await redis.aclose()

    handlers: dict[Any, Any] = dict(problems.EXCEPTION_HANDLERS)
    handlers[RedisError] = _redis_down
    create_order = orders.CreateOrderEndpoint(handlers)
    return GatewayApp(
        create_order,
        config.ops_port,
        routes=[
            Route("/v1/orders", create_order, methods=["POST"]),
            Route("/v1/orders/{order_id}", orders.get_order, methods=["GET"]),
            Route("/v1/queue/{ticket}", queue.QueueStatusEndpoint(), methods=["GET"]),
            Route("/v1/queue/{ticket}/events", queue.queue_events, methods=["GET"]),
            Route("/dashboard", dashboard.dashboard_page, methods=["GET"]),
            Route("/v1/ops/dashboard", dashboard.dashboard_data, methods=["GET"]),
            Route("/wait/{ticket}", waiting.wait_page, methods=["GET"]),
            Route("/healthz", health.healthz, methods=["GET"]),
            Route("/readyz", health.readyz, methods=["GET"]),
            Route("/v1/ops/status", ops.status, methods=["GET"]),
            Route("/metrics", metrics.metrics, methods=["GET"]),
            Route("/v1/ops/drain", ops.drain, methods=["POST"]),
            Route("/problems/{name}", problems.describe, methods=["GET"]),
            Route("/openapi.json", openapi.openapi, methods=["GET"]),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )


class GatewayApp(Starlette):
    """Starlette, with ``POST /v1/orders`` dispatched before the middleware stack and router: on
    the hottest route they cost about as much CPU as the handler itself. Every other request, and
    that route's errors, go through Starlette's exception handlers as usual."""

    def __init__(
        self, create_order: orders.CreateOrderEndpoint, ops_port: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._create_order = create_order
        self._ops_port = ops_port

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._ops_port and scope["type"] == "http" and not self._on_its_port(scope):
            await problems.problem_response(
                NotFound(f"no {scope['path']} on this port"), scope["path"]
            )(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/v1/orders":
            scope["app"] = self
            await self._create_order(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _on_its_port(self, scope: Any) -> bool:
        """With ``ops_port``, the operators' endpoints answer on it alone, and the customers'
        API not there (the health checks on both)."""
        path = scope["path"]
        if path in ("/healthz", "/readyz"):
            return True
        server = scope.get("server") or (None, None)
        on_ops = bool(server[1] == self._ops_port)
        return on_ops == bool(path.startswith(OPS_PATHS))


OPS_PATHS = ("/v1/ops/", "/dashboard", "/metrics")


async def _redis_down(request: Any, exc: Exception) -> Any:
    return await problems.on_buffer_unavailable(request, BufferUnavailable(f"Redis error: {exc!r}"))


async def _check_database(config: GatewayConfig) -> None:
    """Refuse to start for another deployment than the databases' (each that answers now: the
    gateway runs without Postgres, and Redis holds the shard count too)."""
    urls = config.database_urls
    failures = await check_databases(urls, config.shards, config.key_prefix, connect_timeout_s=2)
    for i, exc in enumerate(failures):
        if exc is not None:
            where = "Postgres" if len(urls) == 1 else describe(i, len(urls), config.shards)
            log.warning(
                "%s not reachable at startup (%r); deployment not checked there",
                where,
                exc,
            )


async def _connect_postgres(state: GatewayState, database: int) -> None:
    """Postgres is optional for the gateway (readiness, committed orders' statuses): connect to
    each database in the background, one small pool each."""
    url = state.config.database_urls[database]
    delay = 0.2
    while True:
        try:
            state.pg[database] = await asyncpg.create_pool(
                url, min_size=0, max_size=state.config.pg_pool_size, command_timeout=5
            )
            return
        except Exception as exc:  # noqa: BLE001
            log.warning("gateway: %s not reachable yet (%r)", state.describe(database), exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

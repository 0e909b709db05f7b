"""Real servers for every test: embedded Valkey and PostgreSQL started once per session on free
ports and temp dirs (or ORDERGATE_TEST_REDIS_URL / ORDERGATE_TEST_DATABASE_URL when set)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from ordergate.buffer.connection import create_redis
from ordergate.buffer.keys import Keys
from ordergate.buffer.streams import ensure_streams
from ordergate.components import gateway_config, worker_config
from ordergate.gateway.app import GatewayApp, create_app
from ordergate.gateway.auth import create_key
from ordergate.servers import EmbeddedPostgres, EmbeddedValkey
from ordergate.settings import Settings
from ordergate.workers.migrate import migrate
from ordergate.workers.runner import WorkerReport, run_worker


@dataclass
class Servers:
    redis_url: str
    database_url: str
    valkey: EmbeddedValkey | None
    postgres: EmbeddedPostgres | None
    data_dir: Path


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    data_dir = tmp_path_factory.mktemp("servers")
    redis_url = os.environ.get("ORDERGATE_TEST_REDIS_URL")
    database_url = os.environ.get("ORDERGATE_TEST_DATABASE_URL")
    valkey = None if redis_url else EmbeddedValkey(data_dir)
    postgres = None if database_url else EmbeddedPostgres(data_dir)
    try:
        if valkey:
            redis_url = valkey.start()
        if postgres:
            database_url = postgres.start()
        assert redis_url and database_url
        asyncio.run(migrate(database_url, 8))
        yield Servers(redis_url, database_url, valkey, postgres, data_dir)
    finally:
        if postgres:
            postgres.stop()
        if valkey:
            valkey.stop()


def make_settings(servers: Servers, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": servers.redis_url,
        "database_url": servers.database_url,
        "data_dir": str(servers.data_dir),
        "shards": 8,
        "workers": 1,
        "read_block_ms": 100,
        "retry_backoff_max_s": 0.5,
        "log_format": "console",
    }
    base.update(overrides)
    return Settings.load(base, environ={})


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(servers)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Any]:
    client = create_redis(settings.redis_url or "")
    yield client
    await client.aclose()


@pytest.fixture
async def pg(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=3)
    yield pool
    await pool.close()


@pytest.fixture(autouse=True)
async def clean(servers: Servers) -> None:
    """Every test starts with an empty buffer pool and an empty orders table."""
    client = create_redis(servers.redis_url)
    try:
        await client.flushall()
        await ensure_streams(client, Keys(), 8)
    finally:
        await client.aclose()
    conn = await asyncpg.connect(servers.database_url)
    try:
        await conn.execute("TRUNCATE orders")
    finally:
        await conn.close()


class GatewayClient(httpx.AsyncClient):
    """An httpx client of an in-process gateway; ``app`` is that gateway, for tests to look at."""

    def __init__(self, app: GatewayApp) -> None:
        super().__init__(transport=httpx.ASGITransport(app=app), base_url="http://og")
        self.app = app


@pytest.fixture
async def app_factory(settings: Settings) -> AsyncIterator[Callable[..., Any]]:
    """Start gateway apps in-process (lifespan included) and give httpx clients for them."""
    stack: list[Any] = []

    async def start(custom: Settings | None = None) -> httpx.AsyncClient:
        app = create_app(gateway_config(custom or settings))
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = GatewayClient(app)
        stack.append((lifespan, client))
        return client

    yield start
    for lifespan, client in reversed(stack):
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture
async def client(app_factory: Callable[..., Any]) -> httpx.AsyncClient:
    return await app_factory()


@pytest.fixture
async def api_key(redis: Any) -> str:
    return await create_key(redis, Keys(), "shop-a")


@pytest.fixture
async def other_key(redis: Any) -> str:
    return await create_key(redis, Keys(), "shop-b")


def order_body(
    sfo: str | None = None, *, items: int = 2, price: int = 1250, **extra: Any
) -> dict[str, Any]:
    """A valid order document."""
    lines: list[dict[str, Any]] = [
        {"sku": f"SKU-{i}", "quantity": i + 1, "unit_price_minor": price} for i in range(items)
    ]
    body: dict[str, Any] = {
        "storefront_order_id": sfo or f"so-{uuid.uuid4().hex[:16]}",
        "customer": {"id": "cust-1", "email": "ada@example.com"},
        "items": lines,
        "currency": "EUR",
        "total_minor": sum(line["quantity"] * line["unit_price_minor"] for line in lines),
    }
    body.update(extra)
    return body


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def drain(settings: Settings) -> WorkerReport:
    """Run one worker in burst mode: drain everything there is, then return."""
    return await asyncio.wait_for(run_worker(worker_config(settings), burst=True), 120)


@contextlib.asynccontextmanager
async def worker_running(settings: Settings) -> AsyncIterator[asyncio.Task[WorkerReport]]:
    """A worker draining in this process (leader or standby) until the block ends."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(worker_config(settings), stop=stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def admit(client: Any, key: str, n: int, prefix: str = "o") -> list[dict[str, Any]]:
    """Admit ``n`` orders, 200 at a time, in order; their receipts."""
    receipts: list[dict[str, Any]] = []
    for start in range(0, n, 200):
        responses = await asyncio.gather(
            *(
                client.post("/v1/orders", json=order_body(f"{prefix}-{i}"), headers=auth(key))
                for i in range(start, min(n, start + 200))
            )
        )
        assert {r.status_code for r in responses} == {202}, responses[0].text
        receipts.extend(r.json() for r in responses)
    return receipts


async def eventually(
    check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05
) -> Any:
    """Poll ``check`` (sync or async) until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")

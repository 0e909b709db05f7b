"""The deployment's rails: one shard count and key prefix for every process, recorded by
``migrate``; a process started with other values refuses to start, with a clear error."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import asyncpg
import pytest

from ordergate.buffer.errors import DeploymentMismatch
from ordergate.servers import free_port
from ordergate.settings import Settings
from ordergate.workers.migrate import migrate
from tests.cli.run import Done, cli_env, spawn
from tests.conftest import auth, order_body


async def run(settings: Settings, *args: str, timeout: float = 60, **env: str) -> Done:
    """``ordergate ARGS`` with extra ORDERGATE_* variables, run to its end (or killed)."""
    proc = await spawn(settings, *args, **env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
    return Done(proc.returncode, out.decode(), err.decode())


async def test_migrate_refuses_another_shard_count_or_prefix(settings: Settings) -> None:
    """The session's database was migrated for 8 shards and prefix og (tests/conftest.py)."""
    url = settings.database_url or ""
    assert await migrate(url, 8, "og") == []  # the same values: nothing to do
    with pytest.raises(DeploymentMismatch, match="shards=8 and key_prefix='og'"):
        await migrate(url, 4, "og")
    with pytest.raises(DeploymentMismatch, match="key_prefix='og'; this process has shards=8"):
        await migrate(url, 8, "shop")
    done = await run(settings, "migrate", ORDERGATE_SHARDS="16")
    assert done.returncode == 2
    assert "set up for shards=8" in done.stderr and "shards=16" in done.stderr, done.stderr
    async with _connect(url) as conn:  # no partition was made for the refused count
        assert await conn.fetchval("SELECT to_regclass('orders_p15')") is None


async def test_gateway_and_worker_refuse_another_shard_count(
    settings: Settings, client: Any, api_key: str, pg: Any
) -> None:
    """A gateway runs with 8 shards; a second gateway and a worker started with 4 stop at once
    with the reason, so the same storefront order cannot be admitted twice."""
    first = await client.post("/v1/orders", json=order_body("rail-1"), headers=auth(api_key))
    assert first.status_code == 202
    port = str(free_port())
    for command in (("serve", "--port", port), ("work",), ("work", "--workers", "1")):
        done = await run(settings, *command, timeout=30, ORDERGATE_SHARDS="4")
        assert done.returncode == 2, (command, done.stderr[-2000:])
        assert done.stderr.startswith("ordergate: Redis holds the buffer of key prefix 'og'")
        assert "with shards=8; this process has shards=4" in done.stderr, done.stderr
    again = await client.post("/v1/orders", json=order_body("rail-1"), headers=auth(api_key))
    assert again.status_code == 200 and again.json()["order_id"] == first.json()["order_id"]


async def test_a_gateway_with_another_key_prefix_refuses_to_start(settings: Settings) -> None:
    """Redis knows nothing of prefix 'shop' (so it would record it), but the database was set up
    for 'og': the gateway would fill streams that no worker drains."""
    port = str(free_port())
    done = await run(settings, "serve", "--port", port, timeout=30, ORDERGATE_KEY_PREFIX="shop")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "set up for shards=8 and key_prefix='og'" in done.stderr, done.stderr[-2000:]


async def test_the_gateway_itself_refuses_when_started_past_the_shell(settings: Settings) -> None:
    """uvicorn started on the app factory directly (no pre-flight): the app's startup refuses."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "ordergate.components:gateway_app",
        "--port",
        str(free_port()),
        env=cli_env(settings, ORDERGATE_SHARDS="4"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0
    assert b"with shards=8; this process has shards=4" in err + out, err[-2000:]


async def test_redis_alone_refuses_another_shard_count(
    app_factory: Any, settings: Settings
) -> None:
    """Without Postgres (a gateway may start without it), Redis's record is the rail."""
    with pytest.raises(DeploymentMismatch, match="with shards=8; this process has shards=2"):
        await app_factory(settings.replace(shards=2, database_url=None))


async def test_an_old_database_is_recorded_only_with_its_partition_count(
    settings: Settings,
) -> None:
    """A database set up before the deployment was recorded (partitions, no record): migrate
    records it with the shard count its partitions have, and refuses another."""
    url = settings.database_url or ""
    async with _connect(url) as admin:
        await admin.execute("DROP DATABASE IF EXISTS og_rails")
        await admin.execute("CREATE DATABASE og_rails")
    old = url.rsplit("/", 1)[0] + "/og_rails"
    try:
        await migrate(old, 3)
        async with _connect(old) as conn:
            await conn.execute("DELETE FROM ordergate_deployment")
        with pytest.raises(DeploymentMismatch, match="3 order partitions"):
            await migrate(old, 5)
        assert "recorded the deployment: 3 shards, key prefix 'og'" in await migrate(old, 3)
    finally:
        async with _connect(url) as admin:
            await admin.execute("DROP DATABASE IF EXISTS og_rails WITH (FORCE)")


class _connect:
    def __init__(self, url: str) -> None:
        self.url = url

    async def __aenter__(self) -> asyncpg.Connection:
        self.conn = await asyncpg.connect(self.url)
        return self.conn

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()


async def test_a_buffer_from_before_lanes_is_adopted_once_empty_and_refused_with_orders(
    redis: Any,
) -> None:
    """The single-leader version kept one watermark (``og:drain`` ``w``) and no settled count:
    an empty such buffer starts the lanes at that watermark; one still holding orders (they
    carry no lane numbers) makes the process refuse to start."""
    from ordergate.buffer.keys import Keys
    from ordergate.buffer.position import read_drain_state
    from ordergate.buffer.streams import ensure_streams

    keys = Keys("old")
    await redis.set(keys.seq(), 500)
    await redis.hset(keys.drain(), mapping={"w": 500, "d": 500, "leader": "host-1-w0-1"})
    await redis.xadd(keys.stream(2), {"v": "1", "oid": "ord_2_x", "seq": "500"})
    with pytest.raises(DeploymentMismatch, match="1 orders admitted by an ordergate before lanes"):
        await ensure_streams(redis, keys, 8)
    await redis.delete(keys.stream(2))
    await ensure_streams(redis, keys, 8)
    state = await read_drain_state(redis, keys, 8)
    assert (state.issued, state.settled, state.depth) == (500, 500, 0)
    assert {(lane.watermark, lane.last) for lane in state.lanes} == {(500, 500)}
    await ensure_streams(redis, keys, 8)  # once only: the settled count is there now
    assert (await read_drain_state(redis, keys, 8)).settled == 500

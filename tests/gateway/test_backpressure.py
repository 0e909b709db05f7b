"""Backpressure: a full buffer answers 429 with Retry-After, and takes orders again once drained."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ordergate.buffer.connection import create_redis
from ordergate.buffer.keys import Keys
from ordergate.gateway.auth import create_key
from ordergate.runtime import resolved
from ordergate.servers import MIB, free_port
from ordergate.settings import Settings
from tests.conftest import admit, auth, drain, eventually, make_settings, order_body
from tests.faults import audit, buffered


async def test_full_buffer_is_429_with_retry_after_then_recovers(
    app_factory, api_key, servers, redis, pg
) -> None:
    """Injects: more orders than max_buffered (50). Audits: the 51st gets 429 with Retry-After and
    nothing is written for it; after a drain the gateway takes orders again; the common audit."""
    settings = make_settings(servers, max_buffered=50)
    client = await app_factory(settings)
    receipts = await admit(client, api_key, 50)
    refused = await client.post("/v1/orders", json=order_body("over"), headers=auth(api_key))
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "/problems/buffer-full"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert (await client.get("/readyz")).status_code == 200  # full is not unready

    report = await drain(settings)
    assert report.committed == 50
    assert await pg.fetchval("SELECT count(*) FROM orders") == 50

    async def accepted() -> Any:
        r = await client.post("/v1/orders", json=order_body("over"), headers=auth(api_key))
        return r if r.status_code == 202 else None

    r = await eventually(accepted, timeout=10)
    assert r.json()["queue_number"] == 51
    assert {x["queue_number"] for x in receipts} == set(range(1, 51))
    await drain(settings)
    await audit(pg, redis, [*receipts, r.json()])


async def test_bound_holds_for_concurrent_requests(app_factory, api_key, servers) -> None:
    """Injects: 120 concurrent orders against a bound of 100. Audits: exactly 100 are admitted
    (the bound is enforced inside the admission script, not by a racy pre-check)."""
    import asyncio

    settings = make_settings(servers, max_buffered=100)
    client = await app_factory(settings)
    responses = await asyncio.gather(
        *(
            client.post("/v1/orders", json=order_body(f"c-{i}"), headers=auth(api_key))
            for i in range(120)
        )
    )
    codes = [r.status_code for r in responses]
    assert codes.count(202) == 100 and codes.count(429) == 20


async def test_readiness_is_false_while_redis_is_unreachable(app_factory, servers) -> None:
    dead = make_settings(servers, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    client = await app_factory(dead)
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json()["ready"] is False
    assert r.json()["checks"]["redis"].startswith("unreachable")


async def test_redis_memory_limit_is_503_never_202(
    app_factory, api_key, servers, redis, pg
) -> None:
    """Injects: Redis maxmemory set just above what it uses (noeviction). Audits: with the guard
    on, orders get 503 before Redis runs out; with it off, Redis's own OOM refusal is a 503 too;
    never a 202. After the limit is lifted, orders are taken again; the common audit."""
    guarded = await app_factory(make_settings(servers, memory_guard=0.8))
    unguarded = await app_factory(make_settings(servers, memory_guard=0))
    used = int((await redis.info("memory"))["used_memory"])
    try:
        # Near the limit: the guard sheds (202s until it reads INFO, at most a second later,
        # are fine: Redis is still below its limit).
        await redis.config_set("maxmemory", str(int(used * 1.1)))

        async def shed() -> Any:
            r = await guarded.post("/v1/orders", json=order_body(), headers=auth(api_key))
            return r if r.status_code == 503 else None

        r = await eventually(shed, timeout=10)
        assert "memory limit" in r.json()["detail"] and r.headers["retry-after"] == "5"
        # At the limit: Redis itself refuses every write; never a 202, guard or not.
        await redis.config_set("maxmemory", str(used // 2))
        for client in (guarded, unguarded) * 5:
            r = await client.post("/v1/orders", json=order_body(), headers=auth(api_key))
            assert r.status_code == 503, r.text
            assert r.json()["type"] == "/problems/buffer-unavailable"
    finally:
        await redis.config_set("maxmemory", "0")

    accepted: list[dict[str, Any]] = []

    async def taken() -> Any:
        r = await guarded.post("/v1/orders", json=order_body(), headers=auth(api_key))
        if r.status_code == 202:
            accepted.append(r.json())
        return r if r.status_code == 202 else None

    await eventually(taken, timeout=10)
    await drain(make_settings(servers))
    await audit(pg, redis, accepted)


async def test_the_drain_runs_past_maxmemory_and_frees_it(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: Redis over its maxmemory (noeviction) with orders buffered, as after a lowered
    limit or a move to a smaller machine. Audits: admission is refused (503), yet the drain still
    takes and settles every order (its scripts run with allow-oom), so memory comes back; the
    common audit."""
    receipts = await admit(client, api_key, 200)
    used = int((await redis.info("memory"))["used_memory"])
    try:
        await redis.config_set("maxmemory", str(used // 2))
        r = await client.post("/v1/orders", json=order_body(), headers=auth(api_key))
        assert r.status_code == 503, r.text
        report = await drain(make_settings(servers))
        assert report.committed == 200
        assert sum([await buffered(redis, Keys(), s) for s in range(8)]) == 0
    finally:
        await redis.config_set("maxmemory", "0")
    await audit(pg, redis, receipts)


SMALL_MAXMEMORY_MB = 32  # a Valkey this small fills up in seconds with 12 KB orders
# Half of it: the gateway reads INFO about once a second and orders keep coming meanwhile (about
# 2 MB/s here), so the guard needs headroom below the limit to be the one that answers.
GUARD = 0.5


@dataclass
class SmallValkey:
    settings: Settings  # pointing at it, valkey_maxmemory and all
    redis: Any
    api_key: str  # of storefront shop-a


@pytest.fixture
async def small_valkey(tmp_path: Path, servers: Any) -> AsyncIterator[SmallValkey]:
    """An embedded Valkey started as `ordergate up` and the CLI start it (runtime.resolved), with
    valkey_maxmemory 32mb, and an API key in it; Postgres is the session's."""
    settings = make_settings(
        servers,
        redis_url=None,
        data_dir=str(tmp_path),
        valkey_maxmemory=f"{SMALL_MAXMEMORY_MB}mb",
    )
    with resolved(settings) as live:
        redis = create_redis(live.redis_url or "")
        try:
            yield SmallValkey(live, redis, await create_key(redis, Keys(), "shop-a"))
        finally:
            await redis.aclose()


async def test_memory_guard_sheds_under_the_embedded_valkeys_maxmemory(
    small_valkey, app_factory, pg
) -> None:
    """Injects: ~12 KB orders, no worker draining, into an embedded Valkey whose maxmemory comes
    from valkey_maxmemory (32mb). Audits: the server runs with that limit; once its used memory
    passes memory_guard (0.5 of it) the gateway answers the guard's 503 (problem+json,
    Retry-After: 5) before Valkey itself refuses a write, every earlier answer being a 202; after
    a drain frees the memory, orders get 202 again; the common audit."""
    valkey = small_valkey
    settings = valkey.settings.replace(memory_guard=GUARD)
    limit = int((await valkey.redis.config_get("maxmemory"))["maxmemory"])
    assert limit == SMALL_MAXMEMORY_MB * MIB
    client = await app_factory(settings)
    receipts: list[dict[str, Any]] = []
    started = time.monotonic()

    async def post(sfo: str) -> Any:
        body = order_body(sfo, items=200)
        return await client.post("/v1/orders", json=body, headers=auth(valkey.api_key))

    async def shed() -> Any:
        """One round of 20 new orders; the guard's 503, once there is one."""
        base = len(receipts)
        refused = None
        for r in await asyncio.gather(*(post(f"m-{base}-{i}") for i in range(20))):
            if r.status_code == 202:
                receipts.append(r.json())
            else:
                assert r.status_code == 503 and "memory limit" in r.json()["detail"], r.text
                refused = r
        return refused

    r = await eventually(shed, timeout=120, interval=0)
    used = int((await valkey.redis.info("memory"))["used_memory"])
    print(f"{len(receipts)} orders in {time.monotonic() - started:.1f}s; used {used / limit:.0%}")
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "/problems/buffer-unavailable"
    assert r.headers["retry-after"] == "5"
    assert GUARD * limit <= used < limit  # the guard's refusal, not Valkey's own
    again = await post("again")
    assert again.status_code == 503 and "memory limit" in again.json()["detail"]

    report = await drain(settings)
    assert report.committed == len(receipts)

    async def accepted() -> Any:
        r = await post(f"after-{time.monotonic_ns()}")
        return r if r.status_code == 202 else None

    r = await eventually(accepted, timeout=10)
    await drain(settings)
    await audit(pg, valkey.redis, [*receipts, r.json()])

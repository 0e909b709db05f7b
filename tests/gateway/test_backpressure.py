"""Backpressure: a full buffer answers 429 with Retry-After, and takes orders again once drained."""

from __future__ import annotations

from typing import Any

from ordergate.servers import free_port
from tests.conftest import admit, auth, drain, eventually, make_settings, order_body
from tests.faults import audit


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

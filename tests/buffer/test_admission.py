"""Admission: group commit, durability across a Valkey crash, and failure when Redis is gone."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from buffer.admission import AdmissionConfig, Admitter, Outcome
from buffer.connection import create_redis
from buffer.errors import BufferUnavailable
from buffer.keys import Keys
from buffer.message import admission_args
from sharding import new_order_id, shard_for
from tests.conftest import auth, drain, eventually, order_body

KEYS = Keys()


def _args(sfo: str, shard: int) -> tuple:
    body = f'{{"sfo":"{sfo}"}}'.encode()
    fp = hashlib.blake2b(body, digest_size=16).digest()
    return admission_args(new_order_id(shard), "shop-a", sfo, time.time_ns() // 1000, fp, body)


async def test_concurrent_admissions_share_round_trips(redis) -> None:
    admitter = Admitter(redis, KEYS, AdmissionConfig(shards=8))
    await admitter.start()
    try:
        sfos = [f"g-{i}" for i in range(400)]
        results = await asyncio.gather(
            *(
                admitter.admit(
                    shard_for("shop-a", s, 8), "shop-a", s, _args(s, shard_for("shop-a", s, 8))
                )
                for s in sfos
            )
        )
    finally:
        await admitter.close()
    assert [r.outcome for r in results] == [Outcome.ADMITTED] * 400
    assert admitter.stats.orders == 400
    assert admitter.stats.batches < 100, "group commit: many orders per round trip"
    total = sum([await redis.xlen(KEYS.stream(s)) for s in range(8)])
    assert total == 400
    # queue numbers are dense and unique over all shards, and grow along every stream
    every: list[int] = []
    for shard in range(8):
        seqs = [int(f[b"seq"]) for _, f in await redis.xrange(KEYS.stream(shard))]
        assert seqs == sorted(seqs)
        every.extend(seqs)
    assert sorted(every) == list(range(1, 401))


async def test_unreachable_redis_is_a_prompt_error_not_a_hang() -> None:
    from ordergate.servers import free_port

    dead = create_redis(f"redis://127.0.0.1:{free_port()}/0")
    admitter = Admitter(dead, KEYS, AdmissionConfig(shards=8, timeout_s=1.0))
    await admitter.start()
    try:
        started = time.monotonic()
        with pytest.raises(BufferUnavailable):
            await admitter.admit(0, "shop-a", "x", _args("x", 0))
        assert time.monotonic() - started < 5
    finally:
        await admitter.close()
        await dead.aclose()


async def test_acknowledged_orders_survive_kill_9_of_valkey(
    servers, client, api_key, settings, pg
) -> None:
    """Injects: SIGKILL of the Valkey server right after 500 orders got their 202, then a restart
    from its append-only file. Audits: all 500 are in the buffer and commit exactly once."""
    if servers.valkey is None:
        pytest.skip("external Redis: the test cannot kill it")
    responses = await asyncio.gather(
        *(client.post("/v1/orders", json=order_body(), headers=auth(api_key)) for _ in range(500))
    )
    assert {r.status_code for r in responses} == {202}
    servers.valkey.kill()
    down = await client.post("/v1/orders", json=order_body(), headers=auth(api_key))
    assert down.status_code == 503 and down.headers["retry-after"]
    servers.valkey.start()  # same port, same data directory: it loads the AOF

    async def accepted_again() -> bool:
        r = await client.post("/v1/orders", json=order_body("after-restart"), headers=auth(api_key))
        return r.status_code == 202

    await eventually(accepted_again, timeout=30, interval=0.1)
    report = await drain(settings)
    assert report.committed == 501
    ids = {r["order_id"] for r in await pg.fetch("SELECT order_id FROM orders")}
    assert {r.json()["order_id"] for r in responses} <= ids

"""Workers killed with SIGKILL lose nothing and duplicate nothing."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import asyncpg

from ordergate.buffer.keys import Keys
from tests.conftest import admit, auth, drain, eventually, make_settings
from tests.faults import audit, in_flight
from tests.workers.procs import kill9, spawn_worker


async def _pending(redis: Any) -> int:
    total = 0
    for shard in range(8):
        total += await in_flight(redis, Keys(), shard)
    return total


async def test_sigkill_in_the_middle_of_a_batch(client, api_key, servers, redis, pg) -> None:
    """Injects: SIGKILL of a worker whose batch transaction is open in Postgres (blocked on a
    table lock). Audits: every 202 order exactly once after a new worker reclaims the batch."""
    receipts = await admit(client, api_key, 400)
    settings = make_settings(servers, batch_size=50)
    blocker = await asyncpg.connect(settings.database_url)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")
    worker = spawn_worker(settings)
    try:
        # the worker has read batches (they are pending) and is stuck inside its write (the
        # COPY, or the statement asyncpg prepares for it, waits for the lock)
        await eventually(lambda: _pending(redis), timeout=30)
        await eventually(
            lambda: blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%orders%'"
            ),
            timeout=30,
        )
        kill9(worker)
    finally:
        await tx.rollback()
        await blocker.close()
    assert await pg.fetchval("SELECT count(*) FROM orders") == 0  # the open transaction died
    assert await _pending(redis) > 0  # ... and its entries are still owed

    report = await drain(settings)
    assert report.committed == 400
    await audit(pg, redis, receipts)
    statuses = await asyncio.gather(
        *(client.get(r["status_url"], headers=auth(api_key)) for r in receipts[:50])
    )
    assert {s.json()["status"] for s in statuses} == {"committed"}


async def test_repeated_sigkill_during_a_drain(client, api_key, servers, redis, pg) -> None:
    """Injects: SIGKILL of the worker process at four moments of a 3000-order drain (between
    reads, inserts, commits and acks, wherever it lands), restarting it each time. Audits: every
    202 order exactly once, nothing pending, nothing dead-lettered."""
    receipts = await admit(client, api_key, 3000)
    settings = make_settings(servers, batch_size=100, max_deliveries=20, drain_rate=1500)
    kills = 0
    for threshold in (300, 900, 1500, 2100):
        worker = spawn_worker(settings)
        try:
            await eventually(partial(_count_at_least, pg, threshold), timeout=60, interval=0.01)
        finally:
            kill9(worker)
            kills += 1
    assert kills == 4
    assert await pg.fetchval("SELECT count(*) FROM orders") < 3000  # the kills left work over
    await drain(settings.replace(drain_rate=0))
    await audit(pg, redis, receipts)


async def _count_at_least(pg: Any, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM orders") >= n

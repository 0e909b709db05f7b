"""Two worker processes: one leads the drain, the other takes over when it is killed."""

from __future__ import annotations

import time
from typing import Any

from ordergate.buffer.keys import Keys
from tests.conftest import admit, eventually, make_settings
from tests.faults import audit
from tests.workers.procs import kill9, spawn_worker


async def _leader_pid(redis: Any) -> int | None:
    leader = await redis.hget(Keys().drain(), "leader")
    return int(leader.decode().split("-")[-3]) if leader else None


async def _committed(pg: Any) -> int:
    return await pg.fetchval("SELECT count(*) FROM orders")


async def test_standby_takes_over_when_the_leader_is_killed(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: SIGKILL of the leading worker mid-drain while a standby runs. Audits: the standby
    takes over by itself, every 202 order is in Postgres exactly once, and the drain stayed
    first-in first-out across the takeover."""
    receipts = await admit(client, api_key, 1500)
    settings = make_settings(servers, drain_rate=600, batch_size=50)
    workers = [spawn_worker(settings), spawn_worker(settings)]
    try:
        await eventually(lambda: _at_least(pg, 300), timeout=30)
        pid = await _leader_pid(redis)
        assert pid is not None
        leader = next(w for w in workers if w.pid == pid)
        kill9(leader)
        killed_at = time.monotonic()
        await eventually(lambda: _led_by_other(redis, pid), timeout=30, interval=0.01)
        took_over = time.monotonic() - killed_at
        await eventually(lambda: _at_least(pg, 1500), timeout=60)
        await eventually(lambda: _all_settled(redis), timeout=30)
    finally:
        for w in workers:
            kill9(w)
    print(f"the standby led the drain {took_over:.2f} s after the leader was killed")
    rows = await pg.fetch("SELECT order_id, seq, committed_at FROM orders ORDER BY seq")
    assert sorted(r["order_id"] for r in rows) == sorted(r["order_id"] for r in receipts)
    assert [r["seq"] for r in rows] == list(range(1, 1501))
    times = [r["committed_at"] for r in rows]
    assert times == sorted(times), "the takeover broke first-in first-out"
    await audit(pg, redis, receipts)


async def _all_settled(redis: Any) -> bool:
    return int(await redis.hget(Keys().drain(), "w") or 0) >= 1500


async def _led_by_other(redis: Any, pid: int) -> bool:
    return await _leader_pid(redis) not in (pid, None)


async def _at_least(pg: Any, n: int) -> bool:
    return await _committed(pg) >= n

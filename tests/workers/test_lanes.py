"""Lanes across worker processes: split, drained concurrently, moved when a worker joins, leaves,
is killed or frozen -- and a deposed owner never commits behind its successor."""

from __future__ import annotations

import signal
import time
import urllib.parse
from collections import Counter
from typing import Any

import asyncpg

from ordergate.buffer.keys import Keys
from ordergate.buffer.position import read_drain_state
from tests.conftest import admit, eventually, make_settings
from tests.faults import DelayProxy, assert_fifo_per_lane, audit, in_flight
from tests.workers.procs import LoggedWorker

KEYS = Keys()


def _pid(owner: str) -> int | None:
    """The pid in a worker's name (``host-pid-wN-started``)."""
    parts = owner.split("-")
    return int(parts[-3]) if len(parts) >= 3 and parts[-3].isdigit() else None


async def _owners(redis: Any) -> dict[int, int | None]:
    """Lane -> the pid of the worker owning it."""
    return {lane.shard: _pid(lane.owner) for lane in (await read_drain_state(redis, KEYS, 8)).lanes}


async def _split(redis: Any, *pids: int) -> dict[int, int | None] | None:
    """The owners, once every lane is owned by one of ``pids`` and they hold equal shares."""
    owners = await _owners(redis)
    counts = Counter(owners.values())
    share = 8 // len(pids)
    return owners if all(counts[p] == share for p in pids) else None


async def _committed(pg: Any) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM orders"))


async def _at_least(pg: Any, n: int) -> bool:
    return await _committed(pg) >= n


async def _settled(redis: Any, n: int) -> bool:
    issued = int(await redis.get(KEYS.seq()) or 0)
    settled = int(await redis.hget(KEYS.drain(), "s") or 0)
    return issued == settled == n


async def _pending_on(redis: Any, pid: int) -> int:
    """Entries taken by the worker ``pid`` and not yet settled, over all lanes."""
    pending = 0
    for shard in range(8):
        owner = await redis.hget(KEYS.lane(shard), "owner")
        if owner is not None and _pid(owner.decode()) == pid:
            pending += await in_flight(redis, KEYS, shard)
    return pending


async def _kill_mid_batch(redis: Any, *workers: LoggedWorker) -> int:
    """SIGKILL ``workers`` while at least one has a batch taken and not settled: freeze them
    (SIGSTOP), look, and kill only if so -- otherwise let them run on and look again. Returns
    the entries they left pending."""
    while True:
        await eventually(lambda: _any_pending(redis, workers), timeout=30, interval=0.002)
        for w in workers:
            w.proc.send_signal(signal.SIGSTOP)
        left = sum([await _pending_on(redis, w.pid) for w in workers])
        if left:
            for w in workers:
                w.proc.kill()
            return left
        for w in workers:
            w.proc.send_signal(signal.SIGCONT)


async def _any_pending(redis: Any, workers: tuple[LoggedWorker, ...]) -> bool:
    return any([await _pending_on(redis, w.pid) for w in workers])


async def _stop_all(*workers: LoggedWorker) -> None:
    for w in workers:
        if w.alive():
            w.proc.send_signal(signal.SIGCONT)  # a frozen one must be able to act on SIGTERM
        await w.stop()


async def _two_draining(
    client: Any, key: str, servers: Any, redis: Any, pg: Any, orders: int, rate: float
) -> tuple[list[dict[str, Any]], LoggedWorker, LoggedWorker]:
    """``orders`` admitted, two workers draining them at ``rate``, 4 lanes each, a fifth
    committed."""
    receipts = await admit(client, key, orders)
    settings = make_settings(servers, drain_rate=rate, batch_size=50)
    a, b = LoggedWorker(settings), LoggedWorker(settings)
    try:
        await eventually(lambda: _split(redis, a.pid, b.pid), timeout=30)
        await eventually(lambda: _at_least(pg, orders // 5), timeout=30)
    except BaseException:
        await _stop_all(a, b)
        raise
    return receipts, a, b


async def _end(pg: Any, redis: Any, receipts: list[dict[str, Any]]) -> None:
    await eventually(lambda: _settled(redis, len(receipts)), timeout=60)
    await audit(pg, redis, receipts)
    await assert_fifo_per_lane(pg, "a takeover broke first-in first-out")
    for lane in (
        await read_drain_state(redis, KEYS, 8)
    ).lanes:  # each lane's counts add up, none counted twice
        assert lane.settled == lane.admitted > 0, lane


async def test_two_workers_split_the_lanes_and_a_killed_ones_lanes_move_in_about_2_s(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: SIGKILL of one of two workers in the middle of a batch. Audits: the two held 4
    lanes each and both drained, the survivor owns all 8 about 2 s after the kill (its
    membership lapses), and every 202 order is in Postgres exactly once, first-in first-out
    in each lane."""
    receipts, a, b = await _two_draining(client, api_key, servers, redis, pg, 3000, 600)
    try:
        lanes = (await read_drain_state(redis, KEYS, 8)).lanes
        assert all(lane.settled > 0 for lane in lanes), "a worker sat idle with lanes to drain"
        left = await _kill_mid_batch(redis, a)
        killed_at = time.monotonic()
        await eventually(lambda: _split(redis, b.pid), timeout=30, interval=0.02)
        moved_after = time.monotonic() - killed_at
        await _end(pg, redis, receipts)
    finally:
        await _stop_all(a, b)
    print(
        f"\nSIGKILL of one of two workers with {left} entries taken: its 4 lanes moved in"
        f" {moved_after:.2f} s"
    )
    assert any("left pending by earlier owners" in line for line in b.lines), b.tail()


async def test_both_workers_killed_mid_drain_then_a_new_one_finishes(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: SIGKILL of both workers at once, mid-drain. Audits: a worker started afterwards
    claims what they left pending in every lane, dead-letters nothing, and every 202 order is in
    Postgres exactly once, first-in first-out in each lane."""
    receipts, a, b = await _two_draining(client, api_key, servers, redis, pg, 2000, 500)
    c: LoggedWorker | None = None
    try:
        taken = await _kill_mid_batch(redis, a, b)
        left = 2000 - await _committed(pg)
        assert left > 0
        c = LoggedWorker(make_settings(servers, batch_size=200))
        await _end(pg, redis, receipts)
    finally:
        await _stop_all(a, b, *([c] if c else []))
    dead = sum([await redis.xlen(KEYS.deadletters(s)) for s in range(8)])
    assert dead == 0
    assert c is not None
    assert any("left pending by earlier owners" in line for line in c.lines), c.tail()
    print(
        f"\nSIGKILL of both workers with {taken} entries taken and {left} orders left: a new"
        " worker finished them"
    )


async def test_a_worker_frozen_past_its_lease_loses_its_lanes_and_cannot_commit(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: SIGSTOP of one of two workers for longer than its membership lease, then
    SIGCONT. Audits: the other worker takes its lanes by ending the frozen one's Postgres
    sessions; woken up, the frozen one finds its sessions gone or its epoch superseded and
    commits nothing behind its successor (first-in first-out holds in every lane, no order
    settles twice); the lanes split again, and every 202 order is in Postgres exactly once."""
    receipts, a, b = await _two_draining(client, api_key, servers, redis, pg, 3000, 600)
    try:
        a.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        await eventually(lambda: _split(redis, b.pid), timeout=30, interval=0.02)
        moved_after = time.monotonic() - stopped_at
        assert any("ended its Postgres session" in line for line in b.lines), b.tail()
        frozen = await _committed(pg)
        await eventually(lambda: _at_least(pg, frozen + 300), timeout=30)
        woke = len(a.lines)
        a.proc.send_signal(signal.SIGCONT)
        await eventually(lambda: _split(redis, a.pid, b.pid), timeout=30)
        await _end(pg, redis, receipts)
    finally:
        await _stop_all(a, b)
    after = a.lines[woke:]
    deposed = [
        line
        for line in after
        if "taken by another worker" in line or "lost its lock" in line or "connection lost" in line
    ]
    assert deposed, "\n".join(after[-40:])
    print(
        f"\nSIGSTOP of one of two workers: its lanes moved in {moved_after:.2f} s; woken up it"
        f" met {len(deposed)} fence(s): {deposed[0].split(' ', 3)[-1][:120]}"
    )


async def test_lanes_rebalance_when_a_worker_joins_and_leaves(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: a second worker joining a draining one, then leaving with SIGTERM. Audits: the
    lanes split 4/4 within seconds of the join and all go back to the first worker within
    seconds of the leave, while orders drain exactly once, first-in first-out in each lane."""
    receipts = await admit(client, api_key, 3000)
    settings = make_settings(servers, drain_rate=500, batch_size=50)
    a = LoggedWorker(settings)
    b: LoggedWorker | None = None
    try:
        await eventually(lambda: _split(redis, a.pid), timeout=30)
        await eventually(lambda: _at_least(pg, 300), timeout=30)
        b = LoggedWorker(settings)
        joined_at = time.monotonic()
        await eventually(lambda: _split(redis, a.pid, b.pid), timeout=30, interval=0.02)
        split_after = time.monotonic() - joined_at
        await eventually(lambda: _at_least(pg, 1200), timeout=30)
        left_at = time.monotonic()
        assert await b.stop() == 0, b.tail()
        await eventually(lambda: _split(redis, a.pid), timeout=30, interval=0.02)
        back_after = time.monotonic() - left_at
        await _end(pg, redis, receipts)
    finally:
        await _stop_all(a, *([b] if b else []))
    print(
        f"\nrebalance: 4/4 {split_after:.2f} s after a worker joined, 8/0 {back_after:.2f} s"
        " after it left (SIGTERM)"
    )


async def test_one_process_drains_its_lanes_concurrently(client, api_key, servers, redis) -> None:
    """Audits: a single worker's lanes write at the same time, not one after another: with
    Postgres behind a 20 ms delay proxy, at least two lanes have a transaction open at once."""
    parts = urllib.parse.urlsplit(servers.database_url)
    assert parts.hostname and parts.port
    proxy = await DelayProxy(parts.hostname, parts.port).start()
    proxy.delay = 0.02
    settings = make_settings(servers, database_url=proxy.url(servers.database_url), batch_size=50)
    receipts = await admit(client, api_key, 2000)
    worker = LoggedWorker(settings)
    peak = 0
    try:
        watcher = await asyncpg.connect(servers.database_url)
        try:

            async def busy() -> int:
                return int(
                    await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE"
                        " 'ordergate-drain %' AND xact_start IS NOT NULL"
                    )
                )

            async def observed() -> bool:
                nonlocal peak
                peak = max(peak, await busy())
                return peak >= 2

            await eventually(observed, timeout=30, interval=0.005)
            await eventually(lambda: _settled(redis, len(receipts)), timeout=120)
        finally:
            await watcher.close()
    finally:
        await worker.stop()
        await proxy.close()
    print(f"\none worker: {peak} lanes with a transaction open at once")

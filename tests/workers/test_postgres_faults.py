"""Postgres killed, slow or cut off under load: admission stays Redis-only, the drain stalls
without losing or dead-lettering anything, resumes by itself, and commits every order once."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import urllib.parse
from functools import partial
from typing import Any

import asyncpg

from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import sublanes_of
from ordergate.buffer.position import DrainState, read_drain_state
from ordergate.servers import EmbeddedPostgres
from ordergate.workers.backoff import backoff
from ordergate.workers.lanelock import deployment_key
from ordergate.workers.migrate import migrate
from tests.conftest import admit, auth, eventually, make_settings, order_body
from tests.faults import DelayProxy, assert_fifo_per_lane, audit, in_flight
from tests.workers.procs import LoggedWorker as _Worker
from tests.workers.procs import logged_worker as _worker

KEYS = Keys()
OUTAGE_S = 20.0


class _Storefront:
    """Posts orders through the gateway until stopped, ``per_round`` at a time; keeps every
    receipt, and every answer that was not a 202."""

    def __init__(self, client: Any, key: str, prefix: str, per_round: int = 10) -> None:
        self.client, self.key, self.prefix, self.per_round = client, key, prefix, per_round
        self.receipts: list[dict[str, Any]] = []
        self.refusals: list[tuple[int, str]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> _Storefront:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            await asyncio.wait_for(self._task, 30)

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            answers = await asyncio.gather(
                *(
                    self.client.post(
                        "/v1/orders",
                        json=order_body(f"{self.prefix}-{n + i}"),
                        headers=auth(self.key),
                    )
                    for i in range(self.per_round)
                )
            )
            n += self.per_round
            for a in answers:
                if a.status_code == 202:
                    self.receipts.append(a.json())
                else:
                    self.refusals.append((a.status_code, a.text))
            with contextlib.suppress(TimeoutError):  # pacing: about 100 orders/s
                await asyncio.wait_for(self._stop.wait(), 0.1)


async def _buffer(redis: Any) -> tuple[int, int, int, int]:
    """(queue numbers issued, orders settled, entries in the streams, dead letters), read
    atomically."""
    streams = [KEYS.stream(shard) for shard in range(8)]
    for shard in range(8):  # the sub-lanes: named by the lane hashes
        subs = sublanes_of(await redis.hgetall(KEYS.lane(shard)))
        streams += [KEYS.sublane(shard, sf) for sf in subs]
    pipe = redis.pipeline(transaction=True)
    pipe.get(KEYS.seq())
    pipe.hget(KEYS.drain(), "s")
    for stream in streams:
        pipe.xlen(stream)
    for shard in range(8):
        pipe.xlen(KEYS.deadletters(shard))
    r = await pipe.execute()
    k = len(streams)
    return int(r[0] or 0), int(r[1] or 0), sum(r[2 : 2 + k]), sum(r[2 + k :])


async def _drain(redis: Any) -> DrainState:
    return await read_drain_state(redis, KEYS, 8)


async def _settled_beyond(redis: Any, w: int) -> DrainState | None:
    state = await _drain(redis)
    return state if state.settled > w else None


async def _stalled(redis: Any) -> DrainState | None:
    state = await _drain(redis)
    return state if state.state == "stalled" else None


async def _all_settled(redis: Any) -> bool:
    issued, watermark, buffered, _ = await _buffer(redis)
    return issued > 0 and watermark == issued and buffered == 0


async def _place(client: Any, receipt: dict[str, Any], reason: str = "") -> Any:
    """What the customer's queue page shows for ``receipt`` (None unless it names ``reason``)."""
    place = (await client.get(f"/v1/queue/{receipt['ticket']}")).json()
    return place if reason in (place["eta_reason"] or "") else None


def _address(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


async def test_postgres_killed_for_20_s_under_load(
    app_factory, api_key, servers, redis, tmp_path
) -> None:
    """Injects: SIGKILL of Postgres for 20 s while orders keep arriving and a worker drains, then
    a restart on the same data dir and port. Audits: every POST got 202 throughout, the drain
    said "stalled" and kept every entry buffered (none dead-lettered, the worker alive), resumed
    by itself in the same process, and every 202 order is in Postgres exactly once."""
    postgres = EmbeddedPostgres(tmp_path)
    try:
        url = await asyncio.to_thread(postgres.start)
        await migrate(url, 8)
        settings = make_settings(servers, database_url=url, batch_size=100)
        client = await app_factory(settings)  # its status look-ups use the same, dying Postgres
        shop = _Storefront(client, api_key, "down")
        async with _worker(settings) as worker:
            shop.start()
            before = await eventually(lambda: _settled_beyond(redis, 200), timeout=30)
            await asyncio.to_thread(postgres.kill)
            down_at = time.monotonic()
            admitted_before = len(shop.receipts)
            stalled = await eventually(lambda: _stalled(redis), timeout=15)
            stalled_after = time.monotonic() - down_at
            w = stalled.settled
            assert "Postgres" in stalled.reason, stalled.reason
            silent = 0.0  # the longest the stalled drain went without reporting
            while time.monotonic() - down_at < OUTAGE_S:  # watch the whole outage
                issued, watermark, buffered, dead = await _buffer(redis)
                state = await _drain(redis)
                assert worker.alive(), worker.tail()
                assert state.state == "stalled", state
                assert watermark == w, "something settled while Postgres was down"
                assert dead == 0, "an order was dead-lettered while Postgres was down"
                assert buffered == issued - watermark, "an unsettled entry left the buffer"
                assert not shop.refusals, shop.refusals[:3]
                silent = max(silent, time.time() - state.heard_at_us / 1e6)
                place = await _place(client, shop.receipts[-1])
                assert place["eta_seconds"] is None, place  # no made-up ETA for customers
                await asyncio.sleep(0.5)
            admitted_during = len(shop.receipts) - admitted_before
            assert admitted_during > 0
            place = await eventually(lambda: _place(client, shop.receipts[-1], "stalled"))
            assert "Postgres" in place["eta_reason"], place

            restart_at = time.monotonic()
            await asyncio.to_thread(postgres.start)  # same data dir, same port
            up_at = time.monotonic()
            resumed = await eventually(lambda: _settled_beyond(redis, w), timeout=30, interval=0.01)
            resumed_after = time.monotonic() - up_at
            assert resumed.leader == before.leader, "the drain resumed in another process"
            await shop.stop()
            await eventually(lambda: _all_settled(redis), timeout=60)
        assert not shop.refusals, shop.refusals[:3]
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            await audit(pool, redis, shop.receipts)
        finally:
            await pool.close()
    finally:
        await asyncio.to_thread(postgres.stop)
    print(
        f"\nPostgres down {OUTAGE_S:.0f} s: 'stalled' published {stalled_after:.2f} s after the"
        f" kill, its report never older than {silent:.1f} s; {admitted_during} orders got 202"
        f" meanwhile; Postgres restarted in {up_at - restart_at:.2f} s, and the drain settled"
        f" again {resumed_after:.2f} s after it answered; {len(shop.receipts)} orders audited"
    )


async def _jitter(proxy: DelayProxy, low: float, high: float) -> None:
    while True:
        proxy.delay = random.uniform(low, high)
        await asyncio.sleep(0.2)


async def test_slow_postgres_under_load(client, api_key, servers, redis, pg) -> None:
    """Injects: 150-300 ms of added latency on every reply chunk Postgres sends the worker (a
    proxy in between) while orders keep arriving. Audits: every POST got 202, and every 202
    order is in Postgres exactly once, committed first-in first-out in each lane."""
    host, port = _address(servers.database_url)
    proxy = await DelayProxy(host, port).start()
    jitter = asyncio.create_task(_jitter(proxy, 0.15, 0.3))
    settings = make_settings(servers, database_url=proxy.url(servers.database_url))
    shop = _Storefront(client, api_key, "slow")
    try:
        async with _worker(settings):
            shop.start()
            await eventually(lambda: _settled_beyond(redis, 300), timeout=30)
            await shop.stop()
            await eventually(lambda: _all_settled(redis), timeout=60)
    finally:
        jitter.cancel()
        await shop.stop()
        await proxy.close()
    assert not shop.refusals, shop.refusals[:3]
    await audit(pg, redis, shop.receipts)
    await assert_fifo_per_lane(pg, "slow replies broke first-in first-out")
    print(f"\nslow Postgres: {len(shop.receipts)} orders, every one committed once")


async def _committing(pg: Any) -> int | None:
    """The drain's backend that has just run COMMIT (its reply still on its way), if any."""
    return await pg.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'ordergate-drain%'"
        " AND state = 'idle' AND query = 'COMMIT;'"
    )


async def test_connection_cut_after_commit_before_its_reply(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: three cuts of the worker's Postgres connection (a proxy in between, replies
    delayed 300 ms), each right after the server ran a batch's COMMIT and before the reply got
    back, while orders keep arriving. Audits: the worker reconnects by itself, each lost batch
    is settled as committed on redelivery with its original commit time (not rejected, not
    dead-lettered), and every 202 order is in Postgres exactly once."""
    host, port = _address(servers.database_url)
    proxy = await DelayProxy(host, port).start()
    proxy.delay = 0.3
    settings = make_settings(servers, database_url=proxy.url(servers.database_url), batch_size=100)
    shop = _Storefront(client, api_key, "cut", per_round=5)
    lost: list[int] = []  # the last queue number Postgres held at each cut
    try:
        async with _worker(settings) as worker:
            shop.start()
            for _ in range(3):
                pid = await eventually(lambda: _committing(pg), timeout=30, interval=0.005)
                proxy.cut()
                lost.append(await pg.fetchval("SELECT max(seq) FROM orders"))
                await eventually(partial(_drain_backend_other_than, pg, pid), timeout=30)
            proxy.delay = 0.0  # the fault is over: drain what the slow spell left
            await shop.stop()
            await eventually(lambda: _all_settled(redis), timeout=60)
    finally:
        await shop.stop()
        await proxy.close()
    assert not shop.refusals, shop.refusals[:3]
    await audit(pg, redis, shop.receipts)
    for seq in lost:
        row = await pg.fetchrow("SELECT order_id, committed_at FROM orders WHERE seq = $1", seq)
        status = (await client.get(f"/v1/orders/{row['order_id']}", headers=auth(api_key))).json()
        assert status["status"] == "committed"
        assert status["committed_at"] == _iso(row["committed_at"]), (status, row)
    # a cut batch stays pending on its lane; the lane's next session claims and settles it
    redelivered = sum(1 for line in worker.lines if "left pending by earlier owners" in line)
    assert redelivered >= 1, "no cut landed between a COMMIT and its reply"
    print(
        f"\ncut mid-commit: {redelivered} of {len(lost)} cuts lost a COMMIT's reply; each batch"
        f" was settled on redelivery; {len(shop.receipts)} orders audited"
    )


async def _drain_backend_other_than(pg: Any, pid: int) -> bool:
    return bool(
        await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'ordergate-drain%'"
            " AND pid <> $1"
            " AND (query LIKE 'COPY \"orders\"%' OR query LIKE 'INSERT INTO orders%')",
            pid,
        )
    )


def _iso(at: Any) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_backoff_stays_capped_after_hours_of_outage() -> None:
    """Injects: the 5000th retry of one outage (hours of Postgres down at the 5 s cap). Audits:
    the backoff is still a number within its cap (2**1024 used to overflow the float)."""
    assert all(0 <= backoff(attempt, 5.0) <= 5.0 for attempt in (0, 1, 100, 1024, 5000))


async def _drain_sessions(pg: Any, n: int) -> bool:
    return n <= await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'ordergate-drain%'"
    )


def _lock_poll_failed(*workers: _Worker) -> bool:
    for w in workers:
        assert w.alive(), w.tail()
    return any("cannot poll its lock" in line for w in workers for line in w.lines)


async def test_postgres_held_past_the_lock_poll_timeout(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: an operator's session holds lane 0's lock (so its worker polls for it), then a
    proxy holds every byte between two workers (4 lanes each) and Postgres until that 5 s lock
    poll times out, while orders keep arriving. Audits: both workers survive, the timeout is
    reported as Postgres's (not as a Redis error), the drain resumes when traffic flows again,
    and once the operator lets go, every 202 order is in Postgres exactly once."""
    host, port = _address(servers.database_url)
    proxy = await DelayProxy(host, port).start()
    settings = make_settings(servers, database_url=proxy.url(servers.database_url), batch_size=100)
    shop = _Storefront(client, api_key, "held")
    operator = await asyncpg.connect(servers.database_url)  # not a drain session: never ended
    await operator.execute("SELECT pg_advisory_lock($1, 0)", deployment_key(settings.key_prefix))
    try:
        async with _worker(settings) as first, _worker(settings) as second:
            shop.start()
            before = await eventually(lambda: _settled_beyond(redis, 200), timeout=30)
            await eventually(lambda: _drain_sessions(pg, 8), timeout=30)  # a session per lane
            proxy.hold()
            held_at = time.monotonic()
            await eventually(partial(_lock_poll_failed, first, second), timeout=20, interval=0.1)
            held_for = time.monotonic() - held_at
            proxy.release()
            await eventually(lambda: _settled_beyond(redis, before.settled + 300), timeout=60)
            await shop.stop()
            await operator.close()  # lane 0 drains now
            await eventually(lambda: _all_settled(redis), timeout=60)
    finally:
        await shop.stop()
        await proxy.close()
        await operator.close()
    assert not shop.refusals, shop.refusals[:3]
    misread = [line for line in first.lines + second.lines if "Redis error" in line]
    assert not misread, f"a Postgres hang was reported as a Redis error: {misread[0]}"
    await audit(pg, redis, shop.receipts)
    print(
        f"\nheld Postgres {held_for:.1f} s: the lock poll timed out, both workers survived;"
        f" {len(shop.receipts)} orders audited"
    )


async def _read_only(admin: Any, on: bool) -> None:
    if on:
        await admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    else:
        await admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
    await admin.execute("SELECT pg_reload_conf()")


async def test_postgres_turns_read_only_under_load(client, api_key, servers, redis, pg) -> None:
    """Injects: Postgres turns read-only under the running worker for 3 s (the reloaded setting
    a demoted primary or a maintenance window brings: SQLSTATE 25006 on every INSERT) while
    orders keep arriving. Audits: nothing is dead-lettered, the drain says "stalled" meanwhile,
    and every 202 order is in Postgres exactly once once writes are allowed again."""
    settings = make_settings(servers, batch_size=100)
    admin = await asyncpg.connect(servers.database_url)
    await admin.execute("SET default_transaction_read_only = off")  # outlives the reload
    shop = _Storefront(client, api_key, "ro")
    try:
        async with _worker(settings) as worker:
            shop.start()
            await eventually(lambda: _settled_beyond(redis, 200), timeout=30)
            await _read_only(admin, True)
            stalled = await eventually(lambda: _stalled(redis), timeout=15)
            assert "read-only" in stalled.reason, stalled.reason
            began = time.monotonic()
            while time.monotonic() - began < 3.0:  # watch the whole spell
                _, _, _, dead = await _buffer(redis)
                assert dead == 0, "an order was dead-lettered while Postgres was read-only"
                assert worker.alive(), worker.tail()
                await asyncio.sleep(0.5)
            await _read_only(admin, False)
            await eventually(lambda: _settled_beyond(redis, stalled.settled), timeout=30)
            await shop.stop()
            await eventually(lambda: _all_settled(redis), timeout=60)
    finally:
        await shop.stop()
        await _read_only(admin, False)
        await admin.close()
    assert not shop.refusals, shop.refusals[:3]
    await audit(pg, redis, shop.receipts)
    print(
        f"\nread-only Postgres: {len(shop.receipts)} orders, none dead-lettered, each committed"
        " once"
    )


async def _taken_or_pending(redis: Any) -> tuple[int, int]:
    """(lanes whose owners took orders beyond their watermark, entries pending on a consumer)."""
    state = await _drain(redis)
    pending = 0
    for shard in range(8):
        pending += await in_flight(redis, KEYS, shard)
    return sum(1 for lane in state.lanes if lane.taken > lane.watermark), pending


async def _waits_for_a_lock(pg: Any, pid: int) -> bool:
    return bool(
        await pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            pid,
        )
    )


async def test_sessions_ended_while_the_lanes_idle(client, api_key, servers, redis, pg) -> None:
    """Injects: Postgres ends the idle lanes' sessions (pg_terminate_backend, as an admin, an
    idle_session_timeout or a restart does) and other sessions take the lanes' locks at once,
    as a rival owner would; then orders arrive. Audits: the worker whose locks died takes
    nothing from any lane while the other sessions hold the locks, then owns the lanes again and
    commits every 202 order exactly once, first-in first-out in each lane."""
    settings = make_settings(servers)
    deployment = deployment_key(settings.key_prefix)
    async with _worker(settings) as worker:
        first = await admit(client, api_key, 50, prefix="a")
        await eventually(lambda: _all_settled(redis), timeout=30)
        await eventually(lambda: _drain_sessions(pg, 8), timeout=30)
        rivals = [await asyncpg.connect(servers.database_url) for _ in range(8)]
        try:
            # queued on the locks first, the rivals get them the instant the sessions end
            locking = [
                asyncio.create_task(rival.execute("SELECT pg_advisory_lock($1, $2)", deployment, i))
                for i, rival in enumerate(rivals)
            ]
            for rival in rivals:
                await eventually(partial(_waits_for_a_lock, pg, rival.get_server_pid()))
            ended = await pg.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name LIKE 'ordergate-drain%'"
            )
            assert ended == 8
            await asyncio.wait_for(asyncio.gather(*locking), 10)
            later = await admit(client, api_key, 100, prefix="b")
            began = time.monotonic()
            while time.monotonic() - began < 2.0:  # watch while the rivals hold the locks
                assert await _taken_or_pending(redis) == (0, 0), "a deposed owner took entries"
                assert worker.alive(), worker.tail()
                await asyncio.sleep(0.2)
        finally:
            for rival in rivals:
                await rival.close()
        await eventually(lambda: _all_settled(redis), timeout=30)
    await audit(pg, redis, first + later)
    await assert_fifo_per_lane(pg)

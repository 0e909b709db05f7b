"""Shards across two Postgres servers (分库): lane k writes to database floor(k * 2 / 8), status
reads go there, a list in another order is refused, and one server stopped under load stalls
only its own lanes while the other's keep committing; every acknowledged order once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import asyncpg
import pytest

from ordergate.buffer.deployment import check_database
from ordergate.buffer.errors import DeploymentMismatch
from ordergate.buffer.keys import Keys
from ordergate.buffer.position import read_drain_state
from ordergate.components import worker_config
from ordergate.servers import EmbeddedPostgres
from ordergate.sharding.databases import shards_on
from ordergate.sharding.ids import shard_of_order_id
from ordergate.surge_audit import count_committed
from ordergate.surge_results import Ledger
from ordergate.workers.migrate import migrate_all
from ordergate.workers.runner import run_worker
from tests.cli.run import ordergate
from tests.conftest import admit, auth, drain, eventually, make_settings, worker_running
from tests.faults import audit
from tests.workers.procs import logged_worker
from tests.workers.test_postgres_faults import _all_settled, _Storefront

KEYS = Keys()
OUTAGE_S = 20.0
A_LANES, B_LANES = shards_on(0, 2, 8), shards_on(1, 2, 8)  # [0..3], [4..7]


@dataclass
class Pair:
    """Two embedded Postgres servers, migrated as databases 0 and 1 of one deployment."""

    a: EmbeddedPostgres
    b: EmbeddedPostgres
    # A server dies with the thread that started it (PR_SET_PDEATHSIG), and asyncio.to_thread's
    # threads end with each test's event loop: restarts run on this thread, which lasts the module.
    thread: ThreadPoolExecutor

    async def restart_b(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.thread, self.b.start)

    @property
    def urls(self) -> tuple[str, str]:
        return self.a.url, self.b.url

    @property
    def database_url(self) -> str:
        return " ".join(self.urls)


@pytest.fixture(scope="module")
def pair_of_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    a = EmbeddedPostgres(tmp_path_factory.mktemp("pg-a"))
    b = EmbeddedPostgres(tmp_path_factory.mktemp("pg-b"))
    thread = ThreadPoolExecutor(max_workers=1)
    try:
        a.start()
        b.start()
        pair = Pair(a, b, thread)
        asyncio.run(migrate_all(pair.urls, 8))
        yield pair
    finally:
        b.stop()
        a.stop()
        thread.shutdown()


class _Everywhere:
    """Both databases' pools as one for tests.faults.audit: its rows from all of them, so an
    order committed twice in two databases counts twice."""

    def __init__(self, pools: list[asyncpg.Pool]) -> None:
        self.pools = pools

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return [row for pool in self.pools for row in await pool.fetch(query, *args)]


@pytest.fixture
async def pair(pair_of_servers: Pair) -> AsyncIterator[tuple[Pair, list[asyncpg.Pool]]]:
    """The two servers, their orders tables empty, and a small pool on each."""
    pools = [await asyncpg.create_pool(url, min_size=1, max_size=2) for url in pair_of_servers.urls]
    try:
        for pool in pools:
            await pool.execute("TRUNCATE orders")
        yield pair_of_servers, pools
    finally:
        for pool in pools:
            await pool.close()


async def _lanes_in(pool: asyncpg.Pool) -> dict[int, int]:
    """Rows per shard in one database."""
    rows = await pool.fetch("SELECT shard, count(*) AS n FROM orders GROUP BY shard")
    return {r["shard"]: r["n"] for r in rows}


async def _partitions(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'orders'"
    )
    return sorted(r["relname"] for r in rows)


async def _rows_of(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM orders"))


async def _each_lane_in_its_database(pools: list[asyncpg.Pool]) -> None:
    a, b = [await _lanes_in(pool) for pool in pools]
    assert set(a) <= set(A_LANES), f"database 0 holds rows of lanes {sorted(a)}"
    assert set(b) <= set(B_LANES), f"database 1 holds rows of lanes {sorted(b)}"


async def test_each_lane_writes_to_its_own_database_and_status_reads_follow(
    pair, servers, app_factory, api_key, redis
) -> None:
    """400 orders over 8 lanes, drained with the list of two: database 0 has partitions and rows
    of lanes 0-3 only, database 1 of lanes 4-7 only, each order once; the deployment row of
    each records its place; the gateway reads a committed order of every lane from its
    database, and its readiness reports both."""
    servers_, pools = pair
    settings = make_settings(servers, database_url=servers_.database_url, batch_size=50)
    client = await app_factory(settings)
    receipts = await admit(client, api_key, 400, "two")
    report = await drain(settings)
    assert (report.committed, report.rejected, report.dead_lettered) == (400, 0, 0)

    await _each_lane_in_its_database(pools)
    a, b = [await _lanes_in(pool) for pool in pools]
    assert set(a) == set(A_LANES) and set(b) == set(B_LANES), (a, b)  # every lane had some
    await audit(_Everywhere(pools), redis, receipts)
    for i, pool in enumerate(pools):
        assert await _partitions(pool) == [f"orders_p{k}" for k in shards_on(i, 2, 8)]
        row = await pool.fetchrow(
            "SELECT shards, key_prefix, database_index, databases FROM ordergate_deployment"
        )
        assert tuple(row) == (8, "og", i, 2)

    ledger = Ledger(receipts={r["storefront_order_id"]: r["order_id"] for r in receipts})
    surge = await count_committed(servers_.database_url, ledger)  # the surge's audit
    assert (surge.rows, surge.of_accepted, surge.missing, surge.doubled) == (400, 400, 0, 0)
    # a row in the wrong database too (as lane 4's): the surge's audit sees the double
    row = dict(await pools[0].fetchrow("SELECT * FROM orders LIMIT 1"))
    row["shard"] = 4
    columns = ", ".join(row)
    marks = ", ".join(f"${i + 1}" for i in range(len(row)))
    await pools[1].execute(f"INSERT INTO orders ({columns}) VALUES ({marks})", *row.values())
    surge = await count_committed(servers_.database_url, ledger)
    assert (surge.rows, surge.missing, surge.doubled) == (401, 0, 1)
    await pools[1].execute("DELETE FROM orders WHERE order_id = $1", row["order_id"])

    one_per_lane = {shard_of_order_id(r["order_id"], 8): r for r in receipts}
    assert sorted(one_per_lane) == list(range(8))

    async def committed(receipt: dict[str, Any]) -> Any:
        r = await client.get(f"/v1/orders/{receipt['order_id']}", headers=auth(api_key))
        return r if r.status_code == 200 else None  # 503 until the pool of its database is up

    for shard, receipt in sorted(one_per_lane.items()):
        answer = (await eventually(partial(committed, receipt), timeout=15)).json()
        assert answer["status"] == "committed", (shard, answer)
        assert answer["storefront_order_id"] == receipt["storefront_order_id"]
    ready = (await client.get("/readyz")).json()
    assert ready["ready"] and ready["info"]["postgres"] == "ok", ready
    assert [(d["database"], d["shards"], d["status"]) for d in ready["info"]["databases"]] == [
        (0, A_LANES, "ok"),
        (1, B_LANES, "ok"),
    ]


async def test_a_list_in_another_order_or_shorter_is_refused_at_start(
    pair, servers, app_factory
) -> None:
    """The databases recorded their places: `work`, `serve` and `migrate` with the list reversed
    or with one database left out exit with status 2 and say which database is where, before
    any process drains or admits; so do a worker and a gateway started past the shell."""
    servers_, pools = pair
    a, b = servers_.urls
    reversed_ = make_settings(servers, database_url=f"{b} {a}")
    shorter = make_settings(servers, database_url=a)
    for settings, said in (
        (
            reversed_,
            "database 0 of 2 (lanes 0-3) of this process's database_url was set up as"
            " database 1 of 2 (lanes 4-7)",
        ),
        (shorter, "the database of this process's database_url was set up as database 0 of 2"),
    ):
        for command in (("work",), ("serve", "--port", "0"), ("migrate",)):
            done = await ordergate(settings, *command, timeout=60)
            assert done.returncode == 2, (command, done.stderr[-2000:])
            assert said in done.stderr, (command, done.stderr[-2000:])
            assert "the same URLs, in the same order" in done.stderr
        with pytest.raises(DeploymentMismatch, match="same URLs, in the same order"):
            await asyncio.wait_for(run_worker(worker_config(settings), burst=True), 30)
        with pytest.raises(DeploymentMismatch, match="same URLs, in the same order"):
            await app_factory(settings)
    for i, pool in enumerate(pools):  # nothing was re-recorded, no partition was added
        assert await pool.fetchval("SELECT database_index FROM ordergate_deployment") == i
        assert await _partitions(pool) == [f"orders_p{k}" for k in shards_on(i, 2, 8)]


async def _lanes(redis: Any) -> Any:
    return (await read_drain_state(redis, KEYS, 8)).lanes


async def _b_stalled(redis: Any) -> Any:
    lanes = await _lanes(redis)
    stalled = all(lanes[k].state == "stalled" for k in B_LANES)
    return lanes if stalled else None


async def test_one_server_stopped_for_20_s_stalls_only_its_lanes(
    pair, servers, app_factory, api_key, redis
) -> None:
    """Injects: the second Postgres server stopped for 20 s while orders keep arriving and a
    worker process drains both. Audits: lanes 4-7 say "stalled" naming database 1 and settle
    nothing meanwhile, lanes 0-3 keep draining and their database keeps growing; admission
    answers 202 throughout and the gateway stays ready, naming the database that is down;
    committed statuses of lanes 0-3 keep answering, those of lanes 4-7 answer 503; after the
    restart every acknowledged order is committed exactly once, each in its lane's database."""
    servers_, pools = pair
    settings = make_settings(servers, database_url=servers_.database_url, batch_size=100)
    client = await app_factory(settings)
    shop = _Storefront(client, api_key, "split")
    async with logged_worker(settings) as worker:
        shop.start()

        async def both_commit() -> bool:
            return min([await _rows_of(pool) for pool in pools]) >= 100

        await eventually(both_commit, timeout=60)
        committed = list(shop.receipts)
        await asyncio.to_thread(servers_.b.stop)
        down_at = time.monotonic()
        lanes = await eventually(lambda: _b_stalled(redis), timeout=15)
        stalled_after = time.monotonic() - down_at
        for k in B_LANES:
            assert "database 1 of 2 (lanes 4-7)" in lanes[k].reason, lanes[k]
        frozen = {k: lanes[k].settled for k in B_LANES}
        a_rows_at_outage = await _rows_of(pools[0])
        checked_statuses = False
        while time.monotonic() - down_at < OUTAGE_S:
            lanes = await _lanes(redis)
            assert worker.alive(), worker.tail()
            for k in B_LANES:
                assert lanes[k].state == "stalled", lanes[k]
                assert lanes[k].settled == frozen[k], f"lane {k} settled with its database down"
            for k in A_LANES:
                assert lanes[k].state == "draining", lanes[k]
            assert not shop.refusals, shop.refusals[:3]
            if not checked_statuses:
                ready = (await client.get("/readyz")).json()
                assert ready["ready"], ready
                assert ready["info"]["postgres"].startswith(
                    "Postgres database 1 of 2 (lanes 4-7) unreachable"
                ), ready
                assert [d["status"] == "ok" for d in ready["info"]["databases"]] == [True, False]
                by_lane = {shard_of_order_id(r["order_id"], 8): r for r in committed}
                for k, receipt in by_lane.items():
                    r = await client.get(f"/v1/orders/{receipt['order_id']}", headers=auth(api_key))
                    if k in A_LANES:
                        assert r.status_code == 200, (k, r.text)
                    elif r.status_code != 200:  # its status record may still answer; else 503
                        assert r.status_code == 503, (k, r.text)
                        assert "database 1 of 2" in r.json()["detail"], r.text
                checked_statuses = True
            await asyncio.sleep(0.5)
        a_rows_during = await _rows_of(pools[0]) - a_rows_at_outage
        assert a_rows_during >= 100, f"database 0 took only {a_rows_during} rows meanwhile"

        await servers_.restart_b()  # same data dir, same port
        up_at = time.monotonic()

        async def b_resumed() -> bool:
            lanes = await _lanes(redis)
            return all(lanes[k].settled > frozen[k] for k in B_LANES)

        await eventually(b_resumed, timeout=60, interval=0.05)
        resumed_after = time.monotonic() - up_at
        await shop.stop()
        await eventually(lambda: _all_settled(redis), timeout=90)
    assert not shop.refusals, shop.refusals[:3]
    await _each_lane_in_its_database(pools)
    await audit(_Everywhere(pools), redis, shop.receipts)
    print(
        f"\ndatabase 1 of 2 down {OUTAGE_S:.0f} s: lanes 4-7 'stalled' {stalled_after:.2f} s after"
        f" the stop; database 0 took {a_rows_during} rows meanwhile; lanes 4-7 settled again"
        f" {resumed_after:.2f} s after the restart; {len(shop.receipts)} orders audited"
    )


async def test_a_single_database_deployment_from_before_0004_reads_as_index_0_of_1(
    pair_of_servers: Pair,
) -> None:
    """A deployment row written before migration 0004 has no place: processes take it as the
    one database of a single-database deployment (and refuse it as one of two); `migrate`
    then records it as index 0 of 1."""
    admin = await asyncpg.connect(pair_of_servers.a.url)
    try:
        await admin.execute("DROP DATABASE IF EXISTS og_before_0004")
        await admin.execute("CREATE DATABASE og_before_0004")
    finally:
        await admin.close()
    url = pair_of_servers.a.url.rsplit("/", 1)[0] + "/og_before_0004"
    await migrate_all([url], 8)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "ALTER TABLE ordergate_deployment DROP COLUMN database_index, DROP COLUMN databases;"
            " DELETE FROM ordergate_migrations WHERE version = 4"
        )
        await check_database(conn, 8, "og")
        with pytest.raises(DeploymentMismatch, match="set up as database 0 of 1 .lanes 0-7."):
            await check_database(conn, 8, "og", database=0, databases=2)
        assert await migrate_all([url], 8) == ["applied 0004_database_place.sql"]
        row = await conn.fetchrow("SELECT database_index, databases FROM ordergate_deployment")
        assert tuple(row) == (0, 1)
        await check_database(conn, 8, "og")
    finally:
        await conn.close()
        admin = await asyncpg.connect(pair_of_servers.a.url)
        try:
            await admin.execute("DROP DATABASE IF EXISTS og_before_0004 WITH (FORCE)")
        finally:
            await admin.close()


async def test_a_worker_started_while_one_server_is_down_drains_the_other_lanes(
    pair, servers, app_factory, api_key, redis
) -> None:
    """The second server is down when the gateway and the worker start: the gateway admits to
    every lane, the worker starts anyway and commits lanes 0-3 into the first database, lanes
    4-7 say "stalled" until the second is back (checked on connect, then drained); each order
    once, each in its lane's database."""
    servers_, pools = pair
    settings = make_settings(servers, database_url=servers_.database_url, batch_size=50)
    await pools[1].close()
    await asyncio.to_thread(servers_.b.stop)
    try:
        client = await app_factory(settings)
        receipts = await admit(client, api_key, 200, "half")
        on_a = sum(1 for r in receipts if shard_of_order_id(r["order_id"], 8) in A_LANES)
        async with worker_running(settings) as worker:

            async def a_done() -> bool:
                return await _rows_of(pools[0]) == on_a

            await eventually(a_done, timeout=30)
            lanes = await eventually(lambda: _b_stalled(redis), timeout=15)
            assert not worker.done()
            assert all("database 1 of 2" in lanes[k].reason for k in B_LANES), lanes
            await servers_.restart_b()
            await eventually(lambda: _all_settled(redis), timeout=60)
    finally:
        if not servers_.b.running():
            await servers_.restart_b()
    pools[1] = await asyncpg.create_pool(servers_.b.url, min_size=1, max_size=2)
    assert await _rows_of(pools[1]) == len(receipts) - on_a
    await _each_lane_in_its_database(pools)
    await audit(_Everywhere(pools), redis, receipts)

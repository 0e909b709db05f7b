"""SIGKILL of a cluster master under load: its replica takes over, clients retry their 503s
with the same ids, and every order acknowledged under durability = "replica" is committed
exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from ordergate.buffer.connection import connect_redis
from ordergate.errors import ServerStartError
from ordergate.gateway.auth import create_key
from ordergate.servers import EmbeddedValkeyCluster
from tests.cluster.conftest import CLUSTER_KEYS, empty_cluster
from tests.conftest import drain, eventually, make_settings, worker_running
from tests.faults import accepted, audit, load, retry_until_receipts


@pytest.fixture
def own_cluster(tmp_path) -> Iterator[EmbeddedValkeyCluster]:
    """A cluster of the test's own: a killed master does not come back for the others."""
    cluster = EmbeddedValkeyCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _shard(order_id: str) -> int:
    return int(order_id.split("_")[1])


async def test_sigkill_of_a_master_under_load_loses_no_acknowledged_order(
    own_cluster, servers, app_factory, pg
) -> None:
    await empty_cluster(own_cluster.url)
    settings = make_settings(
        servers, redis_url=own_cluster.url, durability="replica", admission_timeout_ms=3000
    )
    redis = await connect_redis(own_cluster.url)
    try:
        key = await create_key(redis, CLUSTER_KEYS, "shop-a", 8)
        victim = own_cluster.master_of_slot(redis.keyslot(CLUSTER_KEYS.lane(0)))
        victim_lanes = {
            k
            for k in range(8)
            if own_cluster.master_of_slot(redis.keyslot(CLUSTER_KEYS.lane(k))) is victim
        }
        client = await app_factory(settings)
        async with worker_running(settings), load(client, key, "fo", clients=16) as shots:
            await eventually(lambda: accepted(shots) >= 300, timeout=30)
            victim.kill()  # SIGKILL: what the master had not sent its replica is gone
            killed = time.monotonic()
            # the other masters' lanes keep admitting while the victim's replica is elected
            await eventually(
                lambda: _lanes_accepted_after(shots, killed) - victim_lanes, timeout=10
            )
            # its replica is promoted, and answers 503 too: with its master gone it has no
            # replica to acknowledge a write (durability "replica"), until the old master comes
            # back as its replica
            await eventually(lambda: _promoted(own_cluster, victim), timeout=30)
            promoted = time.monotonic()
            await eventually(lambda: _refused_for_no_replica(shots, killed), timeout=30)
            victim.start()
            back = time.monotonic()
            await eventually(lambda: _lanes_accepted_after(shots, back) & victim_lanes, timeout=30)
            again = time.monotonic()
        refused = [s for s in shots if s.status == 503]
        assert refused, "the failover was not felt: no 503 while the master was away"
        receipts = await retry_until_receipts(client, key, shots, timeout=60)
    finally:
        await redis.aclose()
    await drain(settings)
    cluster_redis = await connect_redis(own_cluster.url)
    try:
        await audit(pg, cluster_redis, receipts.by_sfo.values(), keys=CLUSTER_KEYS)
    finally:
        await cluster_redis.aclose()
    rows = await pg.fetchval("SELECT count(*) FROM orders WHERE storefront_id = 'shop-a'")
    assert rows == len(receipts.by_sfo), "every order tried has its one row"
    others = sum(
        1
        for s in shots
        if s.status == 202
        and killed < s.sent < back
        and s.response is not None
        and _shard(s.response.json()["order_id"]) not in victim_lanes
    )
    print(
        f"\nfailover: replica promoted {promoted - killed:.1f} s after the SIGKILL; its lanes"
        f" {sorted(victim_lanes)} admitted again {again - back:.1f} s after the old master"
        f" restarted; {len(refused)} answers 503 in all, {others} receipts from the other"
        f" masters' lanes meanwhile; {len(shots)} orders sent, {receipts.replayed} receipts"
        f" replayed to retries, {rows} rows audited"
    )


def _promoted(cluster: EmbeddedValkeyCluster, victim) -> bool:
    try:
        serving = {cluster.master_of_slot(slot).port for slot in (0, 8000, 16000)}
    except ServerStartError:  # a slot is not served while its replica is being elected
        return False
    return victim.port not in serving and len(serving) == 3


def _refused_for_no_replica(shots: list, after: float) -> bool:
    return any(
        s.status == 503 and s.sent > after and "no replica acknowledged" in s.text for s in shots
    )


def _lanes_accepted_after(shots: list, after: float) -> set[int]:
    return {
        _shard(s.response.json()["order_id"])
        for s in shots
        if s.status == 202 and s.sent > after and s.response is not None
    }

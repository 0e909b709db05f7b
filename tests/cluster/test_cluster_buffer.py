"""The buffer pool on a real Valkey Cluster (3 masters, 3 replicas): lanes spread over the
masters, admission per lane, the drain, positions and the exactly-once audit."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from redis.asyncio.cluster import RedisCluster

from ordergate.buffer.position import read_drain_state
from ordergate.gateway.auth import create_key
from tests.cluster.conftest import CLUSTER_KEYS
from tests.conftest import admit, drain, eventually, make_settings, worker_running
from tests.faults import audit, buffered


def _path(url: str) -> str:
    return "/" + url.split("://", 1)[1].split("/", 1)[1]


async def _position(client: Any, receipt: dict[str, Any]) -> int:
    r = await client.get(_path(receipt["queue_url"]))
    assert r.status_code == 200, r.text
    return int(r.json()["position"])


def _shard(receipt: dict[str, Any]) -> int:
    return int(receipt["order_id"].split("_")[1])


async def test_lanes_spread_over_the_masters_and_drain_exactly_once(
    app_factory, cluster_settings, cluster_redis, pg
) -> None:
    client = await app_factory(cluster_settings)
    assert isinstance(client.app.state.gateway.redis, RedisCluster)  # detected, no setting
    key = await create_key(cluster_redis, CLUSTER_KEYS, "shop-a", 8)
    masters = {cluster_redis.get_node_from_key(CLUSTER_KEYS.lane(k)).name for k in range(8)}
    assert len(masters) == 3, "the 8 lanes' hash tags land on every master"

    receipts = await admit(client, key, 1200)
    by_lane: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in receipts:
        by_lane[_shard(r)].append(r)
    assert set(by_lane) == set(range(8))
    for shard, lane in by_lane.items():
        # each lane numbers its own orders: 1..n, in the order they entered it
        assert sorted(r["queue_number"] for r in lane) == list(range(1, len(lane) + 1))
        assert await buffered(cluster_redis, CLUSTER_KEYS, shard) == len(lane)
        for r in lane[:: max(1, len(lane) // 5)]:  # nothing drained: its lane's earlier orders
            assert await _position(client, r) == r["queue_number"] - 1
    state = await read_drain_state(cluster_redis, CLUSTER_KEYS, 8)
    assert (state.issued, state.settled, state.depth) == (1200, 0, 1200)

    await drain(cluster_settings)
    await audit(pg, cluster_redis, receipts, keys=CLUSTER_KEYS)
    state = await read_drain_state(cluster_redis, CLUSTER_KEYS, 8)
    assert (state.issued, state.settled, state.depth) == (1200, 1200, 0)
    rows = await pg.fetch("SELECT shard, count(*) AS n FROM orders GROUP BY shard")
    assert {r["shard"]: r["n"] for r in rows} == {k: len(v) for k, v in by_lane.items()}
    done = await client.get(f"/v1/orders/{receipts[0]['order_id']}", headers=_auth(key))
    assert done.status_code == 200 and done.json()["status"] == "committed", done.text


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_positions_are_the_true_count_ahead_in_the_lane_during_a_drain(
    app_factory, cluster_settings, cluster_redis, servers, pg
) -> None:
    """On a cluster a position counts the orders ahead in the order's own lane: checked against
    Postgres itself at several moments of a drain capped at 150 orders/s."""
    client = await app_factory(cluster_settings)
    key = await create_key(cluster_redis, CLUSTER_KEYS, "shop-a", 8)
    receipts = await admit(client, key, 800)
    lane = sorted((r for r in receipts if _shard(r) == 0), key=lambda r: r["queue_number"])
    probes = lane[40::12][:5]
    assert len(probes) >= 4

    async def truth(probe: dict[str, Any]) -> int:
        done = await pg.fetchval(
            "SELECT count(*) FROM orders WHERE shard = 0 AND seq < $1", probe["queue_number"]
        )
        return int(probe["queue_number"] - 1 - done)

    throttled = make_settings(
        servers, redis_url=cluster_settings.redis_url, drain_rate=150, batch_size=10
    )
    checked = 0
    async with worker_running(throttled):
        for probe in probes:
            await eventually(
                lambda p=probe: _under_way(truth, p), timeout=60
            )  # part-way to this probe
            for _ in range(5):  # a batch may settle between the reads: then read again
                before = await _position(client, probe)
                exact = await truth(probe)
                after = await _position(client, probe)
                if before == exact == after:
                    checked += 1
                    break
                assert after <= before, "a position went up"
            else:
                raise AssertionError(f"never matched Postgres: {before}/{exact}/{after}")
    assert checked == len(probes)


async def _under_way(truth: Any, probe: dict[str, Any]) -> bool:
    ahead = await truth(probe)
    return 0 < ahead < probe["queue_number"] - 1 - 10

"""Operations on a cluster: a poison order dead-lettered and replayed, signed webhooks (each
lane's events gathered into one stream), and the operators' status added up over the lanes."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from ordergate.buffer.position import read_drain_state
from ordergate.gateway.auth import create_key
from ordergate.sharding.routing import partition_table, shard_for
from tests.cluster.conftest import CLUSTER_KEYS
from tests.conftest import admit, auth, drain, eventually, make_settings, order_body, worker_running
from tests.faults import audit
from tests.workers.receiver import receiving
from tests.workers.test_deadletters import cli
from tests.workers.test_notifications import fast_breakers


async def test_poison_webhooks_and_status_on_a_cluster(
    app_factory, cluster_settings, cluster_redis, servers, pg
) -> None:
    settings = fast_breakers(servers, redis_url=cluster_settings.redis_url)
    client = await app_factory(settings)
    key = await create_key(cluster_redis, CLUSTER_KEYS, "shop-a", 8)
    shard = shard_for("shop-a", "poison-1", 8)
    table = partition_table(shard)
    await pg.execute(f"ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (customer_id <> 'no')")
    try:
        async with receiving() as receiver:
            done = cli(settings, "storefronts", "set-webhook", "shop-a", receiver.url)
            assert done.returncode == 0, done.stderr
            receiver.secret = done.stdout.strip()
            poison = order_body("poison-1")
            poison["customer"]["id"] = "no"
            bad = await client.post("/v1/orders", json=poison, headers=auth(key))
            assert bad.status_code == 202, bad.text
            receipts = await admit(client, key, 40)
            async with worker_running(settings):
                await eventually(lambda: len(receiver.delivered()) == 41, timeout=60)
    finally:
        await pg.execute(f"ALTER TABLE {table} DROP CONSTRAINT no_poison")
    events = receiver.delivered()
    assert all(c.signature_ok for c in receiver.calls)
    by_order = {e["order_id"]: e for e in events.values()}
    assert set(by_order) == {r["order_id"] for r in receipts} | {bad.json()["order_id"]}
    assert by_order[bad.json()["order_id"]]["type"] == "order.dead_lettered"
    assert all(e["event_id"].startswith("evt_") for e in events.values())

    oid = receipts[0]["order_id"]

    async def notified() -> bool:  # the mark on the committed order's record, in its lane
        status = (await client.get(f"/v1/orders/{oid}", headers=auth(key))).json()
        return [c["status"] for c in status.get("timeline", [])][-1:] == ["notified"]

    await eventually(notified, timeout=10)

    status = cli(settings, "status", "--json")
    assert status.returncode == 0, status.stderr
    doc: dict[str, Any] = json.loads(status.stdout)
    assert doc["issued"] == 41 and doc["buffered"] == 0
    assert doc["dead_letters"] == 1, doc

    listed = cli(settings, "dlq", "list", "--json")
    [letter] = json.loads(listed.stdout)
    replayed = cli(settings, "dlq", "replay", f"{shard}/{letter['id']}")
    assert replayed.returncode == 0 and "re-queued 1" in replayed.stdout, replayed.stderr
    await drain(settings)
    await audit(pg, cluster_redis, receipts, keys=CLUSTER_KEYS)
    replayed_oid = bad.json()["order_id"]  # committed once; its status record keeps its history
    assert await pg.fetchval("SELECT count(*) FROM orders WHERE order_id = $1", replayed_oid) == 1
    final = (await client.get(f"/v1/orders/{replayed_oid}", headers=auth(key))).json()
    assert final["status"] == "committed", final


async def test_the_memory_guard_watches_the_fullest_master(
    app_factory, cluster_settings, cluster_redis, servers, valkey_cluster
) -> None:
    """Injects: one master's maxmemory just above what it uses. Audits: the gateway sheds with
    503 (memory limit), although the other masters have room."""
    guarded = await app_factory(
        make_settings(servers, redis_url=cluster_settings.redis_url, memory_guard=0.8)
    )
    key = await create_key(cluster_redis, CLUSTER_KEYS, "shop-a", 8)
    default = cluster_redis.get_default_node()  # where a plain INFO would go
    first = next(n for n in cluster_redis.get_primaries() if n.name != default.name)
    used = int((await cluster_redis.info("memory", target_nodes=first))["used_memory"])
    try:
        await cluster_redis.config_set("maxmemory", str(int(used * 1.1)), target_nodes=first)

        async def shed() -> Any:
            r = await guarded.post("/v1/orders", json=order_body(), headers=auth(key))
            return r if r.status_code == 503 else None

        r = await eventually(shed, timeout=10)
        assert "memory limit" in r.json()["detail"], r.text
    finally:
        await cluster_redis.config_set("maxmemory", "0", target_nodes=first)


async def test_drain_pause_and_resume_on_a_cluster(
    app_factory, cluster_settings, cluster_redis, pg
) -> None:
    """`ordergate drain --pause` (its notice published after the control's transaction, which a
    cluster pipeline cannot carry): every lane pauses with orders buffered; --resume drains."""
    client = await app_factory(cluster_settings)
    key = await create_key(cluster_redis, CLUSTER_KEYS, "shop-a", 8)
    paused = cli(cluster_settings, "drain", "--pause", "--json")
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["paused"] is True
    receipts = await admit(client, key, 200)
    async with worker_running(cluster_settings):

        async def every_lane_paused() -> bool:
            state = await read_drain_state(cluster_redis, CLUSTER_KEYS, 8)
            return all(lane.state == "paused" for lane in state.lanes)

        await eventually(every_lane_paused, timeout=30)
        assert (await read_drain_state(cluster_redis, CLUSTER_KEYS, 8)).settled == 0
        resumed = cli(cluster_settings, "drain", "--resume")
        assert resumed.returncode == 0, resumed.stderr

        async def settled() -> bool:
            return (await read_drain_state(cluster_redis, CLUSTER_KEYS, 8)).settled == 200

        await eventually(settled, timeout=60)
    await audit(pg, cluster_redis, receipts, keys=CLUSTER_KEYS)


async def test_a_storefront_limit_is_split_over_the_lanes_and_holds_in_total(
    app_factory, cluster_settings, cluster_redis
) -> None:
    """`storefronts set-limit --burst 80` on a cluster of 8 lanes: each lane keeps 10 of the
    burst, so 160 orders at once get at most 80 receipts (at most 10 per lane), the rest 429."""
    client = await app_factory(cluster_settings)
    key = await create_key(cluster_redis, CLUSTER_KEYS, "shop-a", 8)
    done = cli(
        cluster_settings, "storefronts", "set-limit", "shop-a", "--rate", "1", "--burst", "80"
    )
    assert done.returncode == 0, done.stderr
    for shard in range(8):  # each lane's copy: its part of the rate and the burst
        part = await cluster_redis.hget(CLUSTER_KEYS.at(shard).storefront_limits(), "shop-a")
        assert part == b"0.125 10 1", part
    answers = await asyncio.gather(
        *(
            client.post("/v1/orders", json=order_body(f"lim-{i}"), headers=auth(key))
            for i in range(160)
        )
    )
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) == {202, 429}, statuses
    per_lane = Counter(
        int(r.json()["order_id"].split("_")[1]) for r in answers if r.status_code == 202
    )
    assert max(per_lane.values()) <= 10 and statuses[202] <= 80, per_lane
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.json()["type"].endswith("/rate-limited"), refused.text

"""Poison messages go to the dead-letter stream, with their error, and can be replayed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

from ordergate.buffer.consumer import LaneConsumer
from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import claim_lane
from tests.conftest import auth, drain, make_settings, order_body

KEYS = Keys()


def cli(settings: Any, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}
    env.update(settings.to_env())
    return subprocess.run(
        [sys.executable, "-m", "ordergate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_malformed_entry_is_dead_lettered_and_the_rest_commits(
    client, api_key, settings, redis, pg
) -> None:
    """Injects: an entry that breaks the message contract (no order id, no body). Audits: it lands
    in the dead-letter stream with its error; the good orders of the same shard commit."""
    await redis.xadd(KEYS.stream(2), {"v": "1", "sf": "shop-a", "garbage": "yes"})
    good = await asyncio.gather(
        *(client.post("/v1/orders", json=order_body(), headers=auth(api_key)) for _ in range(40))
    )
    report = await drain(settings)
    assert report.committed == 40 and report.dead_lettered == 1
    assert await pg.fetchval("SELECT count(*) FROM orders") == 40
    letters = await redis.xrange(KEYS.deadletters(2))
    assert len(letters) == 1
    assert b"malformed message" in letters[0][1][b"error"]
    assert letters[0][1][b"garbage"] == b"yes"  # the original fields are kept for inspection
    assert await redis.xlen(KEYS.stream(2)) == 0
    assert all(r.status_code == 202 for r in good)


async def test_order_postgres_refuses_is_isolated_from_its_batch(
    client, api_key, settings, redis, pg
) -> None:
    """Injects: a CHECK constraint on one partition that refuses one customer, so Postgres itself
    rejects that order in the middle of a batch (SQLSTATE 23514). Audits: the batch is bisected,
    only that order is dead-lettered with the Postgres error, the other orders commit."""
    poison = order_body("poison-1")
    poison["customer"]["id"] = "refuse-me"
    from ordergate.sharding.routing import partition_table, shard_for

    shard = shard_for("shop-a", "poison-1", 8)
    table = partition_table(shard)
    await pg.execute(
        f"ALTER TABLE {table} ADD CONSTRAINT no_refuse CHECK (customer_id <> 'refuse-me')"
    )
    try:
        bodies = [order_body() for _ in range(60)]
        bodies.insert(30, poison)
        responses = await asyncio.gather(
            *(client.post("/v1/orders", json=b, headers=auth(api_key)) for b in bodies)
        )
        assert {r.status_code for r in responses} == {202}
        report = await drain(settings.replace(batch_size=500))
    finally:
        await pg.execute(f"ALTER TABLE {table} DROP CONSTRAINT no_refuse")
    assert report.dead_lettered == 1 and report.committed == 60
    [(_, fields)] = await redis.xrange(KEYS.deadletters(shard))
    assert fields[b"sfo"] == b"poison-1"
    assert b"23514" in fields[b"error"] and b"no_refuse" in fields[b"error"]
    oid = fields[b"oid"].decode()
    status = (await client.get(f"/v1/orders/{oid}", headers=auth(api_key))).json()
    assert status["status"] == "dead_lettered" and "no_refuse" in status["reason"]
    assert await pg.fetchval("SELECT count(*) FROM orders") == 60


async def test_nul_in_metadata_is_refused_at_the_door(client, api_key) -> None:
    r = await client.post(
        "/v1/orders", json=order_body(metadata={"note": "a\u0000b"}), headers=auth(api_key)
    )
    assert r.status_code == 422
    assert "#/metadata/note" in {e["pointer"] for e in r.json()["errors"]}
    r = await client.post(
        "/v1/orders", json=order_body(metadata={"a\u0000b": 1}), headers=auth(api_key)
    )
    assert r.status_code == 422


async def _owner(redis: Any, shard: int, name: str) -> LaneConsumer:
    """``name`` takes lane ``shard`` under a new epoch (as a worker does once it holds the lock)."""
    return LaneConsumer(redis, KEYS, 8, shard, name, await claim_lane(redis, KEYS, shard, name))


async def test_entry_delivered_k_times_is_dead_lettered_then_replayed(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: an order taken by lane owners that die before settling, max_deliveries (3)
    times (three owners, each taking the lane under a new epoch, taking over what the last one
    took, and abandoning it).
    Audits: the next worker dead-letters it with the delivery count; its status says so;
    `ordergate dlq list` shows it and `ordergate dlq replay` re-queues it; it then commits once."""
    settings = make_settings(servers, max_deliveries=3)
    r = await client.post("/v1/orders", json=order_body("doomed"), headers=auth(api_key))
    oid = r.json()["order_id"]
    shard = int(oid.split("_")[1])
    first = LaneConsumer(
        redis, KEYS, 8, shard, "ghost-1", await claim_lane(redis, KEYS, shard, "ghost-1")
    )
    assert not len(await first.claim())
    assert [m.order_id for m in (await first.take(10)).messages] == [oid]
    for n, ghost in enumerate(("ghost-2", "ghost-3"), start=1):  # each takes it over, and dies
        owner = LaneConsumer(
            redis, KEYS, 8, shard, ghost, await claim_lane(redis, KEYS, shard, ghost)
        )
        owed = await owner.claim()
        assert [m.order_id for m in owed.messages] == [oid]
        assert list(owed.deliveries.values()) == [n]

    assert await redis.hget(KEYS.storefront_buffered(), "shop-a") == b"1"
    report = await drain(settings)
    assert report.dead_lettered == 1 and report.committed == 0
    # A dead letter has left the buffer: its storefront's share of it with it.
    assert await redis.hget(KEYS.storefront_buffered(), "shop-a") is None
    status = (await client.get(f"/v1/orders/{oid}", headers=auth(api_key))).json()
    assert status["status"] == "dead_lettered" and "delivered 3 times" in status["reason"]

    listed = cli(settings, "dlq", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    [letter] = json.loads(listed.stdout)
    assert letter["order_id"] == oid and letter["deliveries"] == 3
    human = cli(settings, "dlq", "list")
    assert f"{shard}/{letter['id']}" in human.stdout and "delivered 3 times" in human.stdout

    assert cli(settings, "dlq", "replay", "9/0-0").returncode == 2  # unknown id: clear error
    replayed = cli(settings, "dlq", "replay", f"{shard}/{letter['id']}")
    assert replayed.returncode == 0 and "re-queued 1" in replayed.stdout
    assert await redis.xlen(KEYS.deadletters(shard)) == 0
    assert await redis.hget(KEYS.storefront_buffered(), "shop-a") == b"1"  # back in the buffer
    assert (await client.get(f"/v1/orders/{oid}", headers=auth(api_key))).json()[
        "status"
    ] == "queued"
    # A resubmission now gets the order's new place in line (the record's re-queue mark).
    again = await client.post("/v1/orders", json=order_body("doomed"), headers=auth(api_key))
    assert again.status_code == 200, again.text
    assert again.json()["order_id"] == oid
    assert again.json()["queue_number"] > r.json()["queue_number"]
    assert again.json()["accepted_at"] == r.json()["accepted_at"]

    report = await drain(settings)
    assert report.committed == 1
    assert await redis.hget(KEYS.storefront_buffered(), "shop-a") is None
    assert await redis.hget(KEYS.storefront_settled(), "shop-a") == b"2"  # lettered, committed
    assert await pg.fetchval("SELECT count(*) FROM orders WHERE order_id = $1", oid) == 1
    final = (await client.get(f"/v1/orders/{oid}", headers=auth(api_key))).json()
    assert final["status"] == "committed" and "reason" not in final
    assert [c["status"] for c in final["timeline"]] == [
        "accepted",
        "processing",
        "dead_lettered",
        "requeued",
        "processing",
        "committed",
    ]


async def test_drain_rate_caps_the_drain(client, api_key, servers, pg) -> None:
    """ORDERGATE_DRAIN_RATE: 300 orders at 100/s cannot drain in under two seconds."""
    import time

    await asyncio.gather(
        *(client.post("/v1/orders", json=order_body(), headers=auth(api_key)) for _ in range(300))
    )
    settings = make_settings(servers, drain_rate=100)
    started = time.monotonic()
    report = await drain(settings)
    elapsed = time.monotonic() - started
    assert report.committed == 300
    assert elapsed >= 2.0, f"drained 300 orders in {elapsed:.2f}s at a cap of 100/s"
    assert await pg.fetchval("SELECT count(*) FROM orders") == 300

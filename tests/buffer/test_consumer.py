"""Settling a batch against a real Valkey: plain commits travel in short form, the exceptions in
full, and one batch mixing every kind settles each as it should."""

from __future__ import annotations

import dataclasses
from typing import Any

from ordergate.buffer.consumer import LaneConsumer, Settlement
from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import claim_lane
from ordergate.buffer.position import read_drain_state
from ordergate.buffer.webhooks import set_webhook
from tests.conftest import admit
from tests.faults import buffered, in_flight

KEYS = Keys()
IDEM_TTL = 7777
T, EARLIER = 1_800_000_000_000_000, 1_700_000_000_000_000  # the batch's commit, a first commit


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_a_batch_mixing_every_outcome_settles_each_as_it_should(
    client: Any, api_key: str, redis: Any
) -> None:
    await set_webhook(redis, KEYS, "shop-a", "https://example.com/hook", allow_private=True)
    await admit(client, api_key, 120)
    lane = max((await read_drain_state(redis, KEYS, 8)).lanes, key=lambda lane: lane.admitted)
    shard = lane.shard
    assert lane.admitted >= 8
    await redis.xadd(KEYS.stream(shard), {"v": "1", "sf": "shop-a", "garbage": "yes"})
    consumer = LaneConsumer(redis, KEYS, 8, shard, "w", await claim_lane(redis, KEYS, shard, "w"))
    batch = await consumer.take(1000)
    assert len(batch.messages) == lane.admitted and len(batch.poison) == 1
    m = batch.messages
    kept = m[5]  # re-queued from the dead letters: it has a status record to update
    kept_key = KEYS.status(shard, kept.order_id)
    await redis.hset(kept_key, mapping={"status": "queued", "tl": "accepted@1,requeued@2"})
    items = [
        Settlement.of(m[0], "committed", T),
        Settlement.of(m[1], "rejected", T, "duplicate of order ord_x"),
        Settlement.of(m[2], "committed", T),
        Settlement.of(m[3], "committed", EARLIER),  # a redelivery: its first commit's instant
        Settlement.of(m[4], "dead_lettered", T, "delivered 5 times", 5),
        dataclasses.replace(Settlement.of(kept, "committed", T), keep=True),
        Settlement.dead(batch.poison[0], T),
        *(Settlement.of(x, "committed", T) for x in m[6:]),
    ]
    watermark, settled = await consumer.settle(
        items, 600, idempotency_ttl_s=IDEM_TTL, rate=None, owner="w", taken_at_us=T - 5
    )

    assert settled == len(items) and watermark == lane.last
    assert await buffered(redis, KEYS, shard) == 0
    assert await in_flight(redis, KEYS, shard) == 0
    after = next(x for x in (await read_drain_state(redis, KEYS, 8)).lanes if x.shard == shard)
    assert after.settled == len(items) and after.watermark == lane.last

    letters = {_s(f[b"source_id"]): f for _, f in await redis.xrange(KEYS.deadletters(shard))}
    assert set(letters) == {m[4].entry_id, batch.poison[0].entry_id}
    assert letters[m[4].entry_id][b"deliveries"] == b"5"

    def status(i: int) -> Any:
        return redis.hgetall(KEYS.status(shard, m[i].order_id))

    rejected, dead = await status(1), await status(4)
    assert rejected[b"status"] == b"rejected" and rejected[b"reason"].startswith(b"duplicate")
    assert rejected[b"tl"].endswith(f",processing@{T - 5},rejected@{T}".encode())
    assert dead[b"status"] == b"dead_lettered" and dead[b"sfo"] == m[4].storefront_order_id.encode()
    record = await redis.hgetall(kept_key)
    assert record[b"status"] == b"committed" and record[b"committed_at"] == str(T).encode()
    assert record[b"tl"] == f"accepted@1,requeued@2,processing@{T - 5},committed@{T}".encode()
    for i in (0, 2, 3, 6, len(m) - 1):  # a committed order's row tells its status: no record
        assert not await redis.exists(KEYS.status(shard, m[i].order_id))

    for i in (0, 1, 2, 3, 5, 6, len(m) - 1):  # settled with a row or a record: idem kept 7777 s
        idem = KEYS.idem(shard, m[i].storefront_id, m[i].storefront_order_id)
        assert 0 < await redis.ttl(idem) <= IDEM_TTL, i

    events = {
        _s(f[b"oid"]): (_s(f[b"type"]), _s(f[b"sfo"]), int(f[b"at"]))
        for _, f in await redis.xrange(KEYS.notify())
    }
    assert len(events) == len(m)  # one per order; the malformed entry names none
    assert events[m[0].order_id] == ("order.committed", m[0].storefront_order_id, T)
    assert events[m[1].order_id] == ("order.rejected", m[1].storefront_order_id, T)
    assert events[m[3].order_id] == ("order.committed", m[3].storefront_order_id, EARLIER)
    assert events[m[4].order_id] == ("order.dead_lettered", m[4].storefront_order_id, T)
    assert events[kept.order_id] == ("order.committed", kept.storefront_order_id, T)
    last = m[-1]
    assert events[last.order_id] == ("order.committed", last.storefront_order_id, T)

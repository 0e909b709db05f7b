"""The lane fence and counters, against a real Valkey: a superseded epoch can neither take,
claim nor settle; the counters the positions rest on add up."""

from __future__ import annotations

from typing import Any

import pytest

from ordergate.buffer.consumer import LaneConsumer, Settlement
from ordergate.buffer.errors import LaneFenced
from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import claim_lane
from ordergate.buffer.position import read_drain_state
from tests.conftest import admit
from tests.faults import in_flight

KEYS = Keys()


async def _settle(consumer: LaneConsumer, batch: Any) -> tuple[int, int]:
    items = [Settlement.of(m, "committed", 1) for m in batch.messages]
    return await consumer.settle(items, 60, idempotency_ttl_s=60, rate=None, owner="x")


async def test_a_superseded_owner_can_neither_take_claim_nor_settle(
    client: Any, api_key: str, redis: Any
) -> None:
    await admit(client, api_key, 80)
    lane = next(
        lane for lane in (await read_drain_state(redis, KEYS, 8)).lanes if lane.admitted >= 4
    )
    shard = lane.shard
    old = LaneConsumer(redis, KEYS, 8, shard, "old", await claim_lane(redis, KEYS, shard, "old"))
    taken = await old.take(2)
    assert len(taken) == 2
    new = LaneConsumer(redis, KEYS, 8, shard, "new", await claim_lane(redis, KEYS, shard, "new"))
    assert new.epoch == old.epoch + 1
    for call in (old.take(2), old.claim(), _settle(old, taken)):
        with pytest.raises(LaneFenced, match=f"lane {shard}: FENCED"):
            await call
    assert await in_flight(redis, KEYS, shard) == 2  # nothing moved
    owed = await new.claim()
    assert [m.entry_id for m in owed.messages] == [m.entry_id for m in taken.messages]
    watermark, settled = await _settle(new, owed)
    assert settled == 2
    assert watermark == taken.messages[-1].seq  # the lane's oldest two are settled


async def test_lane_counters_add_up_and_settling_everything_moves_every_watermark_to_last(
    client: Any, api_key: str, redis: Any
) -> None:
    receipts = await admit(client, api_key, 120)
    state = await read_drain_state(redis, KEYS, 8)
    assert state.issued == 120 and state.settled == 0
    assert sum(lane.admitted for lane in state.lanes) == 120
    for lane in state.lanes:
        seqs = [
            r["queue_number"] for r in receipts if r["order_id"].startswith(f"ord_{lane.shard}_")
        ]
        assert lane.admitted == len(seqs) and lane.last == max(seqs, default=0)
    for lane in state.lanes:
        consumer = LaneConsumer(
            redis, KEYS, 8, lane.shard, "w", await claim_lane(redis, KEYS, lane.shard, "w")
        )
        batch = await consumer.take(1000)
        assert [m.seq for m in batch.messages] == sorted(m.seq for m in batch.messages)
        assert (await _settle(consumer, batch))[1] == lane.admitted
        again = await _settle(consumer, batch)  # settling twice counts nothing twice
        assert again[1] == 0
    after = await read_drain_state(redis, KEYS, 8)
    assert after.settled == 120 and after.depth == 0
    for lane in after.lanes:
        assert lane.settled == lane.admitted and lane.watermark == lane.last

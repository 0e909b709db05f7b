"""Depth and position: where an order stands in the queue, from Redis alone, in O(1).

Every admitted order gets a queue number ``seq`` (one counter over all lanes) and a number
``ls`` inside its lane. A lane drains in admission order, so inside the lane exactly
``ls - 1 - s_lane`` orders ahead of it are unsettled (``s_lane``: the lane's settled count).
Over all lanes, ``S`` orders are settled, so at least ``seq - 1 - S`` orders admitted before it
are not. The position is the larger of the two:

    position = max(seq - 1 - S, ls - 1 - s_lane)

It never increases (``seq`` and ``ls`` are fixed, both counts only grow). It is exact while
nothing drains, and whenever the settled orders are exactly the oldest ones (one consecutive
set of waiting orders). While lanes drain in parallel it can undercount: by the number of
orders admitted *after* this one that other lanes have already settled -- at most how far the
fastest lane runs ahead of this order's lane, in orders. The ETA uses the order's own lane: its
in-lane position over the rate its owner measures.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec

from ordergate.buffer.fairness import orders_before
from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import LaneState, SubLane, lane_of
from ordergate.buffer.storefronts import Limit

_ORDER = {"paused": 0, "stalled": 1, "draining": 2, "stopped": 3}


class DrainState(msgspec.Struct, frozen=True):
    """The admission counter, the settled count and every lane, read in one round trip."""

    issued: int = 0  # the orders admitted (the last queue number handed out, on one primary)
    settled: int = 0  # orders settled over all lanes (committed, rejected or dead-lettered)
    lanes: tuple[LaneState, ...] = ()
    # On a cluster each lane numbers its own orders (buffer.keys): a queue number then counts
    # in its lane, and what is ahead is counted against the lane's settled orders.
    numbered_per_lane: bool = False

    def settled_before(self, shard: int) -> int:
        """The settled orders a queue number of lane ``shard`` is counted against."""
        return self.lane(shard).settled if self.numbered_per_lane else self.settled

    @property
    def depth(self) -> int:
        """Orders admitted and not yet settled, over all lanes."""
        return max(0, self.issued - self.settled)

    def lane(self, shard: int) -> LaneState:
        if 0 <= shard < len(self.lanes):
            return self.lanes[shard]
        return LaneState(shard)

    @property
    def rate(self) -> float | None:
        """Orders per second over all lanes: the sum of the lanes' measured rates."""
        rates = [lane.rate for lane in self.lanes if lane.rate]
        return sum(rates) if rates else None

    @property
    def heard_at_us(self) -> int:
        return max((lane.heard_at_us for lane in self.lanes), default=0)

    @property
    def settled_at_us(self) -> int:
        return max((lane.settled_at_us for lane in self.lanes), default=0)

    @property
    def state(self) -> str | None:
        """The drain as a whole: paused or stalled if any lane is, draining if one drains."""
        states = [lane.state for lane in self.lanes if lane.state]
        return min(states, key=lambda s: _ORDER.get(s, 9)) if states else None

    @property
    def reason(self) -> str:
        state = self.state
        return next((lane.reason for lane in self.lanes if lane.state == state), "")

    @property
    def leader(self) -> str:
        """The workers that own lanes, comma separated."""
        return ",".join(sorted({lane.owner for lane in self.lanes if lane.owner}))

    @property
    def cap(self) -> float | None:
        caps = [lane.cap for lane in self.lanes if lane.cap]
        return max(caps) if caps else None


async def read_drain_state(redis: Any, keys: Keys, shards: int) -> DrainState:
    pipe = redis.pipeline(transaction=False)
    queue_drain_state(pipe, keys, shards)
    return drain_state_of(await pipe.execute(), shards, keys)


def queue_counters(pipe: Any, keys: Keys, shards: int) -> int:
    """Queue the reads of the admission counter and the settled count (on a cluster, each
    lane's); returns how many replies they take, for ``counters_of``."""
    scopes = keys.every_lane(shards)
    for scope in scopes:
        pipe.get(scope.seq())
        pipe.hget(scope.drain(), "s")
    return 2 * len(scopes)


def counters_of(replies: list[Any]) -> tuple[int, int]:
    """(orders admitted, orders settled) from ``queue_counters``' replies, lanes added up."""
    return sum(int(v or 0) for v in replies[0::2]), sum(int(v or 0) for v in replies[1::2])


def queue_drain_state(pipe: Any, keys: Keys, shards: int) -> int:
    """Queue the reads of the drain state on ``pipe`` (to go with other reads in one
    transaction); returns how many replies they take, for ``drain_state_of``."""
    n = queue_counters(pipe, keys, shards)
    pipe.hgetall(keys.storefront_limits())  # the drain weights
    for shard in range(shards):
        pipe.hgetall(keys.lane(shard))
    return n + 1 + shards


def drain_state_of(replies: list[Any], shards: int, keys: Keys) -> DrainState:
    n = 2 * len(keys.every_lane(shards))
    counters, limits, lanes = replies[:n], replies[n], replies[n + 1 : n + 1 + shards]
    weights = {k.decode(): Limit.decode(v).weight for k, v in (limits or {}).items()}
    issued, settled = counters_of(counters)
    return DrainState(
        issued=issued,
        settled=settled,
        lanes=tuple(_weighted(lane_of(shard, raw), weights) for shard, raw in enumerate(lanes)),
        numbered_per_lane=keys.cluster,
    )


def _weighted(lane: LaneState, weights: dict[str, int]) -> LaneState:
    if not weights or not lane.subs:
        return lane
    subs = {
        sf: msgspec.structs.replace(u, weight=weights.get(sf, 1)) for sf, u in lane.subs.items()
    }
    return msgspec.structs.replace(lane, subs=subs)


def seconds_until_room(drain: DrainState | None, bound: int) -> int:
    """Retry-After for a full buffer: time for the drain to free a hundredth of the bound (at
    least the excess), at the measured rate; 5 s when no rate is known. Between 1 and 60 s."""
    rate = drain.rate if drain is not None else None
    if drain is None or not rate:
        return 5
    room = max(drain.depth - bound + 1, bound // 100, 1)
    return max(1, min(60, math.ceil(room / rate)))


class Place(msgspec.Struct, frozen=True):
    """An unsettled order's place in the queue."""

    status: str  # queued | processing
    position: int
    eta_seconds: int | None
    eta_reason: str | None


def place_in_line(
    seq: int,
    lane_seq: int,
    shard: int,
    drain: DrainState,
    stale_s: float,
    now: float | None = None,
    storefront: str = "",
) -> Place:
    """Position, status and ETA of the order numbered ``seq`` (``lane_seq`` in its
    storefront's sub-lane of lane ``shard``; 0 when unknown), not yet settled.

    With its storefront's sub-lane known (a ticket since sub-lanes), the orders before it are
    its storefront's ahead of it in that sub-lane, and of every other storefront's backlog in
    the lane the share its weight gets in the rounds until this order's turn
    (buffer.fairness): so the ETA over the lane's rate follows the order the lane really
    drains in. Without it (a ticket from before), the lane's own numbers as before."""
    lane = drain.lane(shard)
    if storefront and lane_seq:
        # A sub-lane the followed state does not show yet is new: none of it settled.
        sub = lane.subs.get(storefront) or SubLane(admitted=lane_seq)
        own = max(0, lane_seq - 1 - sub.settled)
        others = [
            (u.backlog, u.weight) for sf, u in lane.subs.items() if sf != storefront and u.backlog
        ]
        # its lane's turns: its storefront's orders ahead, the others' share
        turns = orders_before(own, sub.weight, others)
        # alone in its lane: everyone admitted earlier, as before the fair drain
        position = turns if others else max(seq - 1 - drain.settled_before(shard), own)
        status = "processing" if lane.processing(seq, storefront, lane_seq) else "queued"
        eta, reason = lane_eta(turns, lane, stale_s, time.time() if now is None else now)
        return Place(status, position, eta, reason)
    in_lane = max(0, lane_seq - 1 - lane.settled) if lane_seq else None
    position = max(0, seq - 1 - drain.settled_before(shard), in_lane or 0)
    status = "processing" if lane.processing(seq) else "queued"
    ahead_in_lane = position if in_lane is None else in_lane
    eta, reason = lane_eta(ahead_in_lane, lane, stale_s, time.time() if now is None else now)
    return Place(status, position, eta, reason)


def tail_eta(drain: DrainState, stale_s: float, now: float) -> tuple[int | None, str | None]:
    """Until the last order admitted is settled: the slowest lane's ETA for its backlog."""
    worst: int = 0
    for lane in drain.lanes:
        if lane.depth:
            eta, reason = lane_eta(lane.depth - 1, lane, stale_s, now)
            if eta is None:
                return None, reason
            worst = max(worst, eta)
    return worst, None


def lane_eta(
    ahead: int, lane: LaneState, stale_s: float, now: float
) -> tuple[int | None, str | None]:
    """Seconds until a lane settles the ``ahead`` orders in front of one and that one."""
    if lane.state is None:
        return None, "no worker has started draining yet"
    silent = now - lane.heard_at_us / 1e6
    if lane.state == "stopped":
        return None, "the drain is stopped: no worker is running"
    if silent > stale_s:
        return None, f"the drain is stopped: no worker has reported for {int(silent)} s"
    if lane.state == "stalled":
        return None, f"the drain is stalled: {lane.reason or 'waiting for Postgres'}"
    if lane.state == "paused":
        return None, "the drain is paused by an operator"
    if not lane.rate:
        return None, "the drain rate is not measured yet"
    # Itself included: an order leaves the queue when the orders ahead of it *and* it are written.
    return max(0, math.ceil((ahead + 1) / lane.rate - 0.5)), None

"""The operators' overview: what the buffer, the drain and the notifier are doing, from Redis.

``ordergate status`` prints it and the gateway serves it as JSON (``GET /v1/ops/status``). Both
read the same keys, so they cannot disagree: each lane's state as its owner reports it, the
streams' lengths and pending entries, the per-second history (rates), the operators' drain
controls, the notifier's breakers and lanes (refreshed every second by the leading notifier).
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from ordergate.buffer import history, storefronts
from ordergate.buffer.connection import pipeline
from ordergate.buffer.control import DrainControl, from_hash
from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import LaneState
from ordergate.buffer.notifications import NotificationStreams
from ordergate.buffer.position import drain_state_of, queue_drain_state, tail_eta

RATE_WINDOW_S = 10  # ingest and drain rates are averaged over the last this many seconds


class Breaker(msgspec.Struct, frozen=True):
    """One destination's circuit breaker and its deliveries, as its notifier last reported."""

    name: str
    state: str  # closed | half_open | open
    failure_rate: float
    slow_rate: float
    open_for_s: float
    inflight: int
    deferred: int
    delivered: int
    failed: int
    last_error: str


class Drain(msgspec.Struct, frozen=True):
    state: str | None  # draining | stalled | stopped | paused; None = never started
    reason: str
    leader: str  # the workers owning lanes, comma separated
    rate_per_s: float | None
    heard_s_ago: float | None
    cap_per_s: float | None = None  # the limit the lanes apply: drain_rate or the operators'


class Shard(msgspec.Struct, frozen=True):
    """One shard's stream: a lane, and the worker that owns it."""

    shard: int
    depth: int  # entries in the stream: admitted, not yet settled
    pending: int  # of those, taken by the drain and not yet settled
    oldest_age_s: float | None  # age of the oldest entry (None: the stream is empty)
    owner: str = ""  # the worker draining the lane ('' = none has yet)
    state: str | None = None  # as its owner last reported: draining | stalled | paused | stopped
    rate_per_s: float | None = None  # orders per second the lane drains while busy
    heard_s_ago: float | None = None  # since its owner last reported


class Notifications(msgspec.Struct, frozen=True):
    leader: str | None  # the notifier delivering now (None: no worker runs one)
    waiting: int  # queued by settle, not yet delivered nor deferred
    deferred: int  # in destinations' deferred streams
    dead: int  # gave up after notify_give_up_s


class Storefront(msgspec.Struct, frozen=True):
    """One storefront's part of the buffer (``other``: those past the top, added up)."""

    storefront_id: str
    buffered: int  # admitted, not yet settled
    share: float  # of the orders buffered
    admitted: int  # so far
    settled: int  # so far
    refused: dict[str, int]  # 429s so far, by reason: rate, share, full
    ingest_rate: float | None = None  # orders/s (status: last RATE_WINDOW_S, top ones only)
    drain_rate: float | None = None
    weight: int = 1  # its share of each lane's drain while it has a backlog
    rate_limit: float | None = None  # its own rate limit (0: none); None: the defaults
    burst: int | None = None


class Overview(msgspec.Struct, frozen=True):
    at: float
    buffered: int  # admitted, not yet settled
    issued: int  # queue numbers handed out
    settled: int  # orders settled over all lanes
    dead_letters: int  # orders in the dead-letter streams
    drain: Drain
    notifications: Notifications
    breakers: list[Breaker]
    shards: list[Shard] = []
    ingest_rate: float | None = None  # orders admitted per second, last RATE_WINDOW_S
    drain_rate: float | None = None  # orders settled per second, last RATE_WINDOW_S
    eta_tail_s: int | None = None  # until the last order admitted is settled
    eta_tail_reason: str | None = None  # why there is no ETA, when there is none
    control: DrainControl = DrainControl()
    storefronts: list[Storefront] = []  # the TOP_STOREFRONTS holding most, then 'other'


async def read_overview(redis: Any, keys: Keys, shards: int, stale_s: float = 5.0) -> Overview:
    """The overview; ``stale_s`` is ``drain_stale_s`` (a leader silent longer has stopped)."""
    now = time.time()
    # One transaction: the settled count and the streams' lengths from the same instant (a
    # scrape must not show an empty buffer with orders unsettled). On a cluster each lane's
    # counters are read with its streams, on its master, but the lanes at slightly different
    # instants (by a batch or so under load: README, Cluster).
    pipe = pipeline(redis, transaction=True)
    taken = queue_drain_state(pipe, keys, shards)
    for shard in range(shards):
        pipe.xlen(keys.deadletters(shard))
    pipe.get(keys.notify_state())
    pipe.hgetall(keys.drain_control())
    for shard in range(shards):
        pipe.xlen(keys.stream(shard))
        pipe.xrange(keys.stream(shard), count=1)
    replies = await pipe.execute(raise_on_error=False)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    drain = drain_state_of(replies, shards, keys)
    replies = replies[taken:]
    dlq, (raw_state, control) = replies[:shards], replies[shards : shards + 2]
    streams = replies[shards + 2 :]
    # Each sub-lane's oldest entry, for the lanes' ages (outside the transaction: an age needs
    # no instant shared with the counts).
    pipe = redis.pipeline(transaction=False)
    pending_subs = [
        (shard, sf)
        for shard in range(shards)
        for sf, u in drain.lane(shard).subs.items()
        if u.backlog
    ]
    for shard, sf in pending_subs:
        pipe.xrange(keys.sublane(shard, sf), count=1)
    firsts: dict[int, list[Any]] = {}
    for (shard, _), first in zip(pending_subs, await pipe.execute(), strict=True):
        if first:
            firsts.setdefault(shard, []).append(first[0])
    waiting, deferred, dead = await NotificationStreams(redis, keys, shards).counts()
    state: dict[str, Any] = json.loads(raw_state) if raw_state else {}
    breakers = [
        Breaker(
            name=f"webhook:{sf}",
            state=lane["breaker"],
            failure_rate=lane["failure_rate"],
            slow_rate=lane["slow_rate"],
            open_for_s=lane["open_for_s"],
            inflight=lane["inflight"],
            deferred=lane["deferred"],
            delivered=lane["delivered"],
            failed=lane["failed"],
            last_error=lane["last_error"],
        )
        for sf, lane in state.get("lanes", {}).items()
    ]
    samples = await history.read(redis, keys, 2 * RATE_WINDOW_S)
    ingest, drained = history.rates(samples)
    counts = storefronts.top(
        await storefronts.read_counts(redis, keys, shards), history.TOP_STOREFRONTS
    )
    held = sum(c.buffered for c in counts) or 1
    eta, eta_reason = tail_eta(drain, stale_s, now)
    return Overview(
        at=now,
        buffered=drain.depth,
        issued=drain.issued,
        settled=drain.settled,
        dead_letters=sum(int(n) for n in dlq),
        drain=Drain(
            state=drain.state,
            reason=drain.reason,
            leader=drain.leader,
            rate_per_s=drain.rate,
            heard_s_ago=round(now - drain.heard_at_us / 1e6, 2) if drain.heard_at_us else None,
            cap_per_s=drain.cap,
        ),
        notifications=Notifications(state.get("leader"), waiting, deferred, dead),
        breakers=breakers,
        shards=[
            _shard(
                shard,
                streams[2 * shard : 2 * shard + 2],
                drain.lane(shard),
                now,
                firsts.get(shard, []),
            )
            for shard in range(shards)
        ],
        ingest_rate=_round(ingest),
        drain_rate=_round(drained if drained is not None else drain.rate),
        eta_tail_s=eta,
        eta_tail_reason=eta_reason,
        control=from_hash(control),
        storefronts=[_storefront(c, held, samples) for c in counts],
    )


def _storefront(c: storefronts.StorefrontCounts, held: int, samples: Any) -> Storefront:
    ingest, drained = history.storefront_rates(samples, c.storefront_id, RATE_WINDOW_S)
    return storefront_figures(c, held, ingest, drained)


def storefront_figures(
    c: storefronts.StorefrontCounts, held: int, ingest: float | None, drained: float | None
) -> Storefront:
    """One storefront's figures; ``held``: the orders buffered over all storefronts."""
    return Storefront(
        c.storefront_id,
        c.buffered,
        round(c.buffered / (held or 1), 4),
        c.admitted,
        c.settled,
        {r: c.refused.get(r, 0) for r in storefronts.REASONS},
        _round(ingest),
        _round(drained),
        c.limit.weight if c.limit else 1,
        c.limit.rate if c.limit else None,
        c.limit.burst if c.limit else None,
    )


def _shard(shard: int, replies: list[Any], lane: LaneState, now: float, firsts: list[Any]) -> Shard:
    """One lane: its base stream's entries (``replies``: its length and first entry) and its
    sub-lanes' (their backlogs, ``firsts`` their oldest entries)."""
    base_depth, base_first = replies
    depth = int(base_depth) + sum(u.backlog for u in lane.subs.values())
    oldest = None
    for entry in [*(base_first or [])[:1], *firsts]:  # ids start with the unix ms of admission
        ms = int(entry[0].split(b"-", 1)[0])
        age = round(max(0.0, now - ms / 1000), 3)
        oldest = age if oldest is None else max(oldest, age)
    count = min(depth, lane.in_flight)
    heard = round(now - lane.heard_at_us / 1e6, 2) if lane.heard_at_us else None
    return Shard(
        shard,
        depth,
        int(count),
        oldest,
        owner=lane.owner,
        state=lane.state,
        rate_per_s=_round(lane.rate),
        heard_s_ago=heard,
    )


def _round(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 1)

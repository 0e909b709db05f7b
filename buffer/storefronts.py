"""Storefronts' limits and their share of the buffer: the ``og:sf:*`` hashes.

Each hash has one field per storefront (their number is bounded by the API keys, not by the
traffic). ``admit.lua`` reads a storefront's limit and rate-limit state and counts its buffered
orders; ``settle.lua`` counts them out and ``replay.lua`` back in; the gateways add
up their 429s here every second (``RefusalCounts``). So every number below is the same from
every gateway and worker, and exact across hosts. On a Redis Cluster each lane keeps its own
counts and rate-limit state, and a copy of each limit holding its even part of it (a lane's
script sees its own slot only: buffer.keys); readers add the lanes' counts up.

A limit is a rate (orders per second) and a burst (orders at once), kept by ``admit.lua`` as
GCRA: one time per storefront, the moment its bucket is full again; and a weight, the share of
each lane's drain the storefront gets while it has a backlog.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ordergate.buffer.errors import BufferPoolError
from ordergate.buffer.keys import STOREFRONT_ID, Keys

REASONS = ("rate", "share", "full")  # why an order got 429
MAX_RATE = 1_000_000.0
MAX_BURST = 10_000_000
MAX_WEIGHT = 1000


class InvalidLimit(BufferPoolError):
    """A storefront limit that cannot be kept (bad id, rate, burst or weight)."""


@dataclass(frozen=True, slots=True)
class Limit:
    """A storefront's own limit: ``rate`` orders/s (0 = none) with ``burst`` at once, and its
    drain ``weight``."""

    rate: float
    burst: int
    weight: int = 1

    def encode(self) -> str:
        return f"{self.rate:g} {self.burst} {self.weight}"

    @classmethod
    def decode(cls, raw: bytes | str) -> Limit:
        text = raw.decode() if isinstance(raw, bytes) else raw
        rate, burst, weight = (text.split() + ["1", "1"])[:3]
        return cls(float(rate), int(burst), int(weight))


def check_limit(storefront_id: str, rate: float, burst: int, weight: int) -> Limit:
    """The limit to store, or ``InvalidLimit`` saying which value is wrong. A burst of 0 is one
    second's worth of the rate."""
    if not STOREFRONT_ID.fullmatch(storefront_id):
        raise InvalidLimit(f"{storefront_id!r} is not a storefront id")
    if not (math.isfinite(rate) and 0 <= rate <= MAX_RATE):
        raise InvalidLimit(f"rate must be between 0 (no limit) and {MAX_RATE:g} orders/s")
    if not 0 <= burst <= MAX_BURST:
        raise InvalidLimit(f"burst must be between 0 (one second of the rate) and {MAX_BURST}")
    if not 1 <= weight <= MAX_WEIGHT:
        raise InvalidLimit(f"weight must be between 1 and {MAX_WEIGHT}")
    if rate and not burst:
        burst = max(1, math.ceil(rate))
    return Limit(rate, burst, weight)


async def set_limit(redis: Any, keys: Keys, storefront_id: str, limit: Limit, shards: int) -> None:
    """Give a storefront its own limit; every gateway applies it to the next batch. On a
    cluster each lane also gets its copy, its even part of the rate and the burst (a lane's
    script sees its own slot only); written one lane after another, so for a moment lanes
    differ."""
    pipe = redis.pipeline(transaction=False)
    pipe.hset(keys.storefront_limits(), storefront_id, limit.encode())
    if keys.cluster:
        part = Limit(limit.rate / shards, math.ceil(limit.burst / shards), limit.weight)
        for scope in keys.every_lane(shards):
            pipe.hset(scope.storefront_limits(), storefront_id, part.encode())
    await pipe.execute()


async def clear_limit(redis: Any, keys: Keys, storefront_id: str, shards: int) -> bool:
    """Back to the defaults of the settings; False when it had no limit of its own."""
    pipe = redis.pipeline(transaction=False)
    pipe.hdel(keys.storefront_limits(), storefront_id)
    if keys.cluster:
        for scope in keys.every_lane(shards):
            pipe.hdel(scope.storefront_limits(), storefront_id)
    return bool((await pipe.execute())[0])


async def limits(redis: Any, keys: Keys) -> dict[str, Limit]:
    raw = await redis.hgetall(keys.storefront_limits())
    return {_s(k): Limit.decode(v) for k, v in raw.items()}


@dataclass(frozen=True, slots=True)
class StorefrontCounts:
    """One storefront as the buffer counts it."""

    storefront_id: str
    buffered: int  # admitted, not yet settled
    admitted: int  # so far: settled + buffered (a replayed dead letter counts again)
    settled: int  # so far
    refused: dict[str, int]  # 429s so far, by reason (REASONS)
    limit: Limit | None  # its own limit; None: the defaults

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())


async def read_counts(redis: Any, keys: Keys, shards: int) -> list[StorefrontCounts]:
    """Every storefront the buffer knows of, the most buffered first (then most admitted). On
    a cluster each lane counts its own: added up here."""
    pipe = redis.pipeline(transaction=False)
    scopes = keys.every_lane(shards)
    for scope in scopes:
        pipe.hgetall(scope.storefront_buffered())
        pipe.hgetall(scope.storefront_settled())
    pipe.hgetall(keys.storefront_refused())
    pipe.hgetall(keys.storefront_limits())
    *counts, refused, own = await pipe.execute()
    buffered, settled = _added(counts[0::2]), _added(counts[1::2])
    refusals: dict[str, dict[str, int]] = {}
    for field, n in refused.items():
        sf, _, reason = _s(field).rpartition(":")
        refusals.setdefault(sf, {})[reason] = int(n)
    ids = {_s(k) for k in (*buffered, *settled, *own)} | set(refusals)
    out = [
        StorefrontCounts(
            sf,
            int(buffered.get(sf.encode(), 0)),
            int(buffered.get(sf.encode(), 0)) + int(settled.get(sf.encode(), 0)),
            int(settled.get(sf.encode(), 0)),
            refusals.get(sf, {}),
            Limit.decode(own[sf.encode()]) if sf.encode() in own else None,
        )
        for sf in ids
    ]
    out.sort(key=lambda c: (-c.buffered, -c.admitted, c.storefront_id))
    return out


def _added(hashes: list[dict[bytes, bytes]]) -> dict[bytes, int]:
    total: Counter[bytes] = Counter()
    for fields in hashes:
        for k, v in fields.items():
            total[k] += int(v)
    return dict(total)


OTHER = "other"  # the storefronts past the top N, added up


def top(counts: list[StorefrontCounts], n: int) -> list[StorefrontCounts]:
    """The first ``n`` of ``counts`` (read_counts' order: most buffered, then most admitted),
    then the rest added up as one ``other`` (so a label set stays bounded whatever the number
    of storefronts)."""
    if len(counts) <= n:
        return counts
    rest = counts[n:]
    refused: Counter[str] = Counter()
    for c in rest:
        refused.update(c.refused)
    other = StorefrontCounts(
        OTHER,
        sum(c.buffered for c in rest),
        sum(c.admitted for c in rest),
        sum(c.settled for c in rest),
        dict(refused),
        None,
    )
    return [*counts[:n], other]


class RefusalCounts:
    """A gateway's 429s per storefront and reason, added to Redis in one round trip a second
    (a refused order costs the hot path a dict update, not a write)."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def count(self, storefront_id: str, reason: str) -> None:
        self._counts[(storefront_id, reason)] += 1

    async def flush(self, redis: Any, keys: Keys) -> None:
        counts, self._counts = self._counts, Counter()
        if not counts:
            return
        pipe = redis.pipeline(transaction=False)
        for (sf, reason), n in counts.items():
            pipe.hincrby(keys.storefront_refused(), f"{sf}:{reason}", n)
        try:
            await pipe.execute()
        except Exception:
            self._counts.update(counts)  # kept for the next second
            raise


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

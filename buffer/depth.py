"""How much is waiting in the buffer pool, per shard."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from buffer.keys import GROUP, Keys


class ShardDepth(msgspec.Struct, frozen=True):
    shard: int
    depth: int  # entries accepted and not yet committed (still in the stream)
    pending: int  # of those, delivered to a worker and not yet acknowledged
    oldest_age_s: float  # age of the oldest entry not yet committed, 0 when empty


async def shard_depths(redis: Any, keys: Keys, shards: int) -> list[ShardDepth]:
    """Depth, pending count and oldest age of every shard, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for shard in range(shards):
        stream = keys.stream(shard)
        pipe.xlen(stream)
        pipe.xpending(stream, GROUP)
        pipe.xrange(stream, count=1)
    replies = await pipe.execute(raise_on_error=False)
    now_ms = time.time() * 1000
    out = []
    for shard in range(shards):
        length, pending, first = replies[shard * 3 : shard * 3 + 3]
        if isinstance(length, Exception):
            raise length
        pending_n = 0 if isinstance(pending, ResponseError) else int(pending["pending"])
        age = 0.0
        if first and not isinstance(first, Exception):
            age = max(0.0, (now_ms - int(first[0][0].split(b"-")[0])) / 1000)
        out.append(ShardDepth(shard, int(length), pending_n, age))
    return out

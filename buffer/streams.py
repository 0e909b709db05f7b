"""Create the shards' streams and consumer groups (idempotent, safe to call from every process)."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from ordergate.buffer.keys import GROUP, Keys


async def ensure_streams(redis: Any, keys: Keys, shards: int) -> None:
    """Make sure every shard has its stream and the workers' consumer group."""
    for shard in range(shards):
        try:
            await redis.xgroup_create(keys.stream(shard), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

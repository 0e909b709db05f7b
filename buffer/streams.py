"""Create the shards' streams (idempotent, safe to call from every process),
once the process's shard count is the deployment's."""

from __future__ import annotations

from typing import Any

from redis.exceptions import ResponseError

from ordergate.buffer.deployment import check_redis
from ordergate.buffer.keys import GROUP, Keys
from ordergate.buffer.lanes import adopt_pre_lane_counts


async def ensure_streams(redis: Any, keys: Keys, shards: int) -> None:
    """Make sure every shard has its stream (created by ``XGROUP CREATE MKSTREAM``, the one way
    to make an empty stream; the drain reads with a cursor, not through the group).

    A process started with another shard count than the deployment's gets DeploymentMismatch
    (buffer.deployment), and so does one that finds orders a version before lanes left
    (buffer.lanes.adopt_pre_lane_counts).
    """
    await check_redis(redis, keys, shards)
    await adopt_pre_lane_counts(redis, keys, shards)
    pipe = redis.pipeline(transaction=False)  # reads first, as above
    for shard in range(shards):
        pipe.xinfo_groups(keys.stream(shard))
    found = await pipe.execute(raise_on_error=False)
    for shard, groups in enumerate(found):
        if not isinstance(groups, Exception) and any(_name(g) == GROUP for g in groups):
            continue
        try:
            await redis.xgroup_create(keys.stream(shard), GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


def _name(group: dict[Any, Any]) -> str:
    name = group.get("name", group.get(b"name", b""))
    return name.decode() if isinstance(name, bytes) else str(name)

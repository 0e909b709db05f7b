"""The deployment every process must share: its shard count, under one key prefix.

``ordergate migrate`` records both in Postgres (``ordergate_deployment``, one row) and the first
process to reach Redis records the shard count under the prefix (``<prefix>:deployment``).
Gateways and workers check both at start and refuse other values: with another shard count the
same storefront order hashes to another shard, past its idempotency record and its unique key,
and is admitted twice; with another prefix a gateway fills streams no worker drains.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from ordergate.buffer.errors import DeploymentMismatch
from ordergate.buffer.keys import Keys

TABLE = "ordergate_deployment"


async def check_redis(redis: Any, keys: Keys, shards: int) -> None:
    """Record ``shards`` for this prefix if nothing is recorded; refuse another count."""
    recorded = await redis.hget(keys.deployment(), "shards")  # a read first: past maxmemory
    if recorded is None:  # Redis refuses every write, and the drain must still start
        pipe = redis.pipeline(transaction=True)
        pipe.hsetnx(keys.deployment(), "shards", shards)
        pipe.hget(keys.deployment(), "shards")
        _, recorded = await pipe.execute()
    if int(recorded) != shards:
        raise DeploymentMismatch(
            f"Redis holds the buffer of key prefix {keys.prefix!r} with shards={int(recorded)};"
            f" this process has shards={shards}. Start it with the deployment's shard count"
        )


async def check_database_at(
    url: str, shards: int, key_prefix: str, connect_timeout_s: float = 5.0
) -> None:
    """``check_database`` on a connection of its own (connection errors go to the caller)."""
    conn = await asyncpg.connect(url, timeout=connect_timeout_s)
    try:
        await check_database(conn, shards, key_prefix)
    finally:
        await conn.close()


async def check_database(conn: Any, shards: int, key_prefix: str) -> None:
    """Refuse unless ``migrate`` set this database up for these values."""
    try:
        row = await conn.fetchrow(f"SELECT shards, key_prefix FROM {TABLE}")
    except asyncpg.UndefinedTableError:
        row = None
    if row is None:
        raise DeploymentMismatch(
            "the database records no ordergate deployment: run `ordergate migrate` first"
        )
    if (row["shards"], row["key_prefix"]) != (shards, key_prefix):
        raise DeploymentMismatch(
            f"the database was set up for shards={row['shards']} and key_prefix="
            f"{row['key_prefix']!r}; this process has shards={shards} and key_prefix="
            f"{key_prefix!r}. Start it with the deployment's values"
        )

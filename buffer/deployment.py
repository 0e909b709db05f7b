"""The deployment every process must share: its shard count, under one key prefix, and its
databases in one order.

``ordergate migrate`` records them in each Postgres database (``ordergate_deployment``, one row:
the shard count, the key prefix, and the database's place in ``database_url``'s list) and the
first process to reach Redis records the shard count under the prefix (``<prefix>:deployment``).
Gateways and workers check both at start and refuse other values: with another shard count the
same storefront order hashes to another shard, past its idempotency record and its unique key,
and is admitted twice; with another prefix a gateway fills streams no worker drains; with the
databases in another order (or fewer) a lane would write where its rows and unique key are not.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ordergate.buffer.errors import DeploymentMismatch
from ordergate.buffer.keys import Keys
from ordergate.sharding.databases import describe

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
    url: str,
    shards: int,
    key_prefix: str,
    connect_timeout_s: float = 5.0,
    *,
    database: int = 0,
    databases: int = 1,
) -> None:
    """``check_database`` on a connection of its own (connection errors go to the caller)."""
    conn = await asyncpg.connect(url, timeout=connect_timeout_s)
    try:
        await check_database(conn, shards, key_prefix, database=database, databases=databases)
    finally:
        await conn.close()


async def check_databases(
    urls: Sequence[str], shards: int, key_prefix: str, connect_timeout_s: float = 5.0
) -> list[Exception | None]:
    """``check_database_at`` on every database of the list at once, each for its place in it:
    DeploymentMismatch if any belongs elsewhere; else, per database, None (checked) or why it
    could not be asked (down, refusing), for the caller to judge."""

    async def one(i: int) -> Exception | None:
        try:
            await check_database_at(
                urls[i], shards, key_prefix, connect_timeout_s, database=i, databases=len(urls)
            )
        except (
            DeploymentMismatch,
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
        ) as exc:
            return exc
        return None

    failures = await asyncio.gather(*(one(i) for i in range(len(urls))))
    for failure in failures:  # the first in the list's order, whichever answered first
        if isinstance(failure, DeploymentMismatch):
            raise failure
    return list(failures)


async def check_database(
    conn: Any, shards: int, key_prefix: str, *, database: int = 0, databases: int = 1
) -> None:
    """Refuse unless ``migrate`` set this database up for these values, as database
    ``database`` of ``databases``."""
    judge(await recorded(conn), shards, key_prefix, database=database, databases=databases)


@dataclass(frozen=True, slots=True)
class Recorded:
    """A database's deployment row."""

    shards: int
    key_prefix: str
    database: int = 0  # its place in database_url's list
    databases: int = 1


async def recorded(conn: Any) -> Recorded | None:
    """The database's deployment row, or None before ``migrate`` wrote one. A row written
    before migration 0004 has no place: it is the one database of a single-database
    deployment, index 0 of 1."""
    try:
        row = await conn.fetchrow(
            f"SELECT shards, key_prefix, database_index, databases FROM {TABLE}"
        )
    except asyncpg.UndefinedColumnError:
        row = await conn.fetchrow(f"SELECT shards, key_prefix, 0, 1 FROM {TABLE}")
    except asyncpg.UndefinedTableError:
        row = None
    return None if row is None else Recorded(*row)


def judge(
    row: Recorded | None, shards: int, key_prefix: str, *, database: int = 0, databases: int = 1
) -> None:
    """DeploymentMismatch unless ``row`` records these values and this place."""
    if row is None:
        raise DeploymentMismatch(
            "the database records no ordergate deployment: run `ordergate migrate` first"
        )
    which = "the database" if databases == 1 else describe(database, databases, shards)
    if (row.shards, row.key_prefix) != (shards, key_prefix):
        raise DeploymentMismatch(
            f"{which} was set up for shards={row.shards} and key_prefix="
            f"{row.key_prefix!r}; this process has shards={shards} and key_prefix="
            f"{key_prefix!r}. Start it with the deployment's values"
        )
    if (row.database, row.databases) != (database, databases):
        was = describe(row.database, row.databases, shards)
        raise DeploymentMismatch(
            f"{which} of this process's database_url was set up as {was} of the"
            " deployment, and holds those shards' rows. Start it with the deployment's"
            " database_url: the same URLs, in the same order"
        )

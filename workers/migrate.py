"""Numbered schema migrations plus one partition per shard; idempotent and safe to run twice.

The first run records the deployment (shard count, key prefix, buffer.deployment); later runs,
and every worker and gateway at start, refuse other values. With several databases
(``database_url`` lists them, sharding.databases), each gets the schema, its place in the list
and the partitions of its own shards only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from importlib import resources

import asyncpg

from ordergate.buffer import deployment
from ordergate.buffer.errors import DeploymentMismatch
from ordergate.sharding.databases import describe, shards_on
from ordergate.sharding.routing import partition_for, partition_table
from ordergate.workers.errors import MigrationError

log = logging.getLogger(__name__)

_LOCK_ID = 0x0D6A7E  # one advisory lock so concurrent `migrate` runs take turns
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped with the package, in order."""
    out = []
    for entry in resources.files("ordergate.workers").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            out.append((int(match.group(1)), entry.name, entry.read_text()))
    out.sort()
    versions = [v for v, _, _ in out]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migrations share a number")
    return out


async def migrate_all(urls: Sequence[str], shards: int, key_prefix: str = "og") -> list[str]:
    """``migrate`` every database of the list, each for its place in it; returns what was done,
    each line naming its database when there are several. Every database's record is read
    first, so a list in another order (or of another length) than the deployment's is refused
    before any database is changed."""
    n = len(urls)
    for i, url in enumerate(urls):
        conn = await asyncpg.connect(url)
        try:
            row = await deployment.recorded(conn)
        finally:
            await conn.close()
        if row is not None:
            deployment.judge(row, shards, key_prefix, database=i, databases=n)
    done: list[str] = []
    for i, url in enumerate(urls):
        lines = await migrate(url, shards, key_prefix, database=i, databases=n)
        done += lines if n == 1 else [f"{describe(i, n, shards)}: {line}" for line in lines]
    return done


async def migrate(
    url: str, shards: int, key_prefix: str = "og", *, database: int = 0, databases: int = 1
) -> list[str]:
    """Apply pending migrations, record the deployment with this database's place in the list
    (or refuse a different one) and create its shards' missing partitions; returns what was
    done."""
    done: list[str] = []
    mine = shards_on(database, databases, shards)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS ordergate_migrations ("
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {
                r["version"] for r in await conn.fetch("SELECT version FROM ordergate_migrations")
            }
            for version, name, sql in migration_files():
                if version in applied:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO ordergate_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )
                done.append(f"applied {name}")
                log.info("applied migration %s", name)
            existing = await _partitions(conn)
            if existing and len(existing) != len(mine) and not await _recorded(conn):
                raise DeploymentMismatch(
                    f"the database has {len(existing)} order partitions; this migrate has"
                    f" shards={shards}. Run it with the deployment's shard count"
                )
            recorded = await conn.execute(
                f"INSERT INTO {deployment.TABLE} (shards, key_prefix, database_index, databases)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
                shards,
                key_prefix,
                database,
                databases,
            )
            if recorded.endswith(" 1"):
                done.append(
                    f"recorded the deployment: {shards} shards, key prefix {key_prefix!r}"
                    + (f", as {describe(database, databases, shards)}" if databases > 1 else "")
                )
            await deployment.check_database(
                conn, shards, key_prefix, database=database, databases=databases
            )
            existing = await _partitions(conn)
            for shard in mine:
                table = partition_table(shard)
                if table not in existing:
                    await conn.execute(
                        f"CREATE TABLE IF NOT EXISTS {table} PARTITION OF orders"
                        f" FOR VALUES IN ({partition_for(shard)})"
                    )
                    done.append(f"created partition {table}")
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()
    return done


async def _partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'orders'"
    )
    return {r["relname"] for r in rows}


async def _recorded(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(f"SELECT count(*) FROM {deployment.TABLE}"))

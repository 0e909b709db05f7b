"""One drain leader at a time: a Postgres session advisory lock, held by the connection that writes.

The drain must commit in queue order, so exactly one process writes at a time. The lock lives
on the very connection the leader commits on: if that connection dies (the process was killed,
the network broke), Postgres drops the lock *and* the open transaction together, so a deposed
leader can never commit behind its successor's back. ``client_connection_check_interval`` makes
Postgres notice a dead client within a second even while the backend waits on a lock.
"""

from __future__ import annotations

import hashlib
from typing import Any

import asyncpg

from ordergate.workers.errors import LockPollFailed


def lock_key(key_prefix: str) -> int:
    """The advisory lock id of one deployment (its Redis key prefix), as a signed bigint."""
    digest = hashlib.blake2b(b"ordergate-drain:" + key_prefix.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def connect(url: str, name: str) -> Any:
    return await asyncpg.connect(
        url,
        command_timeout=30,
        timeout=5,
        server_settings={
            "application_name": f"ordergate-drain {name}"[:63],
            "client_connection_check_interval": "1000",
        },
    )


async def try_lead(conn: Any, key: int) -> bool:
    """Take the drain lock if it is free (never waits).

    Raises LockPollFailed when the connection breaks or Postgres does not answer within 5 s,
    so a hung Postgres is not mistaken for a Redis error (asyncio's TimeoutError is an OSError).
    """
    try:
        return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key, timeout=5))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise LockPollFailed(f"{type(exc).__name__}: {exc}") from exc

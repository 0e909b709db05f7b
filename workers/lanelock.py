"""A lane's Postgres lock: a session advisory lock, held by the connection that writes the lane.

The lock lives on the very connection the lane's owner commits on: if that connection dies (the
process was killed, the network broke, a successor terminated it), Postgres drops the lock *and*
the open transaction together, so a deposed owner can never commit behind its successor's back.
``client_connection_check_interval`` makes Postgres notice a dead client within a second even
while the backend waits.

A frozen owner (SIGSTOP, a long GC pause, a VM migration) keeps its connection and so its lock.
When its membership has lapsed, the successor ends that session with ``pg_terminate_backend``:
the frozen process wakes up to a dead connection, and its Redis calls meet a newer epoch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import asyncpg

from ordergate.workers.errors import LockPollFailed


def deployment_key(key_prefix: str) -> int:
    """The first half of every lane lock id of one deployment (its Redis key prefix): 31 bits,
    so that it reads the same as ``pg_locks.classid``."""
    digest = hashlib.blake2b(b"ordergate-lane:" + key_prefix.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


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


async def _ask(conn: Any, query: str, *args: Any) -> Any:
    """``fetchval`` within 5 s, raising LockPollFailed when the connection breaks or Postgres
    does not answer: a hung Postgres is not mistaken for a Redis error (asyncio's TimeoutError
    is an OSError)."""
    try:
        return await conn.fetchval(query, *args, timeout=5)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise LockPollFailed(f"{type(exc).__name__}: {exc}") from exc


async def try_lock(conn: Any, deployment: int, shard: int) -> bool:
    """Take the lane's lock if it is free (never waits)."""
    return bool(await _ask(conn, "SELECT pg_try_advisory_lock($1, $2)", deployment, shard))


async def unlock(conn: Any, deployment: int, shard: int) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1, $2)", deployment, shard, timeout=5)


async def drain_holder(conn: Any, deployment: int, shard: int) -> int | None:
    """The backend pid holding the lane's lock, if it is a drain session (``connect`` names
    them): a session of anyone else -- an operator holding the lane on purpose -- is never
    ended."""
    pid = await _ask(
        conn,
        "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = $1"
        " AND l.objid::bigint = $2 AND l.objsubid = 2"
        " AND a.application_name LIKE 'ordergate-drain %'",
        deployment,
        shard,
    )
    return int(pid) if pid is not None else None


async def terminate(conn: Any, pid: int) -> bool:
    """End a backend's session (and with it, its locks and open transaction)."""
    return bool(await _ask(conn, "SELECT pg_terminate_backend($1)", pid))

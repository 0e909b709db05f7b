"""Redis clients for the buffer pool, configured the one way that is safe for it.

No client-side retries: redis-py retries a command on timeout by default, and a re-sent XADD
whose first reply was only late would be admitted twice (the admission script is idempotent, but
retries also hide outages). Callers handle failures themselves.

A cancel can be lost on Python 3.11: ``asyncio.wait_for``, which redis-py sends every command
in, returns the command's result instead of raising CancelledError when the command completes
in the loop turn the cancel lands in (CPython gh-86296, fixed in 3.12). A loop that relies on
cancellation alone then runs on, and whoever awaits it waits forever: ``cancel_and_wait``
cancels until the tasks have ended.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def create_redis(
    url: str,
    *,
    socket_timeout: float | None = 5.0,
    max_connections: int | None = 64,
    name: str = "ordergate",
) -> aioredis.Redis:
    """An asyncio Redis client with a bounded, blocking pool and no automatic retries.

    Workers that block in XREAD must pass a ``socket_timeout`` above their BLOCK time.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections or 64,
        timeout=2.0,  # wait this long for a free connection, then fail (never grow unbounded)
        health_check_interval=0,
        client_name=name,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns and closes the pool


async def cancel_and_wait(tasks: Collection[asyncio.Future[Any]], give_up_s: float = 5.0) -> bool:
    """Cancel ``tasks``, again every 0.1 s while any still runs, for up to ``give_up_s``;
    True once all have ended. Their results and errors are retrieved (not logged as lost)."""
    pending = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + give_up_s
    while pending and (left := deadline - time.monotonic()) > 0:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=min(0.1, left))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
    return not pending

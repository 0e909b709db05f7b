"""Redis clients for the buffer pool, configured the one way that is safe for it.

No client-side retries: redis-py retries a command on timeout by default, and a re-sent XADD
whose first reply was only late would be admitted twice (the admission script is idempotent, but
retries also hide outages). Callers handle failures themselves.
"""

from __future__ import annotations

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

    Workers that block in XREADGROUP must pass a ``socket_timeout`` above their BLOCK time.
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

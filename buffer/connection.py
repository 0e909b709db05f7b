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
import logging
import time
from collections.abc import Collection
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


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


async def connect_redis(
    url: str,
    *,
    socket_timeout: float | None = 5.0,
    max_connections: int | None = 64,
    name: str = "ordergate",
    detect_s: float = 2.0,
) -> Any:
    """``create_redis``, or a cluster client when the server ``url`` names is a node of a
    Redis/Valkey Cluster (``INFO cluster``: no setting to get wrong). A server that does not
    answer within ``detect_s`` is taken for one primary, as before clusters: processes start
    while Redis is down and answer 503 until it is back."""
    plain = create_redis(
        url, socket_timeout=socket_timeout, max_connections=max_connections, name=name
    )
    deadline = time.monotonic() + detect_s
    enabled: bool | None = None
    while enabled is None:
        try:
            info = await plain.info("cluster")
            enabled = str(info.get("cluster_enabled", 0)) == "1"
        except (RedisError, OSError) as exc:
            if time.monotonic() > deadline:
                log.warning("Redis at %s did not answer (%r): taken for one primary", url, exc)
                return plain
            await asyncio.sleep(0.2)
    if not enabled:
        return plain
    await plain.aclose()
    cluster = create_cluster(
        url, socket_timeout=socket_timeout, max_connections=max_connections, name=name
    )
    await cluster.initialize()
    return cluster


def create_cluster(
    url: str,
    *,
    socket_timeout: float | None = 5.0,
    max_connections: int | None = 64,
    name: str = "ordergate",
) -> RedisCluster:
    """A cluster client: each command goes to the master of its key's slot (MOVED and ASK are
    followed: the command did not run), with no retry of a command that may have run."""
    return RedisCluster.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections or 64,
        client_name=name,
    )


def create_node_client(host: str, port: int, options: dict[str, Any]) -> aioredis.Redis:
    """A plain client of one node of a cluster, configured as ``create_redis`` configures one."""
    pool = aioredis.BlockingConnectionPool(
        host=host,
        port=port,
        retry=Retry(NoBackoff(), 0),
        max_connections=64,
        timeout=2.0,
        health_check_interval=0,
        **{"socket_timeout": 5.0, "socket_connect_timeout": 2.0, **options},
    )
    return aioredis.Redis.from_pool(pool)


def is_cluster(redis: Any) -> bool:
    return isinstance(redis, RedisCluster)


def pipeline(redis: Any, transaction: bool = True) -> Any:
    """A pipeline, a transaction where the client can run one: a cluster runs a transaction
    only on one slot, so one over keys of several lanes is sent as a plain pipeline there
    (replies then come from more than one instant; callers say what that costs)."""
    return redis.pipeline(transaction=transaction and not is_cluster(redis))


async def memory_used(redis: Any) -> float | None:
    """used_memory over maxmemory of the server, or on a cluster of its fullest master (one
    full master refuses its lanes' writes); None when no maxmemory is set."""
    if is_cluster(redis):
        infos = list((await redis.info("memory", target_nodes=RedisCluster.PRIMARIES)).values())
    else:
        infos = [await redis.info("memory")]
    shares = [
        int(i["used_memory"]) / int(i["maxmemory"]) for i in infos if int(i.get("maxmemory", 0))
    ]
    return max(shares) if shares else None


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

"""One worker process: takes its share of the lanes and its part in notifications until SIGTERM,
finishing the batches in flight."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ordergate.buffer.connection import connect_redis, is_cluster
from ordergate.buffer.deployment import check_databases
from ordergate.buffer.errors import DeploymentMismatch
from ordergate.buffer.keys import Keys
from ordergate.buffer.streams import ensure_streams
from ordergate.sharding.databases import describe
from ordergate.workers.config import WorkerConfig
from ordergate.workers.drainer import Drainer, DrainStats
from ordergate.workers.notifier import Notifier

log = logging.getLogger(__name__)
T = TypeVar("T")

WorkerReport = DrainStats


async def run_worker(
    config: WorkerConfig,
    index: int = 0,
    *,
    burst: bool = False,
    stop: asyncio.Event | None = None,
    install_signals: bool = False,
) -> DrainStats:
    """Run worker ``index``: it drains the lanes dealt to it, and takes more when others leave.

    ``burst`` drains until the buffer is empty and settled, then returns (tests, audits); it
    delivers no notifications (they wait in their stream for a long-running worker).
    """
    stop = stop or asyncio.Event()
    consumer_name = f"{socket.gethostname()}-{os.getpid()}-w{index}-{int(time.time())}"
    # Blocking reads hold a connection (one per idle lane, and the lane's next take runs while
    # its batch is settled); the socket timeout must exceed the BLOCK time.
    redis = await connect_redis(
        config.redis_url,
        socket_timeout=config.read_block_ms / 1000 + 10,
        max_connections=2 * config.shards + 8,
        name=f"ordergate-worker-{index}",
    )
    keys = Keys(config.key_prefix, is_cluster(redis))
    drainer = Drainer(config, redis, keys, consumer_name)
    if install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        await _until_ok(lambda: ensure_streams(redis, keys, config.shards), stop, "Redis")
        await _until_ok(lambda: _check_databases(config), stop, "Postgres")
        if stop.is_set():
            return drainer.stats
        health = asyncio.create_task(_health(redis, keys, drainer.stats, config.health_ttl_s, stop))
        notifying = None if burst else asyncio.create_task(_notify(config, index, stop))
        try:
            await drainer.run(stop, burst=burst)
        finally:
            stop.set()
            health.cancel()
            tasks = [health] if notifying is None else [health, notifying]
            await asyncio.gather(*tasks, return_exceptions=True)
            await _quietly_delete(redis, keys.worker_health(consumer_name))
        stats = drainer.stats
        log.info(
            "worker %s stopped: %d committed, %d rejected, %d dead-lettered",
            consumer_name,
            stats.committed,
            stats.rejected,
            stats.dead_lettered,
        )
        return stats
    finally:
        await redis.aclose()


async def _notify(config: WorkerConfig, index: int, stop: asyncio.Event) -> None:
    """The process's notifier, on connections of its own: slow webhooks must not hold the
    drain's pool."""
    redis = await connect_redis(
        config.redis_url,
        socket_timeout=config.read_block_ms / 1000 + 10,
        max_connections=32,
        name=f"ordergate-notifier-{index}",
    )
    try:
        await Notifier(config, redis).run(stop)
    finally:
        await redis.aclose()


async def _check_databases(config: WorkerConfig) -> None:
    """Refuse to start for another deployment's databases (DeploymentMismatch), and wait until
    at least one database answers. One that does not yet is checked by each of its lanes when
    it answers (workers.lane): its lanes stall meanwhile, the others drain."""
    urls = config.database_urls
    failures = await check_databases(urls, config.shards, config.key_prefix)
    down = [(i, exc) for i, exc in enumerate(failures) if exc is not None]
    if len(down) == len(urls):
        raise down[0][1]
    for i, exc in down:
        log.warning(
            "%s not reachable at start (%r); its lanes wait for it",
            describe(i, len(urls), config.shards),
            exc,
        )


async def _until_ok(
    factory: Callable[[], Awaitable[T]], stop: asyncio.Event, what: str
) -> T | None:
    """``await factory()`` until it succeeds (backoff up to 5 s) or ``stop`` is set; a process
    started for another deployment stops at once."""
    attempt = 0
    while not stop.is_set():
        try:
            return await factory()
        except DeploymentMismatch:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. "the database system is starting up"
            attempt += 1
            log.warning("%s not ready (%r); retrying", what, exc)
        try:
            await asyncio.wait_for(stop.wait(), min(5.0, 0.1 * 2**attempt))
        except TimeoutError:
            pass
    return None


async def _health(
    redis: Any, keys: Keys, stats: DrainStats, ttl_s: int, stop: asyncio.Event
) -> None:
    """A health key with a TTL: present while this worker lives, gone soon after it dies."""
    while not stop.is_set():
        body = {
            "consumer": stats.consumer,
            "pid": os.getpid(),
            "role": stats.role,
            "lanes": stats.lanes,
            "committed": stats.committed,
            "batches": stats.batches,
            "at": time.time(),
        }
        try:
            await redis.set(keys.worker_health(stats.consumer), json.dumps(body), ex=ttl_s)
        except Exception:
            log.debug("heartbeat failed", exc_info=True)
        try:
            await asyncio.wait_for(stop.wait(), ttl_s / 3)
        except TimeoutError:
            pass


async def _quietly_delete(redis: Any, key: str) -> None:
    try:
        await redis.delete(key)
    except Exception:  # noqa: BLE001
        pass

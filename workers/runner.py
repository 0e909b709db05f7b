"""One worker process: drains its shards until SIGTERM, finishing the batches in flight."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from buffer.connection import create_redis
from buffer.keys import Keys
from buffer.streams import ensure_streams
from ordergate.settings import Settings
from sharding.routing import shards_of_worker
from workers.db import create_pool
from workers.ratelimit import TokenBucket
from workers.shard_worker import DrainConfig, ShardStats, ShardWorker

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class WorkerReport:
    consumer: str
    shards: list[int]
    per_shard: dict[int, ShardStats] = field(default_factory=dict)

    @property
    def committed(self) -> int:
        return sum(s.committed for s in self.per_shard.values())

    @property
    def dead_lettered(self) -> int:
        return sum(s.dead_lettered for s in self.per_shard.values())

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.per_shard.values())


def drain_config(settings: Settings) -> DrainConfig:
    return DrainConfig(
        shards=settings.shards,
        batch_size=settings.batch_size,
        batch_linger_ms=settings.batch_linger_ms,
        read_block_ms=settings.read_block_ms,
        claim_idle_ms=settings.claim_idle_ms,
        max_deliveries=settings.max_deliveries,
        status_ttl_s=settings.status_ttl_s,
        retry_backoff_max_s=settings.retry_backoff_max_s,
    )


async def run_worker(
    settings: Settings,
    index: int = 0,
    *,
    burst: bool = False,
    stop: asyncio.Event | None = None,
    install_signals: bool = False,
) -> WorkerReport:
    """Drain the shards of worker ``index`` of ``settings.workers``.

    ``burst`` drains until the shards are empty and settled, then returns (tests, audits).
    """
    assert settings.redis_url and settings.database_url, "resolve server URLs first"
    stop = stop or asyncio.Event()
    shards = shards_of_worker(index, settings.workers, settings.shards)
    consumer = f"{socket.gethostname()}-{os.getpid()}-w{index}-{int(time.time())}"
    keys = Keys(settings.key_prefix)
    # Blocking reads hold a connection each; the socket timeout must exceed the BLOCK time.
    redis = create_redis(
        settings.redis_url,
        socket_timeout=settings.read_block_ms / 1000 + 10,
        max_connections=len(shards) * 2 + 4,
        name=f"ordergate-worker-{index}",
    )
    pool = await _until_ok(
        lambda: create_pool(
            settings.database_url or "",
            min_size=1,
            max_size=min(settings.pg_pool_size, len(shards) + 1),
        ),
        stop,
        "Postgres",
    )
    report = WorkerReport(consumer, shards)
    if pool is None:
        await redis.aclose()
        return report
    if install_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    try:
        await _until_ok(lambda: ensure_streams(redis, keys, settings.shards), stop, "Redis")
        share = len(shards) / settings.shards
        bucket = TokenBucket(settings.drain_rate * share)
        config = drain_config(settings)
        workers = [ShardWorker(s, redis, pool, keys, consumer, config, bucket) for s in shards]
        for w in workers:
            report.per_shard[w.shard] = w.stats
        log.info("worker %s draining shards %s", consumer, shards)
        health = asyncio.create_task(_heartbeat(redis, keys, consumer, report, settings, stop))
        try:
            await asyncio.gather(*(w.run(stop, burst=burst) for w in workers))
        finally:
            health.cancel()
            await asyncio.gather(health, return_exceptions=True)
            await _quietly_delete(redis, keys.worker_health(consumer))
        log.info(
            "worker %s stopped: %d committed, %d rejected, %d dead-lettered",
            consumer,
            report.committed,
            report.rejected,
            report.dead_lettered,
        )
        return report
    finally:
        await pool.close()
        await redis.aclose()


async def _until_ok(
    factory: Callable[[], Awaitable[T]], stop: asyncio.Event, what: str
) -> T | None:
    """``await factory()`` until it succeeds (backoff up to 5 s) or ``stop`` is set."""
    attempt = 0
    while not stop.is_set():
        try:
            return await factory()
        except Exception as exc:  # noqa: BLE001 - e.g. "the database system is starting up"
            attempt += 1
            log.warning("%s not ready (%r); retrying", what, exc)
        try:
            await asyncio.wait_for(stop.wait(), min(5.0, 0.1 * 2**attempt))
        except TimeoutError:
            pass
    return None


async def _heartbeat(
    redis,
    keys: Keys,
    consumer: str,
    report: WorkerReport,  # type: ignore[no-untyped-def]
    settings: Settings,
    stop: asyncio.Event,
) -> None:
    """A health key with a TTL: present while this worker lives, gone soon after it dies."""
    while not stop.is_set():
        body = {
            "consumer": consumer,
            "pid": os.getpid(),
            "shards": report.shards,
            "committed": report.committed,
            "per_shard": {k: asdict(v) for k, v in report.per_shard.items()},
            "at": time.time(),
        }
        try:
            await redis.set(
                keys.worker_health(consumer), json.dumps(body), ex=settings.health_ttl_s
            )
        except Exception:  # noqa: BLE001 - health is best effort
            log.debug("heartbeat failed", exc_info=True)
        try:
            await asyncio.wait_for(stop.wait(), settings.health_ttl_s / 3)
        except TimeoutError:
            pass


async def _quietly_delete(redis, key: str) -> None:  # type: ignore[no-untyped-def]
    try:
        await redis.delete(key)
    except Exception:  # noqa: BLE001
        pass

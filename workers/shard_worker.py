"""The drain loop of one shard: read a batch, write it to Postgres, then settle it in Redis.

Order of effects, and why nothing is lost or doubled:
1. XREADGROUP puts the entries on this consumer's pending list (they stay in the stream).
2. One Postgres transaction inserts them (ON CONFLICT DO NOTHING on the primary key).
3. ``finalize.lua`` sets their statuses, XACKs and XDELs them, atomically.
A crash after 1 or 2 leaves the entries pending; another consumer reclaims them after
``claim_idle_ms`` and step 2 turns the rows already written into a no-op. While Postgres is down
the batch is retried from memory (not re-read), so healthy orders are never counted as failed
deliveries; only entries that keep killing their consumers reach ``max_deliveries`` and the
dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from buffer.consumer import Batch, Outcome, Poison, ShardConsumer
from buffer.keys import Keys
from buffer.message import OrderMessage
from buffer.scripts import Scripts
from buffer.streams import ensure_streams
from workers.errors import TransientPersistError
from workers.persist import Persister
from workers.ratelimit import TokenBucket

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DrainConfig:
    shards: int
    batch_size: int = 500
    batch_linger_ms: int = 0
    read_block_ms: int = 1000
    claim_idle_ms: int = 30000
    max_deliveries: int = 5
    status_ttl_s: int = 7 * 24 * 3600
    retry_backoff_max_s: float = 5.0


@dataclass(slots=True)
class ShardStats:
    committed: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    batches: int = 0
    transient_errors: int = 0


def backoff(attempt: int, cap: float, base: float = 0.05) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2**attempt))


class ShardWorker:
    """Drains one shard for one worker process."""

    def __init__(
        self,
        shard: int,
        redis: Any,
        pool: Any,
        keys: Keys,
        consumer_name: str,
        config: DrainConfig,
        bucket: TokenBucket,
    ) -> None:
        self.shard = shard
        self.redis = redis
        self.pool = pool
        self.keys = keys
        self.config = config
        self.bucket = bucket
        self.consumer = ShardConsumer(redis, keys, shard, consumer_name, Scripts(redis))
        self.persister = Persister(pool, shard)
        self.stats = ShardStats()
        self._next_reclaim = 0.0

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> ShardStats:
        """Drain until ``stop`` is set; in burst mode, until the shard is empty and settled."""
        attempt = 0
        block = 50 if burst else self.config.read_block_ms
        while not stop.is_set():
            try:
                if time.monotonic() >= self._next_reclaim:
                    await self._reclaim(stop)
                granted = await self.bucket.acquire(self.config.batch_size)
                batch = await self.consumer.read(granted, block)
                self.bucket.refund(granted - len(batch))
                attempt = 0
                if not len(batch):
                    if burst and await self._settled():
                        return self.stats
                    continue
                await self._process(batch, stop)
                if self.config.batch_linger_ms and len(batch) < granted:
                    # A partial batch: let the next one fill up a little (pacing, not sync).
                    await asyncio.sleep(self.config.batch_linger_ms / 1000)
            except (RedisError, OSError) as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    log.error("shard %d: consumer group missing; recreating", self.shard)
                    await _quietly(ensure_streams(self.redis, self.keys, self.config.shards))
                else:
                    log.warning("shard %d: Redis error %r; retrying", self.shard, exc)
                attempt += 1
                await _sleep_or_stop(stop, backoff(attempt, self.config.retry_backoff_max_s))
        return self.stats

    async def _settled(self) -> bool:
        """Nothing new and nothing pending on this shard (burst mode's end)."""
        info = await self.redis.xpending(self.consumer.stream, "workers")
        if int(info["pending"]) == 0:
            return await self.redis.xlen(self.consumer.stream) == 0
        self._next_reclaim = 0.0  # something pending elsewhere: try to take it over
        await asyncio.sleep(min(0.05, self.config.claim_idle_ms / 1000))
        return False

    async def _reclaim(self, stop: asyncio.Event) -> None:
        """Take over entries left pending by dead consumers; dead-letter the hopeless ones."""
        self._next_reclaim = time.monotonic() + self.config.claim_idle_ms / 2000
        stale = await self.consumer.stale(self.config.claim_idle_ms, self.config.batch_size)
        if not stale:
            return
        hopeless = [s for s in stale if s[2] >= self.config.max_deliveries]
        if hopeless:
            log.error(
                "shard %d: %d entries delivered %d+ times; dead-lettering",
                self.shard,
                len(hopeless),
                self.config.max_deliveries,
            )
            await self.consumer.dead_letter(
                [
                    Poison(
                        eid,
                        await self._order_id_of(eid),
                        f"delivered {n} times without "
                        "being committed (its consumers died each time)",
                        n,
                    )
                    for eid, _, n in hopeless
                ]
            )
            self.stats.dead_lettered += len(hopeless)
        retry = [eid for eid, _, n in stale if n < self.config.max_deliveries]
        if retry:
            batch = await self.consumer.claim(retry, self.config.claim_idle_ms)
            log.warning("shard %d: reclaimed %d stale entries", self.shard, len(batch))
            if len(batch):
                await self._process(batch, stop)

    async def _order_id_of(self, entry_id: str) -> str | None:
        entries = await self.redis.xrange(self.consumer.stream, entry_id, entry_id)
        if not entries:
            return None
        oid = entries[0][1].get(b"oid")
        return oid.decode() if oid and oid.startswith(f"ord_{self.shard}_".encode()) else None

    async def _process(self, batch: Batch, stop: asyncio.Event) -> None:
        if batch.poison:
            log.error(
                "shard %d: %d malformed entries -> dead letters", self.shard, len(batch.poison)
            )
            await self.consumer.dead_letter(batch.poison)
            self.stats.dead_lettered += len(batch.poison)
        if not batch.messages:
            return
        persisted, refused = await self._persist(batch.messages, stop)
        if persisted is None:
            return  # stopping while Postgres is down: entries stay pending for a later run
        outcomes = [
            Outcome(p.message, p.status, int(p.at.timestamp() * 1e6), p.reason) for p in persisted
        ]
        await self._settle(
            outcomes,
            [Poison(r.message.entry_id, r.message.order_id, r.error) for r in refused],
            stop,
        )
        self.stats.batches += 1
        self.stats.committed += sum(1 for o in outcomes if o.status == "committed")
        self.stats.rejected += sum(1 for o in outcomes if o.status != "committed")
        self.stats.dead_lettered += len(refused)

    async def _persist(self, messages: list[OrderMessage], stop: asyncio.Event) -> Any:
        attempt = 0
        while True:
            try:
                return await self.persister.write(messages)
            except TransientPersistError as exc:
                self.stats.transient_errors += 1
                attempt += 1
                if attempt == 1 or attempt % 20 == 0:
                    log.warning(
                        "shard %d: Postgres unavailable (%s); batch of %d kept, retrying",
                        self.shard,
                        exc,
                        len(messages),
                    )
                expire = getattr(self.pool, "expire_connections", None)
                if expire is not None:
                    await expire()
                await _quietly(self.consumer.touch([m.entry_id for m in messages]))
                if await _sleep_or_stop(stop, backoff(attempt, self.config.retry_backoff_max_s)):
                    return None

    async def _settle(
        self, outcomes: list[Outcome], poison: list[Poison], stop: asyncio.Event
    ) -> None:
        """Finalize in Redis; retried until it works (Postgres already holds the rows)."""
        attempt = 0
        while True:
            try:
                await self.consumer.finalize(outcomes, self.config.status_ttl_s)
                await self.consumer.dead_letter(poison)
                return
            except (RedisError, OSError) as exc:
                attempt += 1
                log.warning(
                    "shard %d: cannot settle batch in Redis (%r); retrying", self.shard, exc
                )
                if await _sleep_or_stop(stop, backoff(attempt, self.config.retry_backoff_max_s)):
                    return  # left pending: redelivery finds the rows and settles then


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until stop is set; True if stopping."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except TimeoutError:
        return False


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception:  # noqa: BLE001 - best effort
        log.debug("best-effort call failed", exc_info=True)

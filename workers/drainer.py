"""The drain: the one queue, taken in admission order, written to Postgres, settled in Redis.

Every worker process runs a Drainer; the one holding the drain lock (workers.leadership) leads,
the others stand by and take over within about a second of its death. The leader loops:

1. ``take`` the entries with the next queue numbers across all shards (they go pending on it);
2. write them in one Postgres transaction, on the connection that holds the lock;
3. ``settle`` them in Redis: statuses, ack and delete, the watermark -- atomically.

So orders commit first-in first-out over the whole buffer, which is what makes a customer's
queue position exact. A crash after 1 or 2 leaves the entries pending; the next leader claims
them first, and the Postgres unique keys turn rows already written into a no-op. While Postgres
is unavailable the batch is retried from memory, never re-read, so healthy orders do not pile
up delivery counts; only entries that keep killing their leaders reach ``max_deliveries`` and
the dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from ordergate.buffer import history
from ordergate.buffer.connection import cancel_and_wait
from ordergate.buffer.consumer import Batch, QueueConsumer, Settlement
from ordergate.buffer.control import DrainControl, read_control
from ordergate.buffer.streams import ensure_streams
from ordergate.workers import leadership, metrics
from ordergate.workers.backoff import backoff, sleep_or_stop
from ordergate.workers.config import WorkerConfig
from ordergate.workers.drainrate import DrainRate
from ordergate.workers.errors import LockPollFailed, LostLeadership, TransientPersistError
from ordergate.workers.persist import Persister
from ordergate.workers.ratelimit import TokenBucket

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DrainStats:
    consumer: str
    role: str = "starting"  # starting | standby | leader | stopped
    committed: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    batches: int = 0
    transient_errors: int = 0


class Drainer:
    """One worker process's part in the drain: leader or standby."""

    STANDBY_POLL_S = 0.5
    HEARTBEAT_S = 1.0
    CONTROL_S = 0.5  # the operators' controls are re-read this often while leading
    IDLE_BLOCK_MS = 1000  # an idle leader waits for entries at most this long between looks

    def __init__(self, config: WorkerConfig, redis: Any, consumer: QueueConsumer) -> None:
        self.config = config
        self.redis = redis
        self.consumer = consumer
        self.name = consumer.consumer
        self.keys = consumer.keys
        self.bucket = TokenBucket(config.drain_rate)  # the operators' rate may lower it
        self.control = DrainControl()
        self._control_read = 0.0
        self.rate = DrainRate()
        self.stats = DrainStats(consumer.consumer)
        self.state = "starting"
        self.reason = ""
        self._lock_key = leadership.lock_key(config.key_prefix)

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> DrainStats:
        """Drain until ``stop`` is set; in burst mode, until the buffer is empty and settled."""
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        try:
            await self._run(stop, burst)
        finally:
            await cancel_and_wait([heartbeat])  # in burst mode nothing else stops its loop
            self.stats.role = "stopped"
        return self.stats

    async def _run(self, stop: asyncio.Event, burst: bool) -> None:
        attempt = 0
        url = self.config.database_url
        while not stop.is_set():
            try:
                conn = await leadership.connect(url, self.name)
            except Exception as exc:  # noqa: BLE001 - down, restarting, refusing: all "not now"
                attempt += 1
                self.stats.transient_errors += 1
                self._set_state("stalled", f"Postgres unavailable: {exc}")
                if attempt == 1 or attempt % 20 == 0:
                    log.warning("cannot reach Postgres (%r); retrying", exc)
                await sleep_or_stop(stop, backoff(attempt, self.config.retry_backoff_max_s))
                continue
            attempt = 0
            try:
                if await self._serve(conn, stop, burst):
                    return
            except (RedisError, OSError) as exc:
                await self._redis_trouble(exc, stop)
            except LostLeadership as exc:
                log.warning("lost the drain lock (%s); standing by", exc)
                self._set_state("stalled", f"Postgres connection lost: {exc}")
            except LockPollFailed as exc:
                log.warning("cannot poll the drain lock (%s); reconnecting", exc)
                self._set_state("stalled", f"Postgres unavailable: {exc}")
            except Exception as exc:
                if not conn.is_closed():
                    raise
                log.warning("Postgres connection lost (%r)", exc)
                self._set_state("stalled", f"Postgres connection lost: {exc}")
            finally:
                if self.stats.role == "leader":
                    if stop.is_set():  # say so while still holding the lock: no successor yet
                        self._set_state("stopped", "the draining worker stopped")
                        await _quietly(self._publish())
                    self.stats.role = "standby"
                await _close(conn)

    async def _serve(self, conn: Any, stop: asyncio.Event, burst: bool) -> bool:
        """Stand by on ``conn`` until the lock is ours, then lead; True when burst is done."""
        while not stop.is_set():
            if await leadership.try_lead(conn, self._lock_key):
                log.info("%s leads the drain", self.name)
                self.stats.role = "leader"
                return await self._lead(conn, stop, burst)
            self.stats.role = "standby"
            if burst:
                length, _ = await self.consumer.outstanding()
                if length == 0:
                    return True  # someone else drained it all
            await sleep_or_stop(stop, self.STANDBY_POLL_S)
        return False

    async def _lead(self, conn: Any, stop: asyncio.Event, burst: bool) -> bool:
        persister = Persister(conn)
        await ensure_streams(self.redis, self.keys, self.config.shards)
        self._control_read = 0.0  # a new leader reads the operators' controls before anything
        recovered = False
        size = self.config.batch_size
        started: float | None = None
        while not stop.is_set():
            if conn.is_closed():
                # Postgres ended the session while we idled (restart, pg_terminate_backend, an
                # idle timeout): the lock went with it, and taking now would race the next leader.
                raise LostLeadership("the session holding the drain lock ended")
            if not await self._obey(stop):
                started = None  # paused: take nothing, not even what earlier leaders left
                continue
            if not recovered:
                await self._recover(persister, stop)
                recovered = True
                continue
            self._set_state("draining")
            if started is None:
                started = time.monotonic()  # waiting for tokens is part of draining at the cap
            granted = await self.bucket.acquire(size, timeout=self.CONTROL_S)
            if not granted:
                continue  # a very low cap: look at the controls again before waiting on
            taken = await self.consumer.take(granted)
            self.bucket.refund(granted - len(taken.batch))
            if len(taken.batch):
                if not await self._process(taken.batch, persister, stop):
                    return False  # stopping while Postgres is down: the batch stays pending
                self.rate.record(len(taken.batch), time.monotonic() - started)
                started = None
                continue
            started = None
            length, pending = await self.consumer.outstanding()
            if pending:
                await self._recover(persister, stop)  # orphans of a deposed leader
                continue
            if burst and length == 0:
                return True
            await self.consumer.wait_for_entries(  # idle: the heartbeat keeps reporting
                taken.last_ids,
                50 if burst else min(self.config.read_block_ms, self.IDLE_BLOCK_MS),
            )
        return False

    async def _obey(self, stop: asyncio.Event) -> bool:
        """Apply the operators' controls (re-read every CONTROL_S): the bucket's rate becomes
        the lower of ``drain_rate`` and theirs. False while paused, after waiting CONTROL_S."""
        if time.monotonic() - self._control_read >= self.CONTROL_S:
            control = await read_control(self.redis, self.keys)
            self._control_read = time.monotonic()
            self.bucket.set_rate(control.cap(self.config.drain_rate))
            if control.paused:
                at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(control.at_us / 1e6))
                self._set_state("paused", f"paused by {control.by or 'an operator'} at {at}")
            elif self.state == "paused":
                self._set_state("draining")
            if control != self.control:
                self.control = control
                log.info(
                    "%s: drain %s, cap %s (set by %s)",
                    self.name,
                    "paused" if control.paused else "running",
                    f"{self.bucket.rate:g}/s" if self.bucket.rate else "none",
                    control.by or "-",
                )
                await _quietly(self._publish())  # now, not at the next heartbeat
        if self.control.paused:
            await sleep_or_stop(stop, self.CONTROL_S)
            return False
        return True

    async def _recover(self, persister: Persister, stop: asyncio.Event) -> None:
        """Claim what earlier leaders left pending and finish it, in queue order, first."""
        owed = await self.consumer.claim_all()
        if not len(owed):
            return
        log.warning(
            "%s: finishing %d entries left pending by earlier leaders", self.name, len(owed)
        )
        size = self.config.batch_size
        messages, poison = owed.messages, owed.poison
        for start in range(0, max(len(messages), 1), size):
            part = Batch(messages[start : start + size], poison, owed.deliveries)
            poison = []
            if not await self._process(part, persister, stop):
                return

    async def _process(self, batch: Batch, persister: Persister, stop: asyncio.Event) -> bool:
        """Write and settle one batch; False if stopping left it pending."""
        started = time.monotonic()
        now_us = time.time_ns() // 1000
        limit = self.config.max_deliveries
        settlements = [Settlement.dead(p, now_us) for p in batch.poison]
        messages = []
        for m in batch.messages:
            prior = batch.deliveries.get(m.entry_id, 0)
            if prior >= limit:
                reason = f"delivered {prior} times without being committed (its workers died)"
                settlements.append(Settlement.of(m, "dead_lettered", now_us, reason, prior))
            else:
                messages.append(m)
        if messages:
            written = await self._persist(persister, messages, stop)
            if written is None:
                return False
            persisted, refused = written
            for p in persisted:
                at_us = int(p.at.timestamp() * 1e6)
                settlements.append(Settlement.of(p.message, p.status, at_us, p.reason))
            for r in refused:
                s = Settlement.of(r.message, "dead_lettered", now_us, r.error)
                settlements.append(s)
        dead = sum(1 for s in settlements if s.outcome == "dead_lettered")
        if dead:
            log.error("%s: %d entries -> dead letters", self.name, dead)
        if not await self._settle(settlements, stop):
            return False
        committed = sum(1 for s in settlements if s.outcome == "committed")
        rejected = sum(1 for s in settlements if s.outcome == "rejected")
        seconds = time.monotonic() - started
        metrics.observe_batch(committed, rejected, dead, seconds)
        self.stats.batches += 1
        self.stats.committed += committed
        self.stats.rejected += rejected
        self.stats.dead_lettered += dead
        seqs = [m.seq for m in batch.messages]
        log.info(
            "batch %s: %d entries, %d committed, %d rejected, %d dead-lettered in %.3f s",
            f"q{min(seqs)}-{max(seqs)}" if seqs else f"{self.name}#{self.stats.batches}",
            len(settlements),
            committed,
            rejected,
            dead,
            seconds,
        )
        return True

    async def _persist(self, persister: Persister, messages: list[Any], stop: asyncio.Event) -> Any:
        attempt = 0
        while True:
            try:
                return await persister.write(messages)
            except TransientPersistError as exc:
                if persister.conn.is_closed():
                    raise LostLeadership(str(exc)) from exc
                self.stats.transient_errors += 1
                attempt += 1
                self._set_state("stalled", f"Postgres cannot take writes: {exc}")
                if attempt == 1 or attempt % 20 == 0:
                    log.warning("Postgres refused a batch of %d for now (%s)", len(messages), exc)
                if await sleep_or_stop(stop, backoff(attempt, self.config.retry_backoff_max_s)):
                    return None

    async def _settle(self, settlements: list[Settlement], stop: asyncio.Event) -> bool:
        """Settle in Redis, retried until it works (Postgres already holds the rows)."""
        attempt = 0
        while True:
            try:
                await self.consumer.settle(
                    settlements,
                    self.config.status_ttl_s,
                    idempotency_ttl_s=self.config.idempotency_ttl_s,
                    deadletter_retention_s=self.config.deadletter_retention_s,
                    rate=self._rate(),
                    leader=self.name,
                )
                self._set_state("draining")
                return True
            except (RedisError, OSError) as exc:
                attempt += 1
                log.warning("cannot settle a batch in Redis (%r); retrying", exc)
                if await sleep_or_stop(stop, backoff(attempt, self.config.retry_backoff_max_s)):
                    return False  # left pending: redelivery finds the rows and settles then

    async def _redis_trouble(self, exc: Exception, stop: asyncio.Event) -> None:
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            log.error("consumer group missing; recreating")
            await _quietly(ensure_streams(self.redis, self.keys, self.config.shards))
        else:
            log.warning("Redis error %r; retrying", exc)
        await sleep_or_stop(stop, backoff(3, self.config.retry_backoff_max_s))

    def _rate(self) -> float | None:
        """The measured rate, never above the cap: the bucket's one-second burst after an idle
        spell would otherwise promise customers a speed the cap does not allow."""
        measured = self.rate.per_second
        if measured is None or not self.bucket.rate:
            return measured
        return min(measured, self.bucket.rate)

    def _set_state(self, state: str, reason: str = "") -> None:
        self.state, self.reason = state, reason

    async def _publish(self) -> None:
        """The drain's state for the queue endpoint: who drains, how fast, and if not, why."""
        fields: dict[str, Any] = {
            "state": self.state,
            "reason": self.reason,
            "at": time.time_ns() // 1000,
            "leader": self.name,
        }
        rate = self._rate()
        if rate is not None:
            fields["rate"] = f"{rate:.3f}"
        pipe = self.redis.pipeline(transaction=False)
        if self.bucket.rate:  # the effective cap: drain_rate or the operators' limit
            fields["cap"] = f"{self.bucket.rate:.3f}"
        else:
            pipe.hdel(self.keys.drain(), "cap")
        pipe.hset(self.keys.drain(), mapping=fields)
        pipe.publish(self.keys.drain_changes(), self.state)
        await pipe.execute()

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        """Publish while leading, or while nobody can lead because Postgres is unreachable."""
        while not stop.is_set():
            if self.stats.role == "leader" or (
                self.state == "stalled" and await self._nobody_leads()
            ):
                await _quietly(self._publish())
                await _quietly(history.record(self.redis, self.keys, self.config.shards))
            await sleep_or_stop(stop, self.HEARTBEAT_S)

    async def _nobody_leads(self) -> bool:
        try:
            at = await self.redis.hget(self.keys.drain(), "at")
        except (RedisError, OSError):
            return False
        return at is None or time.time() - int(at) / 1e6 > 3 * self.HEARTBEAT_S


async def _close(conn: Any) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2)
    except Exception:  # noqa: BLE001 - a broken connection cannot close politely
        conn.terminate()


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except Exception:
        log.debug("best-effort call failed", exc_info=True)

"""One lane's drain: take the lane in admission order, write to Postgres, settle in Redis.

A ``LaneDrain`` runs while its worker is the lane's assigned owner (workers.drainer). It opens
its own Postgres connection, to the lane's own database when ``database_url`` lists several
(sharding.databases; one database down stalls only its lanes), checks that the database is
the lane's by the deployment's record, takes the lane's lock on it (workers.lanelock), makes
itself the lane's owner under a new epoch (buffer.lanes), finishes what earlier owners left
pending, then loops:

1. ``take`` the lane's next entries (the lane's cursor moves past them);
2. write them in one Postgres transaction, on the connection that holds the lock -- while the
   next ``take`` runs, so Redis and Postgres work at the same time;
3. ``settle`` them in Redis: statuses, delete, the lane's watermark -- atomically.

A crash after 1 or 2 leaves the entries in the stream behind the cursor; the next owner claims
them first (each counting one more delivery), and the
Postgres unique keys turn rows already written into a no-op. While Postgres is unavailable the
batch is retried from memory, never re-read, so healthy orders do not pile up delivery counts;
only entries that keep killing their owners reach ``max_deliveries`` and the dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError, ResponseError

from ordergate.buffer import lanes
from ordergate.buffer.connection import cancel_and_wait
from ordergate.buffer.consumer import Batch, LaneConsumer, Settlement
from ordergate.buffer.deployment import check_database
from ordergate.buffer.errors import DeploymentMismatch, LaneFenced
from ordergate.buffer.keys import Keys
from ordergate.buffer.streams import ensure_streams
from ordergate.sharding.databases import database_of, describe
from ordergate.workers import lanelock, metrics
from ordergate.workers.backoff import backoff, sleep_or_stop
from ordergate.workers.config import WorkerConfig
from ordergate.workers.drainrate import DrainRate
from ordergate.workers.errors import LockPollFailed, LostLane, TransientPersistError
from ordergate.workers.persist import Persister
from ordergate.workers.ratelimit import TokenBucket

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DrainStats:
    """One worker process's drain, over all the lanes it owned."""

    consumer: str
    role: str = "starting"  # starting | draining (owns lanes) | idle (owns none) | stopped
    lanes: list[int] = field(default_factory=list)
    committed: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    batches: int = 0
    transient_errors: int = 0
    takeovers: int = 0  # lanes taken from a frozen owner by ending its Postgres session


@dataclass(slots=True)
class Shared:
    """What the worker's lanes share: set by the drainer, read by every lane."""

    config: WorkerConfig
    redis: Any
    keys: Keys
    name: str
    stats: DrainStats
    stop: asyncio.Event
    live: set[str] = field(default_factory=set)  # the workers whose membership holds
    paused: str = ""  # why the operators paused the drain ('' = running)
    cap: float = 0.0  # the drain's total rate limit now (0 = none)
    burst: bool = False


class LaneDrain:
    """Drains lane ``shard`` until released (the lane moved to another worker) or stopped."""

    ACQUIRE_POLL_S = 0.25
    REPORT_S = 1.0
    IDLE_BLOCK_MS = 500  # an idle lane looks at its release flag at least this often

    def __init__(self, shared: Shared, shard: int) -> None:
        self.shared = shared
        self.shard = shard
        self.config = shared.config
        self.redis = shared.redis
        self.keys = shared.keys
        self.release = asyncio.Event()
        self.bucket = TokenBucket(self._share(shared.cap))
        self.rate = DrainRate()
        self.state = "starting"
        self.reason = ""
        self.owned = False
        self._deployment = lanelock.deployment_key(self.config.key_prefix)
        urls = self.config.database_urls
        self.database = database_of(shard, len(urls), self.config.shards)
        self.url = urls[self.database]
        # "Postgres" alone with one database; which one, with several (no URL: it may hold a
        # password, and the reason reaches customers' queue pages)
        self.where = (
            "Postgres"
            if len(urls) == 1
            else f"Postgres {describe(self.database, len(urls), self.config.shards)}"
        )

    # -- the loop around ownership -----------------------------------------------------------

    def done(self) -> bool:
        return self.release.is_set() or self.shared.stop.is_set()

    async def run(self) -> None:
        attempt = 0
        while not self.done():
            try:
                conn = await lanelock.connect(self.url, f"{self.shared.name} lane {self.shard}")
            except Exception as exc:  # noqa: BLE001 - down, restarting, refusing: all "not now"
                attempt += 1
                self.shared.stats.transient_errors += 1
                self._set_state("stalled", f"{self.where} unavailable: {exc}")
                if attempt == 1 or attempt % 20 == 0:
                    log.warning(
                        "lane %d: cannot reach %s (%r); retrying", self.shard, self.where, exc
                    )
                await self._report_unowned()
                await self._pause(backoff(attempt, self.config.retry_backoff_max_s))
                continue
            try:
                await self._check_deployment(conn)
            except DeploymentMismatch as exc:  # never write where the lane's rows are not
                attempt += 1
                self._set_state("stalled", str(exc))
                if attempt == 1 or attempt % 20 == 0:
                    log.error("lane %d: %s", self.shard, exc)
                await _close(conn)
                await self._report_unowned()
                await self._pause(backoff(attempt, self.config.retry_backoff_max_s))
                continue
            except Exception as exc:  # noqa: BLE001 - the connection broke: connect again
                log.warning("lane %d: cannot check %s (%r)", self.shard, self.where, exc)
                await _close(conn)
                await self._pause(backoff(1, self.config.retry_backoff_max_s))
                continue
            attempt = 0
            try:
                epoch = await self._acquire(conn)
                if epoch is not None:
                    await self._own(conn, epoch)
            except LaneFenced as exc:
                log.warning("lane %d: taken by another worker (%s)", self.shard, exc)
            except (RedisError, OSError) as exc:
                await self._redis_trouble(exc)
            except LostLane as exc:
                log.warning("lane %d: lost its lock (%s)", self.shard, exc)
                self._set_state("stalled", f"{self.where} connection lost: {exc}")
            except LockPollFailed as exc:
                log.warning("lane %d: cannot poll its lock (%s); reconnecting", self.shard, exc)
                self._set_state("stalled", f"{self.where} unavailable: {exc}")
            except Exception as exc:
                if not conn.is_closed():
                    raise
                log.warning("lane %d: %s connection lost (%r)", self.shard, self.where, exc)
                self._set_state("stalled", f"{self.where} connection lost: {exc}")
            finally:
                self.owned = False
                await _close(conn)

    async def _check_deployment(self, conn: Any) -> None:
        """The lane's database is this lane's by the deployment's record (its place in the
        list): the runner checked every database it could reach at start, this checks the one
        it could not, and any swapped since, on the connection that will write."""
        await check_database(
            conn,
            self.config.shards,
            self.config.key_prefix,
            database=self.database,
            databases=len(self.config.database_urls),
        )

    async def _acquire(self, conn: Any) -> int | None:
        """Wait for the lane's lock (ending a frozen owner's session), then take the lane under
        a new epoch; None when released or stopped first."""
        while not self.done():
            if await lanelock.try_lock(conn, self._deployment, self.shard):
                epoch = await lanes.claim_lane(self.redis, self.keys, self.shard, self.shared.name)
                log.info("%s owns lane %d (epoch %d)", self.shared.name, self.shard, epoch)
                return epoch
            await self._take_over_frozen(conn)
            await self._pause(self.ACQUIRE_POLL_S)
        return None

    async def _take_over_frozen(self, conn: Any) -> None:
        """The lock is held: if the lane's owner has left the membership, it is frozen (or its
        host lost Redis); end its session so the lock comes free."""
        owner = await self.redis.hget(self.keys.lane(self.shard), "owner")
        owner = owner.decode() if isinstance(owner, bytes) else owner
        if owner == self.shared.name or owner in self.shared.live:
            return  # a live owner hands the lane over by itself once it sees the new assignment
        pid = await lanelock.drain_holder(conn, self._deployment, self.shard)
        if pid is not None and await lanelock.terminate(conn, pid):
            self.shared.stats.takeovers += 1
            log.warning(
                "lane %d: its owner %s left the membership but holds the lock; ended its"
                " Postgres session (pid %d)",
                self.shard,
                owner or "?",
                pid,
            )

    async def _own(self, conn: Any, epoch: int) -> None:
        consumer = LaneConsumer(
            self.redis, self.keys, self.config.shards, self.shard, self.shared.name, epoch
        )
        self.owned = True
        self._set_state("draining")
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            await self._drain(conn, Persister(conn), consumer)
        finally:
            await cancel_and_wait([heartbeat])
            if self.shared.stop.is_set() and not conn.is_closed():
                # Say so while still holding the lock: no successor has reported yet.
                self._set_state("stopped", "the draining worker stopped")
                await _quietly(self._report())
            if not conn.is_closed():
                with contextlib.suppress(Exception):
                    await lanelock.unlock(conn, self._deployment, self.shard)

    # -- owning the lane -----------------------------------------------------------------------

    async def _drain(self, conn: Any, persister: Persister, consumer: LaneConsumer) -> None:
        recovered = False
        size = self.config.batch_size
        started: float | None = None
        ahead: asyncio.Task[Batch] | None = None  # the next take, running during a write
        try:
            while not self.done():
                if conn.is_closed():
                    # Postgres ended the session while we idled (restart, pg_terminate_backend,
                    # an idle timeout): the lock went with it.
                    raise LostLane("the session holding the lane's lock ended")
                self.bucket.set_rate(self._share(self.shared.cap))
                if self.shared.paused:
                    if ahead is None:  # what was taken before the pause is still written
                        started = None
                        self._set_state("paused", self.shared.paused)
                        await self._pause(0.5)
                        continue
                if not recovered:  # paused, it takes nothing, not even what others left
                    await self._recover(persister, consumer)
                    recovered = True
                    continue
                self._set_state("draining")
                if started is None:
                    started = time.monotonic()  # waiting for tokens is part of draining at a cap
                if ahead is not None:
                    batch, ahead = await ahead, None
                else:
                    granted = await self.bucket.acquire(size, timeout=0.5)
                    if not granted:
                        continue  # a very low cap: look at the controls again before waiting on
                    batch = await consumer.take(granted)
                    self.bucket.refund(granted - len(batch))
                if len(batch):
                    if not self.bucket.rate and not self.done() and not self.shared.paused:
                        ahead = asyncio.create_task(consumer.take(size))
                    if not await self._process(batch, persister, consumer):
                        return  # stopping while Postgres is down: the batch stays pending
                    self.rate.record(len(batch), time.monotonic() - started)
                    started = None
                    continue
                started = None
                if self.shared.burst:
                    await asyncio.sleep(0.02)  # burst: the drainer ends us once all is settled
                    continue
                await consumer.wait_for_entries(self.IDLE_BLOCK_MS)
        finally:
            if ahead is not None:  # its entries stay pending on us; the next owner claims them
                await cancel_and_wait([ahead])
                with contextlib.suppress(BaseException):
                    ahead.result()

    async def _recover(self, persister: Persister, consumer: LaneConsumer) -> None:
        """Claim what earlier owners left pending and finish it, in queue order, first."""
        owed = await consumer.claim()
        if not len(owed):
            return
        log.warning(
            "lane %d: finishing %d entries left pending by earlier owners", self.shard, len(owed)
        )
        size = self.config.batch_size
        messages, poison = owed.messages, owed.poison
        for start in range(0, max(len(messages), 1), size):
            part = Batch(messages[start : start + size], poison, owed.deliveries, owed.taken_at_us)
            poison = []
            if not await self._process(part, persister, consumer):
                return

    async def _process(self, batch: Batch, persister: Persister, consumer: LaneConsumer) -> bool:
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
            taken_at = dt.datetime.fromtimestamp((batch.taken_at_us or now_us) / 1e6, tz=dt.UTC)
            written = await self._persist(persister, messages, taken_at)
            if written is None:
                return False
            persisted, refused = written
            for p in persisted:
                at_us = int(p.at.timestamp() * 1e6)
                settlements.append(Settlement.of(p.message, p.status, at_us, p.reason))
            for r in refused:
                settlements.append(Settlement.of(r.message, "dead_lettered", now_us, r.error))
        dead = sum(1 for s in settlements if s.outcome == "dead_lettered")
        if dead:
            log.error("lane %d: %d entries -> dead letters", self.shard, dead)
        if not await self._settle(settlements, consumer, batch.taken_at_us):
            return False
        committed = sum(1 for s in settlements if s.outcome == "committed")
        rejected = sum(1 for s in settlements if s.outcome == "rejected")
        seconds = time.monotonic() - started
        metrics.observe_batch(committed, rejected, dead, seconds)
        stats = self.shared.stats
        stats.batches += 1
        stats.committed += committed
        stats.rejected += rejected
        stats.dead_lettered += dead
        seqs = [m.seq for m in batch.messages]
        log.info(
            "lane %d batch %s: %d entries, %d committed, %d rejected, %d dead-lettered in %.3f s",
            self.shard,
            f"q{min(seqs)}-{max(seqs)}" if seqs else "-",
            len(settlements),
            committed,
            rejected,
            dead,
            seconds,
        )
        return True

    async def _persist(
        self, persister: Persister, messages: list[Any], taken_at: dt.datetime
    ) -> Any:
        attempt = 0
        while True:
            try:
                return await persister.write(messages, taken_at)
            except TransientPersistError as exc:
                if persister.conn.is_closed():
                    raise LostLane(str(exc)) from exc
                self.shared.stats.transient_errors += 1
                attempt += 1
                self._set_state("stalled", f"{self.where} cannot take writes: {exc}")
                if attempt == 1 or attempt % 20 == 0:
                    log.warning(
                        "lane %d: Postgres refused a batch of %d for now (%s)",
                        self.shard,
                        len(messages),
                        exc,
                    )
                if await self._pause(backoff(attempt, self.config.retry_backoff_max_s), True):
                    return None

    async def _settle(
        self, settlements: list[Settlement], consumer: LaneConsumer, taken_at_us: int
    ) -> bool:
        """Settle in Redis, retried until it works (Postgres already holds the rows)."""
        attempt = 0
        while True:
            try:
                await consumer.settle(
                    settlements,
                    self.config.status_ttl_s,
                    idempotency_ttl_s=self.config.idempotency_ttl_s,
                    deadletter_retention_s=self.config.deadletter_retention_s,
                    rate=self._rate(),
                    owner=self.shared.name,
                    taken_at_us=taken_at_us,
                )
                self._set_state("draining")
                return True
            except LaneFenced:
                raise
            except (RedisError, OSError) as exc:
                attempt += 1
                log.warning(
                    "lane %d: cannot settle a batch in Redis (%r); retrying", self.shard, exc
                )
                wait = backoff(attempt, self.config.retry_backoff_max_s)
                if await self._pause(wait, True):
                    return False  # left pending: redelivery finds the rows and settles then

    async def _redis_trouble(self, exc: Exception) -> None:
        if isinstance(exc, ResponseError) and "NOSTREAM" in str(exc):
            log.error("lane %d: stream missing; recreating", self.shard)
            await _quietly(ensure_streams(self.redis, self.keys, self.config.shards))
        else:
            log.warning("lane %d: Redis error %r; retrying", self.shard, exc)
        await self._pause(backoff(3, self.config.retry_backoff_max_s))

    # -- reporting -------------------------------------------------------------------------------

    def _share(self, cap: float) -> float:
        """This lane's part of the drain's total rate limit: an equal share of every lane."""
        return cap / self.config.shards if cap else 0.0

    def _rate(self) -> float | None:
        """The measured rate, never above the lane's share of the cap: the bucket's one-second
        burst after an idle spell would otherwise promise customers a speed the cap forbids."""
        measured = self.rate.per_second
        if measured is None or not self.bucket.rate:
            return measured
        return min(measured, self.bucket.rate)

    def _set_state(self, state: str, reason: str = "") -> None:
        self.state, self.reason = state, reason

    async def _report(self) -> None:
        rate = self._rate()
        await lanes.report(
            self.redis,
            self.keys,
            self.shard,
            {
                "state": self.state,
                "reason": self.reason,
                "owner": self.shared.name,
                "rate": None if rate is None else f"{rate:.3f}",
                "cap": f"{self.shared.cap:.3f}" if self.shared.cap else None,
            },
        )

    async def _heartbeat(self) -> None:
        while True:
            await _quietly(self._report())
            await asyncio.sleep(self.REPORT_S)  # pacing of a heartbeat, cancelled by _own

    async def _report_unowned(self) -> None:
        """Nobody can own the lane (Postgres unreachable): say why, unless another owner
        reports. Customers' ETAs read it: at once if this worker was the last owner."""
        try:
            owner, at = await self.redis.hmget(self.keys.lane(self.shard), "owner", "at")
            owner = owner.decode() if isinstance(owner, bytes) else owner
            recent = at is not None and time.time() - int(at) / 1e6 <= 3 * self.REPORT_S
            if recent and owner != self.shared.name:
                return
            await lanes.report(
                self.redis,
                self.keys,
                self.shard,
                {"state": self.state, "reason": self.reason, "cap": None},
            )
        except (RedisError, OSError):
            log.debug("cannot report lane %d", self.shard, exc_info=True)

    async def _pause(self, seconds: float, stop_only: bool = False) -> bool:
        """Wait ``seconds``, or less if stopping (or, unless ``stop_only``, released). True if
        the wait was cut short that way."""
        if stop_only:
            return await sleep_or_stop(self.shared.stop, seconds)
        waits = [asyncio.ensure_future(e.wait()) for e in (self.shared.stop, self.release)]
        try:
            done, _ = await asyncio.wait(waits, timeout=seconds, return_when="FIRST_COMPLETED")
        finally:
            for w in waits:
                w.cancel()
        return bool(done)


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

"""Admission into the buffer pool, with group commit.

Concurrent requests are gathered into one batch; a batch is one pipeline, one round trip: one
``admit.lua`` call carrying all of its orders as arguments, grouped by shard (the script's fixed
work -- the counters, each stream's newest id -- is paid once per batch, not per order), then
one durability barrier (``WAITAOF`` for fsync, ``WAIT`` for replica, ``CONFIG GET`` of the AOF
policy for aof-always). A caller's future resolves only after the barrier confirmed the write,
so a 202 always means durable.

``aof-always`` rests on how Redis and Valkey run ``appendfsync always``: the AOF is written and
fsync'd before any reply of the same event-loop cycle goes out, so the admission script's reply
itself means durable (and any reply revealing the write, such as a twin's duplicate receipt,
goes out after that fsync too: no lease is needed). The policy is read in every batch's
pipeline, so a server not running it (or switched away from it) gives no receipt.

``auto`` (the default) chooses per batch: every batch's pipeline carries the ``CONFIG GET``, and
a batch is sent as aof-always (no ``WAITAOF``, no lease) while the latest reply said ``yes`` /
``always``, as fsync (``WAITAOF`` and the lease) otherwise. It starts as fsync: the first batch
learns the policy, at no round trip of its own (and nothing to do at start while Redis may be
down), and a lost connection makes it fsync again until a reply says otherwise (a failover may
bring a server with another policy). A batch sent as aof-always is judged by its own
``CONFIG GET``, exactly as aof-always judges it: if the policy is no longer always, its orders
get no receipt (``NotDurable``) and the next batches use ``WAITAOF``. A refused ``CONFIG``
(renamed or denied on managed services) keeps auto on ``WAITAOF``: never a 503 for that.

Until a ``WAITAOF`` or ``WAIT`` barrier confirmed the write (fsync, replica, and auto's batches
sent as fsync), the idempotency record holds a lease (``pending_until``): a twin that arrives
meanwhile gets ``INFLIGHT`` (409) instead of a receipt for a write that might still be
lost. The lease is lifted by ``confirm.lua`` piggy-backed on the next batch, and expires by
itself if this process dies, after which twins get the receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

from ordergate.buffer.connection import is_cluster
from ordergate.buffer.errors import BufferUnavailable, NotDurable
from ordergate.buffer.keys import Keys
from ordergate.buffer.masters import Masters
from ordergate.buffer.scripts import scripts_for
from ordergate.buffer.streams import ensure_streams

log = logging.getLogger(__name__)


class Outcome(enum.IntEnum):
    ADMITTED = 1
    DUPLICATE = 2
    MISMATCH = 3
    INFLIGHT = 4
    FULL = 5  # the buffer holds max_buffered unsettled orders already
    RATE_LIMITED = 6  # the storefront sent more than its rate and burst allow
    OVER_SHARE = 7  # the buffer is near its bound and the storefront holds its share of it


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A storefront's rate limit as admission left it (the IETF RateLimit header fields):
    ``quota`` orders at once (the burst), restored over ``window_s``; ``remaining`` of them
    left now; ``reset_ms`` until the quota is whole again, or, for a refused order, until one
    more is allowed."""

    quota: int
    window_s: int
    remaining: int
    reset_ms: int


@dataclass(frozen=True, slots=True)
class Admission:
    """What the buffer said about one order."""

    outcome: Outcome
    order_id: str
    seq: int = 0
    accepted_at_us: int = 0
    ahead: int = 0
    lane_seq: int = 0
    limit: RateLimit | None = None  # None: the storefront has no rate limit
    held: int = 0  # OVER_SHARE: the storefront's orders buffered, and its share
    share: int = 0


@dataclass(slots=True)
class _Request:
    shard: int
    keys: tuple[str, str]  # its idempotency key, its storefront's sub-lane
    args: tuple[Any, ...]
    future: asyncio.Future[Admission]
    abandoned: bool = False
    unloaded: bool = False  # its server had lost the scripts: re-sent once they are loaded


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    shards: int
    durability: str = "auto"
    durability_timeout_ms: int = 1000
    timeout_s: float = 2.0
    max_batch: int = 256
    max_inflight_batches: int = 2
    lease_ms: int = 10000
    max_buffered: int = 0
    # A storefront without a limit of its own (buffer.storefronts): orders/s and burst, 0 = none.
    storefront_rate: float = 0.0
    storefront_burst: int = 0
    # Orders of max_buffered kept for storefronts below their share of the buffer (0 = none).
    storefront_reserve: int = 0


@dataclass(slots=True)
class _Stats:
    batches: int = 0
    orders: int = 0
    failures: int = 0


class Admitter:
    """Batches admissions from many concurrent requests into few Redis round trips."""

    def __init__(self, redis: Any, keys: Keys, config: AdmissionConfig) -> None:
        self._redis = redis
        self._keys = keys
        self._config = config
        # On a cluster: the master of each lane, each with a client of its own, so a lane's
        # script and its barrier (WAIT, WAITAOF: they count this connection's writes) go down one
        # connection.
        self._nodes = Masters(redis) if is_cluster(redis) else None
        self._unloaded: list[Any] = []
        self._queue: deque[_Request] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(config.max_inflight_batches)
        self._confirms: dict[int, list[str]] = defaultdict(list)
        self._task: asyncio.Task[None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()  # nothing queued, in flight or left to confirm
        self._closing = False
        self._last_stream_repair = 0.0
        self.stats = _Stats()
        # auto: what the latest CONFIG GET said (True: appendonly yes + appendfsync always), and
        # the number of the batch that said it; replies of older batches do not overrule it.
        self._always = False
        self._policy_batch = 0
        self._sent = 0  # batches numbered as they are sent
        self._config_refused = False  # logged once

    async def start(self) -> None:
        try:
            if self._nodes is not None:
                await self._nodes.load_scripts()
            else:
                await scripts_for(self._redis).load()
        except (RedisError, OSError) as exc:  # loaded on first NOSCRIPT once Redis is back
            log.error("cannot load admission scripts yet: %r", exc)
        self._task = asyncio.create_task(self._run(), name="ordergate-admission")

    async def close(self) -> None:
        """Flush what is queued (and pending confirmations), then stop."""
        self._closing = True
        self._check_idle()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._config.timeout_s):
                await self._idle.wait()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for req in self._queue:
            if not req.future.done():
                req.future.set_exception(BufferUnavailable("gateway shutting down"))
        if self._nodes is not None:
            await self._nodes.aclose()

    async def admit(
        self,
        shard: int,
        storefront_id: str,
        storefront_order_id: str,
        args: tuple[Any, ...],
        timeout: float | None = None,  # noqa: ASYNC109 - one call_later, see below
    ) -> Admission:
        """Admit one order; returns after the buffer confirmed it durably, or raises
        ``BufferUnavailable`` once ``timeout`` seconds (default: the configured ``timeout_s``)
        have passed without that confirmation."""
        loop = asyncio.get_running_loop()
        req = _Request(
            shard=shard,
            keys=(
                self._keys.idem(shard, storefront_id, storefront_order_id),
                self._keys.sublane(shard, storefront_id),
            ),
            args=args,
            future=loop.create_future(),
        )
        self._queue.append(req)
        self._wakeup.set()
        # One timer per request (not wait_for + shield: a task and two futures per order, about
        # 7 % of a POST's CPU). At the deadline the request is abandoned: never sent, it never
        # will be; sent, Redis may still write it, and the client's retry finds it through the
        # idempotency record.
        expiry = loop.call_later(
            self._config.timeout_s if timeout is None else timeout, _expire, req
        )
        try:
            return await req.future
        except asyncio.CancelledError:
            req.abandoned = True  # the client went away: nobody reads the outcome
            raise
        finally:
            expiry.cancel()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            await self._slots.acquire()
            batch = self._take_batch()
            if not self._queue:
                self._wakeup.clear()
            if not batch and not self._confirms:
                self._slots.release()
                continue
            task = asyncio.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if self._closing:
            self._check_idle()

    def _check_idle(self) -> None:
        """While closing: set ``_idle`` once everything is out, and send the confirmations left
        (they otherwise ride on the next batch, and there will be none)."""
        if self._queue or self._flushes or self._confirms:
            self._idle.clear()
            if not self._queue and not self._flushes:
                self._wakeup.set()
        else:
            self._idle.set()

    def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        queue, limit = self._queue, self._config.max_batch
        while queue and len(batch) < limit:
            req = queue.popleft()
            if not req.abandoned:
                batch.append(req)
        return batch

    async def _flush(self, batch: list[_Request]) -> None:
        try:
            await self._flush_inner(batch)
        except Exception as exc:
            log.exception("admission flush failed")
            self._fail(batch, BufferUnavailable(f"admission failed: {exc}"))
        finally:
            self._slots.release()

    async def _flush_inner(self, batch: list[_Request], retried: bool = False) -> None:
        by_shard: dict[int, list[_Request]] = defaultdict(list)
        for req in batch:
            by_shard[req.shard].append(req)
        confirms, self._confirms = self._confirms, defaultdict(list)
        self._sent += 1
        number = self._sent
        mode = self._mode()  # the barrier of this batch
        lease = 0 if mode in ("none", "aof-always") else self._config.lease_ms
        if self._nodes is None:  # one primary: one script call over every shard of the batch
            groups = [list(by_shard)] if by_shard else []
            await self._send(self._redis, groups, by_shard, confirms, number, mode, lease)
        else:  # a cluster: one call per lane (one slot), one pipeline per master, in parallel
            try:
                units = await self._nodes.split(set(by_shard) | set(confirms))
            except RedisError as exc:  # a slot with no master yet: a failover under way
                self._requeue_confirms(confirms)
                self._fail(batch, BufferUnavailable(f"buffer unreachable: {exc}"))
                return
            await asyncio.gather(
                *(
                    self._send(
                        client,
                        [[shard] for shard in node_shards if shard in by_shard],
                        by_shard,
                        {shard: confirms[shard] for shard in node_shards if shard in confirms},
                        number,
                        mode,
                        lease,
                    )
                    for client, node_shards in units
                )
            )
        if retried:
            return
        unloaded = [req for req in batch if req.unloaded]
        if unloaded:
            for req in unloaded:
                req.unloaded = False
            for client in {id(c): c for c in self._unloaded}.values():
                await scripts_for(client).load()
            self._unloaded.clear()
            await self._flush_inner(unloaded, retried=True)  # idempotent: safe to re-send
        for req in batch:
            if req.unloaded and not req.future.done():
                req.future.set_exception(BufferUnavailable("admission script cannot be loaded"))

    async def _send(
        self,
        redis: Any,
        groups: list[list[int]],
        by_shard: dict[int, list[_Request]],
        confirms: dict[int, list[str]],
        number: int,
        mode: str,
        lease: int,
    ) -> None:
        """One pipeline to one server: the confirmations, one admit.lua call per group of
        shards, the barrier."""
        scripts = scripts_for(redis)
        batch = [req for group in groups for shard in group for req in by_shard[shard]]
        pipe = redis.pipeline(transaction=False)
        # Confirms first: a twin admitted in this very batch then sees the lease already lifted.
        if self._nodes is not None:  # one slot per script call: one per lane
            confirm_calls = [keys for keys in confirms.values() if keys]
        else:
            flat = [key for keys in confirms.values() for key in keys]
            confirm_calls = [flat] if flat else []
        for keys in confirm_calls:
            pipe.evalsha(scripts.confirm.sha, len(keys), *keys)
        for group in groups:
            script_keys, script_args = self._script_call(group, by_shard, lease)
            pipe.evalsha(scripts.admit.sha, len(script_keys), *script_keys, *script_args)
        barrier = self._barrier(pipe, mode) if batch else 0

        try:
            async with asyncio.timeout(self._config.timeout_s):
                results = await pipe.execute(raise_on_error=False)
        except (TimeoutError, RedisError, OSError) as exc:
            if self._config.durability == "auto":  # the server that comes back may differ
                self._always = False
                self._policy_batch = max(self._policy_batch, number)
            if self._nodes is not None:
                self._nodes.lost()
            self._requeue_confirms(confirms)
            self.stats.failures += 1
            self._fail(batch, BufferUnavailable(f"buffer unreachable: {exc!r}"))
            return

        calls = len(confirm_calls)
        if any(isinstance(r, Exception) for r in results[:calls]):
            self._requeue_confirms(confirms)
        durable_error: Exception | None = None
        if barrier:
            tail = results[len(results) - barrier :]
            durable_error = self._check_barrier(mode, tail[0])
            if self._config.durability == "auto":
                self._learn_policy(number, tail[-1])

        self.stats.batches += 1
        self.stats.orders += len(batch)
        confirmable = False  # this batch admitted orders whose leases can be lifted now
        for g, group in enumerate(groups):
            admitted = results[calls + g]
            requests = [req for shard in group for req in by_shard[shard]]
            if isinstance(admitted, NoScriptError):  # Redis restarted and lost its scripts
                for req in requests:
                    req.unloaded = True
                self._unloaded.append(redis)
                continue
            if isinstance(admitted, Exception):
                self._fail(requests, self._classify(admitted))
                continue
            for req, reply in zip(requests, admitted, strict=True):
                admission = _decode(reply)
                if durable_error is not None and admission.outcome in _RECEIPTS:
                    # Written but not confirmed durable: never a receipt. The lease stays, so
                    # twins get 409 until it expires rather than a receipt for a write that
                    # may vanish. A receipt given again (a duplicate) waits on this batch's
                    # barrier too (admit.lua makes it cover the order's own write), so it is
                    # refused with it: after a failover, the promoted master's orders get no
                    # receipt until a replica has them. (Other outcomes give no receipt.)
                    if not req.future.done():
                        req.future.set_exception(durable_error)
                    continue
                if admission.outcome is Outcome.ADMITTED and lease:
                    self._confirms[req.shard].append(req.keys[0])
                    confirmable = True
                if not req.future.done():
                    req.future.set_result(admission)
        if confirmable and not self._queue:
            # Confirm on their own. Not after a refused confirmation (out of memory, no script):
            # re-sent at once, it would be refused again, in a loop; it waits for the next batch
            # instead, and without one, the lease expires by itself.
            self._wakeup.set()

    def _script_call(
        self, group: list[int], by_shard: dict[int, list[_Request]], lease: int
    ) -> tuple[list[str], list[Any]]:
        """admit.lua's keys and arguments for the orders of the shards of ``group``. On a
        cluster a group is one lane, with its own counters, and the bound, the reserve and the
        default rate limit are split evenly over the lanes (each lane keeps its part)."""
        keys, config = self._keys.at(group[0]), self._config
        split = config.shards if self._nodes is not None else 1
        rate = config.storefront_rate / split
        burst = math.ceil(burst_of(config.storefront_rate, config.storefront_burst) / split)
        script_keys: list[str] = [
            keys.seq(),
            keys.drain(),
            keys.storefront_limits(),
            keys.storefront_tat(),
            keys.storefront_buffered(),
            keys.storefront_known(),
        ]
        script_args: list[Any] = [
            lease,
            math.ceil(config.max_buffered / split),
            f"{rate:g}",
            burst,
            math.ceil(config.storefront_reserve / split),
            len(group),
        ]
        order_keys: list[str] = []
        order_args: list[Any] = []
        for shard in group:
            reqs = by_shard[shard]
            script_keys += (self._keys.stream(shard), self._keys.lane(shard))
            script_args += (shard, len(reqs))
            for req in reqs:
                order_keys += req.keys
                order_args += req.args
        return script_keys + order_keys, script_args + order_args

    def _mode(self) -> str:
        """The barrier of the next batch: the configured one, or auto's choice."""
        if self._config.durability == "auto":
            return "aof-always" if self._always else "fsync"
        return self._config.durability

    def _barrier(self, pipe: Any, mode: str) -> int:
        """Queue the batch's barrier (and auto's policy probe); how many commands it added.
        The first one confirms the batch, the last one (auto) is the ``CONFIG GET``."""
        timeout = self._config.durability_timeout_ms
        commands: list[tuple[Any, ...]] = []
        if mode == "fsync":
            commands.append(("WAITAOF", 1, 0, timeout))
        elif mode == "replica":
            commands.append(("WAIT", 1, timeout))
        if mode == "aof-always" or self._config.durability == "auto":
            commands.append(("CONFIG", "GET", "appendonly", "appendfsync"))
        for command in commands:
            pipe.execute_command(*command)
        return len(commands)

    def _check_barrier(self, mode: str, result: Any) -> Exception | None:
        if isinstance(result, Exception):
            return NotDurable(f"durability barrier failed: {result}")
        if mode == "aof-always":
            appendonly, appendfsync = _aof_policy(result)
            if appendonly == "yes" and appendfsync == "always":
                return None
            if self._config.durability == "auto":
                return NotDurable(
                    "durability auto sent this batch without WAITAOF, the server having run"
                    " appendfsync always; it now runs appendonly"
                    f" {appendonly}, appendfsync {appendfsync} (the next batches use WAITAOF)"
                )
            return NotDurable(
                "durability aof-always needs the Redis server to run appendonly yes and"
                f" appendfsync always; it runs appendonly {appendonly}, appendfsync {appendfsync}"
            )
        if mode == "fsync":
            numlocal = int(result[0])
            if numlocal < 1:
                return NotDurable("Redis did not fsync the append-only file in time")
        elif int(result) < 1:
            return NotDurable("no replica acknowledged the write in time")
        return None

    def _learn_policy(self, number: int, reply: Any) -> None:
        """auto: take the AOF policy from batch ``number``'s ``CONFIG GET`` for the next batches,
        unless a later batch's reply (or failure) was taken already."""
        if number < self._policy_batch:
            return
        self._policy_batch = number
        if isinstance(reply, Exception):
            if not self._config_refused:
                self._config_refused = True
                log.warning(
                    "durability auto: CONFIG GET refused (%s); admission batches use WAITAOF",
                    reply,
                )
            always = False
        else:
            always = _aof_policy(reply) == ("yes", "always")
        if always != self._always:
            log.log(
                logging.INFO if always else logging.WARNING,
                "durability auto: the server %s appendonly yes + appendfsync always; admission"
                " batches %s WAITAOF",
                "runs" if always else "no longer runs",
                "go without" if always else "use",
            )
        self._always = always

    def _classify(self, exc: Exception) -> BufferUnavailable:
        text = str(exc)
        if isinstance(exc, ResponseError) and text.startswith("NOSTREAM"):
            self._schedule_stream_repair()
            return BufferUnavailable("buffer stream missing; being recreated", retry_after=1)
        if isinstance(exc, OutOfMemoryError) or text.startswith("OOM"):  # redis-py strips OOM
            return BufferUnavailable("buffer is out of memory", retry_after=5)
        return BufferUnavailable(f"buffer error: {text}")

    def _schedule_stream_repair(self) -> None:
        now = time.monotonic()
        if now - self._last_stream_repair < 1.0:
            return
        self._last_stream_repair = now
        log.error("buffer streams missing (Redis lost its data?); recreating them")
        task = asyncio.create_task(ensure_streams(self._redis, self._keys, self._config.shards))
        self._flushes.add(task)
        task.add_done_callback(self._flushed)

    def _requeue_confirms(self, confirms: dict[int, list[str]]) -> None:
        for shard, idems in confirms.items():
            self._confirms[shard].extend(idems)

    @staticmethod
    def _fail(reqs: list[_Request], exc: Exception) -> None:
        for req in reqs:
            if not req.future.done():
                req.future.set_exception(exc)


_RECEIPTS = (Outcome.ADMITTED, Outcome.DUPLICATE)


def _expire(req: _Request) -> None:
    req.abandoned = True
    if not req.future.done():
        req.future.set_exception(BufferUnavailable("the buffer did not confirm the order in time"))


def _aof_policy(reply: Any) -> tuple[str, str]:
    """``appendonly`` and ``appendfsync`` from a ``CONFIG GET`` reply (flat list or dict)."""
    if isinstance(reply, dict):
        items = list(reply.items())
    else:
        flat = list(reply or [])
        items = list(zip(flat[::2], flat[1::2], strict=True))
    config = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in items
    }
    return config.get("appendonly", "?"), config.get("appendfsync", "?")


def burst_of(rate: float, burst: int) -> int:
    """A rate limit's burst: as configured, or one second of its rate when left at 0."""
    return burst if burst > 0 else max(1, math.ceil(rate))


def _decode(reply: list[Any]) -> Admission:
    """One reply of admit.lua: {code, q, w, r, t, ...}."""
    outcome = Outcome(int(reply[0]))
    quota = int(reply[1])
    limit = RateLimit(quota, int(reply[2]), int(reply[3]), int(reply[4])) if quota else None
    if outcome in (Outcome.FULL, Outcome.RATE_LIMITED):
        return Admission(outcome, "", limit=limit)
    if outcome is Outcome.OVER_SHARE:
        return Admission(outcome, "", limit=limit, held=int(reply[5]), share=int(reply[6]))
    order_id = reply[5].decode() if isinstance(reply[5], bytes) else str(reply[5])
    if outcome in (Outcome.ADMITTED, Outcome.DUPLICATE):
        return Admission(
            outcome,
            order_id,
            int(reply[6]),
            int(reply[7]),
            int(reply[8]),
            int(reply[9]),
            limit,
        )
    return Admission(outcome, order_id, limit=limit)

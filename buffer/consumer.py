"""The drain's side of the buffer: take the queue in admission order, settle what was written.

All shards form one line. ``take`` hands out the entries with the next queue numbers across
every shard (``take.lua``), so the drain commits orders first-in first-out over the whole
buffer; ``settle`` finishes a batch atomically (``settle.lua``). Entries leave a stream only
through ``settle`` -- committed, rejected or dead-lettered -- never by trimming.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ordergate.buffer.errors import MalformedMessage
from ordergate.buffer.keys import GROUP, Keys
from ordergate.buffer.message import OrderMessage, decode_entry
from ordergate.buffer.scripts import Scripts
from ordergate.sharding.ids import shard_of_order_id


@dataclass(frozen=True, slots=True)
class Poison:
    """An entry that cannot be processed, and why."""

    shard: int
    entry_id: str
    order_id: str | None
    error: str
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class Settlement:
    """How one entry leaves the stream."""

    shard: int
    entry_id: str
    outcome: str  # committed | rejected | dead_lettered
    at_us: int
    order_id: str | None = None
    storefront_id: str | None = None
    storefront_order_id: str | None = None
    reason: str = ""
    deliveries: int = 1

    @classmethod
    def of(
        cls, m: OrderMessage, outcome: str, at_us: int, reason: str = "", deliveries: int = 1
    ) -> Settlement:
        return cls(
            m.shard,
            m.entry_id,
            outcome,
            at_us,
            m.order_id,
            m.storefront_id,
            m.storefront_order_id,
            reason,
            deliveries,
        )

    @classmethod
    def dead(cls, p: Poison, at_us: int) -> Settlement:
        return cls(
            p.shard,
            p.entry_id,
            "dead_lettered",
            at_us,
            p.order_id,
            reason=p.error,
            deliveries=p.deliveries,
        )


@dataclass(slots=True)
class Batch:
    """Entries taken together, in queue order; ``deliveries`` counts earlier deliveries."""

    messages: list[OrderMessage] = field(default_factory=list)
    poison: list[Poison] = field(default_factory=list)
    deliveries: dict[str, int] = field(default_factory=dict)  # entry id -> prior deliveries

    def __len__(self) -> int:
        return len(self.messages) + len(self.poison)


@dataclass(slots=True)
class Taken:
    batch: Batch
    last_ids: list[str]  # per shard: what to wait after when nothing was taken


class QueueConsumer:
    """Takes and settles the entries of all shards for one named consumer (the drain's leader)."""

    def __init__(self, redis: Any, keys: Keys, shards: int, consumer: str) -> None:
        self.redis = redis
        self.keys = keys
        self.shards = shards
        self.consumer = consumer
        self.streams = [keys.stream(s) for s in range(shards)]
        self.scripts = Scripts(redis)
        self._queue_keys = [keys.drain(), keys.seq(), *self.streams]

    async def take(self, n: int) -> Taken:
        """The next ``n`` queue numbers' entries, across all shards, now pending on us."""
        _cursor, last_ids, per_shard = await self.scripts.take(
            keys=self._queue_keys,
            args=[GROUP, self.consumer, n, self.keys.prefix, _now_us()],
        )
        batch = Batch()
        for shard, entries in enumerate(per_shard):
            self._decode(batch, shard, entries)
        _sort(batch)
        return Taken(batch, [_s(i) for i in last_ids])

    async def claim_all(self, max_per_shard: int = 100_000) -> Batch:
        """Every pending entry of every shard, now ours (the leader's lock says they are owed)."""
        per_shard, counts = await self.scripts.claim(
            keys=self._queue_keys,
            args=[GROUP, self.consumer, self.keys.prefix, _now_us(), max_per_shard],
        )
        batch = Batch()
        for shard, (entries, prior) in enumerate(zip(per_shard, counts, strict=True)):
            for (entry_id, _), n in zip(entries, prior, strict=True):
                batch.deliveries[_s(entry_id)] = int(n)
            self._decode(batch, shard, entries)
        _sort(batch)
        return batch

    async def wait_for_entries(self, last_ids: list[str], block_ms: int) -> None:
        """Block until some shard has an entry after ``last_ids`` (or the time is up)."""
        await self.redis.xread(dict(zip(self.streams, last_ids, strict=True)), 1, block_ms)

    async def settle(
        self,
        items: list[Settlement],
        ttl_s: int,
        *,
        idempotency_ttl_s: int,
        deadletter_retention_s: int = 0,
        rate: float | None,
        leader: str,
    ) -> int:
        """Record the outcomes, ack/delete or dead-letter, queue the webhook events, advance the
        watermark; returns it."""
        keys: list[str] = [
            *self._queue_keys,
            *(self.keys.deadletters(s) for s in range(self.shards)),
            self.keys.notify(),
        ]
        args: list[Any] = [
            GROUP,
            ttl_s,
            self.shards,
            _now_us(),
            "" if rate is None else f"{rate:.3f}",
            leader,
            self.keys.webhook(""),
            idempotency_ttl_s,
            deadletter_retention_s,
        ]
        nothing = self.keys.drain()
        for it in items:
            owned = it.order_id and shard_of_order_id(it.order_id, self.shards) == it.shard
            keys.append(
                self.keys.status(it.shard, it.order_id) if owned and it.order_id else nothing
            )
            if owned and it.storefront_id is not None and it.storefront_order_id is not None:
                keys.append(self.keys.idem(it.shard, it.storefront_id, it.storefront_order_id))
            else:
                keys.append(nothing)
            args.extend(
                (
                    it.shard,
                    it.entry_id,
                    it.outcome,
                    it.at_us,
                    it.reason[:2000],
                    it.deliveries,
                    it.order_id or "",
                    it.storefront_id or "",
                    it.storefront_order_id or "",
                )
            )
        return int(await self.scripts.settle(keys=keys, args=args))

    async def outstanding(self) -> tuple[int, int]:
        """(entries in the streams, of which pending): both 0 once everything is settled."""
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xlen(stream)
            pipe.xpending(stream, GROUP)
        replies = await pipe.execute()
        length = sum(int(r) for r in replies[0::2])
        pending = sum(int(r["pending"]) for r in replies[1::2])
        return length, pending

    def _decode(self, batch: Batch, shard: int, entries: list[Any]) -> None:
        for entry_id, flat in entries:
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            try:
                batch.messages.append(decode_entry(shard, entry_id, fields))
            except MalformedMessage as exc:
                oid = fields.get(b"oid", b"").decode(errors="replace")
                if shard_of_order_id(oid, self.shards) != shard:
                    oid = ""  # not an id of this shard: its status key is not ours to touch
                eid = _s(entry_id)
                batch.poison.append(
                    Poison(
                        shard,
                        eid,
                        oid or None,
                        f"malformed message: {exc}",
                        batch.deliveries.get(eid, 0) + 1,
                    )
                )


def _sort(batch: Batch) -> None:
    batch.messages.sort(key=lambda m: m.seq)


def _now_us() -> int:
    return time.time_ns() // 1000


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

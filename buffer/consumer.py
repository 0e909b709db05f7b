"""One consumer of one shard's stream: read, reclaim, finalize, dead-letter.

Entries leave the stream only through ``finalize`` (committed or rejected, after the Postgres
transaction) or ``dead_letter``; nothing is ever trimmed by length or id, so an entry that is not
yet committed cannot vanish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from buffer.errors import MalformedMessage
from buffer.keys import GROUP, Keys
from buffer.message import OrderMessage, decode_entry
from buffer.scripts import Scripts
from sharding.ids import shard_of_order_id


@dataclass(frozen=True, slots=True)
class Poison:
    """An entry that cannot be processed, and why."""

    entry_id: str
    order_id: str | None
    error: str
    deliveries: int = 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one order left the stream."""

    message: OrderMessage
    status: str  # committed | rejected
    at_us: int
    reason: str = ""


@dataclass(slots=True)
class Batch:
    messages: list[OrderMessage]
    poison: list[Poison]

    def __len__(self) -> int:
        return len(self.messages) + len(self.poison)


class ShardConsumer:
    """Reads and settles the entries of one shard for one named consumer."""

    def __init__(self, redis: Any, keys: Keys, shard: int, consumer: str, scripts: Scripts):
        self.redis = redis
        self.keys = keys
        self.shard = shard
        self.consumer = consumer
        self.stream = keys.stream(shard)
        self._scripts = scripts

    async def read(self, count: int, block_ms: int | None, *, own_pending: bool = False) -> Batch:
        """New entries (``>``), or this consumer's own pending ones after a restart."""
        reply = await self.redis.xreadgroup(
            GROUP,
            self.consumer,
            {self.stream: "0" if own_pending else ">"},
            count=count,
            block=None if own_pending else block_ms,
        )
        entries = reply[0][1] if reply else []
        return self._decode(entries)

    async def stale(self, min_idle_ms: int, count: int) -> list[tuple[str, str, int]]:
        """Entries pending on any consumer for longer than ``min_idle_ms``: (id, consumer, n)."""
        rows = await self.redis.xpending_range(
            self.stream, GROUP, min="-", max="+", count=count, idle=min_idle_ms
        )
        return [(_s(r["message_id"]), _s(r["consumer"]), int(r["times_delivered"])) for r in rows]

    async def claim(self, entry_ids: list[str], min_idle_ms: int) -> Batch:
        """Take over stale entries (their delivery count goes up by one)."""
        if not entry_ids:
            return Batch([], [])
        entries = await self.redis.xclaim(
            self.stream, GROUP, self.consumer, min_idle_time=min_idle_ms, message_ids=entry_ids
        )
        # Entries deleted under us come back as (id, None); nothing of them is left to do.
        return self._decode([e for e in entries if e and e[1]])

    async def touch(self, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this live consumer still works on (no delivery count)."""
        if entry_ids:
            await self.redis.xclaim(
                self.stream,
                GROUP,
                self.consumer,
                min_idle_time=0,
                message_ids=entry_ids,
                justid=True,
            )

    async def finalize(self, outcomes: list[Outcome], ttl_s: int) -> None:
        """Record outcomes, then ack and delete the entries, atomically."""
        if not outcomes:
            return
        keys: list[str] = [self.stream]
        args: list[Any] = [GROUP, ttl_s]
        for o in outcomes:
            m = o.message
            keys.append(self.keys.status(self.shard, m.order_id))
            keys.append(self.keys.idem(self.shard, m.storefront_id, m.storefront_order_id))
            args.extend((m.entry_id, o.status, o.at_us, o.reason))
        await self._scripts.finalize(keys=keys, args=args)

    async def dead_letter(self, poison: list[Poison]) -> None:
        """Move entries to the dead-letter stream with their error."""
        if not poison:
            return
        keys: list[str] = [self.stream, self.keys.deadletters(self.shard)]
        args: list[Any] = [GROUP, int(time.time() * 1e6)]
        for p in poison:
            keys.append(self.keys.status(self.shard, p.order_id) if p.order_id else self.stream)
            args.extend((p.entry_id, p.deliveries, p.error[:2000]))
        await self._scripts.dead_letter(keys=keys, args=args)

    def _decode(self, entries: list[Any]) -> Batch:
        messages: list[OrderMessage] = []
        poison: list[Poison] = []
        for entry_id, fields in entries:
            try:
                messages.append(decode_entry(entry_id, fields))
            except MalformedMessage as exc:
                oid = fields.get(b"oid", b"").decode(errors="replace")
                if shard_of_order_id(oid, self.shard + 1) != self.shard:
                    oid = ""  # not an id of this shard: its status key is not ours to touch
                poison.append(Poison(_s(entry_id), oid or None, f"malformed message: {exc}"))
        return Batch(messages, poison)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

"""The dead-letter streams: list what failed and why, and re-queue it."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import msgspec

from ordergate.buffer.keys import Keys
from ordergate.buffer.scripts import Scripts
from ordergate.sharding.ids import shard_of_order_id


class DeadLetter(msgspec.Struct, frozen=True):
    """One dead-lettered entry."""

    shard: int
    id: str
    source_id: str
    order_id: str | None
    storefront_id: str | None
    storefront_order_id: str | None
    deliveries: int
    error: str
    failed_at: dt.datetime

    @property
    def handle(self) -> str:
        """``shard/id``: stream ids are unique per shard only."""
        return f"{self.shard}/{self.id}"


def _s(raw: dict[bytes, bytes], key: bytes) -> str | None:
    value = raw.get(key)
    return value.decode(errors="replace") if value is not None else None


async def list_dead_letters(
    redis: Any, keys: Keys, shards: int, limit: int = 100
) -> list[DeadLetter]:
    """Up to ``limit`` dead letters per shard, oldest first."""
    out: list[DeadLetter] = []
    for shard in range(shards):
        for entry_id, raw in await redis.xrange(keys.deadletters(shard), count=limit):
            out.append(
                DeadLetter(
                    shard=shard,
                    id=entry_id.decode(),
                    source_id=_s(raw, b"source_id") or "",
                    order_id=_s(raw, b"oid"),
                    storefront_id=_s(raw, b"sf"),
                    storefront_order_id=_s(raw, b"sfo"),
                    deliveries=int(raw.get(b"deliveries", 0)),
                    error=_s(raw, b"error") or "",
                    failed_at=dt.datetime.fromtimestamp(
                        int(raw.get(b"failed_at", 0)) / 1e6, tz=dt.UTC
                    ),
                )
            )
    return out


async def replay(redis: Any, keys: Keys, shards: int, letters: list[DeadLetter]) -> int:
    """Put dead letters back into their storefront's sub-lane (the lane's base stream for those
    that name none); returns how many were re-queued."""
    scripts = Scripts(redis)
    groups: dict[tuple[int, str], list[DeadLetter]] = {}
    for letter in letters:
        groups.setdefault((letter.shard, letter.storefront_id or ""), []).append(letter)
    moved = 0
    for (shard, sf), group in groups.items():
        stream = keys.sublane(shard, sf)
        order_keys: list[str] = []
        for d in group:
            if d.order_id and shard_of_order_id(d.order_id, shards) == shard:
                order_keys.append(keys.status(shard, d.order_id))
            else:
                order_keys.append(stream)
            if d.storefront_id is not None and d.storefront_order_id is not None:
                order_keys.append(keys.idem(shard, d.storefront_id, d.storefront_order_id))
            else:
                order_keys.append(stream)
        moved += await scripts.replay(
            keys=[
                stream,
                keys.deadletters(shard),
                keys.at(shard).seq(),
                keys.lane(shard),
                keys.at(shard).storefront_buffered(),
                *order_keys,
            ],
            args=[int(time.time() * 1e6), sf, *(d.id for d in group)],
        )
    return moved

"""The notification streams: events waiting for delivery, deferred per destination, dead.

``settle.lua`` adds an event to ``og:notify`` in the same atomic step that settles its order
(on a cluster to its lane's own ``og:{k}:notify``, which the leading notifier gathers into
``og:notify``: ``gather_lanes``).
From there an event leaves by exactly one of three doors, each atomic:

* delivered (``notified.lua``): deleted, and "notified" goes on the order's timeline (its
  status record, or for a committed order its idempotency record);
* deferred: moved to its destination's lane ``og:notify:deferred:<storefront>``, in order, when
  the destination's breaker is open, a delivery failed or the destination is at its concurrency
  limit; lanes are replayed head first;
* dead: moved from its lane to ``og:notify:dead`` with the last error, when it kept failing for
  ``notify_give_up_s``.

An entry is only deleted after it is written elsewhere (or delivered), so a crash at any point
means a second delivery at worst -- receivers deduplicate by ``event_id``.

Entry fields: ``type``, ``oid``, ``sf``, ``sfo``, ``status``, ``at`` (µs) as settle.lua wrote
them; lanes add ``evt`` (the event id: ``evt_`` + the id it got in ``og:notify``) and ``dat``
(deferred at, µs); dead entries add ``error``, ``attempts`` and ``failed_at``.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import msgspec

from ordergate.buffer.keys import Keys
from ordergate.buffer.scripts import Scripts
from ordergate.sharding.ids import shard_of_order_id


class Event(msgspec.Struct, frozen=True):
    """One order event for one storefront's webhook."""

    entry_id: str  # where it is now (og:notify or a lane)
    event_id: str
    type: str
    order_id: str
    storefront_id: str
    storefront_order_id: str
    status: str
    at_us: int
    deferred_at_us: int = 0

    def payload(self) -> bytes:
        """The JSON body POSTed to the webhook (and signed)."""
        at = dt.datetime.fromtimestamp(self.at_us / 1e6, tz=dt.UTC)
        return _encoder.encode(
            {
                "event_id": self.event_id,
                "type": self.type,
                "order_id": self.order_id,
                "storefront_order_id": self.storefront_order_id,
                "status": self.status,
                "at": at.isoformat().replace("+00:00", "Z"),
            }
        )

    def fields(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "oid": self.order_id,
            "sf": self.storefront_id,
            "sfo": self.storefront_order_id,
            "status": self.status,
            "at": self.at_us,
            "evt": self.event_id,
        }


class DeadEvent(msgspec.Struct, frozen=True):
    event: Event
    error: str
    attempts: int
    failed_at: dt.datetime


_encoder = msgspec.json.Encoder()


def _decode(entry_id: bytes, raw: dict[bytes, bytes]) -> Event:
    eid = entry_id.decode()
    evt = raw.get(b"evt")
    return Event(
        entry_id=eid,
        event_id=evt.decode() if evt else f"evt_{eid}",
        type=raw.get(b"type", b"").decode(),
        order_id=raw.get(b"oid", b"").decode(),
        storefront_id=raw.get(b"sf", b"").decode(),
        storefront_order_id=raw.get(b"sfo", b"").decode(),
        status=raw.get(b"status", b"").decode(),
        at_us=int(raw.get(b"at", 0)),
        deferred_at_us=int(raw.get(b"dat", 0)),
    )


def _now_us() -> int:
    return time.time_ns() // 1000


class NotificationStreams:
    """Redis operations on the notification streams, for the notifier and for operators."""

    def __init__(self, redis: Any, keys: Keys, shards: int) -> None:
        self.redis = redis
        self.keys = keys
        self.shards = shards
        self.scripts = Scripts(redis)

    async def read_new(self, after: str, count: int, block_ms: int) -> list[Event]:
        """Events in ``og:notify`` after entry id ``after`` (blocks up to ``block_ms``)."""
        reply = await self.redis.xread({self.keys.notify(): after}, count, block_ms)
        return [_decode(eid, raw) for _, entries in reply or [] for eid, raw in entries]

    async def lane_head(self, storefront_id: str, count: int) -> list[Event]:
        """The oldest ``count`` deferred events of a destination."""
        entries = await self.redis.xrange(self.keys.notify_deferred(storefront_id), count=count)
        return [_decode(eid, raw) for eid, raw in entries]

    async def lane_lengths(self) -> dict[str, int]:
        """Deferred events per destination (only destinations with some)."""
        lanes = sorted(m.decode() for m in await self.redis.smembers(self.keys.notify_lanes()))
        pipe = self.redis.pipeline(transaction=False)
        for storefront_id in lanes:
            pipe.xlen(self.keys.notify_deferred(storefront_id))
        lengths = await pipe.execute() if lanes else []
        return {sf: int(n) for sf, n in zip(lanes, lengths, strict=True) if n}

    async def defer(self, events: list[Event]) -> None:
        """Move events from ``og:notify`` to their lanes, in the given order."""
        if not events:
            return
        now = _now_us()
        pipe = self.redis.pipeline(transaction=True)
        for e in events:
            pipe.xadd(self.keys.notify_deferred(e.storefront_id), {**e.fields(), "dat": now})
        pipe.sadd(self.keys.notify_lanes(), *{e.storefront_id for e in events})
        pipe.xdel(self.keys.notify(), *(e.entry_id for e in events))
        await pipe.execute()

    async def gather_lanes(self, count: int) -> int:
        """On a cluster: move the events each lane's settle.lua wrote in its own stream
        (``og:{k}:notify``) to ``og:notify``, oldest first; how many moved. Written there
        before deleted here, so a crash between means the event twice, with one event id
        (``evt_<lane>_<entry id>``): receivers deduplicate by it."""
        lanes = [self.keys.at(shard).notify() for shard in range(self.shards)]
        pipe = self.redis.pipeline(transaction=False)
        for lane in lanes:
            pipe.xrange(lane, count=count)
        moved = 0
        for shard, (lane, entries) in enumerate(zip(lanes, await pipe.execute(), strict=True)):
            if not entries:
                continue
            pipe = self.redis.pipeline(transaction=True)  # og:notify: the keys of no shard
            for eid, raw in entries:
                fields = {k.decode(): v for k, v in raw.items()}
                fields["evt"] = f"evt_{shard}_{eid.decode()}"
                pipe.xadd(self.keys.notify(), fields)
            await pipe.execute()
            await self.redis.xdel(lane, *(eid for eid, _ in entries))
            moved += len(entries)
        return moved

    async def delivered(self, events: list[Event], *, deferred: bool) -> None:
        """The events arrived: delete them where they are, mark their orders "notified"."""
        if not events:
            return
        source = (
            self.keys.notify_deferred(events[0].storefront_id) if deferred else self.keys.notify()
        )
        if self.keys.cluster:
            await self._delivered_on_cluster(source, events)
            return
        keys = [source, self.keys.notify_retries()]
        args: list[Any] = [_now_us()]
        for e in events:
            shard = shard_of_order_id(e.order_id, self.shards)
            if shard is None:
                keys.extend((source, source))
            else:
                keys.append(self.keys.status(shard, e.order_id))
                keys.append(self.keys.idem(shard, e.storefront_id, e.storefront_order_id))
            args.extend((e.entry_id, e.event_id))
        await self.scripts.notified(keys=keys, args=args)

    async def _delivered_on_cluster(self, source: str, events: list[Event]) -> None:
        """``notified.lua`` once per lane for the marks (its keys are one slot: the lane's own
        notification stream, from which it deletes nothing, "0-0" being no entry), then the
        events deleted from ``source``: a crash between them means a second delivery, never
        a lost one."""
        now = _now_us()
        by_shard: dict[int, list[Event]] = {}
        for e in events:
            shard = shard_of_order_id(e.order_id, self.shards)
            if shard is not None:
                by_shard.setdefault(shard, []).append(e)
        for shard, group in by_shard.items():
            scope = self.keys.at(shard)
            keys = [scope.notify(), scope.notify_retries()]
            args: list[Any] = [now]
            for e in group:
                keys.append(self.keys.status(shard, e.order_id))
                keys.append(self.keys.idem(shard, e.storefront_id, e.storefront_order_id))
                args.extend(("0-0", e.event_id))
            await self.scripts.notified(keys=keys, args=args)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xdel(source, *(e.entry_id for e in events))
        pipe.hdel(self.keys.notify_retries(), *(f"{e.event_id}:{x}" for e in events for x in "ne"))
        await pipe.execute()

    async def failed(self, event: Event, error: str) -> int:
        """Count a failed attempt of a deferred event; returns its attempts so far."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(self.keys.notify_retries(), f"{event.event_id}:n", 1)
        pipe.hset(self.keys.notify_retries(), f"{event.event_id}:e", error[:1000])
        attempts, _ = await pipe.execute()
        return int(attempts)

    async def bury(self, events: list[Event], error: str) -> None:
        """Move deferred events of one lane to the dead list with the last error."""
        if not events:
            return
        now = _now_us()
        counts = await self.redis.hmget(
            self.keys.notify_retries(), [f"{e.event_id}:n" for e in events]
        )
        attempts = [int(n or 0) for n in counts]
        pipe = self.redis.pipeline(transaction=True)
        for e, n in zip(events, attempts, strict=True):
            pipe.xadd(
                self.keys.notify_dead(),
                {**e.fields(), "error": error[:1000], "attempts": n, "failed_at": now},
            )
            pipe.hdel(self.keys.notify_retries(), f"{e.event_id}:n", f"{e.event_id}:e")
        pipe.xdel(self.keys.notify_deferred(events[0].storefront_id), *(e.entry_id for e in events))
        await pipe.execute()

    async def dead(self, limit: int = 100) -> list[DeadEvent]:
        out = []
        for eid, raw in await self.redis.xrange(self.keys.notify_dead(), count=limit):
            out.append(
                DeadEvent(
                    _decode(eid, raw),
                    raw.get(b"error", b"").decode(),
                    int(raw.get(b"attempts", 0)),
                    dt.datetime.fromtimestamp(int(raw.get(b"failed_at", 0)) / 1e6, tz=dt.UTC),
                )
            )
        return out

    async def requeue_dead(self, entry_ids: list[str] | None = None) -> int:
        """Put dead events (all, or these) back in ``og:notify`` for another round."""
        dead = await self.dead(limit=100_000)
        chosen = [d for d in dead if entry_ids is None or d.event.entry_id in entry_ids]
        if not chosen:
            return 0
        pipe = self.redis.pipeline(transaction=True)
        for d in chosen:
            pipe.xadd(self.keys.notify(), d.event.fields())
        pipe.xdel(self.keys.notify_dead(), *(d.event.entry_id for d in chosen))
        await pipe.execute()
        return len(chosen)

    async def counts(self) -> tuple[int, int, int]:
        """(waiting in og:notify, deferred in all lanes, dead)."""
        waiting = int(await self.redis.xlen(self.keys.notify()))
        deferred = sum((await self.lane_lengths()).values())
        dead = int(await self.redis.xlen(self.keys.notify_dead()))
        return waiting, deferred, dead

    async def hold_lease(self, token: str, ttl_ms: int) -> bool:
        """Take or renew the notifier's lease."""
        return bool(
            await self.scripts.lease(keys=[self.keys.notify_leader()], args=[token, ttl_ms])
        )

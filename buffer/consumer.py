"""The drain's side of the buffer: take a lane in admission order, settle what was written.

Each shard is a lane. Entries leave a stream only through ``settle`` -- committed, rejected or
dead-lettered -- never by trimming, so a stream holds exactly the lane's unsettled entries, in
admission order, and what its owner has taken is its head up to the owner's cursor. So ``take``
is a plain ``XRANGE`` after the cursor (no consumer group: no pending list to write per entry,
nothing for the AOF or a replica to copy but the cursor), and ``taken.lua`` records the new
cursor under the lane's fence. A successor takes over everything up to the cursor
(``claim``), first, so each lane commits first-in first-out; ``settle`` finishes a batch
atomically (``settle.lua``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from ordergate.buffer.errors import LaneFenced, MalformedMessage
from ordergate.buffer.keys import Keys
from ordergate.buffer.message import OrderMessage, decode_entry
from ordergate.buffer.scripts import scripts_for
from ordergate.sharding.ids import shard_of_order_id

# Joins a plain commit's fields into one argument of settle.lua: a control byte, which no entry
# id (<ms>-<seq>), order id, storefront id or storefront order id contains.
SEP = "\x1f"


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
    keep: bool = False  # it has a status record to update (it was re-queued)
    accepted_at_us: int = 0  # the rest: what a status record of an exception needs
    seq: int = 0
    lane_seq: int = 0
    ahead: int = 0

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
            m.requeued,
            m.accepted_at_us,
            m.seq,
            m.lane_seq,
            m.ahead,
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
    taken_at_us: int = 0  # when the lane's owner took (or claimed) these entries

    def __len__(self) -> int:
        return len(self.messages) + len(self.poison)


class LaneConsumer:
    """Takes and settles one lane's entries for its owner, under the epoch it was given.

    Every call is fenced: ``take``, ``claim`` and ``settle`` fail with ``LaneFenced`` once
    another worker has taken the lane (buffer.lanes).
    """

    def __init__(
        self, redis: Any, keys: Keys, shards: int, shard: int, consumer: str, epoch: int
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.shards = shards
        self.shard = shard
        self.consumer = consumer
        self.epoch = epoch
        self.stream = keys.stream(shard)
        self.scripts = scripts_for(redis)
        self._lane_keys = [keys.lane(shard), self.stream, keys.deliveries(shard)]
        self.cursor: str = "0-0"  # the newest entry this owner has taken

    async def take(self, n: int) -> Batch:
        """The lane's next ``n`` entries after the cursor, in admission order; the lane's
        cursor moves past them before they are handed out (a successor takes them over)."""
        taken_at = _now_us()
        entries = await self.redis.xrange(self.stream, min=f"({self.cursor}", count=n)
        batch = Batch(taken_at_us=taken_at)
        if not entries:
            return batch
        newest = _s(entries[-1][0])
        seq = ls = ""
        for _, fields in reversed(entries):  # the newest with a queue number (a malformed one
            if b"seq" in fields:  # may lack it)
                seq, ls = fields[b"seq"], fields.get(b"ls", b"")
                break
        await self._fenced(
            self.scripts.taken(
                keys=self._lane_keys[:1],
                args=[self.epoch, newest, seq, ls, self.keys.drain_changes()],
            )
        )
        self.cursor = newest
        self._decode(batch, self.shard, entries)
        _sort(batch)
        return batch

    async def claim(self, max_entries: int = 100_000) -> Batch:
        """Every entry earlier owners took and did not settle, now ours, with its count of
        deliveries lost; the cursor starts after them."""
        taken_at = _now_us()
        entries, prior = await self._fenced(
            self.scripts.claim(
                keys=self._lane_keys,
                args=[self.consumer, max_entries, self.epoch],
            )
        )
        batch = Batch(taken_at_us=taken_at)
        for (entry_id, _), n in zip(entries, prior, strict=True):
            batch.deliveries[_s(entry_id)] = int(n)
        if entries:
            self.cursor = _s(entries[-1][0])
        else:
            cursor = await self.redis.hget(self.keys.lane(self.shard), "c")
            self.cursor = _s(cursor) if cursor else "0-0"
        self._decode(batch, self.shard, [(eid, _fields(flat)) for eid, flat in entries])
        _sort(batch)
        return batch

    async def wait_for_entries(self, block_ms: int) -> None:
        """Block until the lane has an entry after the cursor (or time's up)."""
        await self.redis.xread({self.stream: self.cursor}, 1, block_ms)

    async def settle(
        self,
        items: list[Settlement],
        ttl_s: int,
        *,
        idempotency_ttl_s: int,
        deadletter_retention_s: int = 0,
        rate: float | None,
        owner: str,
        taken_at_us: int = 0,
    ) -> tuple[int, int]:
        """Record the outcomes, ack/delete or dead-letter, queue the webhook events, advance the
        lane's watermark and the settled counts; returns (the watermark, entries settled).

        A plain commit (committed at the batch's instant, no status record to update), the
        normal case, costs one key and one argument; the exceptions go in full (``_detail``)."""
        shard, lane = self.shard, self.keys.lane(self.shard)
        at = _batch_at(items)
        idem = self.keys.idem
        plain_keys: list[str] = []
        plain_args: list[str] = []
        other_keys: list[str] = []
        other_args: list[Any] = []
        for it in items:
            sf, sfo = it.storefront_id, it.storefront_order_id
            if (
                it.outcome == "committed"
                and not it.keep
                and it.at_us == at
                and it.order_id
                and sf is not None
                and sfo is not None
            ):
                # Its idem key is named for this lane, so it is ours whatever the order id says
                # (no shard_of_order_id per order): admit.lua wrote it beside the entry.
                plain_keys.append(idem(shard, sf, sfo))
                plain_args.append(f"{it.entry_id}{SEP}{it.order_id}{SEP}{sf}{SEP}{sfo}")
            else:
                self._detail(it, lane, other_keys, other_args)
        keys = [
            lane,
            self.keys.drain(),
            self.stream,
            self.keys.deadletters(shard),
            self.keys.notify(),
            self.keys.deliveries(shard),
            self.keys.storefront_buffered(),
            self.keys.storefront_settled(),
            *plain_keys,
            *other_keys,
        ]
        args = [
            "",
            ttl_s,
            self.epoch,
            _now_us(),
            "" if rate is None else f"{rate:.3f}",
            owner,
            self.keys.webhook(""),
            idempotency_ttl_s,
            deadletter_retention_s,
            self.keys.drain_changes(),
            taken_at_us or _now_us(),
            len(plain_args),
            at,
            *plain_args,
            *other_args,
        ]
        watermark, settled = await self._fenced(self.scripts.settle(keys=keys, args=args))
        return int(watermark), int(settled)

    def _detail(self, it: Settlement, lane: str, keys: list[str], args: list[Any]) -> None:
        """An exception in full: its status and idem keys (the lane's key where the entry names
        no order of this lane: a record there is not ours to write) and 13 arguments."""
        shard, oid = self.shard, it.order_id or ""
        owned = shard_of_order_id(oid, self.shards) == shard
        record = it.outcome != "committed" or it.keep  # a committed order's row tells its status
        keys.append(self.keys.status(shard, oid) if owned and record else lane)
        if owned and it.storefront_id is not None and it.storefront_order_id is not None:
            keys.append(self.keys.idem(shard, it.storefront_id, it.storefront_order_id))
        else:
            keys.append(lane)
        args.extend(
            (
                it.entry_id,
                it.outcome,
                it.at_us,
                it.reason[:2000],
                it.deliveries,
                oid,
                it.storefront_id or "",
                it.storefront_order_id or "",
                "1" if it.keep else "0",
                it.accepted_at_us,
                it.seq,
                it.lane_seq,
                it.ahead,
            )
        )

    async def _fenced(self, call: Any) -> Any:
        try:
            return await call
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise LaneFenced(f"lane {self.shard}: {exc}") from None
            raise

    def _decode(self, batch: Batch, shard: int, entries: list[Any]) -> None:
        for entry_id, fields in entries:
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


async def outstanding(redis: Any, keys: Keys, shards: list[int]) -> int:
    """Entries in these lanes' streams (taken or not): 0 once all is settled."""
    pipe = redis.pipeline(transaction=False)
    for shard in shards:
        pipe.xlen(keys.stream(shard))
    return sum(int(r) for r in await pipe.execute())


def _batch_at(items: list[Settlement]) -> int:
    """The instant most plain commits share: a batch commits in one transaction, so all of them
    but those of a redelivery (their first commit's instant) or of a split batch."""
    ats = [it.at_us for it in items if it.outcome == "committed" and not it.keep]
    if not ats or ats.count(ats[0]) == len(ats):
        return ats[0] if ats else 0
    return Counter(ats).most_common(1)[0][0]


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[0::2], flat[1::2], strict=True))


def _sort(batch: Batch) -> None:
    batch.messages.sort(key=lambda m: m.seq)


def _now_us() -> int:
    return time.time_ns() // 1000


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

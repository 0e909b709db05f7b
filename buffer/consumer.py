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

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from ordergate.buffer.errors import LaneFenced, MalformedMessage
from ordergate.buffer.fairness import allocate
from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import SubLane, sublanes_of
from ordergate.buffer.message import OrderMessage, decode_entry
from ordergate.buffer.scripts import scripts_for
from ordergate.buffer.storefronts import Limit
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
    sublane: str = ""  # the sub-lane it was read from ('' the lane's base stream)


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
    sublane: str = ""  # the sub-lane it leaves ('' the lane's base stream)

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
            m.sublane,
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
            sublane=p.sublane,
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

    The lane is its storefronts' sub-lanes (``Keys.sublane``) and its base stream (entries that
    name no storefront). ``take`` goes round the sub-lanes with untaken orders by weight
    (buffer.fairness), each one first in, first out, with a cursor of its own (lane hash
    ``c:<sf>``; the base stream's is ``c``).

    Every call is fenced: ``take``, ``claim`` and ``settle`` fail with ``LaneFenced`` once
    another worker has taken the lane (buffer.lanes).
    """

    WEIGHTS_S = 1.0  # how long the storefronts' weights are kept before they are read again

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
        self.cursor: str = "0-0"  # the newest entry of the base stream this owner has taken
        self.cursors: dict[str, str] = {}  # the same per sub-lane (storefront)
        self._weights: dict[str, int] = {}
        self._weights_at = -math.inf
        self._turn = 0  # which storefront a batch's round starts with
        self._known: set[str] = set()  # sub-lanes with orders, at the last read of the lane
        self._last: int | None = None  # the lane's 'last' at that read
        self._base_cursor = "0-0"  # the base stream's cursor 'c' at that read

    async def take(self, n: int) -> Batch:
        """The lane's next ``n`` entries: the base stream's first, then each sub-lane's share
        (buffer.fairness), each after its cursor; the cursors move past them before they are
        handed out (a successor takes them over)."""
        taken_at = _now_us()
        subs = await self._sublanes()
        backlog = {sf: u.admitted - u.taken for sf, u in subs.items() if u.admitted > u.taken}
        share = allocate(backlog, self._weights, n, self._turn)
        self._turn += 1
        pipe = self.redis.pipeline(transaction=False)
        pipe.xrange(self.stream, min=f"({self.cursor}", count=n)
        for sf, k in share.items():
            after = self.cursors.get(sf) or subs[sf].cursor or "0-0"
            pipe.xrange(self.keys.sublane(self.shard, sf), min=f"({after}", count=k)
        base, *rest = await pipe.execute()
        batch = Batch(taken_at_us=taken_at)
        left = n - len(base)
        picked: list[tuple[str, list[Any]]] = [("", base)] if base else []
        for sf, entries in zip(share, rest, strict=True):
            entries = entries[: max(0, left)]
            left -= len(entries)
            if entries:
                picked.append((sf, entries))
        if not picked:
            return batch
        args: list[Any] = [self.epoch, self.keys.drain_changes()]
        for sf, entries in picked:
            newest = _s(entries[-1][0])
            seq = ls = ""
            for _, fields in reversed(entries):  # the newest with a queue number (a malformed
                if b"seq" in fields:  # one may lack it)
                    seq, ls = fields[b"seq"], fields.get(b"ls", b"")
                    break
            args += [sf, newest, seq, ls]
        await self._fenced(self.scripts.taken(keys=self._lane_keys[:1], args=args))
        for sf, entries in picked:
            if sf:
                self.cursors[sf] = _s(entries[-1][0])
            else:
                self.cursor = _s(entries[-1][0])
            self._decode(batch, self.shard, entries, sf)
        _sort(batch)
        return batch

    async def _sublanes(self) -> dict[str, SubLane]:
        """The lane's sub-lanes as its hash says, and the storefronts' weights (kept for
        WEIGHTS_S)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.lane(self.shard))
        now = time.monotonic()
        fresh = now - self._weights_at > self.WEIGHTS_S
        if fresh:
            pipe.hgetall(self.keys.storefront_limits())
        replies = await pipe.execute()
        if fresh:
            self._weights = {_s(k): Limit.decode(v).weight for k, v in replies[1].items()}
            self._weights_at = now
        subs = sublanes_of(replies[0])
        self._base_cursor = _s(replies[0].get(b"c") or b"0-0")
        self._known = {sf for sf, u in subs.items() if u.backlog}
        self._last = int(replies[0].get(b"last", 0) or 0)
        return subs

    async def claim(self, max_entries: int = 100_000) -> Batch:
        """Every entry earlier owners took and did not settle, in every sub-lane, now ours,
        with its count of deliveries lost; the cursors start after them."""
        taken_at = _now_us()
        subs = {sf: u for sf, u in (await self._sublanes()).items() if u.cursor}
        keys = [*self._lane_keys, *(self.keys.sublane(self.shard, sf) for sf in subs)]
        found, prior = await self._fenced(
            self.scripts.claim(
                keys=keys,
                args=[self.consumer, max_entries, self.epoch, *subs],
            )
        )
        batch = Batch(taken_at_us=taken_at)
        self.cursor = self._base_cursor  # read with the sub-lanes; only this owner moves it
        self.cursors = {sf: u.cursor for sf, u in subs.items()}
        for (sf, entries), counts in zip(zip(["", *subs], found, strict=True), prior, strict=True):
            sf = _s(sf)
            for (entry_id, _), k in zip(entries, counts, strict=True):
                batch.deliveries[_s(entry_id)] = int(k)
            self._decode(batch, self.shard, [(eid, _fields(flat)) for eid, flat in entries], sf)
        _sort(batch)
        return batch

    async def wait_for_entries(self, block_ms: int) -> None:
        """Block until the base stream or a sub-lane this owner knows has an entry after its
        cursor (or time's up; a storefront new to the lane is seen at the next take)."""
        streams = {self.stream: self.cursor}
        for sf, cursor in self.cursors.items():
            streams[self.keys.sublane(self.shard, sf)] = cursor
        await self.redis.xread(streams, 1, block_ms)

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
        subs = sorted({it.sublane for it in items if it.sublane} | self._known)
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
                and it.sublane == sf
                and sf
            ):
                # Its idem key is named for this lane, so it is ours whatever the order id says
                # (no shard_of_order_id per order): admit.lua wrote it beside the entry, in its
                # storefront's sub-lane.
                plain_keys.append(idem(shard, sf, sfo))
                plain_args.append(f"{it.entry_id}{SEP}{it.order_id}{SEP}{sf}{SEP}{sfo}")
            else:
                self._detail(it, lane, other_keys, other_args)
        local = self.keys.at(shard)  # on a cluster, the lane's own counts and notifications
        keys = [
            lane,
            local.drain(),
            self.stream,
            self.keys.deadletters(shard),
            local.notify(),
            self.keys.deliveries(shard),
            local.storefront_buffered(),
            local.storefront_settled(),
            *(self.keys.sublane(shard, sf) for sf in subs),
            *plain_keys,
            *other_keys,
        ]
        args = [
            "" if self._last is None else self._last,
            ttl_s,
            self.epoch,
            _now_us(),
            "" if rate is None else f"{rate:.3f}",
            owner,
            local.webhook(""),
            idempotency_ttl_s,
            deadletter_retention_s,
            self.keys.drain_changes(),
            taken_at_us or _now_us(),
            len(plain_args),
            at,
            len(subs),
            *subs,
            *plain_args,
            *other_args,
        ]
        watermark, settled = await self._fenced(self.scripts.settle(keys=keys, args=args))
        return int(watermark), int(settled)

    def _detail(self, it: Settlement, lane: str, keys: list[str], args: list[Any]) -> None:
        """An exception in full: its status and idem keys (the lane's key where the entry names
        no order of this lane: a record there is not ours to write) and 14 arguments."""
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
                it.sublane,
            )
        )

    async def _fenced(self, call: Any) -> Any:
        try:
            return await call
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise LaneFenced(f"lane {self.shard}: {exc}") from None
            raise

    def _decode(self, batch: Batch, shard: int, entries: list[Any], sublane: str) -> None:
        for entry_id, fields in entries:
            try:
                batch.messages.append(decode_entry(shard, entry_id, fields, sublane))
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
                        sublane,
                    )
                )


async def outstanding(redis: Any, keys: Keys, shards: list[int]) -> int:
    """Entries in these lanes' streams, base and sub-lanes (taken or not): 0 once all is
    settled."""
    return sum((await stream_lengths(redis, keys, shards)).values())


async def stream_lengths(redis: Any, keys: Keys, shards: list[int]) -> dict[int, int]:
    """Per lane: the entries of its base stream and of every sub-lane its hash names."""
    pipe = redis.pipeline(transaction=False)
    for shard in shards:
        pipe.hgetall(keys.lane(shard))
    replies = await pipe.execute()
    subs = {shard: list(sublanes_of(raw)) for shard, raw in zip(shards, replies, strict=True)}
    pipe = redis.pipeline(transaction=False)
    for shard in shards:
        pipe.xlen(keys.stream(shard))
        for sf in subs[shard]:
            pipe.xlen(keys.sublane(shard, sf))
    lengths = iter(await pipe.execute())
    return {shard: sum(int(next(lengths)) for _ in range(1 + len(subs[shard]))) for shard in shards}


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

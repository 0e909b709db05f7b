"""Lanes: each shard's stream is a lane, drained in admission order by one owner at a time.

The lane hash (``Keys.lane``) holds the lane's counters, written by the scripts that admit and
settle, its cursor (``c``: the newest entry its owners have taken, ``taken.lua``), and its fence:
``epoch`` goes up each time a worker takes the lane, and ``taken.lua``, ``claim.lua`` and
``settle.lua`` refuse a caller whose epoch is not the current one. The owner
also holds the lane's Postgres advisory lock on the connection it commits on (workers.lanelock),
so a deposed owner can neither commit behind its successor nor settle after it.

Which worker owns a lane comes from the membership (``Keys.members``): every worker process
renews its entry every ``BEAT_S``; an entry not renewed for ``LEASE_S`` has lapsed, and the
lanes are dealt over the live ones (sharding.lanes).
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from ordergate.buffer.errors import DeploymentMismatch
from ordergate.buffer.keys import Keys
from ordergate.buffer.scripts import scripts_for

LEASE_S = 2.0  # a worker silent this long has left: its lanes go to the others
BEAT_S = 0.5  # how often a worker renews its membership


class SubLane(msgspec.Struct, frozen=True):
    """One storefront's part of a lane, as the lane hash says (fields ``<name>:<storefront>``)."""

    admitted: int = 0  # n: its orders admitted into the lane so far (numbers 1..n)
    settled: int = 0  # s: of those, settled
    taken: int = 0  # t: the number of the newest its owners have taken
    watermark: int = 0  # w: every one of its orders numbered <= w is settled
    cursor: str = ""  # c: the entry id of the newest taken ('' none yet)
    weight: int = 1  # not in the hash: its storefront's weight, where known

    @property
    def backlog(self) -> int:
        return max(0, self.admitted - self.settled)

    @property
    def in_flight(self) -> int:
        return max(0, min(self.admitted, self.taken) - self.settled)


_SUB_FIELDS = {b"n": "admitted", b"s": "settled", b"t": "taken", b"w": "watermark", b"c": "cursor"}


def sublanes_of(raw: dict[bytes, bytes]) -> dict[str, SubLane]:
    """The sub-lanes of a lane hash: its ``n:<sf>``, ``s:<sf>``, ``t:<sf>``, ``w:<sf>`` and
    ``c:<sf>`` fields."""
    found: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        head, colon, sf = name.partition(b":")
        attr = _SUB_FIELDS.get(head)
        if colon and attr and sf:
            found.setdefault(sf.decode(), {})[attr] = (
                value.decode() if attr == "cursor" else int(value or 0)
            )
    return {sf: SubLane(**fields) for sf, fields in found.items()}


class LaneState(msgspec.Struct, frozen=True):
    """One lane as its hash says."""

    shard: int
    admitted: int = 0  # n: orders admitted into the lane so far (its lane numbers 1..n)
    settled: int = 0  # s: of those, settled (committed, rejected or dead-lettered)
    last: int = 0  # the queue number of the lane's newest order
    watermark: int = 0  # w: every order of the lane numbered <= w is settled
    taken: int = 0  # d: the highest queue number its owners have taken
    taken_lane: int = 0  # dl: that order's lane number
    settled_at_us: int = 0  # when the lane last settled something
    epoch: int = 0
    owner: str = ""
    state: str | None = None  # draining | stalled | stopped | paused; None: never drained
    reason: str = ""
    heard_at_us: int = 0  # the owner's last report
    rate: float | None = None  # orders per second the lane drains while busy
    cap: float | None = None  # the drain's total rate limit in force, as the owner applies it
    subs: dict[str, SubLane] = {}  # its storefronts' sub-lanes

    @property
    def depth(self) -> int:
        return max(0, self.admitted - self.settled)

    @property
    def in_flight(self) -> int:
        """Orders taken into batches and not yet settled: each sub-lane is drained in order,
        and so is the base stream (whose entries carry the lane's own numbers)."""
        subs = sum(u.in_flight for u in self.subs.values())
        base_admitted = self.admitted - sum(u.admitted for u in self.subs.values())
        base_settled = self.settled - sum(u.settled for u in self.subs.values())
        return subs + max(0, min(base_admitted, self.taken_lane) - base_settled)

    def processing(self, seq: int, storefront: str = "", lane_seq: int = 0) -> bool:
        """Whether the order (``seq``; ``lane_seq`` in its storefront's sub-lane) waiting in
        this lane was taken into a batch: no per-order write says so, the sub-lane's ``t``
        does (the lane's ``d`` for an order of the base stream)."""
        sub = self.subs.get(storefront) if storefront else None
        if sub is not None and lane_seq:
            return lane_seq <= sub.taken
        return seq <= self.taken


def lane_of(shard: int, raw: dict[bytes, bytes]) -> LaneState:
    def num(name: bytes) -> int:
        return int(raw.get(name, 0) or 0)

    def opt(name: bytes) -> float | None:
        value = raw.get(name)
        return float(value) if value else None

    return LaneState(
        shard=shard,
        admitted=num(b"n"),
        settled=num(b"s"),
        last=num(b"last"),
        watermark=num(b"w"),
        taken=num(b"d"),
        taken_lane=num(b"dl"),
        settled_at_us=num(b"wat"),
        epoch=num(b"epoch"),
        owner=raw.get(b"owner", b"").decode(),
        state=raw[b"state"].decode() if b"state" in raw else None,
        reason=raw.get(b"reason", b"").decode(),
        heard_at_us=num(b"at"),
        rate=opt(b"rate"),
        cap=opt(b"cap"),
        subs=sublanes_of(raw),
    )


async def claim_lane(redis: Any, keys: Keys, shard: int, owner: str) -> int:
    """Make ``owner`` the lane's owner under a new epoch, and return it. Call only while
    holding the lane's Postgres lock: that is what makes the epoch one owner's alone."""
    return int(await scripts_for(redis).own(keys=[keys.lane(shard)], args=[owner]))


async def report(redis: Any, keys: Keys, shard: int, fields: dict[str, Any]) -> None:
    """The owner's report of its lane: state, reason, rate, cap (a heartbeat). A field whose
    value is None is left as it is, except ``cap``, which is removed."""
    fields = {**fields, "at": time.time_ns() // 1000}
    drop_cap = "cap" in fields and fields["cap"] is None
    pairs: list[Any] = []
    for name, value in fields.items():
        if value is not None:
            pairs.extend((name, value))
    await scripts_for(redis).report(
        keys=[keys.lane(shard)], args=[keys.drain_changes(), "1" if drop_cap else "0", *pairs]
    )


class Membership:
    """One worker process's entry among the drain's workers."""

    def __init__(self, redis: Any, keys: Keys, name: str) -> None:
        self.redis = redis
        self.keys = keys
        self.name = name
        self._scripts = scripts_for(redis)

    async def beat(self) -> list[str]:
        """Renew this worker's entry, drop lapsed ones; returns the live workers."""
        members = await self._scripts.member(
            keys=[self.keys.members()],
            args=[self.name, int(time.time() * 1000), int(LEASE_S * 1000)],
        )
        return [m.decode() if isinstance(m, bytes) else m for m in members]

    async def leave(self) -> None:
        await self.redis.zrem(self.keys.members(), self.name)


async def adopt_pre_lane_counts(redis: Any, keys: Keys, shards: int) -> None:
    """A buffer left by a version before lanes kept one watermark (``og:drain`` ``w``) and no
    settled count. Once it is empty, every order up to ``w`` is settled: carry that into the
    settled count and every lane's watermark, so positions and depths start right. With orders
    still in it, refuse: they were admitted without lane numbers (README: Upgrading)."""
    raw = await redis.hmget(keys.drain(), "s", "w")
    if raw[0] is not None or raw[1] is None:
        return
    pipe = redis.pipeline(transaction=False)
    for shard in range(shards):
        pipe.xlen(keys.stream(shard))
    left = sum(int(n) for n in await pipe.execute())
    if left:
        raise DeploymentMismatch(
            f"Redis holds {left} orders admitted by an ordergate before lanes (key prefix"
            f" {keys.prefix!r}); let that version's workers drain them first, then upgrade"
        )
    watermark = int(raw[1])
    pipe = redis.pipeline(transaction=True)
    pipe.hsetnx(keys.drain(), "s", watermark)
    for shard in range(shards):
        pipe.hsetnx(keys.lane(shard), "w", watermark)
        pipe.hsetnx(keys.lane(shard), "last", watermark)
    await pipe.execute()

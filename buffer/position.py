"""Depth and position: where an order stands in the one queue, from Redis alone, in O(1).

Every admitted order gets a queue number (``seq``, one counter over all shards). The drain takes
the queue strictly in that order (``take.lua``) and ``settle.lua`` keeps a watermark ``w``:
every order numbered ``<= w`` is settled. So for an order numbered ``n`` that is not settled,

    position = n - 1 - w

is exactly the number of orders admitted before it that are not yet committed; none of them
commits after it, and no order admitted after it commits before it. It never increases: ``n``
is fixed and ``w`` only grows. The ETA divides by the drain rate the leader measures.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec

from ordergate.buffer.keys import Keys


class DrainState(msgspec.Struct, frozen=True):
    """What ``og:drain`` and the admission counter say, read in one round trip."""

    issued: int = 0  # the last queue number handed out
    settled: int = 0  # w: every queue number <= it is settled
    dispatched: int = 0  # d: every queue number <= it has been taken by the drain
    settled_at_us: int = 0  # when w last moved
    rate: float | None = None  # orders per second the drain achieves while busy
    state: str | None = None  # draining | stalled | stopped | paused; None: never started
    reason: str = ""
    heard_at_us: int = 0  # the leader's last heartbeat
    leader: str = ""
    cap: float | None = None  # the drain's rate limit in force (drain_rate or the operators')

    @property
    def depth(self) -> int:
        """Orders admitted and not yet settled, over all shards."""
        return max(0, self.issued - self.settled)


async def read_drain_state(redis: Any, keys: Keys) -> DrainState:
    pipe = redis.pipeline(transaction=False)
    pipe.get(keys.seq())
    pipe.hgetall(keys.drain())
    issued, raw = await pipe.execute()
    rate, cap = raw.get(b"rate"), raw.get(b"cap")
    return DrainState(
        issued=int(issued or 0),
        settled=int(raw.get(b"w", 0)),
        dispatched=int(raw.get(b"d", 0)),
        settled_at_us=int(raw.get(b"wat", 0)),
        rate=float(rate) if rate else None,
        state=raw[b"state"].decode() if b"state" in raw else None,
        reason=raw.get(b"reason", b"").decode(),
        heard_at_us=int(raw.get(b"at", 0)),
        leader=raw.get(b"leader", b"").decode(),
        cap=float(cap) if cap else None,
    )


def seconds_until_room(drain: DrainState | None, bound: int) -> int:
    """Retry-After for a full buffer: time for the drain to free a hundredth of the bound (at
    least the excess), at the measured rate; 5 s when no rate is known. Between 1 and 60 s."""
    if drain is None or not drain.rate:
        return 5
    room = max(drain.depth - bound + 1, bound // 100, 1)
    return max(1, min(60, math.ceil(room / drain.rate)))


class Place(msgspec.Struct, frozen=True):
    """An unsettled order's place in the queue."""

    status: str  # queued | processing
    position: int
    eta_seconds: int | None
    eta_reason: str | None


def place_in_line(seq: int, drain: DrainState, stale_s: float, now: float | None = None) -> Place:
    """Position, status and ETA of the order numbered ``seq`` (not yet settled)."""
    position = max(0, seq - 1 - drain.settled)
    status = "processing" if seq <= drain.dispatched else "queued"
    eta, reason = _eta(position, drain, stale_s, time.time() if now is None else now)
    return Place(status, position, eta, reason)


def _eta(
    position: int, drain: DrainState, stale_s: float, now: float
) -> tuple[int | None, str | None]:
    if drain.state is None:
        return None, "no worker has started draining yet"
    silent = now - drain.heard_at_us / 1e6
    if drain.state == "stopped":
        return None, "the drain is stopped: no worker is running"
    if silent > stale_s:
        return None, f"the drain is stopped: no worker has reported for {int(silent)} s"
    if drain.state == "stalled":
        return None, f"the drain is stalled: {drain.reason or 'waiting for Postgres'}"
    if drain.state == "paused":
        return None, "the drain is paused by an operator"
    if not drain.rate:
        return None, "the drain rate is not measured yet"
    # Itself included: an order leaves the queue when the orders ahead of it *and* it are written.
    return max(0, math.ceil((position + 1) / drain.rate - 0.5)), None

"""The operators' overview: what the buffer, the drain and the notifier are doing, from Redis.

``ordergate status`` prints it and the gateway serves it as JSON (``GET /v1/ops/status``). Both
read the same keys, so they cannot disagree: the drain state the leader publishes, the streams'
lengths, the notifier's breakers and lanes (refreshed every second by the leading notifier).
"""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from buffer.keys import Keys
from buffer.notifications import NotificationStreams
from buffer.position import read_drain_state


class Breaker(msgspec.Struct, frozen=True):
    """One destination's circuit breaker and its deliveries, as its notifier last reported."""

    name: str
    state: str  # closed | half_open | open
    failure_rate: float
    slow_rate: float
    open_for_s: float
    inflight: int
    deferred: int
    delivered: int
    failed: int
    last_error: str


class Drain(msgspec.Struct, frozen=True):
    state: str | None  # draining | stalled | stopped | paused; None = never started
    reason: str
    leader: str
    rate_per_s: float | None
    heard_s_ago: float | None


class Notifications(msgspec.Struct, frozen=True):
    leader: str | None  # the notifier delivering now (None: no worker runs one)
    waiting: int  # queued by settle, not yet delivered nor deferred
    deferred: int  # in destinations' deferred streams
    dead: int  # gave up after notify_give_up_s


class Overview(msgspec.Struct, frozen=True):
    at: float
    buffered: int  # admitted, not yet settled
    issued: int  # queue numbers handed out
    settled: int  # watermark
    dead_letters: int  # orders in the dead-letter streams
    drain: Drain
    notifications: Notifications
    breakers: list[Breaker]


async def read_overview(redis: Any, keys: Keys, shards: int) -> Overview:
    now = time.time()
    drain = await read_drain_state(redis, keys)
    pipe = redis.pipeline(transaction=False)
    for shard in range(shards):
        pipe.xlen(keys.deadletters(shard))
    pipe.get(keys.notify_state())
    *dlq, raw_state = await pipe.execute()
    waiting, deferred, dead = await NotificationStreams(redis, keys, shards).counts()
    state: dict[str, Any] = json.loads(raw_state) if raw_state else {}
    breakers = [
        Breaker(
            name=f"webhook:{sf}",
            state=lane["breaker"],
            failure_rate=lane["failure_rate"],
            slow_rate=lane["slow_rate"],
            open_for_s=lane["open_for_s"],
            inflight=lane["inflight"],
            deferred=lane["deferred"],
            delivered=lane["delivered"],
            failed=lane["failed"],
            last_error=lane["last_error"],
        )
        for sf, lane in state.get("lanes", {}).items()
    ]
    return Overview(
        at=now,
        buffered=drain.depth,
        issued=drain.issued,
        settled=drain.settled,
        dead_letters=sum(int(n) for n in dlq),
        drain=Drain(
            state=drain.state,
            reason=drain.reason,
            leader=drain.leader,
            rate_per_s=drain.rate,
            heard_s_ago=round(now - drain.heard_at_us / 1e6, 2) if drain.heard_at_us else None,
        ),
        notifications=Notifications(state.get("leader"), waiting, deferred, dead),
        breakers=breakers,
    )

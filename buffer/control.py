"""The operators' drain controls: pause, resume and a rate limit, changed without a restart.

They live in one Redis hash (``og:drain:control``) that the leading drainer re-reads about twice a
second, so a change takes effect on whichever worker leads, now or after a failover:

- ``paused``: "1" while paused (absent or "0" otherwise);
- ``rate``: the operators' limit in orders per second, a float string (absent: no limit of theirs,
  ``drain_rate`` alone applies; otherwise the lower of the two does);
- ``by``: who changed them last (``cli:<user>@<host>``, ``dashboard@<address>``);
- ``at``: when, in unix microseconds.

Every change is also announced on ``og:drain:control:changed``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import msgspec

from ordergate.buffer.keys import Keys


class DrainControl(msgspec.Struct, frozen=True):
    """What the operators asked of the drain."""

    paused: bool = False
    rate: float | None = None  # orders per second; None: no operator limit
    by: str = ""
    at_us: int = 0

    def cap(self, configured: float) -> float:
        """The effective rate limit: the lower of ``configured`` and ours; 0 = unlimited."""
        limits = [r for r in (configured, self.rate or 0.0) if r > 0]
        return min(limits) if limits else 0.0


def changes(keys: Keys) -> str:
    """Pub/sub channel announcing a change of the controls."""
    return f"{keys.drain_control()}:changed"


def from_hash(raw: dict[bytes, bytes]) -> DrainControl:
    """The controls from the hash's fields (HGETALL)."""
    rate = float(raw.get(b"rate") or 0)
    return DrainControl(
        paused=raw.get(b"paused") == b"1",
        rate=rate if rate > 0 else None,
        by=raw.get(b"by", b"").decode(),
        at_us=int(raw.get(b"at") or 0),
    )


async def read_control(redis: Any, keys: Keys) -> DrainControl:
    return from_hash(await redis.hgetall(keys.drain_control()))


def check_rate(rate: float) -> None:
    """ValueError unless ``rate`` is a finite number of orders per second, 0 or more."""
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ValueError("the rate must be a number")
    if not math.isfinite(rate) or rate < 0:
        raise ValueError("the rate must be a finite number >= 0 (0 removes the limit)")


async def set_control(
    redis: Any,
    keys: Keys,
    *,
    paused: bool | None = None,
    rate: float | None = None,
    by: str,
) -> DrainControl:
    """Change the controls (None leaves one as it is; rate 0 removes the operators' limit) and
    return all of them as they now stand."""
    if rate is not None:
        check_rate(rate)
    key = keys.drain_control()
    fields: dict[str, Any] = {"by": by, "at": time.time_ns() // 1000}
    if paused is not None:
        fields["paused"] = "1" if paused else "0"
    if rate:
        fields["rate"] = str(float(rate))
    pipe = redis.pipeline(transaction=True)
    pipe.hset(key, mapping=fields)
    if rate == 0:
        pipe.hdel(key, "rate")
    pipe.hgetall(key)
    *_, raw = await pipe.execute()
    # After the transaction, not in it: a cluster's pipeline takes no PUBLISH (no key, no slot).
    await redis.publish(changes(keys), "1")
    return from_hash(raw)

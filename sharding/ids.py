"""Ids handed out to clients carry their shard, so any gateway finds the shard without a lookup.

An order id reads ``ord_<shard>_<26 chars>``: the suffix is a ULID-like value (48-bit millisecond
time + 80 random bits, Crockford base32), so ids sort by admission time within a shard.
"""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_PREFIX = "ord_"


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_order_id(shard: int, now_ms: int | None = None) -> str:
    """A fresh, unguessable, time-sortable order id for ``shard``."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    return f"{_PREFIX}{shard}_{_b32(value, 26)}"


def shard_of_order_id(order_id: str, shards: int) -> int | None:
    """The shard encoded in ``order_id``, or None if it is not an id this system handed out."""
    if not order_id.startswith(_PREFIX) or len(order_id) > 40:
        return None
    shard_str, sep, rest = order_id[len(_PREFIX) :].partition("_")
    if not sep or not shard_str.isdigit() or len(rest) != 26:
        return None
    if any(c not in _CROCKFORD for c in rest):
        return None
    shard = int(shard_str)
    return shard if shard < shards else None

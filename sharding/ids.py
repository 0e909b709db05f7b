"""Ids handed out to clients carry their shard, so any gateway finds the shard without a lookup.

An order id reads ``ord_<shard>_<26 chars>``: the suffix is a ULID-like value (48-bit millisecond
time + 80 random bits, Crockford base32), so ids sort by admission time within a shard.
"""

from __future__ import annotations

import base64
import os
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_PREFIX = "ord_"


# RFC 4648 base32hex has Crockford's order (digits, then letters); only the letters differ.
_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUV", _CROCKFORD[10:].encode())


def _b32_128(value: int) -> str:
    """A 128-bit value as 26 Crockford digits, most significant first. 26 digits are 130 bits:
    shifted left by 6 into 17 bytes, the value's digits are the first 26 of its base32hex
    encoding (C speed; a Python loop over the digits was 7 % of a POST's CPU)."""
    return (
        base64.b32hexencode((value << 6).to_bytes(17, "big"))[:26].translate(_TO_CROCKFORD).decode()
    )


def new_order_id(shard: int, now_ms: int | None = None) -> str:
    """A fresh, unguessable, time-sortable order id for ``shard``."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    return f"{_PREFIX}{shard}_{_b32_128(value)}"


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

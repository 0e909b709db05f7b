"""Ids handed out to clients carry their shard, so any gateway finds the shard without a lookup.

An order id reads ``ord_<shard>_<26 chars>``, Crockford base32: 10 chars of the admission's
millisecond time (Redis's clock), 11 of its queue number, 5 random. ``admit.lua`` mints it, and
the order's stream entry has the id ``<ms>-<queue number>``: from the order id alone, a gateway
finds the entry of an order in flight (``entry_id_of``), with no record per order. Ids sort by
admission within a shard.
"""

from __future__ import annotations

import os
import time

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
_PREFIX = "ord_"


MS_CHARS, SEQ_CHARS, NONCE_CHARS = 10, 11, 5


def _digits(value: int, width: int) -> str:
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(width)))


def _number(text: str) -> int:
    value = 0
    for c in text:
        value = value * 32 + _CROCKFORD.index(c)
    return value


def new_nonce() -> str:
    """The random tail of an order id, chosen by the gateway (25 bits)."""
    return _digits(int.from_bytes(os.urandom(4), "big"), NONCE_CHARS)


def order_id_of(shard: int, ms: int, seq: int, nonce: str) -> str:
    """The order id ``admit.lua`` mints from the same digits (for tests and tools)."""
    return f"{_PREFIX}{shard}_{_digits(ms, MS_CHARS)}{_digits(seq, SEQ_CHARS)}{nonce}"


def new_order_id(shard: int, now_ms: int | None = None, seq: int = 0) -> str:
    """An order id of the minted shape (tests and tools; the gateway lets ``admit.lua`` mint)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return order_id_of(shard, ms, seq, new_nonce())


def entry_id_of(order_id: str) -> str:
    """The stream entry id of the order, ``<ms>-<queue number>``, read from its id."""
    tail = order_id.rpartition("_")[2]
    ms = _number(tail[:MS_CHARS])
    seq = _number(tail[MS_CHARS : MS_CHARS + SEQ_CHARS])
    return f"{ms}-{seq}"


def seq_of_order_id(order_id: str) -> int:
    """The queue number an order id was minted with."""
    tail = order_id.rpartition("_")[2]
    return _number(tail[MS_CHARS : MS_CHARS + SEQ_CHARS])


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

"""The idempotency record: what a replayed receipt needs, in as few bytes as Redis can keep.

One per admitted order, under ``Keys.idem`` (a hash of the storefront's ids, so its size does not
grow with theirs), written by ``admit.lua`` and expiring ``idempotency_ttl_s`` after the order
settles (``settle.lua``). It is a string of 52 bytes (``lua/_idem.lua`` reads and writes it):

=========  ======  ====================================================================
bytes      format  meaning
=========  ======  ====================================================================
1-8        raw     the first 8 bytes of the body's fingerprint (a different body: 409)
9-34       text    the order id after ``ord_<shard>_`` (the key's shard gives the rest)
35-41      uint    accepted_at, microseconds since the epoch
42-46      uint    orders ahead of it at admission
47-52      uint    its number inside its lane
=========  ======  ====================================================================

then tagged extras of 9 bytes (a tag byte, a big-endian uint64): ``p`` the lease (unix ms) of
an admission not yet confirmed durable, ``q`` the queue number of a re-queued order, ``n`` when
its settlement was notified (us). The queue number is otherwise the one the order id carries.
Measured with its key and expiry: 144 B per order in Valkey 8 (README Performance).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ordergate.sharding.ids import seq_of_order_id

_FIXED = struct.Struct(">8s26s7s5s6s")
FIXED_LEN = _FIXED.size  # 52
FINGERPRINT_BYTES = 8


@dataclass(frozen=True, slots=True)
class IdemRecord:
    fingerprint: bytes
    order_id: str
    accepted_at_us: int
    ahead: int
    lane_seq: int
    seq: int
    lease_until_ms: int | None = None
    notified_at_us: int | None = None


def decode_record(shard: int, raw: bytes) -> IdemRecord:
    """Read a record (raises ValueError on anything else)."""
    if len(raw) < FIXED_LEN or (len(raw) - FIXED_LEN) % 9:
        raise ValueError(f"not an idempotency record ({len(raw)} bytes)")
    fp, tail, at, ahead, ls = _FIXED.unpack_from(raw)
    tags: dict[bytes, int] = {}
    for i in range(FIXED_LEN, len(raw), 9):
        tags[raw[i : i + 1]] = int.from_bytes(raw[i + 1 : i + 9], "big")
    order_id = f"ord_{shard}_{tail.decode()}"
    return IdemRecord(
        fingerprint=fp,
        order_id=order_id,
        accepted_at_us=int.from_bytes(at, "big"),
        ahead=int.from_bytes(ahead, "big"),
        lane_seq=int.from_bytes(ls, "big"),
        seq=tags.get(b"q") or seq_of_order_id(order_id),
        lease_until_ms=tags.get(b"p"),
        notified_at_us=tags.get(b"n"),
    )

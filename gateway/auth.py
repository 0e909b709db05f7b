"""API keys: one per storefront (or several), stored hashed in Redis so auth never needs Postgres.

A key is ``og_`` + 43 url-safe chars (256 random bits); only its SHA-256 is stored, in the hash
``og:apikeys`` (sha256 -> storefront id). Gateways cache lookups for ``auth_cache_s`` seconds, so a
revoked key stops working within that time. An Authorization value that does not have a key's
shape is refused before any cache or Redis lookup, so the cache holds only key-sized entries
(at most ``CACHE_ENTRIES``, about 2 MB), whatever clients send.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from typing import Any

from redis.exceptions import WatchError

from ordergate.buffer.errors import BufferUnavailable
from ordergate.buffer.keys import STOREFRONT_ID, Keys
from ordergate.gateway.errors import AmbiguousRequest, Unauthorized

BEARER = re.compile(r"Bearer og_[A-Za-z0-9_-]{43}")  # 'Bearer ' and a key, nothing else
CACHE_ENTRIES = 10_000


def authorization_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The request's one Authorization value; AmbiguousRequest (400) when it has several
    (which one would count differs between proxies, and did between the gateway's routes)."""
    found = [v for k, v in headers if k == b"authorization"]
    if len(found) > 1:
        raise AmbiguousRequest("send one Authorization header, not several")
    return found[0].decode("latin-1") if found else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(redis: Any, keys: Keys, storefront_id: str, shards: int = 0) -> str:
    """Make a new key for ``storefront_id``; the key itself is returned once and never stored.
    On a cluster (``shards``: the deployment's) every lane's copy of the set of storefronts
    with a key learns it too."""
    if not STOREFRONT_ID.fullmatch(storefront_id):
        raise ValueError("storefront id: 1-64 chars of letters, digits, '_', '.', '-'")
    key = "og_" + secrets.token_urlsafe(32)
    pipe = redis.pipeline(transaction=True)  # keys of no shard: one slot on a cluster too
    pipe.hset(keys.api_keys(), hash_key(key), storefront_id)
    pipe.sadd(keys.storefront_known(), storefront_id)
    await pipe.execute()
    if keys.cluster:
        await _copy_known(redis, keys, shards, {storefront_id.encode()}, replace=False)
    return key


async def sync_known(redis: Any, keys: Keys, shards: int = 0) -> None:
    """Make the set of storefronts with a key match the keys (after a revoke; at a gateway's
    start, for keys made before the set existed), and on a cluster every lane's copy of it."""
    async with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                await pipe.watch(keys.api_keys())
                ids = set(await pipe.hvals(keys.api_keys()))
                pipe.multi()
                pipe.delete(keys.storefront_known())
                if ids:
                    pipe.sadd(keys.storefront_known(), *ids)
                await pipe.execute()
                break
            except WatchError:
                continue
    if keys.cluster:
        await _copy_known(redis, keys, shards, ids, replace=True)


async def _copy_known(redis: Any, keys: Keys, shards: int, ids: set[bytes], replace: bool) -> None:
    pipe = redis.pipeline(transaction=False)
    for scope in keys.every_lane(shards):
        if replace:
            pipe.delete(scope.storefront_known())
        if ids:
            pipe.sadd(scope.storefront_known(), *ids)
    await pipe.execute()


async def list_keys(redis: Any, keys: Keys) -> list[tuple[str, str]]:
    """(key hash prefix, storefront id) of every key."""
    raw = await redis.hgetall(keys.api_keys())
    return sorted((h.decode()[:12], s.decode()) for h, s in raw.items())


async def revoke_key(redis: Any, keys: Keys, key_or_hash_prefix: str, shards: int = 0) -> int:
    """Remove a key, given the key or the start of its hash; returns how many were removed."""
    raw = await redis.hkeys(keys.api_keys())
    full = hash_key(key_or_hash_prefix)
    victims = [
        h
        for h in raw
        if h.decode() == full
        or (len(key_or_hash_prefix) >= 8 and h.decode().startswith(key_or_hash_prefix))
    ]
    if not victims:
        return 0
    removed = int(await redis.hdel(keys.api_keys(), *victims))
    await sync_known(redis, keys, shards)
    return removed


class Authenticator:
    """Resolves a bearer token to its storefront, with a short in-process cache."""

    def __init__(self, redis: Any, keys: Keys, cache_s: float = 5.0) -> None:
        self._redis = redis
        self._hash_key = keys.api_keys()
        # Keyed by the Authorization header itself: a hit needs no hashing.
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._lookups: dict[str, asyncio.Future[str | None]] = {}
        self._cache_s = cache_s
        self.lookups = 0  # API keys looked up in Redis so far

    def cached(self, authorization: str | None) -> str | None:
        """The storefront when the key is in the cache and valid, else None (look it up). The
        hot path: no hashing, no await, no timeout to arm."""
        hit = self._cache.get(authorization) if authorization else None
        if hit is not None and hit[1] >= time.monotonic():
            return hit[0]
        return None

    async def storefront(self, authorization: str | None) -> str:
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized(
                "send 'Authorization: Bearer <api key>'", headers={"WWW-Authenticate": "Bearer"}
            )
        if not BEARER.fullmatch(authorization):
            raise Unauthorized(
                "the API key is not valid (a key is og_ and 43 url-safe characters)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        now = time.monotonic()
        hit = self._cache.get(authorization)
        if hit is not None and hit[1] >= now:
            storefront = hit[0]
        elif authorization in self._lookups:  # single flight: a burst of one key does one lookup
            storefront = await asyncio.shield(self._lookups[authorization])
        else:
            storefront = await self._lookup(authorization, now)
        if storefront is None:
            raise Unauthorized("the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        return storefront

    @property
    def lookups_in_flight(self) -> int:
        """API keys being looked up in Redis now (each shared by every request that waits)."""
        return len(self._lookups)

    async def _lookup(self, authorization: str, now: float) -> str | None:
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._lookups[authorization] = future
        self.lookups += 1
        try:
            raw = await self._redis.hget(self._hash_key, hash_key(authorization[7:].strip()))
            storefront = raw.decode() if raw else None
            if len(self._cache) >= CACHE_ENTRIES:
                self._cache.clear()
            self._cache[authorization] = (storefront, now + (self._cache_s if storefront else 1.0))
            future.set_result(storefront)
            return storefront
        except asyncio.CancelledError:
            # The request leading the lookup gave up (its deadline passed); the requests sharing
            # it were not cancelled: they get what the leader answers, a 503.
            future.set_exception(BufferUnavailable("Redis did not answer the API key lookup"))
            future.exception()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._lookups[authorization]

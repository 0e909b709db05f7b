"""Storefronts' webhook registrations: where their order events go and the secret that signs them.

The registration lives in Redis because ``settle.lua`` checks it (one ``EXISTS``) when it decides
whether a settled order gets an event. The secret is kept in the clear -- the notifier must sign
with it -- and shown to the operator once, when it is made.
"""

from __future__ import annotations

import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec

from ordergate.buffer.errors import InvalidWebhook
from ordergate.buffer.keys import Keys


class Webhook(msgspec.Struct, frozen=True):
    storefront_id: str
    url: str
    secret: str
    created_at: float


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidWebhook(f"webhook URL must be absolute http(s), got {url!r}")
    return url


async def set_webhook(redis: Any, keys: Keys, storefront_id: str, url: str) -> Webhook:
    """Register (or re-point) the storefront's webhook with a new signing secret."""
    hook = Webhook(storefront_id, check_url(url), "whsec_" + secrets.token_urlsafe(32), time.time())
    pipe = redis.pipeline(transaction=True)
    pipe.hset(
        keys.webhook(storefront_id),
        mapping={"url": hook.url, "secret": hook.secret, "created_at": hook.created_at},
    )
    pipe.sadd(keys.webhooks(), storefront_id)
    await pipe.execute()
    return hook


async def remove_webhook(redis: Any, keys: Keys, storefront_id: str) -> bool:
    """Stop queueing events for the storefront; events already queued are still delivered."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(keys.webhook(storefront_id))
    pipe.srem(keys.webhooks(), storefront_id)
    deleted, _ = await pipe.execute()
    return bool(deleted)


async def get_webhook(redis: Any, keys: Keys, storefront_id: str) -> Webhook | None:
    raw = await redis.hgetall(keys.webhook(storefront_id))
    if not raw or b"url" not in raw:
        return None
    return Webhook(
        storefront_id,
        raw[b"url"].decode(),
        raw[b"secret"].decode(),
        float(raw.get(b"created_at", 0)),
    )


async def list_webhooks(redis: Any, keys: Keys) -> list[Webhook]:
    out = []
    for member in sorted(await redis.smembers(keys.webhooks())):
        hook = await get_webhook(redis, keys, member.decode())
        if hook:
            out.append(hook)
    return out

"""Storefronts' webhook registrations: where their order events go and the secret that signs them.

The registration lives in Redis because ``settle.lua`` checks it (one ``EXISTS``) when it decides
whether a settled order gets an event. The secret is kept in the clear -- the notifier must sign
with it -- and shown to the operator once, when it is made.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import msgspec

from ordergate.buffer.errors import InvalidWebhook
from ordergate.buffer.keys import STOREFRONT_ID, Keys


class Webhook(msgspec.Struct, frozen=True):
    storefront_id: str
    url: str
    secret: str
    created_at: float


def check_url(url: str, allow_private: bool = False) -> str:
    """The URL, if it is one a webhook may have: absolute https (http too with
    ``allow_private``), a host name, no control characters or spaces (an injected header), no
    fragment. Where it points is checked by ``vet_host``."""
    if any(ord(c) < 33 or 127 <= ord(c) < 160 for c in url) or len(url) > 2048:
        raise InvalidWebhook("webhook URL has control characters or spaces, or is over 2048 chars")
    parts = urlsplit(url)
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes or not parts.hostname or parts.fragment:
        raise InvalidWebhook(
            f"webhook URL must be absolute {' or '.join(schemes)}, with a host and no fragment,"
            f" got {redacted(url)!r}"
        )
    try:
        parts.port  # noqa: B018 - raises for a bad port
    except ValueError:
        raise InvalidWebhook(f"webhook URL has a bad port: {redacted(url)!r}") from None
    return url


def redacted(url: str) -> str:
    """The URL as it may be shown or logged: no credentials, no query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = ("***@" if "@" in parts.netloc else "") + host + (f":{port}" if port else "")
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?***" if parts.query else "")


def public_address(ip: str) -> bool:
    """Whether a webhook may reach this address: a global unicast one, not loopback, link-local
    (the cloud metadata service), private, shared, multicast, reserved or unspecified."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def vet_host(host: str, port: int, allow_private: bool = False) -> list[str]:
    """The addresses ``host`` resolves to, all of them public (else InvalidWebhook): checked
    when a webhook is registered and again at every connection, since a name can be pointed
    elsewhere after it was checked (DNS rebinding)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise InvalidWebhook(f"webhook host {host!r} does not resolve: {exc}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allow_private:
        refused = [a for a in addresses if not public_address(a)]
        if refused:
            raise InvalidWebhook(
                f"webhook host {host!r} resolves to {', '.join(refused)}, which is not a public"
                " address (webhook_allow_private permits it, for tests and private networks)"
            )
    return addresses


async def set_webhook(
    redis: Any,
    keys: Keys,
    storefront_id: str,
    url: str,
    allow_private: bool = False,
    shards: int = 0,
) -> Webhook:
    """Register (or re-point) the storefront's webhook with a new signing secret (on a
    cluster, ``shards``: the deployment's, for the mark each lane's settle.lua looks for)."""
    if not STOREFRONT_ID.fullmatch(storefront_id):
        raise InvalidWebhook("storefront id: 1-64 chars of letters, digits, '_', '.', '-'")
    check_url(url, allow_private)
    if not allow_private:  # a private network's names may resolve only inside it
        parts = urlsplit(url)
        await vet_host(parts.hostname or "", parts.port or 443)
    hook = Webhook(storefront_id, url, "whsec_" + secrets.token_urlsafe(32), time.time())
    pipe = redis.pipeline(transaction=True)
    pipe.hset(
        keys.webhook(storefront_id),
        mapping={"url": hook.url, "secret": hook.secret, "created_at": hook.created_at},
    )
    pipe.sadd(keys.webhooks(), storefront_id)
    await pipe.execute()
    if keys.cluster:  # settle.lua sees its lane's slot only: a mark in every lane
        pipe = redis.pipeline(transaction=False)
        for scope in keys.every_lane(shards):
            pipe.hset(scope.webhook(storefront_id), "on", "1")
        await pipe.execute()
    return hook


async def remove_webhook(redis: Any, keys: Keys, storefront_id: str, shards: int = 0) -> bool:
    """Stop queueing events for the storefront; events already queued are still delivered."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(keys.webhook(storefront_id))
    pipe.srem(keys.webhooks(), storefront_id)
    deleted, _ = await pipe.execute()
    if keys.cluster:
        await redis.delete(*(scope.webhook(storefront_id) for scope in keys.every_lane(shards)))
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

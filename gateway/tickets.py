"""Queue tickets: the customer's credential for ``/v1/queue/{ticket}`` and ``/wait/{ticket}``.

A ticket is ``<order id>.<queue number>.<ahead>.<accepted at, ms>.<lane number>.<storefront>
.<mac>`` (one line), the numbers in hex, the storefront id with its dots as ``~`` (it names the
order's sub-lane: buffer.fairness), the mac the first 128 bits of HMAC-SHA256 under a deployment
secret. Tickets from before sub-lanes (no storefront) or lanes (no lane number) still verify.
It needs no storage and no lookup to verify, so a poll costs no Redis round trip for the
ticket itself; nobody can guess one (128 bits) or forge one for another order. The secret is
``ticket_secret`` if configured, otherwise one made by the first gateway and kept in Redis for
every other.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
from typing import Any, NamedTuple

from ordergate.buffer.keys import Keys


class Ticket(NamedTuple):
    order_id: str
    seq: int
    ahead: int
    accepted_at_ms: int
    lane_seq: int = 0  # the order's number in its sub-lane (0: a ticket from before lanes)
    storefront: str = ""  # its storefront ('': a ticket from before sub-lanes)


class Tickets:
    """Issues and verifies tickets for one deployment."""

    def __init__(self, redis: Any, keys: Keys, configured: str | None) -> None:
        self._redis = redis
        self._keys = keys
        self._secret: bytes | None = configured.encode() if configured else None
        self._loading: asyncio.Lock = asyncio.Lock()

    async def secret(self) -> bytes:
        if self._secret is None:
            async with self._loading:
                if self._secret is None:
                    key = self._keys.ticket_secret()
                    await self._redis.set(key, secrets.token_urlsafe(32), nx=True)
                    self._secret = bytes(await self._redis.get(key))
        return self._secret

    async def issue(
        self,
        order_id: str,
        seq: int,
        ahead: int,
        accepted_at_us: int,
        lane_seq: int,
        storefront: str = "",
    ) -> str:
        payload = f"{order_id}.{seq:x}.{ahead:x}.{accepted_at_us // 1000:x}.{lane_seq:x}"
        if storefront:
            payload += "." + storefront.replace(".", "~")
        return f"{payload}.{_mac(await self.secret(), payload)}"

    async def read(self, ticket: str) -> Ticket | None:
        """The ticket's contents, or None if it is not one of ours."""
        payload, _, mac = ticket.rpartition(".")
        parts = payload.split(".")
        if len(parts) not in (4, 5, 6) or len(mac) != 22 or len(ticket) > 200:
            return None
        if not ticket.isascii():  # compare_digest takes only ASCII text; no ticket of ours isn't
            return None
        if not hmac.compare_digest(mac, _mac(await self.secret(), payload)):
            return None
        try:
            numbers = [int(p, 16) for p in parts[1:5]]
            storefront = parts[5].replace("~", ".") if len(parts) == 6 else ""
            lane_seq = numbers[3] if len(numbers) > 3 else 0
            return Ticket(parts[0], numbers[0], numbers[1], numbers[2], lane_seq, storefront)
        except ValueError:
            return None


def _mac(secret: bytes, payload: str) -> str:
    digest = hmac.new(secret, payload.encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

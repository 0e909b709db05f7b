"""Webhook deliveries connect to public addresses only, checked at each connection.

A webhook's host was checked when it was registered (buffer.webhooks.vet_host), but a name can
be pointed elsewhere afterwards (DNS rebinding: public at registration, 127.0.0.1 or the cloud
metadata service at delivery). So the notifier's HTTP client resolves the host itself when it
opens a connection, refuses if any address is not public, and connects to the address it
checked (TLS still verifies the certificate for the name).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

from ordergate.buffer.errors import InvalidWebhook
from ordergate.buffer.webhooks import vet_host


class PublicOnly(httpcore.AsyncNetworkBackend):
    """A network backend that opens TCP connections to public addresses only."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await vet_host(host, port)
        except InvalidWebhook as exc:
            raise httpcore.ConnectError(str(exc)) from None
        return await self._inner.connect_tcp(
            addresses[0], port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are delivered over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def public_only(transport: httpx.AsyncHTTPTransport) -> httpx.AsyncHTTPTransport:
    """``transport``, its connections checked by PublicOnly. httpx does not take a network
    backend, so its connection pool's is wrapped (httpcore's ``_network_backend``; the test
    suite delivers to 127.0.0.1 with this on and checks the refusal)."""
    pool: Any = transport._pool
    pool._network_backend = PublicOnly(pool._network_backend)
    return transport

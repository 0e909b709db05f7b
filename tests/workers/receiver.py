"""A real webhook receiver for the notification tests: an HTTP server on a free port whose
behaviour the test switches (answer at once, answer slowly, answer 500)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ordergate.servers import free_port
from ordergate.workers.signing import HEADER, verify


@dataclass
class Call:
    at: float
    status: int
    event: dict[str, Any]
    signature_ok: bool
    event_id_header: str


@dataclass
class Receiver:
    """What the storefront's endpoint does (``delay`` s, then ``status``) and what it saw."""

    url: str = ""
    secret: str = ""
    delay: float = 0.0
    status: int = 200
    calls: list[Call] = field(default_factory=list)  # answered
    received: int = 0  # requests that arrived (answered or not yet)

    def delivered(self) -> dict[str, dict[str, Any]]:
        """Events answered with 2xx, deduplicated by event_id (as a receiver should)."""
        return {c.event["event_id"]: c.event for c in self.calls if 200 <= c.status < 300}

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.received += 1
        if self.delay:
            await asyncio.sleep(self.delay)  # the injected slowness, not synchronisation
        status = self.status
        self.calls.append(
            Call(
                time.monotonic(),
                status,
                json.loads(body),
                verify(self.secret, request.headers.get(HEADER, ""), body),
                request.headers.get("ordergate-event-id", ""),
            )
        )
        return Response(status_code=status)


@contextlib.asynccontextmanager
async def receiving() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = Starlette(routes=[Route("/hooks/orders", receiver.handle, methods=["POST"])])
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "webhook receiver did not start"
        await asyncio.sleep(0.01)
    receiver.url = f"http://127.0.0.1:{port}/hooks/orders"
    try:
        yield receiver
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)

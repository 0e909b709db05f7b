"""GET /healthz (this process is alive) and GET /readyz (Redis answers: orders can be taken).

Postgres is reported but does not decide readiness: the gateway takes orders into the buffer
while Postgres is down, which is the point of the buffer."""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ordergate.gateway.state import GatewayState

_encoder = msgspec.json.Encoder()


async def healthz(request: Request) -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


async def readyz(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(1.0):
            await state.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["redis"] = f"unreachable: {type(exc).__name__}"
    try:
        if state.pg is None:
            raise ConnectionError("no pool yet")
        async with asyncio.timeout(1.0):
            await state.pg.fetchval("SELECT 1")
        postgres = "ok"
    except Exception as exc:  # noqa: BLE001
        postgres = f"unreachable: {type(exc).__name__}"
    ready = checks["redis"] == "ok"
    return Response(
        _encoder.encode({"ready": ready, "checks": checks, "info": {"postgres": postgres}}),
        status_code=200 if ready else 503,
        media_type="application/json",
    )

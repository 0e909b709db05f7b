"""GET /healthz (this process is alive) and GET /readyz (Redis and Postgres answer)."""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from gateway.state import GatewayState

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
        checks["postgres"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["postgres"] = f"unreachable: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return Response(
        _encoder.encode({"ready": ready, "checks": checks}),
        status_code=200 if ready else 503,
        media_type="application/json",
    )

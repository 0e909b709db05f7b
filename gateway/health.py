"""GET /healthz (this process is alive) and GET /readyz (Redis answers: orders can be taken).

Postgres is reported but does not decide readiness: the gateway takes orders into the buffer
while Postgres is down, which is the point of the buffer. With several databases each is
reported (by its place and lanes, never its URL), and ``postgres`` names those that are down:
while one is, only its lanes' committed statuses wait (503 with Retry-After)."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ordergate.gateway.state import GatewayState
from ordergate.sharding.databases import shards_on

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
    answers = await asyncio.gather(*(_ask(pool) for pool in state.pg))
    databases = [
        {
            "database": i,
            "shards": shards_on(i, len(answers), state.config.shards),
            "status": answer,
        }
        for i, answer in enumerate(answers)
    ]
    down = [(i, answer) for i, answer in enumerate(answers) if answer != "ok"]
    if len(answers) == 1 or not down:
        postgres = answers[0] if answers else "not configured"
    else:
        postgres = "; ".join(f"{state.describe(i)} {answer}" for i, answer in down)
    ready = checks["redis"] == "ok"
    info = {"postgres": postgres, "databases": databases}
    return Response(
        _encoder.encode({"ready": ready, "checks": checks, "info": info}),
        status_code=200 if ready else 503,
        media_type="application/json",
    )


async def _ask(pool: Any) -> str:
    """One database's answer: "ok", or why not."""
    try:
        if pool is None:
            raise ConnectionError("no pool yet")
        async with asyncio.timeout(1.0):
            await pool.fetchval("SELECT 1")
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"unreachable: {type(exc).__name__}"

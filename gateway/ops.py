"""GET /v1/ops/status: the operators' overview as JSON (what ``ordergate status`` prints).

When ``admin_token`` is set the endpoint wants ``Authorization: Bearer <admin_token>``; without one
it is open, like a metrics endpoint, and belongs on an internal network."""

from __future__ import annotations

import hmac

import msgspec
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from buffer.overview import read_overview
from gateway.errors import ServiceUnavailable, Unauthorized
from gateway.state import GatewayState

_encoder = msgspec.json.Encoder()


def require_admin(request: Request) -> GatewayState:
    """The gateway's state, once the request carries the admin token (when one is set)."""
    state: GatewayState = request.app.state.gateway
    token = state.settings.admin_token
    if token is not None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise Unauthorized("this endpoint needs Authorization: Bearer <admin_token>")
    return state


async def status(request: Request) -> Response:
    state = require_admin(request)
    try:
        overview = await read_overview(state.redis, state.keys, state.settings.shards)
    except (RedisError, OSError) as exc:
        detail = f"Redis unavailable: {exc}"
        raise ServiceUnavailable(detail, headers={"Retry-After": "1"}) from None
    return Response(
        _encoder.encode(overview),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )

"""The operators' endpoints: ``GET /v1/ops/status`` (what ``ordergate status`` prints) and
``POST /v1/ops/drain`` (what ``ordergate drain`` does: pause, resume, rate limit).

They want ``Authorization: Bearer <admin_token>``; a gateway without ``admin_token`` serves
them not at all (404), so they are never open by accident (``ordergate up`` makes a token and
says where it keeps it). ``POST /v1/ops/drain`` takes ``application/json`` only (a plain form or
``text/plain`` is what another site's page can send unasked), refuses a foreign ``Origin``, and
reads at most ``MAX_COMMAND_BYTES`` of its body."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from ordergate.buffer.control import check_rate, set_control
from ordergate.buffer.overview import read_overview
from ordergate.gateway.errors import (
    Forbidden,
    InvalidDrainCommand,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from ordergate.gateway.state import GatewayState

_encoder = msgspec.json.Encoder()
_HEADERS = {"Cache-Control": "no-store"}
MAX_COMMAND_BYTES = 4096


def require_admin(request: Request) -> GatewayState:
    """The gateway's state, once the request carries the admin token; NotFound without one
    configured (the operators' endpoints are off)."""
    state: GatewayState = request.app.state.gateway
    token = state.config.admin_token
    if token is None:
        raise NotFound("the operators' endpoints are off: this gateway has no admin_token")
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized(
            "this endpoint needs Authorization: Bearer <admin_token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return state


def require_admin_if_set(request: Request) -> GatewayState:
    """For /metrics: behind the admin token when one is set, open otherwise (a Prometheus
    scrape config sends a bearer token where there is one; the figures name no secret)."""
    state: GatewayState = request.app.state.gateway
    return require_admin(request) if state.config.admin_token is not None else state


def _redis_down(exc: Exception) -> ServiceUnavailable:
    return ServiceUnavailable(f"Redis unavailable: {exc}", headers={"Retry-After": "1"})


async def status(request: Request) -> Response:
    state = require_admin(request)
    s = state.config
    try:
        overview = await read_overview(state.redis, state.keys, s.shards, s.drain_stale_s)
    except (RedisError, OSError) as exc:
        raise _redis_down(exc) from None
    return Response(_encoder.encode(overview), media_type="application/json", headers=_HEADERS)


async def drain(request: Request) -> Response:
    """POST /v1/ops/drain: pause, resume or limit the drain; answers the controls now in force."""
    state = require_admin(request)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaType("send the drain command as 'Content-Type: application/json'")
    _same_origin(request)
    paused, rate = _command(await _capped_body(request))
    # Who acted, from what authenticated it: the admin token (not a forwarded-for header).
    who = "dashboard (admin token)" if request.headers.get("origin") else "admin token"
    try:
        control = await set_control(state.redis, state.keys, paused=paused, rate=rate, by=who)
    except (RedisError, OSError) as exc:
        raise _redis_down(exc) from None
    return Response(_encoder.encode(control), media_type="application/json", headers=_HEADERS)


def _same_origin(request: Request) -> None:
    """A browser names the page's origin; a command from another site's page is refused (the
    token already stops it: this is the second lock, for a token kept in the browser)."""
    origin = request.headers.get("origin")
    if origin is None:
        return  # not a browser (curl, the CLI, a script)
    host = request.headers.get("host", "")
    public = request.app.state.gateway.config.public_url
    allowed = {f"{request.url.scheme}://{host}"}
    if public:
        allowed.add(public.rstrip("/"))
    if origin not in allowed:
        raise Forbidden(f"a drain command from {origin!r} is not from this gateway's pages")


async def _capped_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it passes MAX_COMMAND_BYTES: never read whole."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_COMMAND_BYTES:
        raise PayloadTooLarge(f"a drain command is at most {MAX_COMMAND_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_COMMAND_BYTES:
            raise PayloadTooLarge(f"a drain command is at most {MAX_COMMAND_BYTES} bytes")
    return bytes(body)


def _command(body: bytes) -> tuple[bool | None, float | None]:
    """(paused, rate) for set_control, or InvalidDrainCommand naming every bad field."""
    if len(body) > MAX_COMMAND_BYTES:
        raise _invalid([("", f"the body is larger than {MAX_COMMAND_BYTES} bytes")])
    try:
        doc: Any = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise _invalid([("", "the body is not valid JSON")]) from None
    if not isinstance(doc, dict):
        raise _invalid([("", "expected an object")])
    errors = [(f"/{_escape(k)}", "unknown field") for k in doc if k not in ("action", "rate")]
    action, rate = doc.get("action"), doc.get("rate")
    if action is None:
        errors.append(("/action", "required field is missing"))
    elif action not in ("pause", "resume", "rate"):
        errors.append(("/action", "expected one of 'pause', 'resume', 'rate'"))
    if action == "rate":
        if rate is None:
            errors.append(("/rate", "required with action 'rate' (0 removes the limit)"))
        else:
            try:
                check_rate(rate)
            except ValueError as exc:
                errors.append(("/rate", str(exc)))
    elif rate is not None and action in ("pause", "resume"):
        errors.append(("/rate", "only with action 'rate'"))
    if errors:
        raise _invalid(errors)
    if action == "rate":
        return None, float(rate or 0)
    return action == "pause", None


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")  # RFC 6901


def _invalid(errors: list[tuple[str, str]]) -> InvalidDrainCommand:
    listed = [{"pointer": f"#{pointer}", "detail": detail} for pointer, detail in errors]
    detail = "; ".join(f"{e['pointer']}: {e['detail']}" for e in listed)
    return InvalidDrainCommand(detail, errors=listed)

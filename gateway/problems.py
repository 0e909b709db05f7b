"""RFC 9457 problem details: one place turns every error into ``application/problem+json``."""

from __future__ import annotations

import logging
import math
import re
import secrets
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ordergate.buffer.errors import BufferUnavailable
from ordergate.gateway.errors import PROBLEM_TYPES, NotFound, Problem, ServiceUnavailable

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/problem+json"
_encoder = msgspec.json.Encoder()


def problem_response(problem: Problem, instance: str | None = None) -> Response:
    body: dict[str, Any] = {
        "type": f"/problems/{problem.type}",
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    if instance:
        body["instance"] = instance
    body.update(problem.extra)
    return Response(
        _encoder.encode(body),
        status_code=problem.status,
        media_type=MEDIA_TYPE,
        headers=problem.headers,
    )


async def on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem_response(exc, request.url.path)


async def on_buffer_unavailable(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BufferUnavailable)
    retry = str(max(1, math.ceil(exc.retry_after)))
    return problem_response(
        ServiceUnavailable(
            f"{exc} -- no receipt was given; retry with the same storefront_order_id"
            " (a retry never creates a second order)",
            headers={"Retry-After": retry},
        ),
        request.url.path,
    )


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return problem_response(NotFound(f"no route for {request.url.path}"), request.url.path)
    problem = Problem(exc.detail or "error", headers=dict(exc.headers or {}))
    problem.status, problem.type, problem.title = exc.status_code, "http-error", str(exc.detail)
    return problem_response(problem, request.url.path)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id(request: Request) -> str:
    """The caller's ``X-Request-Id`` when it is a plain token, else a fresh one."""
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(8)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    """A 500 names its request id, in the answer and in the one log line with the traceback,
    so a support ticket leads to the log line."""
    rid = request_id(request)
    log.error(
        "unhandled error on %s %s (request %s)",
        request.method,
        request.url.path,
        rid,
        exc_info=exc,
        extra={"request_id": rid},
    )
    return problem_response(
        Problem(
            f"an unexpected error occurred; it has been logged as request {rid}",
            headers={"X-Request-Id": rid},
            request_id=rid,
        ),
        request.url.path,
    )


EXCEPTION_HANDLERS: dict[Any, Any] = {
    Problem: on_problem,
    BufferUnavailable: on_buffer_unavailable,
    HTTPException: on_http_exception,
    Exception: on_unexpected,
}


async def describe(request: Request) -> Response:
    """GET /problems/{type}: what a problem type means (its ``type`` URI resolves here)."""
    cls = PROBLEM_TYPES.get(request.path_params["name"])
    if cls is None:
        raise NotFound("unknown problem type")
    text = f"{cls.title} (HTTP {cls.status})\n\n{(cls.__doc__ or '').strip()}\n"
    return PlainTextResponse(text)

"""The API's contract: OpenAPI 3.1, built from the very msgspec types the gateway decodes and
encodes, so it cannot drift from them; served at ``GET /openapi.json``, and kept in the repo as
``docs/openapi.json`` (a test checks the two match; ``python tools/openapi.py`` rewrites it).

It describes what storefronts and their customers call. The operators' endpoints are left out
on purpose: they are not a public contract, and they are off without an admin token.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from ordergate.buffer.order import Order
from ordergate.gateway.currencies import ISO_4217
from ordergate.gateway.errors import PROBLEM_TYPES
from ordergate.gateway.orders import OrderStatus, Receipt
from ordergate.gateway.queue import QueueStatus

PROBLEM = "application/problem+json"


class Problem(msgspec.Struct):
    """RFC 9457 problem details, as every error is answered."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[dict[str, str]] | None = None  # invalid-order: {pointer, detail}
    order_id: str | None = None  # order-id-reused, order-in-flight


def _problem(*types: str) -> dict[str, Any]:
    listed = ", ".join(f"`/problems/{t}`" for t in types)
    return {
        "description": f"{PROBLEM_TYPES[types[0]].title if len(types) == 1 else listed}",
        "content": {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


# On every answer of admission to a storefront with a rate limit (gateway.limits).
RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": {
        "description": "the storefront's order rate limit, '\"storefront\";q=<burst>;w=<s>'"
        " (draft-ietf-httpapi-ratelimit-headers); absent when it has none",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": "'\"storefront\";r=<orders left now>;t=<s until the quota is whole>'",
        "schema": {"type": "string"},
    },
}


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _key() -> list[dict[str, list[str]]]:
    return [{"apiKey": []}]


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once)."""
    _, schemas = msgspec.json.schema_components(
        [Order, Receipt, OrderStatus, QueueStatus, Problem],
        ref_template="#/components/schemas/{name}",
    )
    # What the types' patterns cannot say: the currency is an ISO 4217 code (checked after
    # decoding), and the total is the items' sum, which no schema can state.
    order = schemas["Order"]["properties"]
    order["currency"] = {"type": "string", "enum": sorted(ISO_4217)}
    order["total_minor"]["description"] = (
        "must equal the sum of quantity * unit_price_minor over the items (else 422)"
    )
    unavailable = _problem("buffer-unavailable")
    ticket = {
        "name": "ticket",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "maxLength": 200},
        "description": "the ticket of a receipt",
    }
    paths: dict[str, Any] = {
        "/v1/orders": {
            "post": {
                "operationId": "createOrder",
                "summary": "Admit an order; answers with a durable receipt in milliseconds.",
                "security": _key(),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Order"}}
                    },
                },
                "responses": {
                    "202": _json("Receipt", "admitted: the receipt"),
                    "200": _json("Receipt", "a resubmission of the same order: the first receipt"),
                    "400": _problem("ambiguous-request"),
                    "401": _problem("unauthorized"),
                    "409": _problem("order-in-flight"),
                    "413": _problem("payload-too-large"),
                    "415": _problem("unsupported-media-type"),
                    "422": _problem("invalid-order", "malformed-json", "order-id-reused"),
                    "429": _problem("rate-limited", "storefront-share-full", "buffer-full"),
                    "503": unavailable,
                },
            }
        },
        "/v1/orders/{order_id}": {
            "get": {
                "operationId": "getOrder",
                "summary": "An order's status and timeline (the storefront's own orders only).",
                "security": _key(),
                "parameters": [
                    {
                        "name": "order_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "maxLength": 64},
                    }
                ],
                "responses": {
                    "200": _json("OrderStatus", "the order"),
                    "400": _problem("ambiguous-request"),
                    "401": _problem("unauthorized"),
                    "404": _problem("not-found"),
                    "503": _problem("buffer-unavailable", "order-store-unavailable"),
                },
            }
        },
        "/v1/queue/{ticket}": {
            "get": {
                "operationId": "getQueuePosition",
                "summary": "The customer's place in the queue; no API key, the ticket is the "
                "credential. Answers 304 to a matching If-None-Match.",
                "parameters": [ticket],
                "responses": {
                    "200": _json("QueueStatus", "the place in the queue"),
                    "304": {"description": "unchanged since the ETag given"},
                    "404": _problem("ticket-not-found"),
                    "503": _problem("buffer-unavailable", "order-store-unavailable"),
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is alive.",
                "responses": {"200": {"description": "alive"}},
            }
        },
    }
    limited = paths["/v1/orders"]["post"]["responses"]
    for code in ("202", "200", "429"):
        limited[code] = {**limited[code], "headers": RATE_LIMIT_HEADERS}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ordergate",
            "version": "1",
            "description": "Peak-load order ingestion: a durable receipt in milliseconds, the "
            "order buffered and written to PostgreSQL at a rate it can bear, and the customer's "
            "place in the queue. Every error is RFC 9457 problem+json.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a storefront's API key: og_ and 43 url-safe characters",
                }
            },
        },
    }


@functools.cache
def encoded() -> bytes:
    """The document as ``docs/openapi.json`` holds it."""
    return msgspec.json.format(msgspec.json.encode(document()), indent=2) + b"\n"


async def openapi(request: Request) -> Response:
    """GET /openapi.json."""
    return Response(encoded(), media_type="application/json")

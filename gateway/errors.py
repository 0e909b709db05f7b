"""Every error the gateway answers with, as a type; ``problems`` turns them into RFC 9457 bodies."""

from __future__ import annotations

from typing import Any

from ordergate.errors import OrdergateError


class Problem(OrdergateError):
    """Base class: an error with an HTTP status and a problem type (RFC 9457)."""

    status = 500
    type = "internal-error"
    title = "Internal error"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra


class InvalidOrder(Problem):
    """The body is not a valid order; ``errors`` names each bad field by JSON pointer."""

    status, type, title = 422, "invalid-order", "The order is invalid"


class InvalidDrainCommand(Problem):
    """The body is not a drain command: ``{"action": "pause" | "resume" | "rate", "rate": N}``,
    where N (orders per second, 0 = no limit) comes with action rate only. ``errors`` names each
    bad field by JSON pointer."""

    status, type, title = 400, "invalid-drain-command", "The drain command is invalid"


class MalformedJson(Problem):
    status, type, title = 422, "malformed-json", "The body is not valid JSON"


class OrderIdReused(Problem):
    """Same storefront_order_id, different body (IETF Idempotency-Key draft: 422)."""

    status, type, title = (
        422,
        "order-id-reused",
        "storefront_order_id already used for another order",
    )


class OrderInFlight(Problem):
    """The same order is being admitted right now by another request."""

    status, type, title = 409, "order-in-flight", "The same order is still being admitted"


class AmbiguousRequest(Problem):
    """A header that must appear once came more than once: the parts of a system (a proxy, the
    gateway's two routes) could each read another one."""

    status, type, title = 400, "ambiguous-request", "A header that must appear once is repeated"


class Unauthorized(Problem):
    status, type, title = 401, "unauthorized", "Missing or invalid API key"


class Forbidden(Problem):
    status, type, title = 403, "forbidden", "Not allowed from here"


class NotFound(Problem):
    status, type, title = 404, "not-found", "Not found"


class PayloadTooLarge(Problem):
    status, type, title = 413, "payload-too-large", "The body is too large"


class UnsupportedMediaType(Problem):
    status, type, title = 415, "unsupported-media-type", "The body must be application/json"


class ServiceUnavailable(Problem):
    """The buffer could not confirm the order durably: nothing was accepted, retry later."""

    status, type, title = 503, "buffer-unavailable", "The order buffer is unavailable"


class OrderStoreUnavailable(Problem):
    """A settled order's status lives in Postgres, which this gateway cannot reach now."""

    status, type, title = 503, "order-store-unavailable", "The order store is unavailable"


class BufferFull(Problem):
    """The buffer holds ``max_buffered`` orders that are not yet committed: nothing was accepted.
    Retry after ``Retry-After`` seconds (computed from the drain rate) with the same
    storefront_order_id."""

    status, type, title = 429, "buffer-full", "The order buffer is full"


class RateLimited(Problem):
    """The storefront sent more orders than its rate limit allows (``RateLimit-Policy``):
    nothing was accepted. Retry after ``Retry-After`` seconds with the same
    storefront_order_id."""

    status, type, title = 429, "rate-limited", "The storefront's order rate limit is reached"


class ShareExhausted(Problem):
    """The buffer is near its bound and this storefront holds its share of it: nothing was
    accepted, while storefronts holding less still are. Retry after ``Retry-After`` seconds
    with the same storefront_order_id."""

    status, type = 429, "storefront-share-full"
    title = "The storefront's share of the buffer is full"


class TooManyStreams(Problem):
    """More event streams than a ticket (or the gateway process) may hold open; poll instead."""

    status, type, title = 429, "too-many-streams", "Too many event streams are open"


class TicketNotFound(Problem):
    """The queue ticket is not one this deployment issued, or it expired (``ticket_ttl_s`` after
    its order was settled). The storefront's order status endpoint still knows the order."""

    status, type, title = 404, "ticket-not-found", "Unknown or expired queue ticket"


PROBLEM_TYPES: dict[str, type[Problem]] = {
    cls.type: cls
    for cls in (
        InvalidOrder,
        InvalidDrainCommand,
        MalformedJson,
        OrderIdReused,
        OrderInFlight,
        Unauthorized,
        AmbiguousRequest,
        Forbidden,
        NotFound,
        TicketNotFound,
        TooManyStreams,
        BufferFull,
        RateLimited,
        ShareExhausted,
        PayloadTooLarge,
        UnsupportedMediaType,
        ServiceUnavailable,
        OrderStoreUnavailable,
    )
}

"""The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers) of a storefront's
order rate limit, on every answer of ``POST /v1/orders`` that went through admission.

``RateLimit-Policy: "storefront";q=<burst>;w=<seconds to refill it>`` names the policy, and
``RateLimit: "storefront";r=<orders left now>;t=<seconds until the quota is whole again>`` (on
a 429, until the next order is allowed) its state.
"""

from __future__ import annotations

from ordergate.buffer.admission import RateLimit

POLICY = '"storefront"'


def seconds(ms: int) -> int:
    return max(0, -(-ms // 1000))


def header_fields(limit: RateLimit) -> dict[str, str]:
    return {
        "RateLimit-Policy": f"{POLICY};q={limit.quota};w={limit.window_s}",
        "RateLimit": f"{POLICY};r={max(0, limit.remaining)};t={seconds(limit.reset_ms)}",
    }

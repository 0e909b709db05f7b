"""Webhook signatures: ``Ordergate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The MAC covers ``"<t>." + body`` with the storefront's secret, so a receiver can check both that
the body is ours and that it is fresh (a replayed old request fails the tolerance check). The
scheme is Stripe's; ``verify`` is what a receiver in Python runs (the README shows it).
"""

from __future__ import annotations

import hashlib
import hmac
import time

HEADER = "Ordergate-Signature"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header's value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance_s: int = 300, now: float | None = None
) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and is at most ``tolerance_s`` old."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).partition("v1=")[2]
    return any(hmac.compare_digest(expected, v) for v in parts.get("v1", []))

"""Waiting between retries: jittered exponential backoff, and sleeps that a stop cuts short."""

from __future__ import annotations

import asyncio
import random


def backoff(attempt: int, cap: float, base: float = 0.05) -> float:
    """Exponential backoff with full jitter. The exponent is bounded: ``2**attempt`` overflows
    a float at attempt 1024, which crashed workers after about 45 minutes of Postgres down."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 64)))


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` or until stop is set; True if stopping."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except TimeoutError:
        return False

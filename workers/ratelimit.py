"""A token bucket that caps the drain rate (orders per second)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Hands out up to ``rate`` tokens per second, with a burst of one second's worth.

    ``rate`` 0 means unlimited. ``acquire`` waits for at least one token and takes up to the
    number asked, so a batch is cut to what the rate allows instead of waiting for all of it.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._clock = time.monotonic
        self._tokens = min(rate, 1.0) if rate else 0.0
        self._last = self._clock()
        self._lock = asyncio.Lock()

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self._tokens = min(self._tokens, rate)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(max(self.rate, 1.0), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def refund(self, tokens: int) -> None:
        """Give back tokens taken for entries that were not there."""
        if self.rate and tokens > 0:
            self._tokens = min(max(self.rate, 1.0), self._tokens + tokens)

    async def acquire(self, wanted: int) -> int:
        """Take between 1 and ``wanted`` tokens, waiting for the first one."""
        if not self.rate:
            return wanted
        async with self._lock:
            self._refill()
            while self._tokens < 1:
                await asyncio.sleep((1 - self._tokens) / self.rate)
                self._refill()
            granted = min(wanted, int(self._tokens))
            self._tokens -= granted
            return granted

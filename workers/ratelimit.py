"""A token bucket that caps the drain rate (orders per second)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Hands out up to ``rate`` tokens per second, with a burst of one second's worth.

    ``rate`` 0 means unlimited. ``acquire`` takes up to the number asked, so a batch is cut to
    what the rate allows instead of waiting for all of it; but it waits for a tenth of a second's
    worth (at least one token), so a capped drain writes batches of ``rate / 10`` orders ten
    times a second, not one order per Postgres transaction.
    """

    MIN_BATCH_S = 0.1

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._clock = time.monotonic
        self._tokens = min(rate, 1.0) if rate else 0.0
        self._last = self._clock()
        self._lock = asyncio.Lock()

    def set_rate(self, rate: float) -> None:
        """Change the rate at once (operators' controls); 0 = unlimited. Tokens saved at the old
        rate are kept up to one second's worth of the new one."""
        if rate == self.rate:
            return
        if self.rate:
            self._refill()
        else:  # from unlimited: start from one token, as a new bucket does
            self._tokens, self._last = min(rate, 1.0), self._clock()
        self.rate = rate
        self._tokens = min(self._tokens, max(rate, 1.0)) if rate else 0.0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(max(self.rate, 1.0), self._tokens + (now - self._last) * self.rate)
        self._last = now

    def refund(self, tokens: int) -> None:
        """Give back tokens taken for entries that were not there."""
        if self.rate and tokens > 0:
            self._tokens = min(max(self.rate, 1.0), self._tokens + tokens)

    async def acquire(self, wanted: int, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Take between 1 and ``wanted`` tokens, waiting for a tenth of a second's worth; 0 when
        ``timeout`` seconds pass first (so a caller at a low rate can look at its controls)."""
        if not self.rate:
            return wanted
        async with self._lock:
            deadline = None if timeout is None else self._clock() + timeout
            need = max(1.0, min(float(wanted), self.rate * self.MIN_BATCH_S))
            self._refill()
            while self._tokens < need:
                wait = (need - self._tokens) / self.rate
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        return 0
                    wait = min(wait, left)
                await asyncio.sleep(wait)
                self._refill()
            granted = min(wanted, int(self._tokens))
            self._tokens -= granted
            return granted

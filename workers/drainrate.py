"""The measured drain rate, the basis of every ETA a customer sees.

Only time spent draining counts: waiting for tokens (the configured cap), taking, writing and
settling a batch. Time spent idle, with nothing to drain, does not -- otherwise a quiet minute
would make the next customer's ETA look slow.
"""

from __future__ import annotations

import time
from collections import deque


class DrainRate:
    """Orders per second over the batches of the last ``window_s`` seconds of draining."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._batches: deque[tuple[float, int, float]] = deque()  # (ended, orders, busy s)
        self._last: float | None = None

    def record(self, orders: int, busy_s: float) -> None:
        now = time.monotonic()
        self._batches.append((now, orders, max(busy_s, 1e-6)))
        while self._batches and now - self._batches[0][0] > self.window_s:
            self._batches.popleft()
        busy = sum(b for _, _, b in self._batches)
        if busy >= 0.05 or len(self._batches) >= 3:
            self._last = sum(n for _, n, _ in self._batches) / busy

    @property
    def per_second(self) -> float | None:
        """The last measured rate; kept while idle (capacity does not change when idle)."""
        return self._last

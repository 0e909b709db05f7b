"""A circuit breaker that counts slow calls, judged over a sliding window, with one half-open probe.

Why not aiobreaker (the design card's choice): as measured for its 1.2.0 it trips only on
consecutive exceptions (a slow success never counts), lets every concurrent caller through when
half-open, mixes ``utcnow()`` and ``now()`` for its open timer, and a timeout placed around it
arrives as an uncounted ``CancelledError``. This one follows Hystrix / resilience4j instead:

* every call runs under its own timeout *inside* the breaker, so a hung call is a counted
  failure, and a call slower than ``slow_call_s`` (default 0.5 s) counts as slow even if it
  succeeds;
* the breaker opens when, over the last ``window`` calls (and at least ``minimum_calls``), the
  failure rate or the slow-call rate reaches its threshold;
* after ``open_s`` it lets exactly one probe through (half-open); the others are refused at
  once. The probe closes it (fast success) or opens it again;
* time is ``time.monotonic`` (injectable), so wall-clock jumps change nothing;
* a cancellation from outside (shutdown) is not the destination's fault: not counted.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from ordergate.workers.errors import BreakerOpen

T = TypeVar("T")


class State(enum.IntEnum):
    """Numbered as the ``ordergate_breaker_state`` metric reports them."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    slow_call_s: float = 0.5
    call_timeout_s: float = 5.0
    window: int = 20
    minimum_calls: int = 5
    failure_rate: float = 0.5
    slow_rate: float = 0.5
    open_s: float = 10.0


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    name: str
    state: State
    calls: int
    failure_rate: float
    slow_rate: float
    open_for_s: float  # how much longer it stays open before the probe (0 unless open)


class CircuitBreaker:
    """One breaker per destination (a webhook host, a notification channel)."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, State, State], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._on_change = on_change
        self._state = State.CLOSED
        self._calls: deque[tuple[bool, bool]] = deque(maxlen=self.config.window)  # (failed, slow)
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> State:
        if self._state is State.OPEN and self._clock() - self._opened_at >= self.config.open_s:
            return State.HALF_OPEN
        return self._state

    def allows(self) -> bool:
        """Would a call go through now? (Without taking the probe slot.)"""
        state = self.state
        return state is State.CLOSED or (state is State.HALF_OPEN and not self._probing)

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` under the breaker; raises BreakerOpen without calling it when open."""
        probe = self._admit()
        started = self._clock()
        try:
            async with asyncio.timeout(self.config.call_timeout_s):
                result = await fn()
        except asyncio.CancelledError:
            if probe:
                self._probing = False  # not the destination's fault: let another probe try
            raise
        except BaseException:
            self._record(failed=True, slow=self._clock() - started > self.config.slow_call_s)
            raise
        self._record(failed=False, slow=self._clock() - started > self.config.slow_call_s)
        return result

    def snapshot(self) -> BreakerSnapshot:
        calls = len(self._calls)
        state = self.state
        return BreakerSnapshot(
            self.name,
            state,
            calls,
            sum(f for f, _ in self._calls) / calls if calls else 0.0,
            sum(s for _, s in self._calls) / calls if calls else 0.0,
            max(0.0, self.config.open_s - (self._clock() - self._opened_at))
            if state is State.OPEN
            else 0.0,
        )

    def _admit(self) -> bool:
        """Let a call through or raise BreakerOpen; True when the call is the half-open probe."""
        state = self.state
        if state is State.CLOSED:
            return False
        if state is State.HALF_OPEN and not self._probing:
            self._probing = True
            self._move(State.HALF_OPEN)
            return True
        wait = self.config.open_s - (self._clock() - self._opened_at)
        raise BreakerOpen(self.name, max(wait, 0.0))

    def _record(self, *, failed: bool, slow: bool) -> None:
        if self._state is State.HALF_OPEN:
            self._probing = False
            if failed or slow:
                self._open()
            else:
                self._calls.clear()
                self._move(State.CLOSED)
            return
        if self._state is State.OPEN:
            return  # a call admitted before the breaker opened: already judged
        self._calls.append((failed, slow))
        n = len(self._calls)
        if n < self.config.minimum_calls:
            return
        failures = sum(f for f, _ in self._calls) / n
        slows = sum(s for _, s in self._calls) / n
        if failures >= self.config.failure_rate or slows >= self.config.slow_rate:
            self._open()

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._calls.clear()
        self._move(State.OPEN)

    def _move(self, new: State) -> None:
        old, self._state = self._state, new
        if old is not new and self._on_change is not None:
            self._on_change(self.name, old, new)

"""The circuit breaker's rules, on a clock the test moves (no sleeps): slow calls count, a
sliding window with a minimum of calls, one half-open probe, timeouts counted, cancellations not."""

from __future__ import annotations

import asyncio

import pytest

from ordergate.workers.breaker import BreakerConfig, CircuitBreaker, State
from ordergate.workers.errors import BreakerOpen


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **kw: float) -> tuple[CircuitBreaker, list[tuple[State, State]]]:
    changes: list[tuple[State, State]] = []
    config = BreakerConfig(**{"window": 10, "minimum_calls": 4, "open_s": 5.0, **kw})  # type: ignore[arg-type]
    b = CircuitBreaker(
        "hook", config, clock=clock, on_change=lambda _, a, z: changes.append((a, z))
    )
    return b, changes


def taking(clock: Clock, seconds: float, *, fail: bool = False):  # type: ignore[no-untyped-def]
    async def call() -> str:
        clock.now += seconds  # the call "takes" this long on the breaker's clock
        if fail:
            raise ConnectionError("receiver down")
        return "ok"

    return call


async def fail_four_times(b: CircuitBreaker, clock: Clock) -> None:
    """Four failed calls: the minimum, all failures, so the breaker opens."""
    for _ in range(4):
        with pytest.raises(ConnectionError):
            await b.call(taking(clock, 0.01, fail=True))


async def test_slow_successes_open_the_breaker() -> None:
    clock = Clock()
    b, changes = breaker(clock)
    for _ in range(3):
        assert await b.call(taking(clock, 0.6)) == "ok"  # slow but successful
    assert b.state is State.CLOSED  # below the minimum number of calls
    await b.call(taking(clock, 0.6))
    assert b.state is State.OPEN and changes == [(State.CLOSED, State.OPEN)]
    with pytest.raises(BreakerOpen):
        await b.call(taking(clock, 0.01))


async def test_failure_rate_over_the_window_opens_it_and_fast_calls_keep_it_closed() -> None:
    clock = Clock()
    b, _ = breaker(clock)
    for _ in range(10):
        await b.call(taking(clock, 0.01))
    for _ in range(4):  # 4 failures in the last 10 calls: 40 % < 50 %
        with pytest.raises(ConnectionError):
            await b.call(taking(clock, 0.01, fail=True))
    assert b.state is State.CLOSED
    with pytest.raises(ConnectionError):
        await b.call(taking(clock, 0.01, fail=True))
    assert b.state is State.OPEN


async def test_half_open_lets_exactly_one_probe_through() -> None:
    clock = Clock()
    b, changes = breaker(clock)
    await fail_four_times(b, clock)
    clock.now += 5.0
    assert b.state is State.HALF_OPEN
    release = asyncio.Event()
    started = 0

    async def probe() -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "ok"

    calls = [asyncio.create_task(b.call(probe)) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert started == 1
    assert sum(isinstance(r, BreakerOpen) for r in results) == 9 and "ok" in results
    assert b.state is State.CLOSED
    assert changes[-2:] == [(State.OPEN, State.HALF_OPEN), (State.HALF_OPEN, State.CLOSED)]


async def test_a_slow_probe_opens_it_again() -> None:
    clock = Clock()
    b, _ = breaker(clock)
    for _ in range(4):
        await b.call(taking(clock, 0.7))
    clock.now += 5.0
    await b.call(taking(clock, 0.7))  # the probe succeeds, but slowly
    assert b.state is State.OPEN
    assert b.snapshot().open_for_s == pytest.approx(5.0)


async def test_a_hung_call_is_a_counted_failure_and_a_cancellation_is_not() -> None:
    b = CircuitBreaker("hook", BreakerConfig(call_timeout_s=0.05, minimum_calls=1, window=1))
    hang = asyncio.Event()
    with pytest.raises(TimeoutError):
        await b.call(hang.wait)  # the timeout lives inside the breaker
    assert b.state is State.OPEN

    b2 = CircuitBreaker("other", BreakerConfig(minimum_calls=1, window=1))
    task = asyncio.create_task(b2.call(hang.wait))
    await asyncio.sleep(0)
    task.cancel()  # e.g. shutdown: not the destination's fault
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b2.state is State.CLOSED and b2.snapshot().calls == 0


async def test_open_time_follows_the_monotonic_clock_only() -> None:
    clock = Clock()
    b, _ = breaker(clock)
    await fail_four_times(b, clock)
    clock.now += 4.9
    assert b.state is State.OPEN and b.snapshot().open_for_s == pytest.approx(0.1)
    clock.now += 0.1
    assert b.state is State.HALF_OPEN and b.allows()

"""The Redis client's quirk that ``cancel_and_wait`` exists for: a cancel lost in a command."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from ordergate.buffer.connection import cancel_and_wait


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="CPython gh-86296 is fixed in 3.12")
async def test_a_cancel_that_lands_as_a_command_is_sent_is_lost(redis: Any) -> None:
    await redis.ping()  # connected: the next command goes straight to wait_for

    async def ping_once_cancelled() -> Any:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # pending as the command goes out: wait_for inside redis-py eats it
        return await redis.ping()

    assert await asyncio.create_task(ping_once_cancelled()) is True


async def test_cancel_and_wait_ends_a_loop_that_only_cancellation_stops(redis: Any) -> None:
    await redis.ping()
    calls = 0

    async def forever() -> None:
        nonlocal calls
        while True:
            asyncio.current_task().cancel()  # type: ignore[union-attr]  # each call eats one
            await redis.ping()
            calls += 1

    task = asyncio.create_task(forever())
    await asyncio.sleep(0)  # let it start: the loop runs on its own cancels, never ending
    assert await cancel_and_wait([task], give_up_s=10)
    assert task.cancelled() and calls >= 1

"""``ordergate status``: the JSON for scripts, the screen for people, and its live refresh."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import struct
import sys
import termios
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from ordergate.buffer import history
from ordergate.buffer.consumer import LaneConsumer
from ordergate.buffer.control import set_control
from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import claim_lane
from ordergate.statusview import GRACE_S
from tests.cli.run import cli_env, ordergate, spawn
from tests.conftest import admit, eventually
from tests.faults import DelayProxy

# A watch told to stop exits within GRACE_S (0 from the graceful path, 128 + the signal from the
# watchdog); this deadline adds room for a busy machine.
EXIT_S = GRACE_S + 5
SHOW_CURSOR = b"\x1b[?25h"  # what Live writes last as it gives the terminal back


async def test_status_json_has_shard_depths_pending_rates_and_the_controls(
    settings: Any, client: Any, api_key: str, redis: Any
) -> None:
    """No worker runs: the depths add up to the orders admitted, the entries a consumer took are
    pending, the rates come from the history samples, and the controls are the operators'."""
    keys = Keys()
    await admit(client, api_key, 300)
    await history.record(redis, keys, 8)
    await admit(client, api_key, 100, prefix="p")
    await history.record(redis, keys, 8)
    epoch = await claim_lane(redis, keys, 3, "test-consumer")
    taken = await LaneConsumer(redis, keys, 8, 3, "test-consumer", epoch).take(10)
    assert len(taken) == 10
    await set_control(redis, keys, paused=True, rate=50, by="test")

    done = await ordergate(settings, "status", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    shards = doc["shards"]
    assert [s["shard"] for s in shards] == list(range(8))
    assert sum(s["depth"] for s in shards) == 400 == doc["buffered"] == doc["issued"]
    assert sum(s["pending"] for s in shards) == 10 == shards[3]["pending"]
    assert shards[3]["owner"] == "test-consumer"
    for s in shards:
        if s["depth"]:
            assert 0 <= s["oldest_age_s"] < 60
        else:
            assert s["oldest_age_s"] is None
    assert doc["ingest_rate"] > 0  # 100 orders between the two samples
    assert doc["drain_rate"] == 0.0
    assert doc["eta_tail_s"] is None
    assert doc["eta_tail_reason"] == "no worker has started draining yet"
    control = doc["control"]
    assert {k: control[k] for k in ("paused", "rate", "by")} == {
        "paused": True,
        "rate": 50.0,
        "by": "test",
    }
    assert control["at_us"] > 0
    # the fields it had before are all still there
    assert {"at", "settled", "dead_letters", "drain", "notifications", "breakers"} <= set(doc)
    assert doc["drain"]["state"] is None and doc["drain"]["cap_per_s"] is None


async def test_status_screen_and_watch(
    settings: Any, client: Any, api_key: str, redis: Any
) -> None:
    """The screen shows the lanes and a pause; --watch refreshes until Ctrl-C, then gives the
    terminal back and exits 0 within seconds."""
    await admit(client, api_key, 20)
    await set_control(redis, Keys(), paused=True, by="cli:ada@host-1")
    done = await ordergate(settings, "status")
    assert done.returncode == 0, done.stderr
    assert "lanes" in done.stdout and "PAUSED" in done.stdout and "cli:ada@host-1" in done.stdout

    proc = await _watch(settings)
    seen = b""
    try:
        seen = await _read_until(proc, b"lanes", 3)  # the screen, refreshed twice
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = await _exited(proc)
    assert proc.returncode == 0, err
    assert (seen + out).endswith(SHOW_CURSOR)


# `ordergate status --watch` that sends itself SIGINT as its third read starts, before its
# first Redis command: the moment of the hang, pinned. The signal's handler then runs while the
# watch runs towards a Redis call rather than while it waits; a watch stopped by cancelling its
# task (asyncio.run's SIGINT handler) lost that cancel in redis-py's asyncio.wait_for (Python
# 3.11) and refreshed forever. Only the moment is staged: the signal, CLI and Redis are real.
SIGINT_AS_THE_THIRD_READ_STARTS = """
import os, signal, sys
import ordergate.buffer.overview as overview
read_overview = overview.read_overview
reads = 0
async def interrupted(*args, **kwargs):
    global reads
    reads += 1
    if reads == 3:
        os.write(2, b"SIGINT sent\\n")
        os.kill(os.getpid(), signal.SIGINT)
    return await read_overview(*args, **kwargs)
overview.read_overview = interrupted
from ordergate.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def test_watch_ends_on_a_sigint_that_comes_as_a_redis_call_starts(settings: Any) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SIGINT_AS_THE_THIRD_READ_STARTS,
        *("status", "--watch", "--interval", "0.2"),
        env=cli_env(settings, TTY_COMPATIBLE="1", COLUMNS="160"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert line == b"SIGINT sent\n", line
    finally:
        out, err = await _exited(proc)
    assert proc.returncode == 0, err
    assert out.count(b"lanes") >= 2 and out.endswith(SHOW_CURSOR), out[-300:]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_watch_ends_on_a_signal_while_redis_does_not_answer(
    settings: Any, servers: Any, signum: int
) -> None:
    """Redis stalled (a proxy that forwards nothing): the watch's first read waits for replies
    that do not come (up to the 5 s socket timeout). SIGINT, or SIGTERM, ends the watch anyway:
    terminal given back, exit 0, within seconds."""
    url = urlsplit(servers.redis_url)
    proxy = await DelayProxy(url.hostname or "127.0.0.1", url.port or 6379).start()
    proxy.hold()
    try:
        proc = await _watch(settings.replace(redis_url=proxy.url(servers.redis_url)))
        seen = b""
        try:
            seen = await _read_until(proc, b"reading ...")  # up, its first read stalled
        finally:
            proc.send_signal(signum)
            out, err = await _exited(proc)
    finally:
        proxy.release()
        await proxy.close()
    assert proc.returncode == 0, err
    assert b"shards" not in seen + out  # no read got through
    assert (seen + out).endswith(SHOW_CURSOR)


async def test_watch_ends_on_sigint_while_its_output_is_blocked(settings: Any) -> None:
    """Its stdout a pipe nobody reads, filled to the brim: every write of the watch blocks,
    giving the terminal back included. SIGINT still ends it, forced after GRACE_S (exit status
    128 + SIGINT), where it used to wait for a reader forever."""
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "ordergate", "status", "--watch", "--interval", "0.2"),
            env=cli_env(settings, TTY_COMPATIBLE="1", COLUMNS="160"),
            stdout=w,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await eventually(lambda: _unread(r) > 0, timeout=60)  # up: Live has drawn
            _fill(w)
        finally:
            signalled = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, err = await _exited(proc)
    finally:
        os.close(r)
        os.close(w)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert time.monotonic() - signalled >= GRACE_S  # the watchdog's doing, not a write's


async def _watch(settings: Any) -> Any:
    return await spawn(
        settings, "status", "--watch", "--interval", "0.2", TTY_COMPATIBLE="1", COLUMNS="160"
    )


async def _read_until(proc: Any, needle: bytes, count: int = 1) -> bytes:
    """Read ``proc``'s stdout until ``needle`` was written ``count`` times (60 s at most)."""
    seen = b""
    deadline = time.monotonic() + 60
    while seen.count(needle) < count:
        chunk = await asyncio.wait_for(proc.stdout.read(4096), deadline - time.monotonic())
        assert chunk, (seen.decode(errors="replace"), await proc.stderr.read())
        seen += chunk
    return seen


async def _exited(proc: Any, within: float = EXIT_S) -> tuple[bytes, bytes]:
    """The rest of ``proc``'s output once it has exited, which it must do within ``within`` s."""
    try:
        return await asyncio.wait_for(proc.communicate(), within)  # type: ignore[no-any-return]
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"still running {within} s after it was told to stop") from None


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe whose read end is ``fd``."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])


def _fill(w: int) -> None:
    """Fill the pipe whose write end is ``w`` until it takes no byte more, through an open file
    of its own (non-blocking: O_NONBLOCK on ``w`` itself would make the child's writes fail)."""
    fd = os.open(f"/proc/self/fd/{w}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        for chunk in (b"\0" * 65536, b"\0"):  # the last byte too: a part-filled page takes it
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(fd, chunk)
    finally:
        os.close(fd)

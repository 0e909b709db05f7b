"""``ordergate status``: the JSON for scripts, the screen for people, and its live refresh."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

from ordergate.buffer import history
from ordergate.buffer.consumer import QueueConsumer
from ordergate.buffer.control import set_control
from ordergate.buffer.keys import Keys
from tests.cli.run import ordergate, spawn
from tests.conftest import admit


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
    taken = await QueueConsumer(redis, keys, 8, "test-consumer").take(40)
    assert len(taken.batch) == 40
    await set_control(redis, keys, paused=True, rate=50, by="test")

    done = await ordergate(settings, "status", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    shards = doc["shards"]
    assert [s["shard"] for s in shards] == list(range(8))
    assert sum(s["depth"] for s in shards) == 400 == doc["buffered"] == doc["issued"]
    assert sum(s["pending"] for s in shards) == 40
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
    """The screen shows the shards and a pause; --watch refreshes until Ctrl-C, then exits 0."""
    await admit(client, api_key, 20)
    await set_control(redis, Keys(), paused=True, by="cli:ada@host-1")
    done = await ordergate(settings, "status")
    assert done.returncode == 0, done.stderr
    assert "shards" in done.stdout and "PAUSED" in done.stdout and "cli:ada@host-1" in done.stdout

    proc = await spawn(
        settings, "status", "--watch", "--interval", "0.2", TTY_COMPATIBLE="1", COLUMNS="160"
    )
    seen = b""
    try:
        while seen.count(b"shards") < 3:  # the screen, refreshed twice
            chunk = await asyncio.wait_for(proc.stdout.read(4096), 30)
            assert chunk, (seen.decode(errors="replace"), await proc.stderr.read())
            seen += chunk
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0

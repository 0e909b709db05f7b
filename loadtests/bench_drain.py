"""(d): how fast ordergate's workers drain the buffer, against a raw COPY of the same rows.

Both run as a child process on the server CPU (``python -m loadtests.bench_drain copy|drain``,
settings from the ``ORDERGATE_*`` environment), against the same Valkey and PostgreSQL:

* ``copy`` reads every entry of the buffer (untimed), turns each into exactly the row the
  workers write (``workers.persist.row_of``), and times ``COPY`` of those rows into ``orders``
  (the partitioned table), one transaction per ``batch_size`` rows, as the drain commits, and
  then once more as one single COPY; then it empties the table again.
* ``drain`` times one worker process in burst mode (``run_worker(burst=True)``): take its
  lanes in order, one Postgres transaction per batch, settle in Redis, until the buffer is
  empty and settled; its first take and last settle (unix time, so that ``bench.py`` can
  combine several processes started together) and its wall time (``wall_seconds``).

Each prints one JSON line. ``OGBENCH_COPY_SINGLE=0`` skips the single COPY (the delayed run).
``OGBENCH_CPROFILE=/tmp/prof`` runs each drain process under cProfile and writes
``/tmp/prof.<pid>`` (where py-spy is not installed; read it with ``pstats``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from ordergate.buffer.connection import create_redis
from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import sublanes_of
from ordergate.buffer.message import OrderMessage, decode_entry
from ordergate.settings import Settings


async def buffered_messages(s: Settings) -> list[OrderMessage]:
    """Every entry in the buffer's streams, in queue order."""
    redis = create_redis(s.redis_url or "", socket_timeout=60)
    keys = Keys(s.key_prefix)
    out: list[OrderMessage] = []
    try:
        for shard in range(s.shards):
            subs = sublanes_of(await redis.hgetall(keys.lane(shard)))
            for sf in ["", *subs]:
                entries: list[Any] = await redis.xrange(keys.sublane(shard, sf)) or []
                for eid, fields in entries:
                    out.append(decode_entry(shard, eid, fields, sf))
    finally:
        await redis.aclose()
    out.sort(key=lambda m: m.seq)
    return out


async def time_copy(s: Settings) -> dict[str, Any]:
    import asyncpg

    from ordergate.workers.persist import COPY_COLUMNS, row_of

    messages = await buffered_messages(s)
    rows = [row_of(m) for m in messages]
    if len(s.database_urls) != 1:  # its rows would have to be split by database first
        raise SystemExit("bench_drain copy: the COPY baseline runs against one database")
    conn = await asyncpg.connect(s.database_urls[0])
    try:
        await conn.execute("TRUNCATE orders")
        t0 = time.perf_counter()
        for start in range(0, len(rows), s.batch_size):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "orders", records=rows[start : start + s.batch_size], columns=COPY_COLUMNS
                )
        batched = time.perf_counter() - t0
        await conn.execute("TRUNCATE orders")
        single = 0.0
        if os.environ.get("OGBENCH_COPY_SINGLE", "1") != "0":
            t0 = time.perf_counter()
            await conn.copy_records_to_table("orders", records=rows, columns=COPY_COLUMNS)
            single = time.perf_counter() - t0
            await conn.execute("TRUNCATE orders")
    finally:
        await conn.close()
    return {
        "rows": len(rows),
        "batch_size": s.batch_size,
        "batched_seconds": batched,
        "batched_rate": len(rows) / batched if batched else 0.0,
        "single_seconds": single,
        "single_rate": len(rows) / single if single else 0.0,
    }


async def time_drain(s: Settings) -> dict[str, Any]:
    """One burst worker process; its first take and last settle (what it costs to start a
    process is not the drain's speed), the wall time too."""
    from ordergate.buffer.consumer import LaneConsumer
    from ordergate.components import worker_config
    from ordergate.workers.runner import run_worker

    marks: dict[str, float] = {}
    take, settle = LaneConsumer.take, LaneConsumer.settle

    async def timed_take(self: LaneConsumer, n: int) -> Any:
        batch = await take(self, n)
        if len(batch):
            marks.setdefault("first_take", time.time())
        return batch

    async def timed_settle(self: LaneConsumer, *args: Any, **kwargs: Any) -> Any:
        result = await settle(self, *args, **kwargs)
        marks["last_settle"] = time.time()
        return result

    LaneConsumer.take = timed_take  # type: ignore[method-assign]
    LaneConsumer.settle = timed_settle  # type: ignore[method-assign]
    t0 = time.perf_counter()
    stats = await run_worker(worker_config(s), 0, burst=True)
    wall = time.perf_counter() - t0
    return {
        "committed": stats.committed,
        "rejected": stats.rejected,
        "dead_lettered": stats.dead_lettered,
        "batches": stats.batches,
        "batch_size": s.batch_size,
        "first_take": marks.get("first_take", 0.0),
        "last_settle": marks.get("last_settle", 0.0),
        "wall_seconds": wall,
    }


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Worker processes started together, as one drain: from the first take of any to the last
    settle of any."""
    committed = sum(p["committed"] for p in parts)
    started = [p["first_take"] for p in parts if p["first_take"]]
    first = min(started, default=0.0)
    last = max((p["last_settle"] for p in parts), default=0.0)
    seconds = last - first if started else 0.0
    wall = max((p["wall_seconds"] for p in parts), default=0.0)
    return {
        "workers": len(parts),
        "committed": committed,
        "per_worker": [p["committed"] for p in parts],
        "rejected": sum(p["rejected"] for p in parts),
        "dead_lettered": sum(p["dead_lettered"] for p in parts),
        "batches": sum(p["batches"] for p in parts),
        "batch_size": parts[0]["batch_size"] if parts else 0,
        "seconds": seconds,
        "rate": committed / seconds if seconds > 0 else 0.0,
        "wall_seconds": wall,
        "wall_rate": committed / wall if wall else 0.0,
    }


def main(argv: list[str] | None = None) -> int:
    import uvloop

    p = argparse.ArgumentParser(description="Time the drain or a raw COPY (loadtests/bench.py).")
    p.add_argument("what", choices=["copy", "drain"])
    args = p.parse_args(argv)
    s = Settings.load()
    prof_out = os.environ.get("OGBENCH_CPROFILE")
    if prof_out and args.what == "drain":
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
        result = uvloop.run(time_drain(s))
        prof.disable()
        prof.dump_stats(f"{prof_out}.{os.getpid()}")
    else:
        result = uvloop.run(time_copy(s) if args.what == "copy" else time_drain(s))
    print("DRAINJSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fairness between storefronts, measured: a small storefront's waits with and without a hot
storefront's backlog ahead of it, in one run.

    python -m loadtests.bench_fair [--hot 20000] [--small 50] [--drain-rate 500]

Starts private embedded Valkey and PostgreSQL, one ``ordergate serve`` and one
``ordergate work`` (2 workers) with the drain capped at ``--drain-rate`` orders/s (standing in
for a Postgres that takes no more). Then:

1. unloaded: the small storefront sends ``--small`` orders; each one's wait is its row's
   ``committed_at - accepted_at``;
2. flooded: the hot storefront sends ``--hot`` orders as fast as the gateway takes them, and
   once they are all admitted the small storefront sends ``--small`` more.

Prints the small storefront's waits (p50 / p99 / max) in both, their ratio, the hot backlog the
small orders arrived behind, and the hot storefront's own waits. Judges nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from loadtests.bench_setup import Placement, admit, clean_env, spawn, stop, wait_http
from ordergate.buffer.connection import create_redis
from ordergate.buffer.keys import Keys
from ordergate.buffer.streams import ensure_streams
from ordergate.gateway.auth import create_key
from ordergate.servers import EmbeddedPostgres, EmbeddedValkey, free_port
from ordergate.settings import Settings
from ordergate.workers.migrate import migrate


def quantile(values: list[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


async def waits(pg: asyncpg.Pool, storefront: str, prefix: str, n: int, timeout: float) -> Any:
    """The waits (s) of ``n`` orders of ``storefront`` whose ids start with ``prefix``, once all
    are committed (polled with a deadline)."""
    deadline = time.monotonic() + timeout
    query = (
        "SELECT extract(epoch FROM committed_at - accepted_at) FROM orders"
        " WHERE storefront_id = $1 AND storefront_order_id LIKE $2"
    )
    while True:
        rows = await pg.fetch(query, storefront, prefix + "%")
        if len(rows) >= n:
            return [float(r[0]) for r in rows]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(rows)} of {n} orders of {storefront} committed")
        await asyncio.sleep(0.2)


def line(name: str, values: list[float]) -> str:
    return (
        f"  {name:<34} p50 {quantile(values, 0.5):7.2f} s   p99 {quantile(values, 0.99):7.2f} s"
        f"   max {max(values):7.2f} s   ({len(values)} orders)"
    )


async def scenario(url: str, s: Settings, args: argparse.Namespace) -> None:
    keys = Keys(s.key_prefix)
    redis = create_redis(s.redis_url or "")
    try:
        await ensure_streams(redis, keys, s.shards)
        hot_key = await create_key(redis, keys, "hot")
        small_key = await create_key(redis, keys, "small")
    finally:
        await redis.aclose()
    pg = await asyncpg.create_pool(s.database_url, min_size=1, max_size=2)
    try:
        await admit(url, small_key, args.small, "alone", concurrency=8)
        alone = await waits(pg, "small", "alone-", args.small, 120)

        started = time.monotonic()
        await admit(url, hot_key, args.hot, "flood", concurrency=64)
        flood_s = time.monotonic() - started
        redis = create_redis(s.redis_url or "")
        try:
            ahead = int(await redis.hget(keys.storefront_buffered(), "hot") or 0)
        finally:
            await redis.aclose()
        await admit(url, small_key, args.small, "behind", concurrency=8)
        behind = await waits(pg, "small", "behind-", args.small, 600)
        hot = await waits(pg, "hot", "flood-", args.hot, 600)
    finally:
        await pg.close()
    print(f"\nfairness, drain capped at {args.drain_rate:g} orders/s, 2 workers, 8 lanes")
    print(f"  the hot storefront sent {args.hot:,} orders in {flood_s:.1f} s;")
    print(f"  the small one's {args.small} orders arrived behind {ahead:,} hot orders buffered")
    print(line("small storefront, alone", alone))
    print(line("small storefront, behind the flood", behind))
    print(line("hot storefront (its own flood)", hot))
    ratio = quantile(behind, 0.99) / max(quantile(alone, 0.99), 1e-3)
    print(f"  small p99 behind the flood / alone: {ratio:.1f} x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hot", type=int, default=20_000, help="the hot storefront's orders")
    p.add_argument("--small", type=int, default=50, help="the small storefront's orders")
    p.add_argument("--drain-rate", type=float, default=500.0, help="the drain's cap, orders/s")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ogbench-fair-") as tmp_name:
        tmp = Path(tmp_name)
        valkey, postgres = EmbeddedValkey(tmp), EmbeddedPostgres(tmp)
        procs: list[Any] = []
        try:
            s = Settings.load(
                {
                    "redis_url": valkey.start(),
                    "database_url": postgres.start(),
                    "data_dir": str(tmp),
                    "port": free_port(),
                    "drain_rate": args.drain_rate,
                    "workers": 2,
                    "max_buffered": 1_000_000,
                    "log_level": "warning",
                },
                environ={},
            )
            asyncio.run(migrate(s.database_url or "", s.shards, s.key_prefix))
            env = clean_env(s.to_env())
            url = f"http://{s.host}:{s.port}"
            anywhere = Placement(None, None)
            for name in ("serve", "work"):
                cmd = [sys.executable, "-m", "ordergate", name]
                procs.append(spawn(cmd, env, tmp / f"{name}.log", anywhere, False))
            serve = procs[0]
            wait_http(url, serve, tmp / "serve.log")
            asyncio.run(scenario(url, s, args))
        finally:
            for proc in procs:
                stop(proc)
            postgres.stop()
            valkey.stop()
    return 0


if __name__ == "__main__":
    os.environ.pop("ORDERGATE_CONFIG", None)
    raise SystemExit(main())

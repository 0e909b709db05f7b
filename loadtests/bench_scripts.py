"""Valkey's own cost of the buffer's scripts, per order, on a scratch embedded Valkey (appendonly
yes, appendfsync always, as ``ordergate up`` runs it): what (d)'s ``INFO cpu`` figures cannot
separate from the server's I/O.

* ``admit``: ``admit.lua`` per order, by ``INFO commandstats``, for batches of several shapes
  (shards x orders per shard); with ``--against REV``, also the ``admit.lua`` of that git
  revision (one call per shard, the layout before 2026-12-02), alternating, best of 3 each.
* ``take``: Valkey CPU (``INFO cpu``) per entry of taking 500-entry batches of a 20,000-entry
  stream: ``XREADGROUP`` inside a script (how lanes were read before the cursor), a native
  ``XREADGROUP``, and a native ``XRANGE`` after a cursor (how they are read now).

    python -m loadtests.bench_scripts [--against 16d18bd]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from ordergate.buffer.scripts import source
from ordergate.servers import EmbeddedValkey

BODY = b'{"x":"' + b"a" * 400 + b'"}'
SHAPES = ((8, 1), (8, 2), (4, 4), (1, 32))


def _reset(r: redis.Redis) -> None:
    r.execute_command("FLUSHALL", "SYNC")
    for shard in range(8):
        r.xgroup_create(f"og:{{{shard}}}:stream", "workers", id="0", mkstream=True)
    r.config_resetstat()


def _script_us(r: redis.Redis, orders: int) -> float:
    stats: Any = r.info("commandstats")
    return float(stats["cmdstat_evalsha"]["usec"]) / orders


def admit_now(
    r: redis.Redis, sha: str, groups: int, k: int, calls: int = 100, rate: float = 0
) -> float:
    """us of script time per order, this tree's admit.lua (one call per batch); with ``rate``,
    every order's storefront has that rate limit (and the buffer a bound and a reserve)."""
    _reset(r)
    pipe = r.pipeline(transaction=False)
    n = 0
    limits = [1_000_000, f"{rate:g}", int(rate), 10_000] if rate else [0, 0, 0, 0]
    for c in range(calls):
        keys: list[Any] = ["og:seq", "og:drain", "og:sf:limits", "og:sf:tat"]
        keys += ["og:sf:buffered", "og:sf:known"]
        args: list[Any] = [0, *limits, groups]
        order_keys: list[Any] = []
        order_args: list[Any] = []
        for g in range(groups):
            shard = (c + g) % 8
            keys += [f"og:{{{shard}}}:stream", f"og:{{{shard}}}:lane"]
            args += [shard, k]
            for _ in range(k):
                n += 1
                order_keys.append(f"og:{{{shard}}}:idk:{n}")
                row = b"cust-1\x1fada@example.com\x1fEUR\x1f2500\x1f2"
                order_args += [f"n{n % 99999:05d}", "sf", f"o{n}", 1764633600000000 + n]
                order_args += [os.urandom(8), row, BODY]
        pipe.evalsha(sha, len(keys) + len(order_keys), *keys, *order_keys, *args, *order_args)
        if c % 20 == 19:
            pipe.execute()
    pipe.execute()
    return _script_us(r, n)


def admit_before(r: redis.Redis, sha: str, groups: int, k: int, calls: int = 100) -> float:
    """The same with the one-call-per-shard admit.lua of before 2026-12-02."""
    _reset(r)
    pipe = r.pipeline(transaction=False)
    n = 0
    for c in range(calls):
        for g in range(groups):
            shard = (c + g) % 8
            keys: list[Any] = [f"og:{{{shard}}}:stream", "og:seq", "og:drain"]
            keys.append(f"og:{{{shard}}}:lane")
            args: list[Any] = [0, 0, shard]
            for _ in range(k):
                n += 1
                keys.append(f"og:{{{shard}}}:idem:sf:o{n}")
                args += [f"n{n % 99999:05d}", "sf", f"o{n}", 1764633600000000 + n]
                args += [os.urandom(16), BODY]
            pipe.evalsha(sha, len(keys), *keys, *args)
        if c % 20 == 19:
            pipe.execute()
    pipe.execute()
    return _script_us(r, n)


def take_costs(r: redis.Redis, entries: int = 20_000, batch: int = 500) -> dict[str, float]:
    fields: dict[Any, Any] = {"v": "1", "oid": "ord_3_" + "0" * 26, "sf": "shop-a"}
    fields |= {"sfo": "order-0001", "seq": "123456", "ls": "12345", "at": "1764633600000000"}
    fields |= {"a0": "1234", "r": "cust-1\x1fada@example.com\x1fEUR\x1f2500\x1f2", "body": BODY}
    in_script = r.register_script(
        "return redis.call('XREADGROUP', 'GROUP', 'g', 'c', 'COUNT', ARGV[1],"
        " 'STREAMS', KEYS[1], '>')"
    )

    def scripted(cursor: str) -> str:
        in_script(keys=["s"], args=[batch])
        return cursor

    def native_group(cursor: str) -> str:
        r.xreadgroup("g", "c", {"s": ">"}, count=batch)
        return cursor

    def native_range(cursor: str) -> str:
        got: Any = r.xrange("s", min=f"({cursor}", count=batch)
        return str(got[-1][0].decode())

    ways: dict[str, Callable[[str], str]] = {
        "XREADGROUP in a script": scripted,
        "XREADGROUP": native_group,
        "XRANGE after a cursor": native_range,
    }
    out: dict[str, float] = {}
    for name, take in ways.items():
        best = float("inf")
        for _ in range(2):
            r.execute_command("FLUSHALL", "SYNC")
            r.xgroup_create("s", "g", id="0", mkstream=True)
            pipe = r.pipeline(transaction=False)
            for i in range(entries):
                pipe.xadd("s", fields)
                if i % 500 == 499:
                    pipe.execute()
            pipe.execute()
            cpu: Any = r.info("cpu")
            before = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
            cursor = "0-0"
            for _ in range(entries // batch):
                cursor = take(cursor)
            cpu = r.info("cpu")
            after = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
            best = min(best, (after - before) / entries * 1e6)
        out[name] = best
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", help="git revision whose admit.lua to compare (e.g. 16d18bd)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ogbench-scripts-") as tmp:
        server = EmbeddedValkey(Path(tmp))
        url = server.start()
        try:
            r = redis.Redis.from_url(url)
            now = r.script_load(source("admit"))
            before = None
            if args.against:
                text = subprocess.run(
                    ["git", "show", f"{args.against}:buffer/lua/admit.lua"],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                before = r.script_load(text)
            print(
                "admit.lua, us of script time per order (INFO commandstats), best of 3;"
                " 'limited': a rate limit on the storefront, a bound and a reserve"
            )
            for groups, k in SHAPES:
                a = min(admit_now(r, now, groups, k) for _ in range(3))
                lim = min(admit_now(r, now, groups, k, rate=1e6) for _ in range(3))
                line = f"  {groups} shards x {k} orders per batch: {a:.1f} us"
                line += f", limited {lim:.1f} us (ratio {lim / a:.2f})"
                if before:
                    b = min(admit_before(r, before, groups, k) for _ in range(3))
                    line += f", {args.against}'s {b:.1f} us, ratio {a / b:.2f}"
                print(line, flush=True)
            print("taking 500-entry batches, Valkey CPU per entry (INFO cpu), best of 2")
            for name, us in take_costs(r).items():
                print(f"  {name}: {us:.1f} us", flush=True)
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

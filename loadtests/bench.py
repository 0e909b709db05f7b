"""Side-by-side benchmark of ordergate on this machine, in one run, with one load generator.

    python loadtests/bench.py [--quick] [--out loadtests/results]

Starts private embedded Valkey (two: ordergate's and arq's, both appendonly yes + appendfsync
always) and PostgreSQL (fsync on, synchronous_commit on) on free ports in a temporary directory,
then measures, the HTTP server under test alone on the first CPU and everything else (generator,
Valkey, PostgreSQL, workers) on the others:

  (d) the drain: one worker in burst mode vs a raw COPY of the same rows into ``orders``;
  (d2) the drain into two Postgres servers (the shards split over them) vs into one;
  (e) ``GET /v1/queue/{ticket}`` vs a plain Starlette GET (see ``bench_poll``);
  (a) a plain Starlette ``POST /v1/orders`` that only decodes the order with msgspec;
  (b) a naive endpoint: one INSERT per order through an asyncpg pool, durable commit;
  (f) Starlette + arq: one ``enqueue_job`` per order;
  (c) ordergate's ``POST /v1/orders``, default durability ``auto``: like (f), durable by the
      server's appendfsync always (auto sends aof-always's pipeline to it: no WAITAOF, a
      CONFIG GET per batch; ``--set durability=fsync`` adds a WAITAOF barrier per batch);
  then (c) open loop at 80 % of its closed-loop peak, and an overload run: a fixed rate above
  what (b) sustains, offered open-loop to (b) and then to (c).

Closed-loop runs (a, b, f, c, e) use wrk with a Lua script (POST bodies with unique ids), or
the built-in generator (``--generator builtin``); open-loop runs use the built-in asyncio
generator (``bench_openloop``). Same payloads, same connections, same number of uvicorn
processes (``--processes``) for every server. Prints every figure and ratio, and writes JSON and a
PNG chart. Not a test: it judges nothing but prints each target as met or missed.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests import bench_drain, bench_poll, bench_profile, bench_report, bench_setup
from loadtests.bench_load import PostOrders, run_load
from loadtests.bench_openloop import OpenLoopResult, format_open, run_open_loop
from loadtests.bench_poll import Options
from loadtests.bench_setup import (
    Placement,
    admit,
    clean_env,
    delay_proxy,
    placement,
    post_orders,
    prepare,
    run,
    spawn,
    stop,
    temp_dir,
    two_postgres,
    wait_http,
)
from ordergate.runtime import resolved
from ordergate.servers import EmbeddedValkey, EmbeddedValkeyCluster, free_port
from ordergate.settings import Settings

POST_KINDS = ("a", "b", "f", "c", "g", "h")
LABELS = {
    "a": "plain Starlette + msgspec",
    "b": "naive INSERT per order",
    "f": "Starlette + arq enqueue_job",
    "c": "ordergate POST /v1/orders",
    "g": "ordergate POST /v1/orders, storefront rate limit on",
    "h": "ordergate POST /v1/orders, buffer on a 3-master Valkey Cluster",
}
# (h): (c) with the buffer on a local Valkey Cluster of 3 masters and 3 replicas (each node
# appendonly yes + appendfsync always, as (c)'s primary), on the same CPUs as (c)'s Valkey: the
# same load, one script call and one pipeline per master per batch instead of one in all.
# (g): (c) with every order through the storefront rate limit, set too high to refuse any (its
# state read and written per batch, RateLimit header fields on every answer). The share rule
# costs nothing until the buffer nears its bound.
LIMITS_ON = {"ORDERGATE_STOREFRONT_RATE": "1000000", "ORDERGATE_STOREFRONT_BURST": "10000000"}


class Bench:
    """One benchmark run: its servers, processes, options and report."""

    def __init__(self, args: argparse.Namespace, tmp: Path, place: Placement) -> None:
        self.args = args
        self.tmp = tmp
        self.place = place
        self.opts = Options(
            args.duration,
            args.warmup,
            args.connections,
            args.rounds,
            args.generator,
            args.gen_procs,
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        self.report: dict[str, Any] = {
            "command": " ".join(["python", *sys.argv]),
            "cpus": os.cpu_count(),
            "server_cpus": sorted(place.server or []),
            "other_cpus": sorted(place.rest or []),
            "options": vars(args),
        }
        self.tag = 0
        self.cluster: EmbeddedValkeyCluster | None = None

    # -- processes ------------------------------------------------------------------------------

    def start(self, name: str, cmd: list[str], env: dict[str, str], server: bool = True) -> Any:
        proc = spawn(cmd, env, self.tmp / f"{name}.log", self.place, server)
        self.procs.append(proc)
        return proc

    def next_tag(self, kind: str) -> str:
        self.tag += 1
        return f"{kind}{self.tag:03d}-"

    def post_load(self, key: str, kind: str) -> PostOrders:
        """New orders for one run (ids tagged with the run)."""
        return post_orders(key, self.next_tag(kind))

    # -- the run --------------------------------------------------------------------------------

    def run(self, s: Settings, arq_url: str) -> None:
        args, opts = self.args, self.opts
        key, valkey_pid = run(prepare(s))
        pg_pid = _postgres_pid(s)
        self.env = clean_env(s.to_env())
        ports = {k: free_port() for k in ("plain", "naive", "arq", "limited", "clustered")}
        urls = {
            "c": f"http://{s.host}:{s.port}",
            "a": f"http://127.0.0.1:{ports['plain']}",
            "b": f"http://127.0.0.1:{ports['naive']}",
            "f": f"http://127.0.0.1:{ports['arq']}",
            "g": f"http://{s.host}:{ports['limited']}",
            "h": f"http://{s.host}:{ports['clustered']}",
        }
        n = str(args.processes)
        gateway = self.start("gateway", [sys.executable, "-m", "ordergate", "serve"], self.env)
        wait_http(urls["c"], gateway, self.tmp / "gateway.log")
        limited = self.start(
            "limited",
            [sys.executable, "-m", "ordergate", "serve"],
            self.env | LIMITS_ON | {"ORDERGATE_PORT": str(ports["limited"])},
        )
        wait_http(urls["g"], limited, self.tmp / "limited.log")
        masters: dict[str, int] = {}
        if "post" in args.only:
            self.cluster = EmbeddedValkeyCluster(self.tmp / "cluster")
            self.cluster.start()
            masters = run(_cluster_ready(self.cluster.url, key, s))
            clustered = self.start(
                "clustered",
                [sys.executable, "-m", "ordergate", "serve"],
                self.env
                | {
                    "ORDERGATE_REDIS_URL": self.cluster.url,
                    "ORDERGATE_PORT": str(ports["clustered"]),
                },
            )
            wait_http(urls["h"], clustered, self.tmp / "clustered.log")
        self.report["processes"] = args.processes
        naive = self.start(
            "naive",
            [sys.executable, "-m", "loadtests.bench_apps", "naive", "--port", str(ports["naive"])]
            + ["--processes", n],
            self.env
            | {"OGBENCH_DATABASE_URL": s.database_url or "", "OGBENCH_PG_POOL": str(args.pg_pool)},
        )
        arq = self.start(
            "arq",
            [sys.executable, "-m", "loadtests.bench_apps", "arq", "--port", str(ports["arq"])]
            + ["--processes", n],
            self.env | {"OGBENCH_REDIS_URL": arq_url},
        )
        arq_valkey_pid = _redis_pid(arq_url)

        # (d) first, on a buffer of its own: fill it, COPY its rows, then drain it.
        if "d" in args.only:
            self.report["drain"] = self.drain(urls["c"], key, s)
        if "d2" in args.only:
            self.report["drain_two_postgres"] = self.drain_two_postgres(urls["c"], key, s)

        # (e): 2000 waiting orders; the plain app serves a real answer as its fixed body.
        body_file = self.tmp / "queue-body.json"
        tickets: list[str] = []
        if "e" in args.only:
            tickets = run(admit(urls["c"], key, bench_poll.POLLED, f"poll-{time.time_ns()}"))
            self.report["queue_sample"] = bench_poll.write_body_file(
                urls["c"], tickets[0], body_file
            )
        plain_env = self.env | ({"OGBENCH_QUEUE_BODY": str(body_file)} if tickets else {})
        plain = self.start(
            "plain",
            [sys.executable, "-m", "loadtests.bench_apps", "plain", "--port", str(ports["plain"])]
            + ["--processes", n],
            plain_env,
        )
        sample = post_orders(key, "probe-")
        probe = sample.body_prefix + b"probe" + sample.body_suffix
        hdrs = dict(sample.headers)
        for kind, proc in (("a", plain), ("b", naive), ("f", arq)):
            wait_http(
                urls[kind],
                proc,
                self.tmp / f"{kind}.log",
                "POST",
                "/v1/orders",
                (202,),
                probe,
                hdrs,
            )
        watch = {
            "a": {"server": plain.pid},
            "b": {"server": naive.pid, "postgres": pg_pid},
            "f": {"server": arq.pid, "valkey": arq_valkey_pid},
            "c": {"server": gateway.pid, "valkey": valkey_pid},
            "g": {"server": limited.pid, "valkey": valkey_pid},
        }
        if masters:
            watch["h"] = {"server": clustered.pid, **masters}

        if "e" in args.only:
            print("(e) queue polls", flush=True)
            worker = bench_poll.start_worker_factory(
                self.env, self.tmp / "poll-worker.log", self.place
            )
            self.report["queue"] = bench_poll.run_queue(
                urls["c"],
                urls["a"],
                key,
                opts,
                args.queue_variants,
                args.queue_kinds,
                {"a": watch["a"], "e": watch["c"], "e304": watch["c"]},
                tickets,
                worker,
                args.drain_rate,
            )

        if "post" in args.only:
            print("(a, b, f, c) POST /v1/orders, closed loop", flush=True)
            runs = bench_poll.measure(
                "post",
                POST_KINDS,
                opts,
                urls,
                {k: functools.partial(self.post_load, key, k) for k in POST_KINDS},
                watch,
            )
            self.report["post"] = bench_poll.summarize(runs)
            if args.profile:
                self.profile_servers(
                    {"a": (plain.pid, urls["a"]), "c": (gateway.pid, urls["c"])}, key
                )

        if "overload" in args.only:
            self.report["open_loop"] = self.open_loop(urls, key)

    def drain(self, url: str, key: str, s: Settings) -> dict[str, Any]:
        """Fill the buffer for ``--fill`` seconds, then COPY its rows, then drain it."""
        opts = self.opts
        print(f"(d) filling the buffer for {self.args.fill:g} s ...", flush=True)
        load = post_orders(key, self.next_tag("d"))
        empty = valkey_usage(s.redis_url or "")
        fill = run_load(
            url,
            load,
            generator=opts.generator,
            connections=opts.connections,
            duration=self.args.fill,
            warmup=0,
            processes=opts.gen_processes,
        )
        print(f"  filled: {fill.ok:,} orders ({fill.ok_rps:,.0f}/s)", flush=True)
        filled = valkey_usage(s.redis_url or "")
        copy = self._drain_child("copy", s)
        print(
            f"  COPY of the same {copy['rows']:,} rows: {copy['batched_rate']:,.0f} rows/s in "
            f"transactions of {copy['batch_size']}, {copy['single_rate']:,.0f} rows/s as one COPY",
            flush=True,
        )
        copied = valkey_usage(s.redis_url or "")  # the COPY child read the streams: not counted
        drained = self._drain_workers(s, self.env, profile=self.args.profile)
        settled = valkey_usage(s.redis_url or "")
        # per order buffered: copy['rows'] (wrk's count misses the requests in flight at its end)
        valkey = valkey_per_order(empty, filled, copied, settled, copy["rows"], load.body_length())
        valkey["xadd_cpu_us"] = xadd_cpu_us(s.redis_url or "", load.body_length())
        valkey["cpu_per_xadd"] = valkey["cpu_us"] / valkey["xadd_cpu_us"]
        print(
            f"  drain, {drained['workers']} workers: {drained['committed']:,} committed in"
            f" {drained['seconds']:.2f} s = {drained['rate']:,.0f} orders/s"
            f" ({drained['batches']} batches, {drained['per_worker']} per worker; with the"
            f" workers' start {drained['wall_seconds']:.2f} s = {drained['wall_rate']:,.0f}/s)",
            flush=True,
        )
        print(
            f"  Valkey CPU per order: {valkey['admit_cpu_us']:.1f} us admitting +"
            f" {valkey['drain_cpu_us']:.1f} us draining = {valkey['cpu_us']:.1f} us (inside"
            f" scripts: {valkey['admit_commands_us']:.1f} +"
            f" {valkey['drain_commands_us']:.1f} us)"
            f" ({valkey['cpu_per_xadd']:.1f} x a bare pipelined XADD of the same body,"
            f" {valkey['xadd_cpu_us']:.1f} us); memory per"
            f" order: body ({valkey['body_bytes']} B) + {valkey['buffered_overhead_bytes']:.0f} B"
            f" buffered, {valkey['settled_bytes']:.0f} B once settled",
            flush=True,
        )
        delayed = self.drain_delayed(url, key, s) if self.args.delay_ms > 0 else None
        return {
            "filled": fill.ok,
            "copy": copy,
            "drain": drained,
            "valkey": valkey,
            "delayed": delayed,
        }

    def drain_delayed(self, url: str, key: str, s: Settings) -> dict[str, Any]:
        """Fill again, then COPY and drain through tests/faults.py's proxy, which adds
        ``--delay-ms`` to every Postgres reply: what a drain far from its database does."""
        delay = self.args.delay_ms
        print(f"(d) through a {delay:g} ms delay proxy: filling again ...", flush=True)
        fill = run_load(
            url,
            post_orders(key, self.next_tag("dd")),
            generator=self.opts.generator,
            connections=self.opts.connections,
            duration=self.args.fill,
            warmup=0,
            processes=self.opts.gen_processes,
        )
        with delay_proxy(s.database_url or "", delay / 1000) as proxied:
            env = self.env | {"ORDERGATE_DATABASE_URL": proxied, "OGBENCH_COPY_SINGLE": "0"}
            copy = self._drain_child("copy", s, env=env)
            drained = self._drain_workers(s, env)
        ratio = drained["rate"] / copy["batched_rate"] if copy["batched_rate"] else 0.0
        print(
            f"  {fill.ok:,} orders; one loop of COPY transactions of {copy['batch_size']}:"
            f" {copy['batched_rate']:,.0f} rows/s; {drained['workers']} workers:"
            f" {drained['rate']:,.0f} orders/s = {ratio:.2f} x",
            flush=True,
        )
        return {"delay_ms": delay, "copy": copy, "drain": drained, "ratio": ratio}

    def drain_two_postgres(self, url: str, key: str, s: Settings) -> dict[str, Any]:
        """(d2): the same fill drained into one Postgres server, then into two (the shards
        split over them, database_url listing both), by the same burst workers."""
        rates: dict[str, Any] = {}
        with two_postgres(self.tmp, s) as both:
            for name, env in (
                ("one", self.env),
                ("two", self.env | {"ORDERGATE_DATABASE_URL": both}),
            ):
                print(f"(d2) {name} Postgres: filling for {self.args.fill:g} s ...", flush=True)
                fill = run_load(
                    url,
                    post_orders(key, self.next_tag("d2")),
                    generator=self.opts.generator,
                    connections=self.opts.connections,
                    duration=self.args.fill,
                    warmup=0,
                    processes=self.opts.gen_processes,
                )
                drained = self._drain_workers(s, env)
                rates[name] = {"filled": fill.ok, "drain": drained}
                print(
                    f"  {name}: {drained['committed']:,} orders drained by {drained['workers']}"
                    f" workers in {drained['seconds']:.2f} s = {drained['rate']:,.0f} orders/s",
                    flush=True,
                )
        one, two = rates["one"]["drain"]["rate"], rates["two"]["drain"]["rate"]
        ratio = two / one if one else 0.0
        print(f"  two Postgres servers / one: {ratio:.2f} x", flush=True)
        return rates | {"ratio": ratio}

    def _drain_workers(
        self, s: Settings, env: dict[str, str], profile: str | None = None
    ) -> dict[str, Any]:
        """``--drain-workers`` burst worker processes started together, as one drain."""
        n = self.args.drain_workers
        procs = [
            self._drain_start("drain", env, profile if i == 0 else None, tag=str(i))
            for i in range(n)
        ]
        parts = [self._drain_wait(*p) for p in procs]
        return bench_drain.combine(parts)

    def _drain_child(
        self,
        what: str,
        s: Settings,
        profile: str | None = None,
        env: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        return self._drain_wait(*self._drain_start(what, env or self.env, profile))

    def _drain_start(
        self, what: str, env: dict[str, str], profile: str | None, tag: str = ""
    ) -> tuple[Any, Path, str]:
        cmd = [sys.executable, "-m", "loadtests.bench_drain", what]
        if profile:
            spy = shutil.which("py-spy")
            if spy:
                out = Path(profile) / f"{what}{tag}.txt"
                cmd = [spy, "record", "-r", "200", "-f", "raw", "--nonblocking", "-o", str(out)]
                cmd += ["--", sys.executable, "-m", "loadtests.bench_drain", what]
        log = self.tmp / f"drain-{what}{tag}-{time.time_ns()}.log"
        # Not pinned: nothing else runs meanwhile, and workers pinned to one CPU would share
        # it; the COPY baseline runs the same way.
        return spawn(cmd, env, log, self.place, False), log, what

    def _drain_wait(self, proc: Any, log: Path, what: str) -> dict[str, Any]:
        proc.wait()
        m = re.search(r"^DRAINJSON (.*)$", log.read_text(), re.M)
        if proc.returncode != 0 or m is None:
            raise RuntimeError(f"bench_drain {what} failed; see {log}")
        import json

        result: dict[str, Any] = json.loads(m.group(1))
        return result

    def open_loop(self, urls: dict[str, str], key: str) -> dict[str, Any]:
        args = self.args
        post = self.report.get("post", {}).get("median_rps", {})
        out: dict[str, Any] = {}
        peak_c = post.get("c") or args.c_peak
        if peak_c:
            rate = 0.8 * peak_c
            print(
                f"(c) open loop at 80 % of its peak: {rate:,.0f}/s for {args.duration:g} s",
                flush=True,
            )
            r = self._open(urls["c"], key, rate, args.duration)
            out["c_at_80"] = asdict(r) | {"error_share": r.error_share}
        rate = args.overload_rate or (args.overload_factor * post["b"] if post.get("b") else 0)
        if not rate:
            print("no overload rate: pass --overload-rate (no (b) figure measured)")
            return out
        out["overload_rate"] = rate
        for kind in ("b", "c"):
            print(
                f"({kind}) overload: {rate:,.0f}/s offered for {args.overload_seconds:g} s",
                flush=True,
            )
            r = self._open(urls[kind], key, rate, args.overload_seconds)
            out[f"{kind}_overload"] = asdict(r) | {"error_share": r.error_share}
            time.sleep(3)  # let the server finish what the cut-off clients left behind
        return out

    def _open(self, url: str, key: str, rate: float, seconds: float) -> OpenLoopResult:
        r = run_open_loop(
            url,
            post_orders(key, self.next_tag("o")),
            rate=rate,
            duration=seconds,
            warmup=self.args.open_warmup,
            timeout=self.args.timeout,
            processes=self.args.open_procs,
            max_connections=self.args.max_connections,
        )
        print("  " + format_open(r), flush=True)
        return r

    def profile_servers(self, servers: dict[str, tuple[int, str]], key: str) -> None:
        """An extra run of each of ``servers`` (kind -> pid, url) under py-spy (raw collapsed
        stacks in PROFILE/<kind>.txt), summed by layer in microseconds of CPU per request."""
        spy = shutil.which("py-spy")
        if spy is None:
            print("py-spy not found; no profile", file=sys.stderr)
            return
        profiles: dict[str, Any] = {}
        for kind, (pid, url) in servers.items():
            out = Path(self.args.profile) / f"{kind}.txt"
            seconds = max(1, round(self.opts.duration))
            cmd = [spy, "record", "--pid", str(pid), "-r", "200", "-f", "raw", "-o", str(out)]
            spy_proc = subprocess.Popen(
                [*cmd, "-d", str(seconds), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            r = run_load(
                url,
                post_orders(key, self.next_tag("p")),
                generator=self.opts.generator,
                connections=self.opts.connections,
                duration=seconds + 1,
                warmup=0.5,
                processes=self.opts.gen_processes,
                watch={"server": pid},
            )
            _, err = spy_proc.communicate(timeout=60)
            if spy_proc.returncode:
                print(err.decode(errors="replace")[-2000:], file=sys.stderr)
                continue
            cpu_us = r.watched_cpu["server"] * 1e6 / r.rps if r.rps else 0.0
            summary = bench_profile.summarize(out)
            layers = summary["layers"]
            assert isinstance(layers, dict)
            profiles[kind] = {
                "rps": r.rps,
                "server_cpu": r.watched_cpu["server"],
                "cpu_us_per_request": cpu_us,
                "layers_us": {k: v * cpu_us for k, v in layers.items()},
                "layers_share": layers,
                "self_share": summary["self"],
                "file": str(out),
            }
            print(
                f"  profiled ({kind}): {r.rps:,.0f} req/s under py-spy, server cpu "
                f"{r.watched_cpu['server']:.0%} = {cpu_us:.0f} us per request -> {out}"
            )
        self.report["profile"] = profiles


def _postgres_pid(s: Settings) -> int:
    """The postmaster's pid (its backends are its children)."""
    return int((s.data_path / "postgres" / "postmaster.pid").read_text().split()[0])


def valkey_usage(url: str) -> tuple[float, int, float]:
    """(CPU seconds, user + system; used_memory bytes; seconds spent inside scripts, from INFO
    commandstats: a script's commands are counted in it and again under their own names, so
    only the scripts are summed) of the Valkey at ``url``. The CPU beyond is the server's
    reading, replying, native commands (the drain's XRANGE) and, with appendfsync always, the
    AOF's writes and fsyncs, which grow with the number of round trips rather than of orders."""
    from ordergate.buffer.connection import create_redis

    async def go() -> tuple[float, int, float]:
        redis = create_redis(url)
        try:
            cpu, memory = await redis.info("cpu"), await redis.info("memory")
            stats = await redis.info("commandstats")
        finally:
            await redis.aclose()
        scripts = ("cmdstat_evalsha", "cmdstat_eval")
        inside = sum(float(stats[k]["usec"]) for k in scripts if k in stats) / 1e6
        total = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
        return total, int(memory["used_memory"]), inside

    result: tuple[float, int, float] = run(go())
    return result


def xadd_cpu_us(url: str, body_bytes: int, n: int = 20_000) -> float:
    """The same-run baseline for Valkey's CPU per order: one XADD of a body this size and the
    fields an order entry has, pipelined 500 at a time, into a scratch stream (then deleted)."""
    from ordergate.buffer.connection import create_redis

    fields = {"v": "1", "oid": "ord_0_" + "0" * 26, "sf": "shop-a", "sfo": "x" * 16}
    fields |= {"seq": "1", "at": "1764600000000000", "body": "x" * body_bytes}

    async def go() -> float:
        redis = create_redis(url, socket_timeout=30)
        try:
            before = await redis.info("cpu")
            for _ in range(0, n, 500):
                pipe = redis.pipeline(transaction=False)
                for _ in range(500):
                    pipe.xadd("ogbench:xadd", fields)
                await pipe.execute()
            after = await redis.info("cpu")
            await redis.delete("ogbench:xadd")
        finally:
            await redis.aclose()
        spent = sum(float(after[k]) - float(before[k]) for k in ("used_cpu_user", "used_cpu_sys"))
        return spent / n * 1e6

    result: float = run(go())
    return result


def valkey_per_order(
    empty: tuple[float, int, float],
    filled: tuple[float, int, float],
    copied: tuple[float, int, float],
    settled: tuple[float, int, float],
    orders: int,
    body_bytes: int,
) -> dict[str, Any]:
    """Valkey's CPU and memory per order over (d): admission (empty -> filled), the drain
    (copied -> settled), the memory of a buffered order beyond its body, and of a settled one."""
    n = max(orders, 1)
    admit_us = (filled[0] - empty[0]) / n * 1e6
    drain_us = (settled[0] - copied[0]) / n * 1e6
    return {
        "orders": orders,
        "admit_cpu_us": admit_us,
        "drain_cpu_us": drain_us,
        "admit_commands_us": (filled[2] - empty[2]) / n * 1e6,
        "drain_commands_us": (settled[2] - copied[2]) / n * 1e6,
        "cpu_us": admit_us + drain_us,
        "body_bytes": body_bytes,
        "buffered_overhead_bytes": (filled[1] - empty[1]) / n - body_bytes,
        "settled_bytes": (settled[1] - empty[1]) / n,
    }


def _redis_pid(url: str) -> int:
    from ordergate.buffer.connection import create_redis

    async def go() -> int:
        redis = create_redis(url)
        try:
            return int((await redis.info("server"))["process_id"])
        finally:
            await redis.aclose()

    return int(run(go()))


async def _cluster_ready(url: str, key: str, s: Settings) -> dict[str, int]:
    """The cluster's streams, the same API key as (c)'s; the masters' pids, to watch."""
    from ordergate.buffer.connection import connect_redis
    from ordergate.buffer.keys import Keys
    from ordergate.buffer.streams import ensure_streams
    from ordergate.gateway.auth import hash_key, sync_known

    redis = await connect_redis(url)
    keys = Keys(s.key_prefix, cluster=True)
    try:
        await ensure_streams(redis, keys, s.shards)
        await redis.hset(keys.api_keys(), hash_key(key), bench_setup.STOREFRONT)
        await sync_known(redis, keys, s.shards)
        infos = await redis.info("server", target_nodes=redis.PRIMARIES)
        return {f"valkey {name}": int(info["process_id"]) for name, info in infos.items()}
    finally:
        await redis.aclose()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=["d", "d2", "e", "post", "overload"],
        default=["d", "d2", "e", "post", "overload"],
        help="parts to run (overload needs post, or --overload-rate and --c-peak)",
    )
    p.add_argument("--out", default="loadtests/results", help="folder for bench.json, bench.png")
    p.add_argument("--json", help="write the figures here instead of OUT/bench.json")
    p.add_argument("--png", help="write the chart here instead of OUT/bench.png")
    p.add_argument("--duration", type=float, help="measured seconds per run (10; quick 3)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each run (2; quick 1)")
    p.add_argument("--rounds", type=int, help="alternating rounds, median reported (2; quick 1)")
    p.add_argument("--connections", type=int, default=64, help="closed-loop connections")
    p.add_argument("--processes", type=int, default=1, help="uvicorn processes of every server")
    p.add_argument("--generator", choices=["wrk", "builtin"], default="wrk")
    p.add_argument("--gen-procs", type=int, default=1, help="generator processes (wrk: threads)")
    p.add_argument("--pg-pool", type=int, default=16, help="(b)'s asyncpg pool per process")
    p.add_argument("--fill", type=float, help="(d): seconds of admissions to drain (3; quick 1)")
    p.add_argument("--drain-workers", type=int, default=2, help="(d): worker processes")
    p.add_argument(
        "--delay-ms", type=float, default=20.0, help="(d): the delayed run's ms per reply (0: skip)"
    )
    p.add_argument("--queue-variants", nargs="+", choices=["static", "drain"], default=["static"])
    p.add_argument(
        "--queue-kinds", nargs="+", choices=["a", "e", "e304"], default=["a", "e", "e304"]
    )
    p.add_argument("--drain-rate", type=float, default=200.0, help="worker cap, (e) drain variant")
    p.add_argument("--overload-rate", type=float, help="offered rate (default: factor x (b))")
    p.add_argument("--overload-factor", type=float, default=1.5, help="x (b)'s closed-loop peak")
    p.add_argument("--overload-seconds", type=float, help="held this long (30; quick 5)")
    p.add_argument("--c-peak", type=float, help="(c)'s peak req/s when post is not run")
    p.add_argument("--timeout", type=float, default=2.0, help="open-loop client timeout (s)")
    p.add_argument(
        "--open-warmup", type=float, help="open-loop ramp from 0 to the rate (5; quick 2)"
    )
    p.add_argument("--open-procs", type=int, default=1, help="open-loop generator processes")
    p.add_argument("--max-connections", type=int, default=1024, help="open-loop connection cap")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an ordergate setting for the gateway and workers (e.g. batch_size=1000); repeatable",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin the server to its own CPU")
    p.add_argument("--profile", help="folder: py-spy the gateway (extra (c) run) and the drain")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, short in (
        ("duration", 10.0, 3.0),
        ("warmup", 2.0, 1.0),
        ("rounds", 2, 1),
        ("fill", 3.0, 1.0),
        ("overload_seconds", 30.0, 5.0),
        ("open_warmup", 5.0, 2.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    if args.generator == "wrk" and shutil.which("wrk") is None:
        print("wrk not found; using the built-in generator", file=sys.stderr)
        args.generator = "builtin"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    place = placement(not args.no_pin)
    if place.rest:
        os.sched_setaffinity(0, place.rest)  # children (Valkey, Postgres, generator) inherit
    started = time.monotonic()
    with temp_dir(args.keep) as tmp:
        # environ={}: never the caller's ORDERGATE_REDIS_URL (this writes a million orders),
        # always embedded servers in the temporary directory. max_buffered far above what the
        # runs admit without a drain (the bound is still checked in admit.lua, as in production).
        settings = Settings.load(
            {
                "data_dir": str(tmp),
                "port": free_port(),
                "processes": args.processes,
                "log_level": "warning",
                "workers": 1,
                "max_buffered": 100_000_000,
                # durability: the default, auto; as (f), it rests on the server's appendfsync
                # always, and sends no WAITAOF while each batch's CONFIG GET reports it
            }
            | dict(item.split("=", 1) for item in args.set),
            environ={},
        )
        if args.keep:
            print(f"data dir and logs: {tmp}", flush=True)
        arq_valkey = EmbeddedValkey(tmp / "arq")
        bench = Bench(args, tmp, place)
        try:
            with resolved(settings) as s:
                arq_url = arq_valkey.start()
                try:
                    bench.run(s, arq_url)
                finally:
                    for proc in reversed(bench.procs):
                        stop(proc)
                    if bench.cluster is not None:
                        bench.cluster.stop()
        finally:
            arq_valkey.stop()
    report = bench.report
    report["durability"] = settings.durability
    report["seconds"] = time.monotonic() - started
    out = Path(args.out)
    json_path = Path(args.json) if args.json else out / "bench.json"
    png_path = Path(args.png) if args.png else out / "bench.png"
    bench_report.finish(report, json_path, png_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

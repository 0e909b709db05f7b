"""Benchmark: does GET /v1/queue/{ticket} keep up with a plain Starlette endpoint? (target 0.8x)

Not a test: it prints figures and ratios against a baseline measured in the same run, on the
same machine, with the same uvicorn configuration as ``ordergate serve`` (1 process, uvloop,
httptools, no access log, log level warning):

* (a)    a plain Starlette app whose ``GET /v1/queue/{ticket}`` returns a fixed JSON dict
         (JSONResponse) of the same shape and size as a real answer;
* (e)    the gateway's queue endpoint, round-robin over ~2000 distinct tickets;
* (e304) the same with If-None-Match set to each ticket's current ETag.

Two variants: ``static`` (no worker, positions never move) and ``drain`` (a worker drains a
backlog at ORDERGATE_DRAIN_RATE=200 ahead of the polled tickets, so positions, ETAs and ETags
change while polled). Runs alternate a, e, e304 per round; the median of the rounds is reported.

CPU split on a 2-core machine: the server under test is pinned alone to the first CPU; this
script, the load generator, Valkey, PostgreSQL and the worker share the other. The table shows
how busy the server and the generator were, so a generator-bound run is visible.

    python loadtests/bench_queue.py [--duration 10] [--connections 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from buffer.connection import create_redis  # noqa: E402
from buffer.keys import Keys  # noqa: E402
from buffer.streams import ensure_streams  # noqa: E402
from gateway.auth import create_key  # noqa: E402
from loadtests.loadgen import HttpClient, LoadResult, RequestSpec, run_load  # noqa: E402
from ordergate.runtime import resolved  # noqa: E402
from ordergate.servers import die_with_parent, free_port  # noqa: E402
from ordergate.settings import Settings  # noqa: E402
from workers.migrate import migrate  # noqa: E402

TARGET = 0.8
SATURATED = 0.95  # below this server CPU share, a run was not limited by the server alone
POLLED = 2000  # distinct tickets polled per variant
KINDS = ("a", "e", "e304")
LABELS = {
    "a": "plain Starlette",
    "e": "ordergate queue",
    "e304": "ordergate queue, If-None-Match",
}


@dataclass
class Placement:
    """Which CPUs the server under test and everything else may use (None: no pinning)."""

    server: set[int] | None
    rest: set[int] | None

    def preexec_server(self) -> None:
        die_with_parent()
        if self.server:
            os.sched_setaffinity(0, self.server)


def placement(pin: bool) -> Placement:
    """The first allowed CPU for the server under test, the others for everything else."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return Placement(None, None)
    return Placement({cpus[0]}, set(cpus[1:]))


# --- the baseline app (a) ---------------------------------------------------------------------


def create_baseline_app(body: dict[str, Any]) -> Any:
    """The plain Starlette endpoint: same route, a fixed dict through JSONResponse."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def queue_status(request: Request) -> JSONResponse:
        return JSONResponse(body)

    return Starlette(routes=[Route("/v1/queue/{ticket}", queue_status, methods=["GET"])])


def serve_baseline(port: int, body_file: str) -> int:
    """uvicorn exactly as ``ordergate.cli.cmd_serve`` runs it (one process)."""
    import uvicorn

    body = json.loads(Path(body_file).read_text())
    uvicorn.run(
        lambda: create_baseline_app(body),
        factory=True,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )
    return 0


# --- processes ----------------------------------------------------------------------------------


def _env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without any ORDERGATE_* of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}
    env.update(extra)
    return env


def _spawn(
    cmd: list[str], env: Mapping[str, str], log: Path, place: Placement, server: bool
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=place.preexec_server if server else die_with_parent,
        )


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def _wait_http(url: str, path: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        client = HttpClient(url)
        try:
            status, _, _ = await client.request("GET", path)
            if status == 200:
                return
        except OSError:
            pass
        finally:
            await client.close()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url}{path} did not answer 200 within 30 s; see {log}")


# --- setup: schema, key, orders, ETags ----------------------------------------------------------


async def prepare(s: Settings) -> tuple[str, int]:
    """Schema, streams and an API key; and Valkey's pid (to report its CPU)."""
    await migrate(s.database_url or "", s.shards)
    redis = create_redis(s.redis_url or "")
    try:
        await ensure_streams(redis, Keys(s.key_prefix), s.shards)
        key = await create_key(redis, Keys(s.key_prefix), "shop-a")
        info = await redis.info("server")
        return key, int(info["process_id"])
    finally:
        await redis.aclose()


def order_body(sfo: str) -> bytes:
    """A valid order (as tests/conftest.py's ``order_body``)."""
    items: list[dict[str, Any]] = [
        {"sku": f"SKU-{i}", "quantity": i + 1, "unit_price_minor": 1250} for i in range(2)
    ]
    return json.dumps(
        {
            "storefront_order_id": sfo,
            "customer": {"id": "cust-1", "email": "ada@example.com"},
            "items": items,
            "currency": "EUR",
            "total_minor": sum(x["quantity"] * x["unit_price_minor"] for x in items),
        }
    ).encode()


async def admit(url: str, key: str, n: int, prefix: str, concurrency: int = 64) -> list[str]:
    """Admit ``n`` orders; their tickets, in queue order."""
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    receipts: list[tuple[int, str]] = []
    counter = iter(range(n))

    async def one_connection() -> None:
        client = HttpClient(url)
        try:
            for i in counter:
                status, _, body = await client.request(
                    "POST", "/v1/orders", headers, order_body(f"{prefix}-{i}")
                )
                if status != 202:
                    raise RuntimeError(f"admission answered {status}: {body[:300]!r}")
                receipt = json.loads(body)
                receipts.append((receipt["queue_number"], receipt["ticket"]))
        finally:
            await client.close()

    await asyncio.gather(*(one_connection() for _ in range(min(concurrency, n))))
    return [ticket for _, ticket in sorted(receipts)]


async def poll_once(url: str, tickets: Sequence[str]) -> list[tuple[int, dict[str, str], bytes]]:
    """One GET per ticket (16 connections): current ETags and bodies."""
    out: list[tuple[int, dict[str, str], bytes]] = [(0, {}, b"")] * len(tickets)
    indices = iter(range(len(tickets)))

    async def one_connection() -> None:
        client = HttpClient(url)
        try:
            for i in indices:
                out[i] = await client.request("GET", f"/v1/queue/{tickets[i]}")
        finally:
            await client.close()

    await asyncio.gather(*(one_connection() for _ in range(16)))
    return out


def _run(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Options:
    """How each run is made (the same for every kind and variant)."""

    duration: float
    warmup: float
    connections: int
    rounds: int
    generator: str
    gen_processes: int


def measure_variant(
    name: str,
    opts: Options,
    gateway_url: str,
    baseline_url: str,
    tickets: Sequence[str],
    watch: Mapping[str, Mapping[str, int]],
) -> dict[str, list[LoadResult]]:
    """Rounds of a, e, e304 (alternating, so drift hits all three alike)."""
    paths = [f"/v1/queue/{t}" for t in tickets]
    runs: dict[str, list[LoadResult]] = {k: [] for k in KINDS}
    for r in range(opts.rounds):
        for kind in KINDS:
            specs: list[RequestSpec] = list(paths)
            if kind == "e304":  # the freshest ETags we can have: read just before the run
                answers = _run(poll_once(gateway_url, tickets))
                specs = [
                    (p, {"If-None-Match": h["etag"]}) if st == 200 else p
                    for p, (st, h, _) in zip(paths, answers, strict=True)
                ]
            result = run_load(
                baseline_url if kind == "a" else gateway_url,
                specs,
                generator=opts.generator,
                connections=opts.connections,
                duration=opts.duration,
                warmup=opts.warmup,
                processes=opts.gen_processes,
                watch=watch["a" if kind == "a" else "e"],
            )
            runs[kind].append(result)
            print(
                f"  [{name} {r + 1}/{opts.rounds}] {kind:<4} {result.rps:>9,.0f} req/s  "
                f"p99 {result.p99_ms:6.2f} ms  "
                + "  ".join(f"{k} cpu {v:.0%}" for k, v in result.watched_cpu.items())
                + f"  generator cpu {result.generator_cpu:.0%}"
                + "  cpus busy "
                + "/".join(f"{b:.0%}" for b in result.cpu_busy),
                flush=True,
            )
    return runs


def median_run(runs: Sequence[LoadResult]) -> LoadResult:
    """The run with the median throughput (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.rps)
    return ordered[(len(ordered) - 1) // 2]


def summarize(runs: Mapping[str, Sequence[LoadResult]]) -> dict[str, Any]:
    med = {k: median_run(v) for k, v in runs.items()}
    rps = {k: statistics.median(r.rps for r in v) for k, v in runs.items()}
    spread = {
        k: (max(r.rps for r in v) - min(r.rps for r in v)) / rps[k] if rps[k] else math.nan
        for k, v in runs.items()
    }
    return {
        "median_rps": rps,
        "spread": spread,  # (max - min) / median over the rounds
        "median_run": {k: asdict(v) | {"error_share": v.error_share} for k, v in med.items()},
        "all_rps": {k: [r.rps for r in v] for k, v in runs.items()},
        "server_cpu": {
            k: [r.watched_cpu.get("server", math.nan) for r in v] for k, v in runs.items()
        },
        "ratio_e_a": rps["e"] / rps["a"] if rps["a"] else math.nan,
        "ratio_e304_a": rps["e304"] / rps["a"] if rps["a"] else math.nan,
        "pass": bool(rps["a"]) and rps["e"] / rps["a"] >= TARGET,
    }


def print_table(name: str, summary: Mapping[str, Any]) -> None:
    print(f"\n== variant: {name}")
    print(
        f"{'run':<40}{'req/s':>10}{'spread':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'304':>7}{'srv cpu':>9}{'gen cpu':>9}"
    )
    for kind in KINDS:
        r = summary["median_run"][kind]
        served = r["requests"] or 1
        cpu = next(iter(r["watched_cpu"].values()), math.nan)
        print(
            f"{'(' + kind + ') ' + LABELS[kind]:<40}{summary['median_rps'][kind]:>10,.0f}"
            f"{summary['spread'][kind]:>8.1%}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['error_share']:>8.2%}{r['not_modified'] / served:>7.0%}"
            f"{cpu:>9.0%}{r['generator_cpu']:>9.0%}"
        )
    unsaturated = [
        f"{kind} {cpu:.0%}"
        for kind, cpus in summary["server_cpu"].items()
        for cpu in cpus
        if cpu < SATURATED
    ]
    if unsaturated:
        print(f"note: server below {SATURATED:.0%} cpu in runs {', '.join(unsaturated)}: it also")
        print("      waited (on Redis, or a busy generator core); see cpus busy per run above")
    e, e304 = summary["ratio_e_a"], summary["ratio_e304_a"]
    print(f"ratio e/a    = {e:.3f}")
    print(f"ratio e304/a = {e304:.3f}")
    print(
        f"{'PASS' if summary['pass'] else 'FAIL'}: e/a {e:.3f} {'>=' if e >= TARGET else '<'} "
        f"{TARGET} ({name})"
    )


# --- the whole run ------------------------------------------------------------------------------


@contextlib.contextmanager
def temp_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="og-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def bench(args: argparse.Namespace) -> dict[str, Any]:
    place = placement(not args.no_pin)
    if place.rest:
        os.sched_setaffinity(0, place.rest)  # children (Valkey, Postgres, generator) inherit
    opts = Options(
        args.duration, args.warmup, args.connections, args.rounds, args.generator, args.gen_procs
    )
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpus": os.cpu_count(),
        "server_cpus": sorted(place.server or []),
        "other_cpus": sorted(place.rest or []),
        "options": asdict(opts),
        "target": TARGET,
        "variants": {},
    }
    with temp_dir(args.keep) as tmp:
        gw_port, base_port = free_port(), free_port()
        # environ={}: never the caller's ORDERGATE_REDIS_URL (this writes ~40k orders), always
        # embedded servers in the temporary directory.
        settings = Settings.load(
            {"data_dir": str(tmp), "port": gw_port, "log_level": "warning", "workers": 1},
            environ={},
        )
        if args.keep:
            print(f"data dir and logs: {tmp}", flush=True)
        procs: list[subprocess.Popen[bytes]] = []
        with resolved(settings) as s:
            try:
                _bench_with_servers(s, tmp, place, opts, args, report, procs, base_port)
            finally:
                for proc in reversed(procs):
                    _stop(proc)
    return report


def _bench_with_servers(
    s: Settings,
    tmp: Path,
    place: Placement,
    opts: Options,
    args: argparse.Namespace,
    report: dict[str, Any],
    procs: list[subprocess.Popen[bytes]],
    base_port: int,
) -> None:
    key, valkey_pid = _run(prepare(s))
    env = _env(s.to_env())
    gw_url, base_url = f"http://{s.host}:{s.port}", f"http://127.0.0.1:{base_port}"
    gw_log = tmp / "gateway.log"
    gateway = _spawn([sys.executable, "-m", "ordergate", "serve"], env, gw_log, place, True)
    procs.append(gateway)
    _run(_wait_http(gw_url, "/healthz", gateway, gw_log))

    print(f"admitting {POLLED} orders ...", flush=True)
    tickets = _run(admit(gw_url, key, POLLED, "static"))
    first = _run(poll_once(gw_url, tickets[:1]))[0]
    sample = json.loads(first[2])
    report["sample_answer"] = sample
    body_file = tmp / "baseline-body.json"
    body_file.write_text(json.dumps(sample))
    base_log = tmp / "baseline.log"
    baseline = _spawn(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-baseline",
            str(base_port),
            "--body-file",
            str(body_file),
        ],
        env,
        base_log,
        place,
        True,
    )
    procs.append(baseline)
    _run(_wait_http(base_url, f"/v1/queue/{tickets[0]}", baseline, base_log))
    watch = {
        "a": {"server": baseline.pid},
        "e": {"server": gateway.pid, "valkey": valkey_pid},
    }

    variants = [v for v in ("static", "drain") if v in args.variants]
    if "static" in variants:
        print("variant static: no worker, positions fixed", flush=True)
        runs = measure_variant("static", opts, gw_url, base_url, tickets, watch)
        report["variants"]["static"] = summarize(runs) | {"polled": len(tickets)}
    if args.profile:
        _profile(args.profile, gateway.pid, gw_url, tickets, opts)

    if "drain" in variants:
        # Enough backlog ahead of the polled tickets that they stay waiting for the whole
        # variant, so every poll takes the waiting path with a live ETA.
        per_run = opts.warmup + opts.duration + 1.5
        seconds = opts.rounds * len(KINDS) * per_run + 20
        backlog = math.ceil(args.drain_rate * seconds * 1.3)
        print(f"variant drain: admitting {backlog} + {POLLED} orders ...", flush=True)
        _run(admit(gw_url, key, backlog, "backlog"))
        drain_tickets = _run(admit(gw_url, key, POLLED, "drain"))
        wenv = env | {"ORDERGATE_DRAIN_RATE": f"{args.drain_rate:g}", "ORDERGATE_WORKERS": "1"}
        w_log = tmp / "worker.log"
        worker = _spawn([sys.executable, "-m", "ordergate", "work"], wenv, w_log, place, False)
        procs.append(worker)
        _run(_wait_for_eta(gw_url, drain_tickets[0], worker, w_log))
        runs = measure_variant("drain", opts, gw_url, base_url, drain_tickets, watch)
        last = json.loads(_run(poll_once(gw_url, drain_tickets[:1]))[0][2])
        report["variants"]["drain"] = summarize(runs) | {
            "polled": len(drain_tickets),
            "backlog": backlog,
            "drain_rate": args.drain_rate,
            "first_polled_at_end": last,
        }
        _stop(worker)


async def _wait_for_eta(url: str, ticket: str, worker: subprocess.Popen[bytes], log: Path) -> None:
    """Until the worker drains and has measured its rate (answers then carry an ETA)."""
    client = HttpClient(url)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}; see {log}")
            _, _, body = await client.request("GET", f"/v1/queue/{ticket}")
            if json.loads(body).get("eta_seconds") is not None:
                return
            await asyncio.sleep(0.2)
    finally:
        await client.close()
    raise RuntimeError(f"no ETA within 60 s; see {log}")


def _profile(out: str, pid: int, url: str, tickets: Sequence[str], opts: Options) -> None:
    """An extra (e) run under py-spy; the format follows the file name (.svg, .txt, .json)."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy not found (pip install py-spy); no profile", file=sys.stderr)
        return
    fmt = {".txt": "raw", ".json": "speedscope"}.get(Path(out).suffix, "flamegraph")
    seconds = max(1, round(opts.duration))
    cmd = [spy, "record", "--pid", str(pid), "-o", out, "-f", fmt, "-d", str(seconds)]
    spy_proc = subprocess.Popen(
        [*cmd, "-r", "250", "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    result = run_load(
        url,
        [f"/v1/queue/{t}" for t in tickets],
        generator=opts.generator,
        connections=opts.connections,
        duration=seconds + 1,
        warmup=0.5,
        processes=opts.gen_processes,
    )
    _, err = spy_proc.communicate(timeout=60)
    print(f"  profiled (e) run: {result.rps:,.0f} req/s under py-spy -> {out}")
    if spy_proc.returncode:
        print(err.decode(errors="replace")[-2000:], file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="a, e, e304 alternations (median)")
    p.add_argument("--generator", choices=["builtin", "wrk"], default="builtin")
    p.add_argument("--gen-procs", type=int, default=1, help="generator processes (wrk: threads)")
    p.add_argument(
        "--variants", nargs="+", choices=["static", "drain"], default=["static", "drain"]
    )
    p.add_argument("--drain-rate", type=float, default=200.0, help="worker cap, drain variant")
    p.add_argument("--no-pin", action="store_true", help="do not pin the server to its own CPU")
    p.add_argument("--profile", help="py-spy an extra (e) run into this file (.svg/.txt/.json)")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dir and logs")
    p.add_argument("--json", help="write the figures to this file")
    p.add_argument("--serve-baseline", type=int, help=argparse.SUPPRESS)
    p.add_argument("--body-file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_baseline:
        return serve_baseline(args.serve_baseline, args.body_file)
    if args.generator == "wrk" and shutil.which("wrk") is None:
        print("wrk not found; using the built-in generator", file=sys.stderr)
        args.generator = "builtin"

    report = bench(args)
    print(f"\ncommand: {report['command']}")
    print(
        f"cpus: {report['cpus']}; server under test on {report['server_cpus'] or 'any'}, "
        f"generator/Valkey/Postgres/worker on {report['other_cpus'] or 'any'}"
    )
    for name, summary in report["variants"].items():
        print_table(name, summary)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

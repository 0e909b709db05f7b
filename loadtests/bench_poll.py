"""(e): does ``GET /v1/queue/{ticket}`` keep up with a plain Starlette endpoint? (target 0.8x)

* (a) the plain app's ``GET /v1/queue/{ticket}`` (``loadtests.bench_apps``): a fixed dict through
  JSONResponse, of the same shape and size as a real answer;
* (e) the gateway's queue endpoint, round-robin over ~2000 distinct tickets;
* (e304) the same with If-None-Match set to each ticket's current ETag.

Two variants: ``static`` (no worker, positions never move) and ``drain`` (a worker drains a
backlog at ``--drain-rate`` ahead of the polled tickets, so positions, ETAs and ETags change
while polled). Runs alternate a, e, e304 per round; the median of the rounds is reported.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtests.bench_load import LoadResult, RequestSpec, run_load
from loadtests.bench_setup import HttpClient, admit, poll_once, run, spawn, stop

TARGET = 0.8
POLLED = 2000  # distinct tickets polled per variant
LABELS = {
    "a": "plain Starlette GET",
    "e": "ordergate queue",
    "e304": "ordergate queue, If-None-Match",
}


@dataclass
class Options:
    """How each closed-loop run is made (the same for every kind)."""

    duration: float
    warmup: float
    connections: int
    rounds: int
    generator: str
    gen_processes: int


def measure(
    name: str,
    kinds: Sequence[str],
    opts: Options,
    urls: Mapping[str, str],
    loads: Mapping[str, Callable[[], Any]],
    watch: Mapping[str, Mapping[str, int]],
) -> dict[str, list[LoadResult]]:
    """Rounds of ``kinds``, alternating so drift hits all alike; ``loads[kind]()`` is built
    just before each run (fresh ETags, fresh order ids)."""
    runs: dict[str, list[LoadResult]] = {k: [] for k in kinds}
    for r in range(opts.rounds):
        for kind in kinds:
            result = run_load(
                urls[kind],
                loads[kind](),
                generator=opts.generator,
                connections=opts.connections,
                duration=opts.duration,
                warmup=opts.warmup,
                processes=opts.gen_processes,
                watch=watch[kind],
            )
            runs[kind].append(result)
            print(
                f"  [{name} {r + 1}/{opts.rounds}] {kind:<5} {result.rps:>9,.0f} req/s  "
                f"p50 {result.p50_ms:6.2f}  p99 {result.p99_ms:6.2f} ms  errors "
                f"{result.error_share:.2%}  "
                + "  ".join(f"{k} cpu {v:.0%}" for k, v in result.watched_cpu.items())
                + f"  generator cpu {result.generator_cpu:.0%}  cpus busy "
                + "/".join(f"{b:.0%}" for b in result.cpu_busy),
                flush=True,
            )
    return runs


def median_run(runs: Sequence[LoadResult]) -> LoadResult:
    """The run with the median throughput (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.rps)
    return ordered[(len(ordered) - 1) // 2]


def summarize(runs: Mapping[str, Sequence[LoadResult]]) -> dict[str, Any]:
    """Median req/s (successful answers only), spread, and the median run of each kind."""
    rps = {k: statistics.median(r.ok_rps for r in v) for k, v in runs.items()}
    return {
        "median_rps": rps,
        "spread": {  # (max - min) / median over the rounds
            k: (max(r.ok_rps for r in v) - min(r.ok_rps for r in v)) / rps[k] if rps[k] else 0.0
            for k, v in runs.items()
        },
        "median_run": {
            k: asdict(median_run(v)) | {"error_share": median_run(v).error_share}
            for k, v in runs.items()
        },
        "all_rps": {k: [r.ok_rps for r in v] for k, v in runs.items()},
    }


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def run_queue(
    gw_url: str,
    plain_url: str,
    key: str,
    opts: Options,
    variants: Sequence[str],
    kinds: Sequence[str],
    watch: Mapping[str, Mapping[str, int]],
    tickets: Sequence[str],
    worker: Callable[[float], Any] | None = None,
    drain_rate: float = 200.0,
) -> dict[str, Any]:
    """Each variant's summary and ratios e/a, e304/a. ``tickets`` are waiting orders' tickets;
    ``worker(rate)`` starts a draining worker (the drain variant), returning its process."""
    out: dict[str, Any] = {}
    for variant in variants:
        polled = list(tickets)
        proc = None
        extra: dict[str, Any] = {}
        if variant == "drain":
            if worker is None:
                continue
            # Enough backlog ahead of the polled tickets that they stay waiting for the whole
            # variant, so every poll takes the waiting path with a live ETA.
            seconds = opts.rounds * len(kinds) * (opts.warmup + opts.duration + 1.5) + 20
            backlog = math.ceil(drain_rate * seconds * 1.3)
            print(f"  (e, drain) admitting {backlog} + {POLLED} orders ...", flush=True)
            run(admit(gw_url, key, backlog, f"backlog-{time.time_ns()}"))
            polled = run(admit(gw_url, key, POLLED, f"drain-{time.time_ns()}"))
            proc = worker(drain_rate)
            _wait_for_eta(gw_url, polled[0], proc)
            extra = {"backlog": backlog, "drain_rate": drain_rate}
        paths = [f"/v1/queue/{t}" for t in polled]

        def gets(paths: list[str] = paths) -> list[RequestSpec]:
            return list(paths)

        def conditional(paths: list[str] = paths, polled: list[str] = polled) -> list[RequestSpec]:
            answers = run(poll_once(gw_url, polled))  # the freshest ETags we can have
            return [
                (p, {"If-None-Match": h["etag"]}) if st == 200 else p
                for p, (st, h, _) in zip(paths, answers, strict=True)
            ]

        try:
            runs = measure(
                f"e {variant}",
                kinds,
                opts,
                {"a": plain_url, "e": gw_url, "e304": gw_url},
                {"a": gets, "e": gets, "e304": conditional},
                watch,
            )
        finally:
            stop(proc)
        summary = summarize(runs)
        rps = summary["median_rps"]
        summary["ratio_e_a"] = ratio(rps["e"], rps["a"])
        if "e304" in rps:
            summary["ratio_e304_a"] = ratio(rps["e304"], rps["a"])
        out[variant] = summary | {"polled": len(polled)} | extra
    return out


def _wait_for_eta(url: str, ticket: str, worker: Any) -> None:
    """Until the worker drains and has measured its rate (answers then carry an ETA)."""

    async def go() -> None:
        client = HttpClient(url)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if worker.poll() is not None:
                    raise RuntimeError(f"worker exited with {worker.returncode}")
                _, _, body = await client.request("GET", f"/v1/queue/{ticket}")
                if json.loads(body).get("eta_seconds") is not None:
                    return
                await _sleep(0.2)
        finally:
            await client.close()
        raise RuntimeError("no ETA within 60 s")

    run(go())


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def write_body_file(gw_url: str, ticket: str, path: Path) -> dict[str, Any]:
    """A real answer of the queue endpoint, for the plain app to serve as its fixed body."""
    sample: dict[str, Any] = json.loads(run(poll_once(gw_url, [ticket]))[0][2])
    path.write_text(json.dumps(sample))
    return sample


def start_worker_factory(
    cmd_env: Mapping[str, str], log: Path, place: Any
) -> Callable[[float], Any]:
    """``start(rate)``: a worker draining at ``rate`` (off the server CPU)."""

    def start(rate: float) -> Any:
        env = dict(cmd_env) | {"ORDERGATE_DRAIN_RATE": f"{rate:g}", "ORDERGATE_WORKERS": "1"}
        return spawn([sys.executable, "-m", "ordergate", "work"], env, log, place, False)

    return start

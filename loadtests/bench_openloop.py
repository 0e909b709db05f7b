"""Open-loop load: a fixed offered rate, kept whatever the server answers (raw asyncio).

A closed loop slows down with the server it measures, so it can never show a surge. Here every
request has a due time set in advance: the offered rate grows linearly from 0 over the warm-up
(so the connection pool grows with it, as it would with real clients), then holds at ``rate``
for the measured ``duration``. Latency counts from the due time, not from when the request went
out (no coordinated omission): waiting for a free connection is the server's fault too, and so
is the generator's 1 ms tick (a request waits up to 1 ms for it). A connection carries one
request at a time; when none is idle a new one is opened (8 connects at a time at most), up to
``max_connections``, beyond which due requests wait in line in the generator, as they would in
the storefronts' own client pools. A request not answered within ``timeout`` of its due time
counts as a timeout (its connection is closed, as a client giving up would); one still waiting
in line then is dropped and counted the same way.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import resource
import time
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from loadtests.bench_load import Load, ResponseParser, percentile_ms, request_maker, split_url

TICK_S = 0.001
TIMEOUT_CODE = -1  # latency slot of a request that timed out
ERROR_CODE = -2  # latency slot of a request whose connection failed
START_MARGIN_S = 0.5
PREOPEN = 64  # connections opened before the start (as many as the closed loop uses)
MAX_OPENING = 8  # connects in progress at once: the pool grows, it does not stampede


@dataclass
class OpenLoopResult:
    """One open-loop run. Latencies count from each request's due time."""

    url: str
    offered_rps: float
    seconds: float
    scheduled: int  # requests due in the measured window
    sent: int
    ok: int  # 2xx within the timeout
    other: int  # any other status within the timeout
    timeouts: int  # no answer within the timeout (dropped in line or cut off)
    socket_errors: int
    timeout_s: float
    p50_ms: float  # over every due request; a timeout counts as infinitely slow
    p95_ms: float
    p99_ms: float
    max_connections_used: int
    generator_cpu: float
    late_ms_p99: float  # how late the generator itself sent (its own lag, not the server's)
    p99_thirds_ms: list[float] = field(default_factory=list)  # first, middle, last third
    per_second: list[dict[str, float]] = field(default_factory=list)

    @property
    def error_share(self) -> float:
        """Share of due requests that got no 2xx in time: errors, timeouts, failed sockets."""
        bad = self.other + self.timeouts + self.socket_errors
        return bad / self.scheduled if self.scheduled else math.nan

    @property
    def achieved_rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


class _Gen:
    """One process's schedule, connections and records."""

    def __init__(self, make: Any, rate: float, start: float, warmup: float, duration: float):
        self.make = make
        self.rate = rate
        self.start = start
        self.ramp = warmup  # the rate grows linearly from 0 over the warm-up
        self.end = start + warmup + duration
        self.due = 0  # requests made due so far
        self.line: deque[tuple[int, float]] = deque()  # (index, due time) waiting for a conn
        self.idle: list[_OConn] = []
        self.inflight: deque[tuple[float, _OConn, int]] = deque()  # sent, in due order (about)
        self.conns: set[_OConn] = set()
        self.opening = 0
        self.max_used = 0
        # Per measured request (by index from the window start): latency in us or a code.
        self.n_measured = int(round(duration * rate))
        self.first_measured = int(math.ceil(warmup * rate / 2))
        self.results: array[int] = array("q", [TIMEOUT_CODE]) * self.n_measured
        self.status: array[int] = array("h", [0]) * self.n_measured
        self.sent = 0
        self.late_us: array[int] = array("q")

    def count_at(self, t: float) -> int:
        """Requests due ``t`` seconds after the start (the ramp, then the full rate)."""
        if t < self.ramp:
            return int(self.rate * t * t / (2 * self.ramp))
        return int(self.rate * (self.ramp / 2 + t - self.ramp))

    def due_of(self, i: int) -> float:
        """When request ``i`` is due (the inverse of ``count_at``)."""
        if i < self.rate * self.ramp / 2:
            return self.start + math.sqrt(2 * self.ramp * i / self.rate)
        return self.start + self.ramp + (i - self.rate * self.ramp / 2) / self.rate

    def slot(self, i: int) -> int:
        k = i - self.first_measured
        return k if 0 <= k < self.n_measured else -1


class _OConn(asyncio.Protocol):
    def __init__(self, gen: _Gen) -> None:
        self.gen = gen
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.current: tuple[int, float] | None = None  # (index, due time)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, index: int, due: float) -> None:
        assert self.transport is not None
        self.current = (index, due)
        g = self.gen
        k = g.slot(index)
        if k >= 0:
            g.sent += 1
            g.late_us.append(int((time.monotonic() - due) * 1e6))
        g.inflight.append((due, self, index))
        self.transport.write(g.make(index))

    def data_received(self, data: bytes) -> None:
        try:
            status = self.parser.feed(data)
        except ValueError:
            self._fail()
            return
        if not status or self.current is None:
            return
        index, due = self.current
        self.current = None
        g = self.gen
        k = g.slot(index)
        if k >= 0:
            g.results[k] = int((time.monotonic() - due) * 1e6)
            g.status[k] = status
        _dispatch(g, self)

    def cut(self) -> None:
        """Give up on the current request (timeout): close, as a client would."""
        self.current = None
        if self.transport is not None:
            self.transport.abort()

    def _fail(self) -> None:
        if self.current is not None:
            k = self.gen.slot(self.current[0])
            if k >= 0:
                self.gen.results[k] = ERROR_CODE
            self.current = None
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail()
        self.gen.conns.discard(self)
        if self in self.gen.idle:
            self.gen.idle.remove(self)


def _dispatch(g: _Gen, conn: _OConn) -> None:
    """``conn`` is free: give it the next request in line, or make it idle."""
    if g.line:
        index, due = g.line.popleft()
        conn.send(index, due)
    else:
        g.idle.append(conn)


async def _open(g: _Gen, host: str, port: int, max_connections: int) -> None:
    loop = asyncio.get_running_loop()
    g.opening += 1
    try:
        _, proto = await loop.create_connection(lambda: _OConn(g), host, port)
        conn = cast(_OConn, proto)
        g.conns.add(conn)
        g.max_used = max(g.max_used, len(g.conns))
        _dispatch(g, conn)
    except OSError:
        if g.line:  # the first in line loses its chance, as a failed connect would
            index, _ = g.line.popleft()
            k = g.slot(index)
            if k >= 0:
                g.results[k] = ERROR_CODE
        await asyncio.sleep(0.01)
    finally:
        g.opening -= 1


async def _generate(
    host: str,
    port: int,
    load: Load,
    index: int,
    rate: float,
    start_at: float,
    warmup: float,
    duration: float,
    timeout: float,
    max_connections: int,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    g = _Gen(request_maker(host, port, load, index), rate, start_at, warmup, duration)
    # Connected before the clock starts, as wrk does; more are opened when the line needs them.
    for _ in range(min(PREOPEN, max_connections)):
        await _open(g, host, port, max_connections)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    last_sweep = 0.0
    tasks: set[asyncio.Task[None]] = set()
    while True:
        now = time.monotonic()
        if now >= g.end + timeout:
            break
        total = g.first_measured + g.n_measured
        if g.due < total:
            due_now = min(g.count_at(now - g.start) + 1, total)
            while g.due < due_now:
                i = g.due
                g.due += 1
                due = g.due_of(i)
                if g.idle:
                    g.idle.pop().send(i, due)
                else:
                    g.line.append((i, due))
        # Open connections for the line, up to the cap (one per waiting request).
        want = min(
            len(g.line) - g.opening,
            max_connections - len(g.conns) - g.opening,
            MAX_OPENING - g.opening,
        )
        for _ in range(max(0, want)):
            t = loop.create_task(_open(g, host, port, max_connections))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if now - last_sweep >= 0.01:
            last_sweep = now
            limit = now - timeout
            while g.line and g.line[0][1] < limit:
                g.line.popleft()  # stays TIMEOUT_CODE
            while g.inflight and g.inflight[0][0] < limit:
                _, c, i = g.inflight.popleft()
                if c.current is not None and c.current[0] == i:
                    c.cut()
        await asyncio.sleep(TICK_S)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    for c in list(g.conns):
        c.cut()
    for t in tasks:
        t.cancel()
    return {
        "results": g.results.tobytes(),
        "status": g.status.tobytes(),
        "sent": g.sent,
        "late": g.late_us.tobytes(),
        "max_used": g.max_used,
        "cpu": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
        "first_measured": g.first_measured,
    }


def _child(args: tuple[Any, ...]) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_generate(*args))


def run_open_loop(
    url: str,
    load: Load,
    *,
    rate: float,
    duration: float = 30.0,
    warmup: float = 2.0,
    timeout: float = 2.0,
    processes: int = 1,
    max_connections: int = 1024,
) -> OpenLoopResult:
    """Offer ``rate`` requests/s for ``warmup + duration`` seconds; measure the last part."""
    host, port = split_url(url)
    processes = max(1, processes)
    start_at = time.monotonic() + START_MARGIN_S
    per = rate / processes
    jobs = [
        (
            host,
            port,
            load,
            i,
            per,
            start_at,
            warmup,
            duration,
            timeout,
            max_connections // processes,
        )
        for i in range(processes)
    ]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        parts = pool.map(_child, jobs)
    return _summarize(url, rate, warmup, duration, timeout, parts)


def _summarize(
    url: str,
    rate: float,
    warmup: float,
    duration: float,
    timeout: float,
    parts: Sequence[dict[str, Any]],
) -> OpenLoopResult:
    ok = other = timeouts = errors = 0
    everything: list[float] = []
    thirds: list[list[float]] = [[], [], []]
    seconds = max(1, int(round(duration)))
    buckets: list[list[float]] = [[] for _ in range(seconds)]
    late: array[int] = array("q")
    for p in parts:
        results: array[int] = array("q")
        results.frombytes(p["results"])
        status: array[int] = array("h")
        status.frombytes(p["status"])
        late.frombytes(p["late"])
        per = len(results) / duration if duration else 1.0
        for k, (lat, st) in enumerate(zip(results, status, strict=True)):
            if lat == TIMEOUT_CODE or lat > timeout * 1e6:
                timeouts += 1
                value = math.inf
            elif lat == ERROR_CODE:
                errors += 1
                value = math.inf
            else:
                value = float(lat)
                if 200 <= st < 300:
                    ok += 1
                else:
                    other += 1
            everything.append(value)
            thirds[min(2, int(3 * k / len(results)))].append(value)
            buckets[min(seconds - 1, int(k / per))].append(value)
    everything.sort()
    per_second = []
    for b in buckets:
        b.sort()
        per_second.append(
            {
                "p50_ms": percentile_ms(b, 50),
                "p99_ms": percentile_ms(b, 99),
                "bad_share": sum(1 for v in b if v == math.inf) / len(b) if b else math.nan,
            }
        )
    for t in thirds:
        t.sort()
    late_sorted = sorted(late)
    return OpenLoopResult(
        url=url,
        offered_rps=rate,
        seconds=duration,
        scheduled=len(everything),
        sent=sum(p["sent"] for p in parts),
        ok=ok,
        other=other,
        timeouts=timeouts,
        socket_errors=errors,
        timeout_s=timeout,
        p50_ms=percentile_ms(everything, 50),
        p95_ms=percentile_ms(everything, 95),
        p99_ms=percentile_ms(everything, 99),
        max_connections_used=sum(p["max_used"] for p in parts),
        generator_cpu=sum(p["cpu"] for p in parts) / (warmup + duration + timeout),
        late_ms_p99=percentile_ms(late_sorted, 99),
        p99_thirds_ms=[percentile_ms(t, 99) for t in thirds],
        per_second=per_second,
    )


def format_open(r: OpenLoopResult) -> str:
    def ms(v: float) -> str:
        return f"> {r.timeout_s * 1000:.0f}" if v == math.inf else f"{v:.1f}"

    return (
        f"offered {r.offered_rps:,.0f}/s for {r.seconds:.0f} s: {r.ok:,} ok of {r.scheduled:,} "
        f"({r.achieved_rps:,.0f}/s); p50 {ms(r.p50_ms)} / p95 {ms(r.p95_ms)} / p99 "
        f"{ms(r.p99_ms)} ms; errors {r.other + r.socket_errors:,}, timeouts {r.timeouts:,} "
        f"({r.error_share:.1%} bad); {r.max_connections_used} connections; generator cpu "
        f"{r.generator_cpu:.0%}, sends late by p99 {r.late_ms_p99:.1f} ms"
    )

"""Closed-loop load: wrk (Debian's, with a Lua script) or a built-in raw asyncio generator.

Closed loop: every connection keeps one request in flight and sends the next as soon as the
answer is complete (HTTP/1.1 keep-alive, no pipelining). What is sent is either a list of GET
paths taken round-robin (``RequestSpec``) or ``PostOrders``: one order per request, each with
its own ``storefront_order_id``, so idempotency and unique keys see new orders only.

Why not httpx/aiohttp or Locust: their client costs more CPU per request than a Starlette handler
does, so on a small machine they would measure themselves. The built-in generator is a bare
``asyncio.Protocol`` per connection that parses only the status line and Content-Length; it runs
in forked children, never in the caller's process, so the caller can sample the CPU of the
servers under test (``watch``) over exactly the measured window.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import tempfile
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import psutil

# A GET to send: a path, or a path with extra headers (e.g. If-None-Match).
RequestSpec = str | tuple[str, Mapping[str, str]]

START_MARGIN_S = 0.3  # time for the forked generators to connect before the clock starts
_WARMUP, _MEASURE, _STOPPED = 0, 1, 2
ID_DIGITS = 10


@dataclass(frozen=True)
class PostOrders:
    """POST ``body_prefix + <unique id> + body_suffix`` to ``path``, one new id per request.

    The id is ``<tag><generator index, 2 digits><counter, 10 digits>``: fixed width, so every
    request of a run has the same Content-Length, and unique across runs with distinct tags.
    """

    path: str
    headers: tuple[tuple[str, str], ...]
    body_prefix: bytes
    body_suffix: bytes
    tag: str

    def id_of(self, generator: int, n: int) -> bytes:
        return b"%s%02d%0*d" % (self.tag.encode(), generator, ID_DIGITS, n)

    def body_length(self) -> int:
        return len(self.body_prefix) + len(self.id_of(0, 0)) + len(self.body_suffix)


Load = Sequence[RequestSpec] | PostOrders


@dataclass
class LoadResult:
    """What one load run measured; ``*_cpu`` are shares of one core over the measured window."""

    generator: str
    url: str
    connections: int
    processes: int
    seconds: float
    requests: int  # complete responses in the window
    rps: float
    ok: int  # 2xx
    not_modified: int  # 304
    other: int  # any other status
    socket_errors: int  # connections lost or unparsable answers
    p50_ms: float
    p95_ms: float
    p99_ms: float
    generator_cpu: float
    watched_cpu: dict[str, float] = field(default_factory=dict)
    cpu_busy: list[float] = field(default_factory=list)  # per CPU of the machine, 0..1

    @property
    def error_share(self) -> float:
        total = self.requests + self.socket_errors
        return (self.other + self.socket_errors) / total if total else 1.0

    @property
    def ok_rps(self) -> float:
        """Successful answers (2xx and 304) per second."""
        return (self.ok + self.not_modified) / self.seconds if self.seconds else 0.0


def split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http://host:port URLs are supported, not {url!r}")
    return parts.hostname, parts.port or 80


def _authority(host: str, port: int) -> str:
    return host if port == 80 else f"{host}:{port}"


def build_gets(host: str, port: int, specs: Sequence[RequestSpec]) -> list[bytes]:
    """The raw bytes of each GET, built once: the hot loop only writes them."""
    out: list[bytes] = []
    for spec in specs:
        path, extra = (spec, {}) if isinstance(spec, str) else spec
        lines = [f"GET {path} HTTP/1.1", f"Host: {_authority(host, port)}", "User-Agent: og-bench"]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        out.append(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return out


def request_maker(host: str, port: int, load: Load, generator: int) -> Callable[[int], bytes]:
    """``make(n)``: the raw bytes of this generator's n-th request."""
    if isinstance(load, PostOrders):
        lines = [f"POST {load.path} HTTP/1.1", f"Host: {_authority(host, port)}"]
        lines += [f"{k}: {v}" for k, v in load.headers]
        lines.append(f"Content-Length: {load.body_length()}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + load.body_prefix
        suffix, id_of = load.body_suffix, load.id_of

        def make_post(n: int) -> bytes:
            return head + id_of(generator, n) + suffix

        return make_post
    gets = build_gets(host, port, load)
    offset = generator * 7919

    def make_get(n: int) -> bytes:
        return gets[(n + offset) % len(gets)]

    return make_get


class ResponseParser:
    """Frames HTTP/1.1 responses on one connection by Content-Length (1xx/204/304: no body)."""

    __slots__ = ("buf", "need", "status")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1  # bytes of the current response once its head is parsed
        self.status = 0

    def feed(self, data: bytes) -> int:
        """The status of the response completed by ``data``, 0 if none is complete yet.

        Raises ValueError for an answer it cannot frame. No pipelining: at most one response
        is outstanding, so nothing follows it in the buffer.
        """
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return 0
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                length = int(head[i + 17 : j if j >= 0 else len(head)])
            elif self.status in (204, 304) or self.status < 200:
                length = 0
            else:
                raise ValueError("no Content-Length")
            self.need = end + 4 + length
        if len(buf) < self.need:
            return 0
        del buf[: self.need]
        self.need = -1
        return self.status


# --- built-in closed loop -----------------------------------------------------------------------


class _Run:
    """One process's share of the connections, its counters and its clock."""

    def __init__(self, make: Callable[[int], bytes]) -> None:
        self.make = make
        self.n = 0
        self.phase = _WARMUP
        self.ok = self.not_modified = self.other = self.socket_errors = 0
        self.latencies_us: array[int] = array("q")

    def take(self) -> bytes:
        self.n += 1
        return self.make(self.n)

    def record(self, status: int, latency_ns: int) -> None:
        if self.phase != _MEASURE:
            return
        self.latencies_us.append(latency_ns // 1000)
        if 200 <= status < 300:
            self.ok += 1
        elif status == 304:
            self.not_modified += 1
        else:
            self.other += 1


class _Conn(asyncio.Protocol):
    """One keep-alive connection: send, read one whole response, send the next."""

    def __init__(self, run: _Run, lost: asyncio.Queue[_Conn]) -> None:
        self.run = run
        self.lost = lost
        self.parser = ResponseParser()
        self.sent_ns = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if self.run.phase == _STOPPED:
            return
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(self.run.take())

    def data_received(self, data: bytes) -> None:
        try:
            status = self.parser.feed(data)
        except ValueError:
            assert self.transport is not None
            self.transport.abort()  # counted in connection_lost
            return
        if status:
            self.run.record(status, time.perf_counter_ns() - self.sent_ns)
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        # Closed loop: a request is always in flight, so a lost connection is a lost request.
        if self.run.phase == _MEASURE:
            self.run.socket_errors += 1
        if self.run.phase != _STOPPED:
            self.lost.put_nowait(self)


async def _generate(
    host: str,
    port: int,
    load: Load,
    index: int,
    connections: int,
    start_at: float,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = _Run(request_maker(host, port, load, index))
    lost: asyncio.Queue[_Conn] = asyncio.Queue()
    conns: list[_Conn] = []

    async def connect() -> None:
        _, proto = await loop.create_connection(lambda: _Conn(run, lost), host, port)
        conns.append(proto)

    # Connected (and sending: warm-up) before the clock starts; the start is shared by all
    # generator processes through CLOCK_MONOTONIC.
    await asyncio.gather(*(connect() for _ in range(connections)))

    async def reconnect() -> None:
        while True:
            await lost.get()
            try:
                await connect()
            except OSError:
                if run.phase == _MEASURE:
                    run.socket_errors += 1
                await asyncio.sleep(0.01)
                lost.put_nowait(_Conn(run, lost))

    reconnector = loop.create_task(reconnect())
    await asyncio.sleep(max(0.0, start_at + warmup - time.monotonic()))
    run.phase = _MEASURE
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(max(0.0, start_at + warmup + duration - time.monotonic()))
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    run.phase = _STOPPED
    reconnector.cancel()
    for c in conns:
        if c.transport is not None:
            c.transport.abort()
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return {
        "seconds": t1 - t0,
        "ok": run.ok,
        "not_modified": run.not_modified,
        "other": run.other,
        "socket_errors": run.socket_errors,
        "cpu": cpu,
        "latencies": run.latencies_us.tobytes(),
    }


def _child(args: tuple[Any, ...]) -> dict[str, Any]:
    import uvloop

    return uvloop.run(_generate(*args))


def percentile_ms(sorted_us: Sequence[int] | Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of sorted microseconds, in milliseconds."""
    if not sorted_us:
        return math.nan
    k = min(len(sorted_us) - 1, max(0, math.ceil(q / 100 * len(sorted_us)) - 1))
    return sorted_us[k] / 1000.0


def cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    """User + system CPU seconds of each process and its live children (uvicorn workers)."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            total = 0.0
            for p in [proc, *proc.children(recursive=True)]:
                t = p.cpu_times()
                total += t.user + t.system
            out[pid] = total
        except psutil.Error:
            out[pid] = math.nan
    return out


def busy(t0: Sequence[Any], t1: Sequence[Any]) -> list[float]:
    """Per-CPU busy share between two ``psutil.cpu_times(percpu=True)`` samples."""
    out = []
    for a, b in zip(t0, t1, strict=True):
        total = sum(b) - sum(a)
        idle = (b.idle + getattr(b, "iowait", 0.0)) - (a.idle + getattr(a, "iowait", 0.0))
        out.append(1 - idle / total if total > 0 else math.nan)
    return out


def run_builtin(
    url: str,
    load: Load,
    *,
    connections: int = 64,
    duration: float = 10.0,
    warmup: float = 2.0,
    processes: int = 1,
    watch: Mapping[str, int] | None = None,
) -> LoadResult:
    """Run the built-in generator in ``processes`` forked children; block until done."""
    host, port = split_url(url)
    processes = max(1, min(processes, connections))
    watch = dict(watch or {})
    start_at = time.monotonic() + START_MARGIN_S
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    jobs = [(host, port, load, i, n, start_at, warmup, duration) for i, n in enumerate(shares)]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        pending = pool.map_async(_child, jobs)
        time.sleep(max(0.0, start_at + warmup - time.monotonic()))
        c0, m0 = cpu_seconds(list(watch.values())), psutil.cpu_times(percpu=True)
        w0 = time.perf_counter()
        time.sleep(max(0.0, start_at + warmup + duration - time.monotonic()))
        c1, m1 = cpu_seconds(list(watch.values())), psutil.cpu_times(percpu=True)
        window = time.perf_counter() - w0
        parts = pending.get(timeout=duration + warmup + 60)
    latencies: array[int] = array("q")
    for p in parts:
        latencies.frombytes(p["latencies"])
    ordered = sorted(latencies)
    seconds = max(p["seconds"] for p in parts)
    ok, nm, other = (sum(p[k] for p in parts) for k in ("ok", "not_modified", "other"))
    return LoadResult(
        generator="builtin",
        url=url,
        connections=connections,
        processes=processes,
        seconds=seconds,
        requests=len(ordered),
        rps=len(ordered) / seconds,
        ok=ok,
        not_modified=nm,
        other=other,
        socket_errors=sum(p["socket_errors"] for p in parts),
        p50_ms=percentile_ms(ordered, 50),
        p95_ms=percentile_ms(ordered, 95),
        p99_ms=percentile_ms(ordered, 99),
        generator_cpu=sum(p["cpu"] for p in parts) / seconds,
        watched_cpu={name: (c1[pid] - c0[pid]) / window for name, pid in watch.items()},
        cpu_busy=busy(m0, m1),
    )


# --- wrk ----------------------------------------------------------------------------------------


def _lua_str(s: str | bytes) -> str:
    text = s.decode("latin-1") if isinstance(s, bytes) else s
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_WRK_DONE = r"""
function done(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + (t:get("n2xx") or 0); b = b + (t:get("n304") or 0); c = c + (t:get("nother") or 0)
  end
  local e = summary.errors
  if counted == 0 then  -- no response(): wrk's own count, where >= 400 is an error
    c = e.status; a = summary.requests - c
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"ok":%d,"not_modified":%d,"other":%d,' ..
    '"socket_errors":%d,"p50":%.0f,"p95":%.0f,"p99":%.0f}\n',
    summary.requests, summary.duration, a, b, c,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""

_WRK_GET = r"""
local threads = {}
local reqs = {}
local i = 0
counted = 1
n2xx, n304, nother = 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("offset", #threads * 7919)
end

function init(args)
  for k, s in ipairs(specs) do reqs[k] = wrk.format("GET", s[1], s[2]) end
  i = offset % #reqs
end

function request()
  i = i % #reqs + 1
  return reqs[i]
end

function response(status, headers, body)
  if status == 304 then n304 = n304 + 1
  elseif status >= 200 and status < 300 then n2xx = n2xx + 1
  else nother = nother + 1 end
end
"""

# No response() callback for POSTs: it would make wrk parse every header into Lua; wrk's own
# error count (status >= 400) tells failures from 2xx.
_WRK_POST = r"""
local threads = {}
local n = 0
counted = 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("gen", #threads - 1)
end

function request()
  n = n + 1
  local body = prefix .. string.format("%s%02d%010d", tag, gen, n) .. suffix
  return wrk.format("POST", path, headers, body)
end
"""


def wrk_script(load: Load) -> str:
    """A wrk Lua script for ``load`` that prints its counts as one JSON line."""
    if isinstance(load, PostOrders):
        hdrs = ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in load.headers)
        return (
            f"path = {_lua_str(load.path)}\nheaders = {{{hdrs}}}\n"
            f"prefix = {_lua_str(load.body_prefix)}\nsuffix = {_lua_str(load.body_suffix)}\n"
            f"tag = {_lua_str(load.tag)}\n" + _WRK_POST + _WRK_DONE
        )
    rows = []
    for spec in load:
        path, extra = (spec, {}) if isinstance(spec, str) else spec
        hdrs = ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in extra.items())
        rows.append(f"  {{{_lua_str(path)}, {{{hdrs}}}}},")
    return "local specs = {\n" + "\n".join(rows) + "\n}\n" + _WRK_GET + _WRK_DONE


def run_wrk(
    url: str,
    load: Load,
    *,
    connections: int = 64,
    duration: float = 10.0,
    warmup: float = 2.0,
    threads: int = 1,
    watch: Mapping[str, int] | None = None,
) -> LoadResult:
    """Run Debian's ``wrk``: a warm-up run, then the measured run."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    watch = dict(watch or {})
    threads = max(1, min(threads, connections))
    target = url.rstrip("/")
    if isinstance(load, PostOrders):
        target += load.path
    scripts: list[str] = []

    def wrk_run(seconds: float, run_load: Load) -> subprocess.Popen[str]:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
            f.write(wrk_script(run_load))
            scripts.append(f.name)
        cmd = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s"]
        return subprocess.Popen(
            [*cmd, "--timeout", "5s", "-s", scripts[-1], target], stdout=subprocess.PIPE, text=True
        )

    try:
        if warmup > 0:
            warm = load
            if isinstance(load, PostOrders):  # other ids than the measured run's
                warm = PostOrders(
                    load.path, load.headers, load.body_prefix, load.body_suffix, load.tag + "w"
                )
            wrk_run(max(1.0, round(warmup)), warm).communicate()
        seconds = max(1.0, round(duration))
        proc = wrk_run(seconds, load)
        pids = [*watch.values(), proc.pid]
        c0, m0, w0 = cpu_seconds(pids), psutil.cpu_times(percpu=True), time.perf_counter()
        time.sleep(0.98 * seconds)  # wrk's own window; ends just before
        c1, m1, window = cpu_seconds(pids), psutil.cpu_times(percpu=True), time.perf_counter() - w0
        out, _ = proc.communicate()
    finally:
        for script in scripts:
            os.unlink(script)
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
    d = json.loads(m.group(1))
    seconds = d["duration_us"] / 1e6
    return LoadResult(
        generator="wrk",
        url=target,
        connections=connections,
        processes=threads,
        seconds=seconds,
        requests=d["requests"],
        rps=d["requests"] / seconds,
        ok=d["ok"],
        not_modified=d["not_modified"],
        other=d["other"],
        socket_errors=d["socket_errors"],
        p50_ms=d["p50"] / 1000,
        p95_ms=d["p95"] / 1000,
        p99_ms=d["p99"] / 1000,
        generator_cpu=(c1[proc.pid] - c0[proc.pid]) / window,
        watched_cpu={name: (c1[pid] - c0[pid]) / window for name, pid in watch.items()},
        cpu_busy=busy(m0, m1),
    )


def run_load(
    url: str,
    load: Load,
    *,
    generator: str = "wrk",
    connections: int = 64,
    duration: float = 10.0,
    warmup: float = 2.0,
    processes: int = 1,
    watch: Mapping[str, int] | None = None,
) -> LoadResult:
    """One measured closed-loop run with the chosen generator (``wrk`` or ``builtin``)."""
    if generator == "wrk":
        return run_wrk(
            url,
            load,
            connections=connections,
            duration=duration,
            warmup=warmup,
            threads=processes,
            watch=watch,
        )
    return run_builtin(
        url,
        load,
        connections=connections,
        duration=duration,
        warmup=warmup,
        processes=processes,
        watch=watch,
    )


def format_result(r: LoadResult) -> str:
    watched = "".join(f", {k} cpu {v:.0%}" for k, v in r.watched_cpu.items())
    watched += ", machine cpus busy " + "/".join(f"{b:.0%}" for b in r.cpu_busy)
    return (
        f"{r.rps:,.0f} req/s over {r.seconds:.1f} s ({r.connections} conns, {r.generator} x"
        f"{r.processes}); p50 {r.p50_ms:.2f} / p95 {r.p95_ms:.2f} / p99 {r.p99_ms:.2f} ms; "
        f"2xx {r.ok}, 304 {r.not_modified}, other {r.other}, socket errors {r.socket_errors}; "
        f"generator cpu {r.generator_cpu:.0%}{watched}"
    )

"""A closed-loop HTTP/1.1 keep-alive load generator for GET endpoints (asyncio, uvloop, raw).

Why not httpx/aiohttp or Locust: their client costs more CPU per request than a Starlette
handler does, so on a small machine they measure themselves. Here each connection is a bare
``asyncio.Protocol`` that sends one prebuilt request, waits for the whole answer (framed by
Content-Length; 1xx/204/304 have no body) and sends the next: no pipelining, no parsing beyond
the status line and the length. The requests come round-robin from one list, so many
connections spread over many distinct paths.

The generator runs in child processes (``processes``, forked), never in the caller's process, so
the caller can sample the CPU of the server under test (``watch``) over exactly the measured
window. With Debian's ``wrk`` installed, ``generator="wrk"`` runs that instead.

    python loadtests/loadgen.py http://127.0.0.1:8000 --path /healthz -c 64 -d 10
    python loadtests/loadgen.py http://127.0.0.1:8000 --paths-file paths.json --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import psutil

# A request to send: a path, or a path with extra headers (e.g. If-None-Match).
RequestSpec = str | tuple[str, Mapping[str, str]]

START_MARGIN_S = 0.3  # time for the forked generators to connect before the clock starts
_WARMUP, _MEASURE, _STOPPED = 0, 1, 2


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


def build_requests(host: str, port: int, specs: Sequence[RequestSpec]) -> list[bytes]:
    """The raw bytes of each GET, built once: the hot loop only writes them."""
    out: list[bytes] = []
    authority = host if port == 80 else f"{host}:{port}"
    for spec in specs:
        path, extra = (spec, {}) if isinstance(spec, str) else spec
        lines = [f"GET {path} HTTP/1.1", f"Host: {authority}", "User-Agent: og-loadgen"]
        lines += [f"{k}: {v}" for k, v in extra.items()]
        out.append(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return out


class _Run:
    """One process's share of the connections, its counters and its clock."""

    def __init__(self, requests: list[bytes], offset: int) -> None:
        self.requests = requests
        self.next = offset % len(requests)
        self.phase = _WARMUP
        self.ok = self.not_modified = self.other = self.socket_errors = 0
        self.latencies_us: array[int] = array("q")

    def take(self) -> bytes:
        i = self.next
        self.next = i + 1 if i + 1 < len(self.requests) else 0
        return self.requests[i]

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
        self.buf = bytearray()
        self.need = -1  # bytes of the current response once its head is parsed
        self.status = 0
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
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            try:
                self.status = int(head[9:12])
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    length = int(head[i + 17 : j if j >= 0 else len(head)])
                elif self.status in (204, 304) or self.status < 200:
                    length = 0
                else:
                    raise ValueError("no Content-Length")
            except ValueError:
                self._fail()
                return
            self.need = end + 4 + length
        if len(buf) < self.need:
            return
        done_ns = time.perf_counter_ns()
        del buf[: self.need]  # no pipelining: nothing else can be in the buffer
        self.need = -1
        self.run.record(self.status, done_ns - self.sent_ns)
        self.send()

    def _fail(self) -> None:
        assert self.transport is not None
        self.transport.abort()  # counted in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        # Closed loop: a request is always in flight, so a lost connection is a lost request.
        if self.run.phase == _MEASURE:
            self.run.socket_errors += 1
        if self.run.phase != _STOPPED:
            self.lost.put_nowait(self)


async def _generate(
    host: str,
    port: int,
    requests: list[bytes],
    connections: int,
    offset: int,
    start_at: float,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    run = _Run(requests, offset)
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


def _percentile(sorted_us: Sequence[int], q: float) -> float:
    if not sorted_us:
        return math.nan
    k = min(len(sorted_us) - 1, max(0, math.ceil(q / 100 * len(sorted_us)) - 1))
    return sorted_us[k] / 1000.0


def _cpu_seconds(pids: Sequence[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            out[pid] = math.nan
    return out


def _busy(t0: Sequence[Any], t1: Sequence[Any]) -> list[float]:
    """Per-CPU busy share between two ``psutil.cpu_times(percpu=True)`` samples."""
    out = []
    for a, b in zip(t0, t1, strict=True):
        total = sum(b) - sum(a)
        idle = (b.idle + getattr(b, "iowait", 0.0)) - (a.idle + getattr(a, "iowait", 0.0))
        out.append(1 - idle / total if total > 0 else math.nan)
    return out


def _split_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http://host:port URLs are supported, not {url!r}")
    return parts.hostname, parts.port or 80


def run_builtin(
    url: str,
    specs: Sequence[RequestSpec],
    *,
    connections: int = 64,
    duration: float = 10.0,
    warmup: float = 2.0,
    processes: int = 1,
    watch: Mapping[str, int] | None = None,
) -> LoadResult:
    """Run the built-in generator in ``processes`` forked children; block until done."""
    host, port = _split_url(url)
    requests = build_requests(host, port, specs)
    processes = max(1, min(processes, connections))
    watch = dict(watch or {})
    start_at = time.monotonic() + START_MARGIN_S
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    jobs = [
        (host, port, requests, n, i * len(requests) // processes, start_at, warmup, duration)
        for i, n in enumerate(shares)
    ]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes) as pool:
        pending = pool.map_async(_child, jobs)
        time.sleep(max(0.0, start_at + warmup - time.monotonic()))
        c0, m0 = _cpu_seconds(list(watch.values())), psutil.cpu_times(percpu=True)
        w0 = time.perf_counter()
        time.sleep(max(0.0, start_at + warmup + duration - time.monotonic()))
        c1, m1 = _cpu_seconds(list(watch.values())), psutil.cpu_times(percpu=True)
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
        p50_ms=_percentile(ordered, 50),
        p95_ms=_percentile(ordered, 95),
        p99_ms=_percentile(ordered, 99),
        generator_cpu=sum(p["cpu"] for p in parts) / seconds,
        watched_cpu={name: (c1[pid] - c0[pid]) / window for name, pid in watch.items()},
        cpu_busy=_busy(m0, m1),
    )


def _lua_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_WRK_LUA = r"""
local threads = {}
local reqs = {}
local i = 0
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

function done(summary, latency, requests)
  local a, b, c = 0, 0, 0
  for _, t in ipairs(threads) do
    a = a + t:get("n2xx"); b = b + t:get("n304"); c = c + t:get("nother")
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"ok":%d,"not_modified":%d,"other":%d,' ..
    '"socket_errors":%d,"p50":%.0f,"p95":%.0f,"p99":%.0f}\n',
    summary.requests, summary.duration, a, b, c,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
"""


def wrk_script(specs: Sequence[RequestSpec]) -> str:
    """A wrk Lua script sending ``specs`` round-robin and printing counts as one JSON line.

    wrk counts only >= 400 as errors, so 2xx and 304 are counted here via ``response``.
    """
    rows = []
    for spec in specs:
        path, extra = (spec, {}) if isinstance(spec, str) else spec
        hdrs = ", ".join(f"[{_lua_str(k)}] = {_lua_str(v)}" for k, v in extra.items())
        rows.append(f"  {{{_lua_str(path)}, {{{hdrs}}}}},")
    return "local specs = {\n" + "\n".join(rows) + "\n}\n" + _WRK_LUA


def run_wrk(
    url: str,
    specs: Sequence[RequestSpec],
    *,
    connections: int = 64,
    duration: float = 10.0,
    warmup: float = 2.0,
    threads: int = 1,
    watch: Mapping[str, int] | None = None,
) -> LoadResult:
    """Run Debian's ``wrk`` (warm-up run, then the measured run) with a round-robin script."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    watch = dict(watch or {})
    threads = max(1, min(threads, connections))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(wrk_script(specs))
        script = f.name
    try:

        def wrk_run(seconds: float) -> subprocess.Popen[str]:
            cmd = [wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s"]
            return subprocess.Popen(
                [*cmd, "--timeout", "5s", "-s", script, url], stdout=subprocess.PIPE, text=True
            )

        if warmup > 0:
            wrk_run(max(1.0, round(warmup))).communicate()
        proc = wrk_run(max(1.0, round(duration)))
        pids = [*watch.values(), proc.pid]
        c0, m0, w0 = _cpu_seconds(pids), psutil.cpu_times(percpu=True), time.perf_counter()
        time.sleep(0.98 * max(1.0, round(duration)))  # wrk's own window; ends just before
        c1, m1, window = _cpu_seconds(pids), psutil.cpu_times(percpu=True), time.perf_counter() - w0
        out, _ = proc.communicate()
    finally:
        os.unlink(script)
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}")
    d = json.loads(m.group(1))
    seconds = d["duration_us"] / 1e6
    return LoadResult(
        generator="wrk",
        url=url,
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
        cpu_busy=_busy(m0, m1),
    )


def run_load(
    url: str,
    specs: Sequence[RequestSpec],
    *,
    generator: str = "builtin",
    connections: int = 64,
    duration: float = 10.0,
    warmup: float = 2.0,
    processes: int = 1,
    watch: Mapping[str, int] | None = None,
) -> LoadResult:
    """One measured run with the chosen generator (``builtin`` or ``wrk``)."""
    if generator == "wrk":
        return run_wrk(
            url,
            specs,
            connections=connections,
            duration=duration,
            warmup=warmup,
            threads=processes,
            watch=watch,
        )
    return run_builtin(
        url,
        specs,
        connections=connections,
        duration=duration,
        warmup=warmup,
        processes=processes,
        watch=watch,
    )


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client for setup work (admitting orders, reading ETags)."""

    def __init__(self, url: str) -> None:
        self.host, self.port = _split_url(url)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body; reconnects once if the peer closed."""
        for attempt in (0, 1):
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
            assert self._reader is not None
            lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            if body or method in ("POST", "PUT"):
                lines.append(f"Content-Length: {len(body)}")
            self._writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            try:
                head = await self._reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                await self.close()
                if attempt:
                    raise
                continue
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            hdrs = {}
            for line in header_lines:
                if ":" in line:
                    k, v = line.split(":", 1)
                    hdrs[k.strip().lower()] = v.strip()
            status = int(status_line.split()[1])
            length = int(hdrs.get("content-length", "0"))
            data = await self._reader.readexactly(length) if length else b""
            if hdrs.get("connection", "").lower() == "close":
                await self.close()
            return status, hdrs, data
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._reader = None


def format_result(r: LoadResult) -> str:
    watched = "".join(f", {k} cpu {v:.0%}" for k, v in r.watched_cpu.items())
    watched += ", machine cpus busy " + "/".join(f"{b:.0%}" for b in r.cpu_busy)
    return (
        f"{r.rps:,.0f} req/s over {r.seconds:.1f} s ({r.connections} conns, {r.generator} x"
        f"{r.processes}); p50 {r.p50_ms:.2f} / p95 {r.p95_ms:.2f} / p99 {r.p99_ms:.2f} ms; "
        f"2xx {r.ok}, 304 {r.not_modified}, other {r.other}, socket errors {r.socket_errors}; "
        f"generator cpu {r.generator_cpu:.0%}{watched}"
    )


def _load_specs(path: str) -> list[RequestSpec]:
    """A JSON list of paths or of {"path": ..., "headers": {...}} objects."""
    with open(path) as f:
        raw = json.load(f)
    return [x if isinstance(x, str) else (x["path"], x.get("headers", {})) for x in raw]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", help="http://host:port")
    p.add_argument("--path", action="append", default=[], help="a path to GET (repeatable)")
    p.add_argument("--paths-file", help="JSON list of paths or {path, headers} objects")
    p.add_argument("-c", "--connections", type=int, default=64)
    p.add_argument("-d", "--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("-p", "--processes", type=int, default=1, help="generator processes/threads")
    p.add_argument("--generator", choices=["builtin", "wrk"], default="builtin")
    p.add_argument("--watch-pid", type=int, action="append", default=[], help="report its CPU")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    specs: list[RequestSpec] = list(args.path)
    if args.paths_file:
        specs += _load_specs(args.paths_file)
    if not specs:
        p.error("give --path or --paths-file")
    result = run_load(
        args.url,
        specs,
        generator=args.generator,
        connections=args.connections,
        duration=args.duration,
        warmup=args.warmup,
        processes=args.processes,
        watch={f"pid {pid}": pid for pid in args.watch_pid},
    )
    if args.json:
        print(json.dumps({**asdict(result), "error_share": result.error_share}, indent=2))
    else:
        print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the benchmark needs around the measured runs: CPU placement, processes, orders, tickets.

CPU split (2 cores here): the HTTP server under test is pinned alone to the first allowed CPU;
the benchmark script, the load generator, Valkey, PostgreSQL and workers share the others. Every
server under test gets the same split, so ratios compare like with like.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.bench_load import PostOrders, split_url
from ordergate.buffer.connection import create_redis
from ordergate.buffer.keys import Keys
from ordergate.buffer.streams import ensure_streams
from ordergate.gateway.auth import create_key
from ordergate.servers import EmbeddedPostgres, die_with_parent
from ordergate.settings import Settings
from ordergate.workers.migrate import migrate, migrate_all

REPO = Path(__file__).resolve().parent.parent
STOREFRONT = "shop-a"


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


def run(coro: Any) -> Any:
    import uvloop

    return uvloop.run(coro)


@contextlib.contextmanager
def temp_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="og-bench-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


# --- processes ----------------------------------------------------------------------------------


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without any ORDERGATE_* of its own, plus ``extra``; the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def spawn(
    cmd: list[str], env: Mapping[str, str], log: Path, place: Placement, server: bool
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` (on the server CPU if ``server``), its output into ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            env=dict(env),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=place.preexec_server if server else die_with_parent,
        )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_http(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    method: str = "GET",
    path: str = "/healthz",
    ok: Sequence[int] = (200,),
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> None:
    """Until ``url`` + ``path`` answers one of ``ok`` (30 s at most)."""

    async def go() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
            client = HttpClient(url)
            try:
                status, _, _ = await client.request(method, path, headers, body)
                if status in ok:
                    return
            except OSError:
                pass
            finally:
                await client.close()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{url}{path} did not answer {list(ok)} within 30 s; see {log}")

    run(go())


class HttpClient:
    """A minimal keep-alive HTTP/1.1 client for setup work (admitting orders, reading ETags)."""

    def __init__(self, url: str) -> None:
        self.host, self.port = split_url(url)
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


# --- schema, key, orders, tickets ---------------------------------------------------------------


async def prepare(s: Settings) -> tuple[str, int]:
    """Schema, streams and an API key; and Valkey's pid (to report its CPU)."""
    await migrate(s.database_url or "", s.shards, s.key_prefix)
    redis = create_redis(s.redis_url or "")
    try:
        await ensure_streams(redis, Keys(s.key_prefix), s.shards)
        key = await create_key(redis, Keys(s.key_prefix), STOREFRONT)
        info = await redis.info("server")
        return key, int(info["process_id"])
    finally:
        await redis.aclose()


def order_body(sfo: str) -> bytes:
    """A valid order (as tests/conftest.py's ``order_body``): the payload of every POST run."""
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


def post_orders(key: str, tag: str) -> PostOrders:
    """New orders for ``POST /v1/orders``, ids tagged ``tag`` (unique per run)."""
    marker = "@@ID@@"
    prefix, suffix = order_body(marker).split(marker.encode())
    headers = (("Authorization", f"Bearer {key}"), ("Content-Type", "application/json"))
    return PostOrders("/v1/orders", headers, prefix, suffix, tag)


async def admit(url: str, key: str, n: int, prefix: str, concurrency: int = 64) -> list[str]:
    """Admit ``n`` orders through the gateway; their tickets, in queue order."""
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


@contextlib.contextmanager
def delay_proxy(database_url: str, delay_s: float) -> Iterator[str]:
    """tests/faults.py's TCP proxy in front of Postgres, adding ``delay_s`` to every reply, run
    on an event loop of its own thread; yields the URL that goes through it."""
    import asyncio
    import threading
    import urllib.parse

    from tests.faults import DelayProxy

    parts = urllib.parse.urlsplit(database_url)
    assert parts.hostname and parts.port
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> DelayProxy:
        proxy = await DelayProxy(parts.hostname or "", parts.port or 0).start()
        proxy.delay = delay_s
        return proxy

    proxy = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield proxy.url(database_url)
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


@contextlib.contextmanager
def two_postgres(tmp: Path, s: Settings) -> Iterator[str]:
    """The (d2) row's pair of Postgres servers: a fresh database ``ordergate_two`` on the run's
    own server and a second embedded server in ``tmp/pg2``, migrated as databases 0 and 1 of
    one deployment; yields their ``database_url`` (two URLs, space-separated)."""
    import asyncpg

    second = EmbeddedPostgres(tmp / "pg2")
    first = (s.database_url or "").rsplit("/", 1)[0] + "/ordergate_two"

    async def setup(urls: list[str]) -> None:
        admin = await asyncpg.connect(s.database_url)
        try:
            await admin.execute("DROP DATABASE IF EXISTS ordergate_two")
            await admin.execute("CREATE DATABASE ordergate_two")
        finally:
            await admin.close()
        await migrate_all(urls, s.shards, s.key_prefix)

    try:
        urls = [first, second.start()]
        asyncio.run(setup(urls))
        yield " ".join(urls)
    finally:
        second.stop()

"""What the fault tests share besides ``tests.faults``: storefront clients that post orders
under load, record every answer (or its absence) and retry what got no receipt with the same
storefront_order_id; a Valkey of a test's own, to pause or kill without disturbing the
session's; and ``LatencyProxy``, a fixed ``DelayProxy``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from buffer.connection import create_redis
from buffer.keys import Keys
from gateway.auth import create_key
from ordergate.servers import EmbeddedValkey
from tests.conftest import auth, eventually, order_body
from tests.faults import DelayProxy

HANG_S = 30.0  # a request unanswered this long has hung


@dataclass
class Shot:
    """One POST: when it was sent and answered (monotonic), and what came back."""

    sfo: str
    sent: float
    answered: float
    status: int | None  # None: no HTTP answer (connection refused or reset, hung)
    response: httpx.Response | None

    @property
    def took(self) -> float:
        return self.answered - self.sent

    @property
    def text(self) -> str:
        return self.response.text[:300] if self.response is not None else "no answer"


async def shoot(http: httpx.AsyncClient, key: str, sfo: str) -> Shot:
    """POST the order ``sfo``; its body is a function of its id, so a retry sends the same."""
    sent = time.monotonic()
    try:
        async with asyncio.timeout(HANG_S):
            r = await http.post("/v1/orders", json=order_body(sfo), headers=auth(key))
    except (httpx.TransportError, TimeoutError):
        return Shot(sfo, sent, time.monotonic(), None, None)
    return Shot(sfo, sent, time.monotonic(), r.status_code, r)


@contextlib.asynccontextmanager
async def load(
    http: httpx.AsyncClient, key: str, prefix: str, clients: int = 24
) -> AsyncIterator[list[Shot]]:
    """``clients`` storefront clients posting new orders back to back until the block ends."""
    shots: list[Shot] = []
    stop = asyncio.Event()

    async def client(c: int) -> None:
        n = 0
        while not stop.is_set():
            shots.append(await shoot(http, key, f"{prefix}-{c}-{n}"))
            n += 1

    tasks = [asyncio.create_task(client(c)) for c in range(clients)]
    try:
        yield shots
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def accepted(shots: list[Shot], after: float = 0.0, before: float = float("inf")) -> int:
    """How many orders sent after ``after`` got a 202 before ``before``."""
    return sum(1 for s in shots if s.status == 202 and s.sent > after and s.answered < before)


@dataclass
class Receipts:
    """One receipt per order: ``by_sfo``; ``replayed`` of them came with 200 to a retry (the
    order had been written, its first answer lost or refused)."""

    by_sfo: dict[str, dict[str, Any]]
    replayed: int


async def retry_until_receipts(
    http: httpx.AsyncClient, key: str, shots: list[Shot], timeout: float = 30.0
) -> Receipts:
    """Every order's receipt: its 202, or else the 202/200 that retries with the same
    storefront_order_id get. Before that, a retry may see only 409 (an earlier write of it awaits
    its lease), 503 (the buffer is still away) or no answer; anything else fails the test."""
    by_sfo = {s.sfo: s.response.json() for s in shots if s.status == 202 and s.response}
    owed = sorted({s.sfo for s in shots} - set(by_sfo))
    replayed = 0
    gate = asyncio.Semaphore(32)

    async def retry(sfo: str) -> None:
        nonlocal replayed

        async def receipt() -> Shot | None:
            async with gate:
                shot = await shoot(http, key, sfo)
            assert shot.status in (None, 200, 202, 409, 503), (sfo, shot.status, shot.text)
            return shot if shot.status in (200, 202) else None

        shot = await eventually(receipt, timeout=timeout, interval=0.2)
        assert shot.response is not None
        by_sfo[sfo] = shot.response.json()
        replayed += shot.status == 200

    await asyncio.gather(*(retry(sfo) for sfo in owed))
    return Receipts(by_sfo, replayed)


async def committed(pg: Any, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM orders") >= n


async def one_row_per_order(pg: Any, sfos: set[str]) -> None:
    """Exactly the orders tried are in Postgres, each once (the audit checks the 202s)."""
    rows = await pg.fetch("SELECT storefront_order_id FROM orders WHERE storefront_id = 'shop-a'")
    assert sorted(r["storefront_order_id"] for r in rows) == sorted(sfos)


@dataclass
class PrivateValkey:
    server: EmbeddedValkey
    redis: Any
    api_key: str  # of storefront shop-a


@contextlib.asynccontextmanager
async def own_valkey(tmp_path: Path) -> AsyncIterator[PrivateValkey]:
    """A Valkey of the test's own (appendonly, fsync always), with an API key for shop-a."""
    server = EmbeddedValkey(tmp_path)
    server.start()
    redis = create_redis(server.url)
    try:
        yield PrivateValkey(server, redis, await create_key(redis, Keys(), "shop-a"))
    finally:
        await redis.aclose()
        server.stop()


class LatencyProxy(DelayProxy):
    """``DelayProxy`` with two fixes (for ``tests.faults``): a reply chunk is due ``delay`` after
    it arrived, so chunks that arrive together leave together (``DelayProxy`` sleeps before it
    reads the next chunk, so latency adds up on a busy connection: k chunks wait k * delay); and
    a change of ``delay`` applies to the chunks already held (with ``DelayProxy``, replies held
    when the delay is lifted still wait out the old one, here up to 11 s)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._changed = asyncio.Event()
        super().__init__(target_host, target_port)

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._delay = seconds
        self._changed.set()  # held chunks look at their due time again
        self._changed = asyncio.Event()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        if not delayed:
            return await super()._pump(reader, writer, delayed=False)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while chunk := await reader.read(65536):
                    chunks.put_nowait((loop.time(), chunk))
            chunks.put_nowait((loop.time(), b""))

        reading = asyncio.create_task(read())
        try:
            with contextlib.suppress(OSError):
                while True:
                    arrived, chunk = await chunks.get()
                    if not chunk:
                        return
                    while (due := arrived + self.delay - loop.time()) > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), due)
                    await self._open.wait()
                    writer.write(chunk)
                    await writer.drain()
        finally:
            reading.cancel()

"""The fault-injection toolkit: a TCP proxy that delays or holds traffic, the audit every fault
test ends with, storefront clients that post under load, record every answer (or its absence)
and retry what got no receipt with the same storefront_order_id, and a Valkey of a test's own,
to pause or kill without disturbing the session's."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ordergate.buffer.connection import create_redis
from ordergate.buffer.consumer import stream_lengths
from ordergate.buffer.keys import Keys
from ordergate.buffer.lanes import sublanes_of
from ordergate.gateway.auth import create_key
from ordergate.servers import EmbeddedValkey
from ordergate.sharding.ids import shard_of_order_id
from tests.conftest import auth, eventually, order_body


class DelayProxy:
    """A TCP proxy between a client and a real server that can add latency to the server's
    replies (``delay`` seconds per chunk), hold all traffic (``hold``) or cut every connection
    (``cut``). It runs in the test's own event loop."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._delay = 0.0
        self._changed = asyncio.Event()
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        self._delay = seconds
        self._changed.set()  # held chunks look at their due time again
        self._changed = asyncio.Event()

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, scheme_url: str) -> str:
        """``scheme_url`` (a redis:// or postgresql:// URL of the target) pointed at the proxy."""
        host, port = self.target
        if f"{host}:{port}" not in scheme_url:
            raise ValueError(f"{scheme_url} does not point at {host}:{port}")
        return scheme_url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}")

    def hold(self) -> None:
        """Stop forwarding in both directions (bytes wait, connections stay open). As in a real
        partition, a client that closes its socket meanwhile is not noticed by the server until
        ``release``: its session, and the locks it holds, stay open."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def cut(self) -> None:
        """Close every proxied connection now (as a network partition would)."""
        for writer in list(self._writers):
            writer.close()

    async def close(self) -> None:
        if self._server:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, delayed=False)),
            asyncio.create_task(self._pump(up_reader, writer, delayed=True)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
                self._tasks.discard(pump)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, delayed: bool
    ) -> None:
        """Forward ``reader`` to ``writer``. A reply chunk is due ``delay`` after it arrived, so
        chunks that arrive together leave together (latency does not add up on a busy
        connection), and a change of ``delay`` applies to the chunks already held."""
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
                    while delayed and (due := arrived + self.delay - loop.time()) > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._changed.wait(), due)
                    await self._open.wait()  # after the delay: a hold stops chunks due meanwhile
                    writer.write(chunk)
                    await writer.drain()
        finally:
            reading.cancel()


async def audit(
    pg: Any,
    redis: Any,
    accepted: Iterable[dict[str, Any]],
    *,
    storefront: str = "shop-a",
    shards: int = 8,
    keys: Keys | None = None,
) -> None:
    """The audit every fault test ends with, after the drain: every order that got a 202 is in
    Postgres exactly once, no storefront order id (so none that got an error and was retried)
    has two rows, statuses agree with Postgres, and the buffer holds nothing any more (nothing
    pending, nothing dead-lettered)."""
    receipts = list(accepted)
    rows = await pg.fetch(
        "SELECT order_id, storefront_id, storefront_order_id FROM orders WHERE storefront_id = $1",
        storefront,
    )
    ids = [r["order_id"] for r in rows]
    assert len(ids) == len(set(ids)), "an order was written twice"
    sfos = [r["storefront_order_id"] for r in rows]
    assert len(sfos) == len(set(sfos)), "a storefront order id has two rows"
    missing = {r["order_id"] for r in receipts} - set(ids)
    assert not missing, f"{len(missing)} acknowledged orders missing, e.g. {sorted(missing)[:3]}"
    keys = keys or Keys()
    for receipt in receipts:
        shard = shard_of_order_id(receipt["order_id"], shards)
        assert shard is not None
        # committed: its status record is gone, its row (checked above) tells its status
        status = await redis.hget(keys.status(shard, receipt["order_id"]), "status")
        assert status is None, (receipt["order_id"], status)
    for shard in range(shards):
        assert await in_flight(redis, keys, shard) == 0, f"shard {shard} has entries in flight"
        assert await buffered(redis, keys, shard) == 0, f"shard {shard} still buffers entries"
        assert await redis.xlen(keys.deadletters(shard)) == 0, f"shard {shard} dead-lettered"


async def in_flight(redis: Any, keys: Keys, shard: int) -> int:
    """Entries of the lane its owners have taken and not settled: those up to its cursors (the
    base stream's and each sub-lane's)."""
    raw = await redis.hgetall(keys.lane(shard))
    cursors = {"": raw.get(b"c")} | {sf: u.cursor.encode() for sf, u in sublanes_of(raw).items()}
    total = 0
    for sf, cursor in cursors.items():
        if cursor:
            total += len(await redis.xrange(keys.sublane(shard, sf), max=cursor.decode()))
    return total


async def buffered(redis: Any, keys: Keys, shard: int) -> int:
    """Entries in the lane: its base stream and its sub-lanes."""
    return (await stream_lengths(redis, keys, [shard]))[shard]


async def lane_entries(redis: Any, keys: Keys, shard: int) -> list[Any]:
    """Every entry of the lane (base stream, then each sub-lane), as XRANGE gives them."""
    subs = sublanes_of(await redis.hgetall(keys.lane(shard)))
    out: list[Any] = []
    for sf in ["", *sorted(subs)]:
        out += await redis.xrange(keys.sublane(shard, sf))
    return out


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


async def assert_fifo_per_lane(pg: Any, what: str = "") -> None:
    """Inside each lane, no order committed before one of its storefront admitted earlier
    (lanes drain in parallel, and a lane's storefronts by turns, so across them commit times
    interleave)."""
    rows = await pg.fetch("SELECT shard, storefront_id, committed_at FROM orders ORDER BY seq")
    for lane, sf in {(r["shard"], r["storefront_id"]) for r in rows}:
        times = [r["committed_at"] for r in rows if (r["shard"], r["storefront_id"]) == (lane, sf)]
        assert times == sorted(times), (
            f"lane {lane}, {sf}: {what or 'orders committed out of order'}"
        )


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

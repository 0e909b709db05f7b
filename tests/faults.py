"""The fault-injection toolkit: a TCP proxy that delays or holds traffic, and the audit every
fault test ends with."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any

from buffer.keys import GROUP, Keys
from sharding.ids import shard_of_order_id


class DelayProxy:
    """A TCP proxy between a client and a real server that can add latency to the server's
    replies (``delay`` seconds per chunk), hold all traffic (``hold``) or cut every connection
    (``cut``). It runs in the test's own event loop."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.delay = 0.0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> DelayProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def url(self, scheme_url: str) -> str:
        """``scheme_url`` (a redis:// or postgresql:// URL of the target) pointed at the proxy."""
        host, port = self.target
        return scheme_url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}")

    def hold(self) -> None:
        """Stop forwarding in both directions (bytes wait, connections stay open)."""
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
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while chunk := await reader.read(65536):
                await self._open.wait()
                if delayed and self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(chunk)
                await writer.drain()


async def audit(
    pg: Any,
    redis: Any,
    accepted: Iterable[dict[str, Any]],
    *,
    storefront: str = "shop-a",
    shards: int = 8,
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
    keys = Keys()
    for receipt in receipts:
        shard = shard_of_order_id(receipt["order_id"], shards)
        assert shard is not None
        status = await redis.hget(keys.status(shard, receipt["order_id"]), "status")
        assert status in (b"committed", "committed"), (receipt["order_id"], status)
    for shard in range(shards):
        pending = await redis.xpending(keys.stream(shard), GROUP)
        assert int(pending["pending"]) == 0, f"shard {shard} still has pending entries"
        assert await redis.xlen(keys.stream(shard)) == 0, f"shard {shard} still buffers entries"
        assert await redis.xlen(keys.deadletters(shard)) == 0, f"shard {shard} dead-lettered"

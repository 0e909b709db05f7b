"""Redis faults under load: a paused server, replies later than the clients' socket timeouts, a
gateway process killed mid-burst. Each test ends with the common audit (``tests.faults``).

Run with ``-s`` to see what they measured (how fast requests were answered during the fault, how
long until every order had its receipt)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from ordergate.servers import die_with_parent, free_port
from ordergate.settings import Settings
from tests.conftest import drain, eventually, make_settings, worker_running
from tests.faults import (
    HANG_S,
    DelayProxy,
    PrivateValkey,
    Shot,
    accepted,
    audit,
    committed,
    load,
    one_row_per_order,
    own_valkey,
    retry_until_receipts,
    shoot,
)

SLACK_S = 1.5  # scheduling noise on a shared 2-core box, on top of the admission deadline
LEASE_MS = 3000  # in-flight lease: retries of an order written without a receipt wait this long


@pytest.fixture
async def private_valkey(tmp_path: Path) -> AsyncIterator[PrivateValkey]:
    async with own_valkey(tmp_path) as valkey:
        yield valkey


def _answered_in_time(shots: list[Shot], since: float, deadline: float) -> None:
    late = [s for s in shots if s.sent > since and s.took > deadline + SLACK_S]
    assert not late, [(s.sfo, s.status, round(s.took, 2)) for s in late[:5]]


async def test_sigstop_of_redis_for_10_s(private_valkey, app_factory, servers, pg) -> None:
    """Injects: SIGSTOP of Valkey for 10 s while 24 clients post orders and a worker drains.
    Audits: every request sent during the pause is answered by the admission deadline with 503
    (problem+json, Retry-After), never a 202; after SIGCONT, retries with the same ids give every
    order one receipt, and the drain writes one row per order, every 202 among them."""
    valkey = private_valkey
    settings = make_settings(servers, redis_url=valkey.server.url, inflight_lease_ms=LEASE_MS)
    http = await app_factory(settings)
    deadline = settings.admission_timeout_ms / 1000
    async with worker_running(settings):
        async with load(http, valkey.api_key, "p") as shots:
            await eventually(lambda: accepted(shots) >= 200)
            valkey.server.signal(signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                await asyncio.sleep(10)  # the fault itself: Redis stays paused this long
            finally:
                valkey.server.signal(signal.SIGCONT)
            resumed = time.monotonic()
            await eventually(lambda: accepted(shots, after=resumed))

        during = [s for s in shots if stopped < s.sent and s.answered < resumed]
        first = min(s.answered for s in shots if s.sent > resumed and s.status == 202)
        print(
            f"\nSIGSTOP 10 s: {len(during)} requests answered during the pause, the slowest in"
            f" {max(s.took for s in during):.2f} s (deadline {deadline:.1f} s);"
            f" a new order had its 202 {first - resumed:.2f} s after SIGCONT"
        )
        assert len(during) >= 24, "not even one round of requests was answered"
        _answered_in_time(shots, stopped, deadline)
        for s in during:
            assert s.status == 503 and s.response is not None, (s.sfo, s.status, s.text)
            assert s.response.headers["content-type"] == "application/problem+json"
            assert int(s.response.headers["retry-after"]) >= 1

        receipts = await retry_until_receipts(http, valkey.api_key, shots)
        print(
            f"every order had its receipt {time.monotonic() - resumed:.2f} s after SIGCONT"
            f" (lease {LEASE_MS} ms); {receipts.replayed} retries found the order written"
        )
        await eventually(lambda: committed(pg, len(receipts.by_sfo)))
    await audit(pg, valkey.redis, receipts.by_sfo.values())
    await one_row_per_order(pg, set(receipts.by_sfo))


@pytest.fixture
async def redis_proxy(servers) -> AsyncIterator[DelayProxy]:
    """A (fixed) DelayProxy in front of the session's Valkey."""
    url = urlsplit(servers.redis_url)
    proxy = await DelayProxy(url.hostname or "127.0.0.1", url.port or 6379).start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def _worker_connections(redis: Any) -> set[str]:
    return {c["id"] for c in await redis.client_list() if c["name"].startswith("ordergate-worker")}


async def _dropped_one(redis: Any, before: set[str]) -> bool:
    return not before <= await _worker_connections(redis)


async def test_redis_replies_later_than_the_socket_timeouts(
    redis_proxy, app_factory, servers, redis, api_key, pg
) -> None:
    """Injects: 11 s of latency on every Redis reply to the gateway and the worker (a proxy),
    more than either's socket timeout (5 s, 10.1 s), during a burst; the commands still reach
    Redis and run. Audits: every request is answered by the admission deadline, with 503 while
    the replies are late (never a 202 unconfirmed); once they are not, retries with the same ids
    give every order one receipt, and the drain writes one row per order."""
    settings = make_settings(
        servers, redis_url=redis_proxy.url(servers.redis_url), inflight_lease_ms=LEASE_MS
    )
    worker_socket_timeout = settings.read_block_ms / 1000 + 10  # as workers.runner sets it
    http = await app_factory(settings)
    deadline = settings.admission_timeout_ms / 1000
    async with worker_running(settings):
        async with load(http, api_key, "d") as shots:
            await eventually(lambda: accepted(shots) >= 200)
            before = await _worker_connections(redis)
            redis_proxy.delay = worker_socket_timeout + 1
            delayed = time.monotonic()
            # Until the worker's socket timeout fired: it dropped a connection whose reply was
            # late (nothing else closes one).
            await eventually(partial(_dropped_one, redis, before))
            redis_proxy.delay = 0
            restored = time.monotonic()
            await eventually(lambda: accepted(shots, after=restored))

        during = [s for s in shots if delayed < s.sent and s.answered < restored]
        print(
            f"\nReplies 11 s late: {len(during)} requests answered meanwhile, the slowest in"
            f" {max(s.took for s in during):.2f} s (deadline {deadline:.1f} s); the worker"
            f" timed out {restored - delayed:.2f} s into the delay"
        )
        assert len(during) >= 24, "not even one round of requests was answered"
        _answered_in_time(shots, delayed, deadline)
        for s in during:
            assert s.status == 503, (s.sfo, s.status, s.text)

        receipts = await retry_until_receipts(http, api_key, shots)
        print(
            f"every order had its receipt {time.monotonic() - restored:.2f} s after the delay;"
            f" {receipts.replayed} retries found the order written"
        )
        await eventually(lambda: committed(pg, len(receipts.by_sfo)))
    await audit(pg, redis, receipts.by_sfo.values())
    await one_row_per_order(pg, set(receipts.by_sfo))


async def test_requests_sharing_a_stalled_key_lookup_each_get_503(
    redis_proxy, app_factory, servers, api_key
) -> None:
    """Injects: Redis holding every reply (a proxy) while two requests with an API key not yet
    cached arrive one after the other: the second once the first's lookup is in flight, so it
    shares that lookup. Audits: both are
    answered 503 (problem+json, Retry-After) by the admission deadline, the second too when the
    lookup it shares is given up by the first."""
    settings = make_settings(
        servers, redis_url=redis_proxy.url(servers.redis_url), admission_timeout_ms=1000
    )
    http = await app_factory(settings)
    redis_proxy.hold()
    try:
        first = asyncio.create_task(shoot(http, api_key, "h-1"))
        auth = http.app.state.gateway.auth
        await eventually(lambda: auth.lookups_in_flight == 1, timeout=5)
        second = await shoot(http, api_key, "h-2")
        shots = [await first, second]
    finally:
        redis_proxy.release()
    for shot in shots:
        assert shot.status == 503 and shot.response is not None, shot.text
        assert shot.response.headers["content-type"] == "application/problem+json"
        assert int(shot.response.headers["retry-after"]) >= 1
        assert "API key" in shot.response.json()["detail"]
    _answered_in_time(shots, 0, settings.admission_timeout_ms / 1000)


@contextlib.contextmanager
def gateway_processes(settings: Settings, log: Path) -> Iterator[Callable[[], Any]]:
    """Starts real `ordergate serve` processes on ``settings.port``; stops them at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}
    env.update(settings.to_env())
    procs: list[subprocess.Popen[bytes]] = []

    def spawn() -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ordergate", "serve"],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent,
                )
            )
        return procs[-1]

    try:
        yield spawn
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def _ready(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_sigkill_of_a_gateway_process_with_requests_in_flight(
    redis_proxy, servers, redis, api_key, pg, tmp_path
) -> None:
    """Injects: SIGKILL of a real `ordergate serve` process in the middle of a burst of 1000
    POSTs from 64 concurrent clients, then a restart; Redis replies 0.2 s late meanwhile, so the
    requests in flight at the kill have their orders written and no answer yet. Audits: every
    request that got no answer is retried with the same id until it has a receipt (a 200 for
    those written); the drain writes one row per order, every 202 among them."""
    settings = make_settings(
        servers,
        redis_url=redis_proxy.url(servers.redis_url),
        port=free_port(),
        inflight_lease_ms=LEASE_MS,
    )
    limits = httpx.Limits(max_connections=64)
    base = f"http://{settings.host}:{settings.port}"
    with gateway_processes(settings, tmp_path / "gateway.log") as spawn:
        gateway = spawn()
        async with httpx.AsyncClient(base_url=base, limits=limits, timeout=HANG_S) as http:
            await eventually(lambda: _ready(http), timeout=60, interval=0.1)
            shots: list[Shot] = []
            orders = iter(range(1000))

            async def storefront() -> None:
                for i in orders:  # shared: 64 clients post the 1000 orders between them
                    shots.append(await shoot(http, api_key, f"g-{i}"))

            redis_proxy.delay = 0.2
            burst = [asyncio.create_task(storefront()) for _ in range(64)]
            await eventually(lambda: accepted(shots) >= 150)
            gateway.kill()
            killed = time.monotonic()
            redis_proxy.delay = 0
            await asyncio.gather(*burst)
            gateway.wait(10)
            unanswered = sum(s.status is None for s in shots)
            print(f"\ngateway SIGKILLed: {1000 - unanswered} answers, {unanswered} requests none")
            assert unanswered, "the burst was over before the kill"
            # 202, or no answer (the kill); or 503 (no receipt: under the 0.2 s delay on a busy
            # machine a request can outwait admission_timeout_ms): both are retried below.
            assert {s.status for s in shots} <= {202, 503, None}, {s.status for s in shots}

            spawn()
            await eventually(lambda: _ready(http), timeout=60, interval=0.1)
            ready = time.monotonic()
            receipts = await retry_until_receipts(http, api_key, shots)
            print(
                f"the new gateway was ready {ready - killed:.2f} s after the kill; every order had"
                f" its receipt {time.monotonic() - ready:.2f} s later (lease {LEASE_MS} ms);"
                f" {receipts.replayed} retries found the order written"
            )
    assert len(receipts.by_sfo) == 1000
    assert receipts.replayed, "no order in flight at the kill had been written"
    await drain(settings)
    await audit(pg, redis, receipts.by_sfo.values())
    await one_row_per_order(pg, set(receipts.by_sfo))

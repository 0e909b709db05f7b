"""A real ``ordergate serve`` against clients that hold connections and send oversized headers
(issue 15, items 1 and 2): each is answered or closed by its deadline or limit, while other
clients are served."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from ordergate.servers import free_port
from tests.conftest import auth, eventually, order_body
from tests.gateway.test_metrics import answers_200, processes

HEADER_S = BODY_S = 1.5
CLOSED_WITHIN_S = 8.0  # the deadline plus the slack of a busy 2-core machine; before: never


@pytest.fixture
async def gateway(settings: Any, tmp_path: Path) -> AsyncIterator[str]:
    custom = settings.replace(
        port=free_port(), header_timeout_s=HEADER_S, body_timeout_s=BODY_S, max_headers=50
    )
    with processes(custom, tmp_path / "serve.log", ["serve"]):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{custom.port}") as http:
            await eventually(partial(answers_200, http, "/healthz"), timeout=60)
        yield f"127.0.0.1:{custom.port}"


async def _open(where: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = where.split(":")
    return await asyncio.open_connection(host, int(port))


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(-1), CLOSED_WITHIN_S)
    return data, time.monotonic() - started


async def test_a_silent_connection_gets_408_and_is_closed(gateway: str) -> None:
    reader, writer = await _open(gateway)
    data, took = await _answer(reader)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert took >= HEADER_S * 0.9
    writer.close()


async def test_a_slowloris_client_gains_nothing_by_trickling(gateway: str, api_key: str) -> None:
    """Injects: a request line, then a header byte every 0.2 s (each byte used to reset
    uvicorn's timer). Audits: 408 and closed by the header deadline, counted from the first
    byte; meanwhile an order from another client gets its 202."""
    reader, writer = await _open(gateway)
    writer.write(b"POST /v1/orders HTTP/1.1\r\nHost: og\r\n")
    answer = asyncio.create_task(_answer(reader))
    async with httpx.AsyncClient(base_url=f"http://{gateway}") as http:
        ok = await http.post("/v1/orders", json=order_body(), headers=auth(api_key))
        assert ok.status_code == 202, ok.text
    for byte in b"X-Slow: " + b"a" * 200:
        if answer.done() or writer.is_closing():
            break
        writer.write(bytes([byte]))
        await asyncio.sleep(0.2)  # the attacker's pace, not a synchronisation
    data, took = await answer
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert took < CLOSED_WITHIN_S
    writer.close()


async def test_headers_then_no_body_is_closed_by_the_body_deadline(gateway: str) -> None:
    reader, writer = await _open(gateway)
    writer.write(
        b"POST /v1/orders HTTP/1.1\r\nHost: og\r\nContent-Type: application/json\r\n"
        b"Content-Length: 500\r\n\r\n{"
    )
    data, took = await _answer(reader)
    assert not data.startswith(b"HTTP/1.1 2"), data  # closed (or answered 4xx), never admitted
    assert took >= BODY_S * 0.9
    writer.close()


@pytest.mark.parametrize(
    ("size", "count", "why"),
    [
        (17_000, 1, b"headers too large"),
        (8_000_000, 1, b"headers too large"),
        (1, 60, b"too many headers"),
    ],
    ids=["17KB", "8MB", "60-headers"],
)
async def test_oversized_headers_get_431(gateway: str, size: int, count: int, why: bytes) -> None:
    """A 64 MB header once got 200; 40 distinct 8 MB ones took the gateway to 417 MB RSS."""
    headers = b"".join(b"X-%d: " % i + b"a" * size + b"\r\n" for i in range(count))
    reader, writer = await _open(gateway)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: og\r\n")
    try:
        for start in range(0, len(headers), 65536):
            writer.write(headers[start : start + 65536])
            await writer.drain()
        writer.write(b"\r\n")
    except ConnectionError:
        pass  # refused and closed while we were still sending: what it should do
    data, _ = await _answer(reader)
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert data.endswith(why)
    writer.close()


async def test_headers_within_the_limits_are_served(gateway: str) -> None:
    reader, writer = await _open(gateway)
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: og\r\nX-Fine: "
        + b"a" * 15_000
        + b"\r\nConnection: close\r\n\r\n"
    )
    data, _ = await _answer(reader)
    assert data.startswith(b"HTTP/1.1 200 "), data[:200]
    writer.close()


async def test_past_max_connections_the_answer_is_503(settings: Any, tmp_path: Path) -> None:
    """Injects: held connections up to ``max_connections`` (20,000 once used up the gateway's
    file descriptors). Audits: the next request gets 503 at once; once they close, 200."""
    custom = settings.replace(port=free_port(), max_connections=4, header_timeout_s=30.0)
    with processes(custom, tmp_path / "serve.log", ["serve"]):
        where = f"127.0.0.1:{custom.port}"
        async with httpx.AsyncClient(base_url=f"http://{where}") as http:

            async def status() -> int | None:
                try:
                    return (await http.get("/healthz")).status_code
                except httpx.TransportError:
                    return None

            await eventually(lambda: _is(status, 200), timeout=60)
        held = [await _open(where) for _ in range(4)]
        async with httpx.AsyncClient(base_url=f"http://{where}") as http:
            r = await http.get("/healthz")
            assert r.status_code == 503, r.text
        for _, writer in held:
            writer.close()
        async with httpx.AsyncClient(base_url=f"http://{where}") as http:
            await eventually(lambda: _is(status, 200), timeout=10)


async def _is(probe: Any, expected: int) -> bool:
    return await probe() == expected


async def test_ops_port_keeps_the_operators_endpoints_off_the_customers_port(
    settings: Any, tmp_path: Path, api_key: str
) -> None:
    """``ops_port``: /v1/ops/*, /dashboard and /metrics answer there only, the customers' API
    not there; both answer /healthz."""
    custom = settings.replace(port=free_port(), ops_port=free_port(), admin_token="ops-token-1")
    token = {"Authorization": "Bearer ops-token-1"}
    with processes(custom, tmp_path / "serve.log", ["serve"]):
        main = httpx.AsyncClient(base_url=f"http://127.0.0.1:{custom.port}")
        ops = httpx.AsyncClient(base_url=f"http://127.0.0.1:{custom.ops_port}")
        async with main, ops:
            await eventually(partial(answers_200, main, "/healthz"), timeout=60)
            assert (await ops.get("/healthz")).status_code == 200
            for path in ("/v1/ops/status", "/metrics", "/dashboard"):
                assert (await main.get(path, headers=token)).status_code == 404, path
                assert (await ops.get(path, headers=token)).status_code == 200, path
            order = await main.post("/v1/orders", json=order_body(), headers=auth(api_key))
            assert order.status_code == 202
            elsewhere = await ops.post("/v1/orders", json=order_body(), headers=auth(api_key))
            assert elsewhere.status_code == 404

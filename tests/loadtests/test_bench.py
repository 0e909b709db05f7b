"""The benchmark's own parts that can be checked in milliseconds (the benchmark is not a test)."""

from __future__ import annotations

import math
import subprocess
import sys
from array import array
from pathlib import Path

from lupa import LuaRuntime

from loadtests.bench_load import ResponseParser, request_maker, wrk_script
from loadtests.bench_openloop import ERROR_CODE, TIMEOUT_CODE, _summarize
from loadtests.bench_setup import post_orders
from ordergate.buffer.order import ORDER_DECODER

BENCH = Path(__file__).resolve().parents[2] / "loadtests" / "bench.py"


def test_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout


def test_posted_orders_are_valid_and_unique() -> None:
    load = post_orders("og_key", "t1-")
    seen = set()
    for generator in (0, 1):
        make = request_maker("127.0.0.1", 8000, load, generator)
        for n in (1, 2, 10**9):
            raw = make(n)
            head, body = raw.split(b"\r\n\r\n", 1)
            assert head.startswith(b"POST /v1/orders HTTP/1.1")
            assert b"Authorization: Bearer og_key" in head
            assert f"Content-Length: {len(body)}".encode() in head
            seen.add(ORDER_DECODER.decode(body).storefront_order_id)
    assert len(seen) == 6


def test_wrk_script_sends_the_bodies_of_the_built_in_generator() -> None:
    """wrk's Lua request() (run here in a real Lua, through lupa) sends, for each generator and
    request number, exactly the body the Python generator sends: the same orders either way."""
    load = post_orders("og_key", "t2-")
    for generator in (0, 1):
        lua = LuaRuntime(encoding=None)  # strings cross as bytes
        sent: list[tuple[bytes, bytes, bytes]] = []
        lua.globals().wrk = lua.table_from(
            {
                b"format": lambda method, path, headers, body, sent=sent: sent.append(
                    (method, path, body)
                )
            }
        )
        lua.execute(wrk_script(load).encode())
        lua.globals().gen = generator  # what the script's setup() gives each wrk thread
        make = request_maker("127.0.0.1", 8000, load, generator)
        for n in (1, 2, 3):
            sent.clear()
            lua.globals().request()
            ((method, path, body),) = sent
            assert (method, path) == (b"POST", b"/v1/orders")
            assert body == make(n).split(b"\r\n\r\n", 1)[1]
            assert ORDER_DECODER.decode(body).storefront_order_id.startswith("t2-")


def test_response_parser_frames_by_length() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 202 Accepted\r\ncontent-length: 4\r\n\r\nab") == 0
    assert parser.feed(b"cd") == 202
    assert parser.feed(b"HTTP/1.1 304 Not Modified\r\netag: x\r\n\r\n") == 304


def test_open_loop_counts_timeouts_as_infinitely_slow() -> None:
    results = array("q", [1000] * 96 + [TIMEOUT_CODE, TIMEOUT_CODE, ERROR_CODE, 3_000_000])
    status = array("h", [202] * 96 + [0, 0, 0, 202])
    part = {
        "results": results.tobytes(),
        "status": status.tobytes(),
        "sent": 100,
        "late": array("q", [0]).tobytes(),
        "max_used": 3,
        "cpu": 0.1,
    }
    r = _summarize("http://x", 100.0, 0.0, 1.0, 2.0, [part])
    assert (r.scheduled, r.ok, r.timeouts, r.socket_errors) == (100, 96, 3, 1)
    assert r.error_share == 0.04
    assert r.p50_ms == 1.0
    assert math.isinf(r.p99_ms)


def test_drain_of_several_workers_counts_from_the_first_take_to_the_last_settle() -> None:
    from loadtests.bench_drain import combine

    one = {"committed": 600, "rejected": 0, "dead_lettered": 0, "batches": 3, "batch_size": 500}
    parts = [
        one | {"first_take": 100.0, "last_settle": 101.5, "wall_seconds": 2.5},
        one | {"committed": 400, "first_take": 100.2, "last_settle": 102.0, "wall_seconds": 3.0},
    ]
    drained = combine(parts)
    assert drained["workers"] == 2 and drained["per_worker"] == [600, 400]
    assert drained["seconds"] == 2.0 and drained["rate"] == 500.0
    assert drained["wall_rate"] == 1000 / 3.0
    idle = combine(
        [one | {"committed": 0, "first_take": 0.0, "last_settle": 0.0, "wall_seconds": 1}]
    )
    assert idle["rate"] == 0.0

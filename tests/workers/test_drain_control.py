"""Runtime drain control: pause, resume and a rate limit, followed by the leading worker within
a second or two, shown in the drain's published state; and POST /v1/ops/drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ordergate.buffer.control import DrainControl, read_control, set_control
from ordergate.buffer.keys import Keys
from ordergate.buffer.overview import read_overview
from ordergate.buffer.position import DrainState, read_drain_state
from tests.cli.run import ordergate
from tests.conftest import admit, auth, eventually, make_settings, order_body, worker_running

KEYS = Keys()
TOKEN = "drain-admin-token"


@pytest.fixture
async def ops(app_factory: Any, settings: Any) -> Any:
    """A gateway with an admin token, and a client that sends it."""
    client = await app_factory(settings.replace(admin_token=TOKEN))
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    return client


class Flow:
    """Orders admitted steadily in the background; every one must get its 202."""

    def __init__(self, client: Any, key: str) -> None:
        self.client, self.key = client, key
        self.admitted = 0
        self.receipts: list[dict[str, Any]] = []

    async def run(self) -> None:
        n = 0
        while True:
            rs = await asyncio.gather(
                *(
                    self.client.post(
                        "/v1/orders", json=order_body(f"f-{n + i}"), headers=auth(self.key)
                    )
                    for i in range(10)
                )
            )
            assert [r.status_code for r in rs] == [202] * 10, rs[0].text
            self.receipts.extend(r.json() for r in rs)
            self.admitted += 10
            n += 10
            await asyncio.sleep(0.05)  # pacing: about 150 orders a second


@contextlib.asynccontextmanager
async def flowing(client: Any, key: str) -> AsyncIterator[Flow]:
    flow = Flow(client, key)
    task = asyncio.create_task(flow.run())
    try:
        yield flow
    finally:
        if task.done():
            task.result()  # a refused admission fails the test here
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _state(redis: Any) -> DrainState:
    return await read_drain_state(redis, KEYS, 8)


async def _paused(redis: Any) -> DrainState | None:
    s = await _state(redis)
    return s if s.state == "paused" else None


async def _settled_at_least(redis: Any, n: int) -> bool:
    return (await _state(redis)).settled >= n


async def _all_settled(redis: Any) -> bool:
    s = await _state(redis)
    return s.issued > 0 and s.settled == s.issued


async def _steady(redis: Any, seconds: float) -> int:
    """The watermark, checked every 0.1 s for ``seconds``: it must not move."""
    w = (await _state(redis)).settled
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert (await _state(redis)).settled == w, "the drain moved while paused"
        await asyncio.sleep(0.1)
    return w


async def test_pause_stops_the_drain_while_admissions_go_on_and_resume_drains_everything(
    settings: Any, client: Any, api_key: str, redis: Any
) -> None:
    async with worker_running(settings):
        async with flowing(client, api_key) as flow:
            await eventually(lambda: _settled_at_least(redis, 50), timeout=30)
            done = await ordergate(settings, "drain", "--pause", "--json")
            asked = time.monotonic()
            assert done.returncode == 0, done.stderr
            control = json.loads(done.stdout)
            assert control["paused"] is True and control["by"].startswith("cli:")
            state = await eventually(lambda: _paused(redis), timeout=10, interval=0.02)
            took = time.monotonic() - asked
            assert took < 2.0, f"the pause took {took:.2f} s to take effect"
            assert state.reason.startswith("paused by cli:")
            before = flow.admitted
            w = await _steady(redis, 1.5)
            assert flow.admitted >= before + 50  # admissions went on, every one a 202
            assert (await _state(redis)).issued > w
            # a customer who waits sees why there is no ETA
            receipt = flow.receipts[-1]
            ticket = receipt["ticket"]

            async def eta_says_paused() -> Any:
                answer = (await client.get(f"/v1/queue/{ticket}")).json()
                return answer["eta_seconds"] is None and "paused" in (answer["eta_reason"] or "")

            await eventually(eta_says_paused, timeout=5)
            overview = await read_overview(redis, KEYS, 8)
            assert overview.drain.state == "paused" and overview.control.paused
            assert overview.eta_tail_s is None
            assert overview.eta_tail_reason == "the drain is paused by an operator"
        await set_control(redis, KEYS, paused=False, by="test")
        await eventually(lambda: _all_settled(redis), timeout=60)
        assert (await _state(redis)).state == "draining"


async def test_a_rate_limit_caps_the_drain_and_rate_zero_lifts_it(
    settings: Any, client: Any, api_key: str, redis: Any
) -> None:
    """Paused before any worker starts: the leader reads the controls before taking anything."""
    await set_control(redis, KEYS, paused=True, by="test")
    await admit(client, api_key, 2400)
    async with worker_running(settings):
        await eventually(lambda: _paused(redis), timeout=30)
        assert await _steady(redis, 0.5) == 0
        await set_control(redis, KEYS, paused=False, rate=200, by="test")
        await eventually(lambda: _settled_at_least(redis, 1), timeout=10, interval=0.02)
        first, t0 = (await _state(redis)).settled, time.monotonic()
        await asyncio.sleep(3)  # the measuring window (not a synchronisation)
        last, t1 = (await _state(redis)).settled, time.monotonic()
        measured = (last - first) / (t1 - t0)
        print(f"drain at an operator limit of 200/s: {measured:.0f}/s")
        assert 100 <= measured <= 300
        overview = await read_overview(redis, KEYS, 8)
        assert overview.control.rate == 200 and overview.drain.cap_per_s == 200

        done = await ordergate(settings, "drain", "--rate", "0")
        assert done.returncode == 0, done.stderr
        assert "operator rate limit none" in done.stdout
        lifted = time.monotonic()
        rest = (await _state(redis)).depth
        assert rest > 200  # enough left to tell 200/s from unlimited (the CLI's start varies)
        await eventually(lambda: _all_settled(redis), timeout=60, interval=0.02)
        took = time.monotonic() - lifted
        print(f"{rest} orders left after the limit was lifted, drained in {took:.2f} s")
        assert took < rest / 400  # at 200/s it would take rest / 200
        await eventually(lambda: _cap_is(redis, None), timeout=5)
        assert (await read_control(redis, KEYS)).rate is None


async def _cap_is(redis: Any, cap: float | None) -> bool:
    return (await read_overview(redis, KEYS, 8)).drain.cap_per_s == cap


async def test_a_pause_is_not_held_up_by_a_very_low_rate(
    settings: Any, client: Any, api_key: str, redis: Any
) -> None:
    """At 0.5 orders/s the leader waits 2 s for each token; the pause must not wait with it."""
    await admit(client, api_key, 50)
    await set_control(redis, KEYS, rate=0.5, by="test")
    async with worker_running(settings):
        await eventually(lambda: _settled_at_least(redis, 1), timeout=30)
        await eventually(lambda: _cap_is(redis, 0.5), timeout=5)
        await set_control(redis, KEYS, paused=True, by="test")
        asked = time.monotonic()
        await eventually(lambda: _paused(redis), timeout=10, interval=0.02)
        assert time.monotonic() - asked < 2.0
        await _steady(redis, 1.0)
        # the rate stays as it was set when resuming
        await set_control(redis, KEYS, paused=False, rate=0, by="test")
        await eventually(lambda: _all_settled(redis), timeout=30)


async def test_post_ops_drain_changes_the_controls(ops: Any, redis: Any) -> None:
    r = await ops.post("/v1/ops/drain", json={"action": "rate", "rate": 250})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["paused"] is False and body["rate"] == 250.0
    assert body["by"] == "admin token" and body["at_us"] > 0  # who, from the authentication
    r = await ops.post(
        "/v1/ops/drain",
        json={"action": "pause"},
        headers={"Origin": "http://og", "X-Forwarded-For": "10.9.9.9"},
    )
    assert r.json()["paused"] is True and r.json()["rate"] == 250.0
    assert r.json()["by"] == "dashboard (admin token)"
    r = await ops.post("/v1/ops/drain", json={"action": "resume", "rate": None})
    assert r.json()["paused"] is False
    r = await ops.post("/v1/ops/drain", json={"action": "rate", "rate": 0})
    assert r.json()["rate"] is None
    assert await read_control(redis, KEYS) == DrainControl(**r.json())


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        (b"not json", "#"),
        (b"[]", "#"),
        (b'{"action": "rate", "rate": 1e999}', "#"),
        (b"{}", "#/action"),
        (b'{"action": "stop"}', "#/action"),
        (b'{"action": "rate"}', "#/rate"),
        (b'{"action": "rate", "rate": -1}', "#/rate"),
        (b'{"action": "rate", "rate": "fast"}', "#/rate"),
        (b'{"action": "rate", "rate": true}', "#/rate"),
        (b'{"action": "pause", "rate": 5}', "#/rate"),
        (b'{"action": "pause", "why": "lunch"}', "#/why"),
    ],
)
async def test_post_ops_drain_refuses_a_bad_body(
    ops: Any, redis: Any, body: bytes, pointer: str
) -> None:
    r = await ops.post("/v1/ops/drain", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["type"] == "/problems/invalid-drain-command"
    assert pointer in [e["pointer"] for e in problem["errors"]]
    assert await redis.exists(KEYS.drain_control()) == 0  # nothing changed


async def test_post_ops_drain_wants_the_admin_token(app_factory: Any, servers: Any) -> None:
    client = await app_factory(make_settings(servers, admin_token="s3cret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = await client.post("/v1/ops/drain", json={"action": "pause"}, headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
    r = await client.post(
        "/v1/ops/drain", json={"action": "pause"}, headers={"Authorization": "Bearer s3cret"}
    )
    assert r.status_code == 200 and r.json()["paused"] is True


async def test_the_operators_endpoints_are_off_without_a_token(client: Any) -> None:
    """No admin_token configured: /v1/ops/* answer 404 (they once were open, on the port the
    customers' pages are served from); /metrics stays scrapeable."""
    for method, path in (
        ("GET", "/v1/ops/status"),
        ("GET", "/v1/ops/dashboard"),
        ("POST", "/v1/ops/drain"),
    ):
        r = await client.request(method, path, json={"action": "pause"})
        assert r.status_code == 404, (path, r.text)
        assert "no admin_token" in r.json()["detail"]
    assert (await client.get("/metrics")).status_code == 200


async def test_post_ops_drain_is_json_only_same_origin_and_capped(ops: Any, redis: Any) -> None:
    """Injects: what another site's page can send (text/plain and a form, no preflight), a
    foreign Origin, and a 200 MB body. Audits: 415, 415, 403, 413 after reading no more than
    the cap and a chunk; the controls never changed."""
    for media in ("text/plain", "application/x-www-form-urlencoded"):
        r = await ops.post(
            "/v1/ops/drain", content=b'{"action": "pause"}', headers={"Content-Type": media}
        )
        assert r.status_code == 415, r.text
    r = await ops.post(
        "/v1/ops/drain", json={"action": "pause"}, headers={"Origin": "https://evil.example"}
    )
    assert r.status_code == 403 and r.json()["type"] == "/problems/forbidden"
    sent = 0

    async def huge() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b" " * 65536
        for _ in range(200 * 16):  # 200 MB, never announced by a Content-Length
            sent += len(chunk)
            yield chunk

    r = await ops.post(
        "/v1/ops/drain", content=huge(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413, r.text
    assert sent <= 4 * 65536, f"read {sent} bytes of a body capped at 4096"
    assert await redis.exists(KEYS.drain_control()) == 0


async def test_the_cli_explains_a_bad_rate_and_an_unreachable_redis(settings: Any) -> None:
    done = await ordergate(settings, "drain", "--rate", "-3")
    assert done.returncode == 2 and "--rate: the rate must be a finite number" in done.stderr
    done = await ordergate(settings, "drain", "--rate", "fast")
    assert done.returncode == 2 and "invalid float value" in done.stderr
    gone = settings.replace(redis_url="redis://127.0.0.1:1/0")
    done = await ordergate(gone, "drain", "--pause")
    assert done.returncode == 2 and "cannot reach Redis at 127.0.0.1:1" in done.stderr

"""Customers' queue: tickets, exact positions, honest ETAs, ETags, expiry, timelines, SSE."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import msgspec

from tests.conftest import (
    admit,
    auth,
    drain,
    eventually,
    make_settings,
    order_body,
    worker_running,
)
from tests.faults import assert_fifo_per_lane
from tests.workers.procs import kill9, spawn_worker


def _path(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[1].join(["/", ""])


async def _poll(client: Any, receipt: dict[str, Any]) -> dict[str, Any]:
    r = await client.get(_path(receipt["queue_url"]))
    assert r.status_code == 200, r.text
    return r.json()


async def _truth_ahead(pg: Any, receipt: dict[str, Any]) -> int:
    """Orders admitted before this one and not in Postgres yet: counted in Postgres itself."""
    n = receipt["queue_number"]
    done = await pg.fetchval("SELECT count(*) FROM orders WHERE seq < $1", n)
    return n - 1 - done


async def test_receipt_carries_a_ticket_and_unknown_tickets_are_404(client, api_key) -> None:
    r = await client.post("/v1/orders", json=order_body(), headers=auth(api_key))
    receipt = r.json()
    ticket = receipt["ticket"]
    mac = ticket.rsplit(".", 1)[1]
    assert len(mac) == 22  # 128 bits, base64url
    assert receipt["queue_url"] == f"http://og/v1/queue/{ticket}"
    assert receipt["wait_url"] == f"http://og/wait/{ticket}"
    status = await _poll(client, receipt)
    assert status["status"] == "queued" and status["position"] == 0
    assert status["queue_number"] == receipt["queue_number"] == 1
    # no API key needed, and nothing else works as a ticket
    forged = ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")
    non_ascii = ticket[:-2] + "\u00e9\u00e9"  # once a TypeError (500) in compare_digest
    for bad in (
        forged,
        "nonsense",
        receipt["order_id"],
        ticket.replace(".1.0.", ".2.0."),
        non_ascii,
    ):
        r = await client.get(f"/v1/queue/{bad}")
        assert r.status_code == 404, bad
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith("/problems/ticket-not-found")

    # a resubmission gets the same ticket: once the in-flight lease is lifted (409 until the
    # confirmation, sent on its own pipeline, has reached Redis -- see Durability)
    async def resubmitted() -> Any:
        r = await client.post(
            "/v1/orders",
            json=order_body(receipt["storefront_order_id"]),
            headers=auth(api_key),
        )
        assert r.status_code in (200, 409), r.text
        return r if r.status_code == 200 else None

    again = await eventually(resubmitted, timeout=10, interval=0.05)
    assert again.json()["ticket"] == ticket


async def test_position_is_the_true_count_ahead_during_a_throttled_drain(
    client, api_key, servers, pg
) -> None:
    """Positions against Postgres itself, at several moments of a drain capped at 150/s."""
    receipts = await admit(client, api_key, 600)
    shards = {int(r["order_id"].split("_")[1]) for r in receipts}
    assert shards == set(range(8))
    for r in receipts[::97]:  # before the drain: everyone admitted earlier is ahead
        assert (await _poll(client, r))["position"] == r["queue_number"] - 1
    probes = sorted(receipts, key=lambda r: r["queue_number"])[450::30]
    settings = make_settings(servers, drain_rate=150, batch_size=25)
    checked = 0
    async with worker_running(settings):
        for probe in probes:
            await eventually(partial(_moved, pg, probe), timeout=30)
            for _ in range(5):  # a batch may settle between the reads: then read again
                before = (await _poll(client, probe))["position"]
                truth = await _truth_ahead(pg, probe)
                after = (await _poll(client, probe))["position"]
                if before == truth == after:
                    checked += 1
                    break
                assert after <= before, "a position went up"
            else:
                raise AssertionError(f"position never matched Postgres: {before}/{truth}/{after}")
    assert checked == len(probes) >= 4


async def _moved(pg: Any, probe: dict[str, Any]) -> bool:
    # wait until the drain is part-way towards this probe, so each check is at a new moment
    return await _truth_ahead(pg, probe) < probe["queue_number"] - 1 - 100


async def test_positions_never_increase_and_each_lane_is_first_in_first_out(
    client, api_key, servers, pg
) -> None:
    """3000 orders over all shards drained at 1500/s while 60 customers poll: positions never
    go up and end at 0, and inside each lane no order commits before one admitted earlier."""
    receipts = await admit(client, api_key, 3000)
    watched = receipts[::50]
    seen: dict[str, list[int]] = {r["ticket"]: [] for r in watched}
    settings = make_settings(servers, drain_rate=1500, batch_size=100)

    async def watch(r: dict[str, Any]) -> None:
        while True:
            status = await _poll(client, r)
            seen[r["ticket"]].append(status["position"])
            if status["status"] == "committed":
                return
            await asyncio.sleep(0.02)  # the polling interval of this customer

    async with worker_running(settings):
        await asyncio.wait_for(asyncio.gather(*(watch(r) for r in watched)), 60)
        await eventually(lambda: _all_in(pg, 3000), timeout=30)
    for positions in seen.values():
        assert positions == sorted(positions, reverse=True), positions
        assert positions[-1] == 0
    assert sum(len(p) for p in seen.values()) > 500  # it was watched all along
    rows = await pg.fetch("SELECT shard, seq FROM orders ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(1, 3001))
    assert len({r["shard"] for r in rows}) == 8
    await assert_fifo_per_lane(pg, "an order committed before an older one")


async def _all_in(pg: Any, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM orders") == n


async def test_eta_lands_within_20_percent_of_the_real_wait(client, api_key, servers) -> None:
    receipts = await admit(client, api_key, 700)
    target = max(receipts, key=lambda r: r["queue_number"])
    settings = make_settings(servers, drain_rate=100, batch_size=10)
    async with worker_running(settings):
        # let the drain run ~2 s so its rate is measured, then ask once and time the real wait
        status = await eventually(lambda: _ahead_at_most(client, target, 500), timeout=30)
        asked = time.monotonic()
        assert status["eta_seconds"] is not None, status
        assert status["eta_reason"] is None
        await eventually(lambda: _committed(client, target), timeout=30, interval=0.02)
        waited = time.monotonic() - asked
    assert abs(status["eta_seconds"] - waited) <= 0.2 * waited, (status, waited)


async def _ahead_at_most(client: Any, receipt: dict[str, Any], n: int) -> Any:
    status = await _poll(client, receipt)
    return status if status["position"] <= n else None


async def _committed(client: Any, receipt: dict[str, Any]) -> bool:
    return (await _poll(client, receipt))["status"] == "committed"


async def test_eta_is_null_with_a_reason_while_the_drain_is_stopped(
    app_factory, api_key, servers
) -> None:
    settings = make_settings(servers, drain_stale_s=1.5, drain_rate=20, batch_size=5)
    client = await app_factory(settings)
    receipts = await admit(client, api_key, 200)
    last = receipts[-1]
    status = await _poll(client, last)
    assert status["eta_seconds"] is None and "no worker" in status["eta_reason"]

    async with worker_running(settings):
        status = await eventually(lambda: _with_eta(client, last), timeout=30)
        assert status["poll_after_seconds"] >= 1
    status = await _poll(client, last)  # a clean stop says so at once
    assert status["eta_seconds"] is None and "stopped" in status["eta_reason"]
    assert status["status"] in ("queued", "processing") and status["position"] > 0

    worker = spawn_worker(settings)  # now a worker that dies without a word
    try:
        await eventually(lambda: _with_eta(client, last), timeout=30)
    finally:
        kill9(worker)
    status = await eventually(lambda: _without_eta(client, last), timeout=10)
    assert "no worker has reported" in status["eta_reason"]


async def _with_eta(client: Any, receipt: dict[str, Any]) -> Any:
    status = await _poll(client, receipt)
    return status if status["eta_seconds"] is not None else None


async def _without_eta(client: Any, receipt: dict[str, Any]) -> Any:
    status = await _poll(client, receipt)
    return status if status["eta_seconds"] is None else None


async def test_etag_gives_304_until_the_queue_moves(client, api_key, settings) -> None:
    receipts = await admit(client, api_key, 30)
    url = _path(receipts[-1]["queue_url"])
    first = await client.get(url)
    etag = first.headers["etag"]
    again = await client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["etag"] == etag
    await drain(settings)
    moved = await client.get(url, headers={"If-None-Match": etag})
    assert moved.status_code == 200 and moved.headers["etag"] != etag
    assert moved.json()["status"] == "committed" and moved.json()["poll_after_seconds"] is None


async def test_poll_interval_grows_with_the_position(client, api_key) -> None:
    receipts = await admit(client, api_key, 2600)
    front = await _poll(client, receipts[0])
    back = await _poll(client, receipts[-1])
    assert front["poll_after_seconds"] <= 2
    assert back["poll_after_seconds"] > front["poll_after_seconds"]
    assert back["poll_after_seconds"] <= 30


async def test_ticket_expires_a_configured_time_after_commit(app_factory, api_key, servers) -> None:
    settings = make_settings(servers, ticket_ttl_s=1)
    client = await app_factory(settings)
    [receipt] = await admit(client, api_key, 1)
    await drain(settings)
    assert (await _poll(client, receipt))["status"] == "committed"

    async def gone() -> bool:
        return (await client.get(_path(receipt["queue_url"]))).status_code == 404

    await eventually(gone, timeout=10, interval=0.1)
    # the storefront still sees the order
    r = await client.get(receipt["status_url"], headers=auth(api_key))
    assert r.json()["status"] == "committed"


async def test_timeline_lists_every_state_change_in_order(client, api_key, settings) -> None:
    [receipt] = await admit(client, api_key, 1)
    queued = (await client.get(receipt["status_url"], headers=auth(api_key))).json()
    assert [c["status"] for c in queued["timeline"]] == ["accepted"]
    assert queued["timeline"][0]["at"] == queued["accepted_at"]
    assert queued["ticket"] == receipt["ticket"]
    await drain(settings)
    done = (await client.get(receipt["status_url"], headers=auth(api_key))).json()
    codes = [c["status"] for c in done["timeline"]]
    assert codes == ["accepted", "processing", "committed"]
    times = [c["at"] for c in done["timeline"]]
    assert times == sorted(times)
    assert times[-1] == done["committed_at"]


async def test_server_sent_events_push_each_change_until_final(client, api_key, servers) -> None:
    receipts = await admit(client, api_key, 300)
    target = receipts[-1]
    settings = make_settings(servers, drain_rate=200, batch_size=20)
    async with worker_running(settings):
        path = _path(target["queue_url"]) + "/events"
        r = await asyncio.wait_for(client.get(path), 60)  # the stream ends at the final state
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [
        msgspec.json.decode(block.split("data: ", 1)[1])
        for block in r.text.split("\n\n")
        if "event: status" in block
    ]
    positions = [e["position"] for e in events]
    assert len(events) >= 3 and positions == sorted(positions, reverse=True)
    assert events[-1]["status"] == "committed"
    assert (await client.get("/v1/queue/nope/events")).status_code == 404


async def test_positions_stay_right_when_the_gateway_loses_its_drain_subscription(
    client, api_key, settings, redis
) -> None:
    """Injects: CLIENT KILL of the gateway's pub/sub connection (repeatedly, while the queue
    moves). Audits: every answer still shows the position Redis holds at that moment."""
    receipts = await admit(client, api_key, 40)
    last = max(receipts, key=lambda r: r["queue_number"])
    assert (await _poll(client, last))["position"] == 39
    for _ in range(3):
        await eventually(lambda: redis.execute_command("CLIENT", "LIST", "TYPE", "pubsub"))
        assert await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1
        for _ in range(5):  # while it resubscribes, polls read the state themselves
            assert (await _poll(client, last))["position"] == 39
    await drain(settings)
    status = await _poll(client, last)  # no notice needed: the answer is read or followed fresh
    assert status["status"] == "committed" and status["position"] == 0


async def test_event_streams_are_capped_per_ticket_and_end(app_factory, settings, api_key) -> None:
    """Injects: more event streams on one ticket than the cap (15,000 once took 80 % of a core
    and cost other clients 503s). Audits: past the cap, 429 too-many-streams with Retry-After;
    the open ones end by their lifetime; a stream that ended frees its place."""
    client = await app_factory(settings.replace(sse_per_ticket=2, sse_max_s=2.0))
    [receipt] = await admit(client, api_key, 1)
    ticket = receipt["ticket"]
    path = _path(receipt["queue_url"]) + "/events"
    streams = client.app.state.gateway.streams
    opened = [asyncio.create_task(client.get(path)) for _ in range(2)]
    await eventually(lambda: streams[ticket] == 2, timeout=10)
    refused = await client.get(path)
    assert refused.status_code == 429 and refused.json()["type"] == "/problems/too-many-streams"
    assert refused.headers["retry-after"] == "30"
    for r in await asyncio.wait_for(asyncio.gather(*opened), 30):  # their lifetime ends them
        assert r.status_code == 200 and "event: status" in r.text
    assert ticket not in streams
    again = await asyncio.wait_for(client.get(path), 30)
    assert again.status_code == 200

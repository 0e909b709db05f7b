"""The fair drain: each lane's storefronts share its drain by weight, each one first in, first
out, so a few orders behind another storefront's flood wait for a round, not for the flood."""

from __future__ import annotations

from typing import Any

from ordergate.buffer.fairness import allocate, orders_before
from ordergate.buffer.keys import Keys
from ordergate.buffer.storefronts import Limit, set_limit
from ordergate.gateway.auth import create_key
from tests.conftest import admit, auth, eventually, make_settings, worker_running
from tests.faults import assert_fifo_per_lane

KEYS = Keys()


def test_a_batch_goes_round_the_storefronts_by_weight() -> None:
    assert allocate({"a": 1000, "b": 3}, {}, 10) == {"a": 7, "b": 3}
    assert allocate({"a": 1000, "b": 1000}, {"b": 3}, 8) == {"a": 2, "b": 6}
    assert allocate({"a": 2, "b": 0}, {}, 10) == {"a": 2}
    assert allocate({}, {}, 10) == {}
    # the round starts one storefront further each batch: a batch of 1 alternates
    assert [allocate({"a": 9, "b": 9}, {}, 1, turn) for turn in range(3)] == [
        {"a": 1},
        {"b": 1},
        {"a": 1},
    ]


def test_orders_before_count_the_others_share_of_the_rounds() -> None:
    assert orders_before(0, 1, []) == 0
    assert orders_before(0, 1, [(20_000, 1)]) == 1  # first in its queue: one round
    assert orders_before(9, 1, [(20_000, 1)]) == 19  # ten rounds
    assert orders_before(9, 1, [(4, 1)]) == 13  # the other's whole backlog is smaller
    assert orders_before(9, 2, [(20_000, 1)]) == 9 + 5  # twice the weight: half the rounds


async def _sent(client: Any, key: str, n: int, prefix: str) -> list[dict[str, Any]]:
    return await admit(client, key, n, prefix)


async def _waits(pg: Any, prefix: str) -> list[float]:
    rows = await pg.fetch(
        "SELECT extract(epoch FROM committed_at - accepted_at) AS w FROM orders"
        " WHERE storefront_order_id LIKE $1",
        prefix + "%",
    )
    return [float(r["w"]) for r in rows]


async def test_a_small_storefront_behind_a_flood_waits_about_as_long_as_alone(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: with the drain capped at 300 orders/s, 24 orders of a small storefront alone;
    then 2,400 of another (100 x), then 24 of the small one again. Audits: behind the flood the
    small storefront's longest wait stays within 2 s of its longest wait alone, and all of its
    orders commit while the flood has committed fewer than half of its own; FIFO holds in each
    lane for each storefront; the whole flood commits in the end."""
    small = await create_key(redis, KEYS, "shop-small")
    settings = make_settings(servers, drain_rate=300, workers=1)
    async with worker_running(settings):
        await _sent(client, small, 24, "alone")

        async def alone_done() -> bool:
            return len(await _waits(pg, "alone-")) == 24

        await eventually(alone_done, timeout=60)
    await _sent(client, api_key, 2400, "flood")
    async with worker_running(settings):
        await _sent(client, small, 24, "behind")

        async def small_done() -> tuple[int] | None:
            if len(await _waits(pg, "behind-")) < 24:
                return None
            flood = "SELECT count(*) FROM orders WHERE storefront_id = 'shop-a'"
            return (int(await pg.fetchval(flood)),)

        (flood_committed,) = await eventually(small_done, timeout=60, interval=0.05)
        assert flood_committed < 1200, f"the small storefront waited for {flood_committed} orders"

        async def all_done() -> bool:
            return await pg.fetchval("SELECT count(*) FROM orders") == 2448

        await eventually(all_done, timeout=120)
    alone, behind = max(await _waits(pg, "alone-")), max(await _waits(pg, "behind-"))
    assert behind <= alone + 2.0, f"longest wait {behind:.2f} s behind the flood, {alone:.2f} alone"
    await assert_fifo_per_lane(pg)


async def test_weights_share_each_lane_s_drain(client, api_key, servers, redis, pg) -> None:
    """Two storefronts with equal backlogs, weights 1 and 3: while both have a backlog, the
    second gets about three orders for each of the first's."""
    heavy = await create_key(redis, KEYS, "shop-heavy")
    await set_limit(redis, KEYS, "shop-heavy", Limit(0, 0, 3), 8)
    await _sent(client, api_key, 1600, "light")
    await _sent(client, heavy, 1600, "heavy")
    settings = make_settings(servers, drain_rate=400, workers=1)
    async with worker_running(settings):

        async def some() -> tuple[int, int] | None:
            rows = await pg.fetch(
                "SELECT storefront_id, count(*) AS n FROM orders GROUP BY storefront_id"
            )
            counts = {r["storefront_id"]: int(r["n"]) for r in rows}
            light, heavy_n = counts.get("shop-a", 0), counts.get("shop-heavy", 0)
            return (light, heavy_n) if light + heavy_n >= 800 else None

        light, heavy_n = await eventually(some, timeout=60, interval=0.05)
    assert heavy_n < 1600 and light < 1600, "one of them ran out of backlog"
    assert 2.3 <= heavy_n / light <= 3.7, (light, heavy_n)


async def test_positions_count_the_storefront_s_own_queue_and_the_others_share(
    client, api_key, servers, redis
) -> None:
    """Nothing drains: a small storefront's first order, behind another's 400, has one round
    before it in its lane (the other's share), not the other's whole backlog; the hot one's
    last order has its whole queue before it."""
    small = await create_key(redis, KEYS, "shop-small")
    hot = await _sent(client, api_key, 400, "hot")
    r = await client.post(
        "/v1/orders",
        json={
            "storefront_order_id": "s-1",
            "customer": {"id": "c"},
            "items": [{"sku": "X", "quantity": 1, "unit_price_minor": 100}],
            "currency": "EUR",
            "total_minor": 100,
        },
        headers=auth(small),
    )
    assert r.status_code == 202, r.text
    ticket = r.json()["ticket"]

    async def position() -> Any:  # the gateway follows the lanes' state, refreshed each second
        answer = (await client.get(f"/v1/queue/{ticket}")).json()
        return answer if answer["position"] == 1 else None

    mine = await eventually(position, timeout=10, interval=0.1)  # one round: one hot order
    assert mine["ahead_at_admission"] == 0
    last = (await client.get(f"/v1/queue/{hot[-1]['ticket']}")).json()
    assert last["position"] >= 40, last  # its own lane's queue, at least

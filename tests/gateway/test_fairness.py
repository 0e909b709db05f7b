"""Fair between storefronts: rate limits per storefront (exact across gateway processes, with
the IETF RateLimit header fields) and a share of the buffer that a flood cannot take."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from ordergate.buffer.keys import Keys
from ordergate.gateway.auth import create_key
from ordergate.servers import free_port
from tests.conftest import auth, drain, eventually, make_settings, order_body
from tests.gateway.test_metrics import answers_200, grew, processes, scrape
from tests.workers.test_deadletters import cli

KEYS = Keys()
ADMIN = "fairness-admin-token-0123456789"


async def post(client: Any, key: str, sfo: str) -> httpx.Response:
    response: httpx.Response = await client.post(
        "/v1/orders", json=order_body(sfo), headers=auth(key)
    )
    return response


def remaining(response: httpx.Response) -> int:
    """r of ``RateLimit: "storefront";r=N;t=T``."""
    fields = dict(p.split("=") for p in response.headers["ratelimit"].split(";")[1:])
    return int(fields["r"])


async def test_past_its_burst_a_storefront_gets_429_with_ratelimit_fields(
    app_factory, api_key, other_key, servers, redis
) -> None:
    """Every answer to a limited storefront carries RateLimit-Policy and RateLimit; past the
    burst, 429 rate-limited with Retry-After; a replay is never refused and costs no token;
    each storefront has a bucket of its own."""
    client = await app_factory(make_settings(servers, storefront_rate=0.01, storefront_burst=5))
    before = await scrape(client)
    answers = [await post(client, api_key, f"rl-{i}") for i in range(5)]
    assert [a.status_code for a in answers] == [202] * 5
    assert {a.headers["ratelimit-policy"] for a in answers} == {'"storefront";q=5;w=500'}
    assert [remaining(a) for a in answers] == [4, 3, 2, 1, 0]

    refused = await post(client, api_key, "rl-5")
    assert refused.status_code == 429, refused.text
    problem = refused.json()
    assert problem["type"] == "/problems/rate-limited"
    assert refused.headers["content-type"] == "application/problem+json"
    assert 90 <= int(refused.headers["retry-after"]) <= 101  # one order per 100 s
    assert remaining(refused) == 0 and "ratelimit-policy" in refused.headers

    replay = await post(client, api_key, "rl-0")  # same storefront_order_id and body
    assert replay.status_code == 200 and replay.json()["order_id"] == answers[0].json()["order_id"]
    assert remaining(replay) == 0

    other = await post(client, other_key, "rl-0")
    assert other.status_code == 202 and remaining(other) == 4
    after = await scrape(client)
    assert grew(before, after, "ordergate_orders_shed_total", status="429") == 1
    assert grew(before, after, "ordergate_orders_accepted_total") == 6

    async def counted() -> bool:
        return await redis.hget(KEYS.storefront_refused(), "shop-a:rate") == b"1"

    await eventually(counted, timeout=10)  # each gateway adds its 429s up once a second


async def test_a_storefront_limit_of_its_own_set_and_cleared(
    client, api_key, other_key, settings
) -> None:
    """``storefronts set-limit`` limits one storefront, at once and for every gateway; others
    stay unlimited (no RateLimit fields); ``--clear`` lifts it; bad values are refused."""
    done = cli(settings, "storefronts", "set-limit", "shop-a", "--rate", "0.01", "--burst", "2")
    assert done.returncode == 0, done.stderr
    assert [(await post(client, api_key, f"own-{i}")).status_code for i in range(3)] == [
        202,
        202,
        429,
    ]
    free = [await post(client, other_key, f"free-{i}") for i in range(5)]
    assert {a.status_code for a in free} == {202}
    assert not any("ratelimit" in a.headers for a in free)

    listed = cli(settings, "storefronts", "list", "--json", "--interval", "0")
    rows = {r["storefront_id"]: r for r in json.loads(listed.stdout)["storefronts"]}
    assert rows["shop-a"]["rate_limit"] == 0.01 and rows["shop-a"]["burst"] == 2
    assert rows["shop-a"]["buffered"] == 2 and rows["shop-b"]["buffered"] == 5
    assert rows["shop-b"]["rate_limit"] is None
    table = cli(settings, "storefronts", "list", "--interval", "0")
    assert "0.01/s burst 2" in table.stdout, table.stdout

    weight = cli(settings, "storefronts", "set-limit", "shop-a", "--weight", "3")
    assert weight.returncode == 0 and "weight 3" in weight.stdout
    assert "0.01 orders/s, burst 2" in weight.stdout  # the rest of its limit is kept

    cleared = cli(settings, "storefronts", "set-limit", "shop-a", "--clear")
    assert cleared.returncode == 0, cleared.stderr
    after = await post(client, api_key, "own-3")
    assert after.status_code == 202 and "ratelimit" not in after.headers

    for bad in (["--weight", "0"], ["--rate", "-1"], ["--rate", "nan"], ["--burst", "-2"]):
        refused = cli(settings, "storefronts", "set-limit", "shop-a", *bad)
        assert refused.returncode == 2, (bad, refused.stdout, refused.stderr)
    assert cli(settings, "storefronts", "set-limit", "shop-a", "--clear").returncode == 2
    assert cli(settings, "storefronts", "set-limit", "shop a", "--rate", "1").returncode == 2


async def test_the_limit_is_exact_across_two_gateway_processes(
    settings, api_key, tmp_path: Path
) -> None:
    """Two ``serve`` processes, each its own port, flooded at once for one storefront with a
    burst of 40: exactly 40 orders are admitted between them, and both admitted some."""
    ports = (free_port(), free_port())
    custom = settings.replace(storefront_rate=0.01, storefront_burst=40)
    log = tmp_path / "serve.log"
    commands = [["serve", "--port", str(p)] for p in ports]
    with processes(custom, log, *commands):
        clients = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{p}", timeout=20) for p in ports]
        try:
            for http in clients:
                await eventually(partial(answers_200, http, "/readyz"), timeout=60)
            answers = await asyncio.gather(
                *(post(clients[i % 2], api_key, f"two-{i}") for i in range(160))
            )
        finally:
            for http in clients:
                await http.aclose()
    codes = [a.status_code for a in answers]
    assert codes.count(202) == 40 and codes.count(429) == 120, (codes, log.read_text()[-2000:])
    assert {codes[i] for i in range(0, 160, 2)} >= {202}  # the first process admitted some
    assert {codes[i] for i in range(1, 160, 2)} >= {202}  # and so did the second


async def test_a_flood_leaves_the_reserve_to_a_storefront_below_its_share(
    app_factory, api_key, other_key, servers, redis
) -> None:
    """max_buffered 100, reserve 10 %: a flooding storefront alone stops at 90 (429
    storefront-share-full); another one still gets 202 up to the bound; past it, 429
    buffer-full. The counts follow the drain out."""
    custom = make_settings(servers, max_buffered=100, storefront_reserve=0.1)
    client = await app_factory(custom)
    flood = []
    for start in range(0, 150, 30):
        flood += await asyncio.gather(
            *(post(client, api_key, f"fl-{i}") for i in range(start, start + 30))
        )
    codes = [a.status_code for a in flood]
    assert codes.count(202) == 90 and codes.count(429) == 60, codes
    refused = next(a for a in flood if a.status_code == 429)
    assert refused.json()["type"] == "/problems/storefront-share-full", refused.text
    assert "retry-after" in refused.headers

    small = [await post(client, other_key, f"sm-{i}") for i in range(10)]
    assert [a.status_code for a in small] == [202] * 10
    full = await post(client, other_key, "sm-10")
    assert full.status_code == 429 and full.json()["type"] == "/problems/buffer-full"

    counts = await redis.hgetall(KEYS.storefront_buffered())
    assert counts == {b"shop-a": b"90", b"shop-b": b"10"}
    await drain(custom)
    assert await redis.hgetall(KEYS.storefront_buffered()) == {}
    settled = await redis.hgetall(KEYS.storefront_settled())
    assert settled == {b"shop-a": b"90", b"shop-b": b"10"}
    again = await post(client, api_key, "fl-again")
    assert again.status_code == 202


async def test_a_single_storefront_can_fill_the_whole_buffer(app_factory, api_key, servers) -> None:
    """With one storefront holding API keys, the reserve is not kept: the bound is its own."""
    client = await app_factory(make_settings(servers, max_buffered=100, storefront_reserve=0.1))
    codes = [(await post(client, api_key, f"one-{i}")).status_code for i in range(101)]
    assert codes == [202] * 100 + [429]


async def test_metrics_and_status_name_the_top_storefronts_and_add_up_the_rest(
    app_factory, servers, redis
) -> None:
    """metrics_storefronts 2: the two storefronts holding most get their own series, the others
    add up as ``other``; ``status --storefront`` and the dashboard show each one's figures."""
    custom = make_settings(servers, metrics_storefronts=2, admin_token=ADMIN)
    client = await app_factory(custom)
    for sf, n in (("shop-a", 4), ("shop-b", 3), ("shop-c", 2), ("shop-d", 1)):
        key = await create_key(redis, KEYS, sf)
        assert {(await post(client, key, f"{sf}-{i}")).status_code for i in range(n)} == {202}

    text = (await client.get("/metrics", headers=auth(ADMIN))).text
    series = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ordergate_storefront_")
    }
    assert series['ordergate_storefront_buffered{storefront="shop-a"}'] == 4
    assert series['ordergate_storefront_buffered{storefront="shop-b"}'] == 3
    assert series['ordergate_storefront_buffered{storefront="other"}'] == 3
    assert series['ordergate_storefront_admitted_total{storefront="other"}'] == 3
    assert not any("shop-c" in name or "shop-d" in name for name in series)
    assert 'ordergate_storefront_refused_total{reason="rate",storefront="other"}' in series

    shown = cli(custom, "status", "--storefront", "shop-c", "--json", "--interval", "0")
    assert shown.returncode == 0, shown.stderr
    row = json.loads(shown.stdout)
    assert row["buffered"] == 2 and row["admitted"] == 2 and row["share"] == 0.2
    assert cli(custom, "status", "--storefront", "shop-z").returncode == 2

    dashboard = await client.get("/v1/ops/dashboard", headers=auth(ADMIN))
    rows = dashboard.json()["overview"]["storefronts"]
    assert [(r["storefront_id"], r["buffered"]) for r in rows] == [
        ("shop-a", 4),
        ("shop-b", 3),
        ("shop-c", 2),
        ("shop-d", 1),
    ]

"""The order API end to end against real Valkey and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from ordergate.buffer.keys import Keys
from ordergate.components import gateway_config
from ordergate.gateway.app import create_app
from ordergate.gateway.auth import CACHE_ENTRIES
from ordergate.sharding import new_order_id
from tests.conftest import auth, drain, order_body


async def test_whole_path_n_orders_become_exactly_n_rows(client, api_key, settings, pg) -> None:
    bodies = [order_body() for _ in range(120)]
    responses = await asyncio.gather(
        *(client.post("/v1/orders", json=b, headers=auth(api_key)) for b in bodies)
    )
    assert [r.status_code for r in responses] == [202] * 120, [
        r.text for r in responses if r.status_code != 202
    ][:2]
    receipts = [r.json() for r in responses]
    assert all(r["status"] == "queued" for r in receipts)
    assert len({r["order_id"] for r in receipts}) == 120

    report = await drain(settings)
    assert report.committed == 120

    rows = await pg.fetch(
        "SELECT order_id, storefront_order_id, total_minor, shard, body FROM orders"
    )
    assert len(rows) == 120
    by_id = {r["order_id"]: r for r in rows}
    for body, receipt in zip(bodies, receipts, strict=True):
        row = by_id[receipt["order_id"]]
        assert row["storefront_order_id"] == body["storefront_order_id"]
        assert row["total_minor"] == body["total_minor"]
        assert receipt["order_id"].startswith(f"ord_{row['shard']}_")
    # every shard got some of one storefront's orders (the hot-storefront spread)
    assert {r["shard"] for r in rows} == set(range(8))

    statuses = await asyncio.gather(
        *(client.get(r["status_url"], headers=auth(api_key)) for r in receipts)
    )
    assert all(s.status_code == 200 and s.json()["status"] == "committed" for s in statuses)
    assert all(s.json()["committed_at"] >= s.json()["accepted_at"] for s in statuses)


async def test_receipt_only_after_the_entry_is_in_the_stream(client, api_key, redis) -> None:
    r = await client.post("/v1/orders", json=order_body("A-1"), headers=auth(api_key))
    assert r.status_code == 202
    assert r.headers["location"] == r.json()["status_url"]
    order_id = r.json()["order_id"]
    shard = int(order_id.split("_")[1])
    entries = await redis.xrange(Keys().sublane(shard, "shop-a"))
    assert [e[1][b"oid"].decode() for e in entries] == [order_id]
    fields = entries[0][1]
    assert fields[b"sf"] == b"shop-a" and fields[b"sfo"] == b"A-1" and fields[b"seq"] == b"1"


async def test_resubmission_returns_the_original_receipt(client, api_key, settings, pg) -> None:
    body = order_body("dup-1")
    first = await client.post("/v1/orders", json=body, headers=auth(api_key))
    again = await client.post("/v1/orders", json=body, headers=auth(api_key))
    # same content, other key order and spacing: still the same order
    reordered = await client.post(
        "/v1/orders",
        content=_reordered_json(body),
        headers={**auth(api_key), "content-type": "application/json"},
    )
    assert first.status_code == 202
    assert again.status_code == 200 and again.json() == first.json()
    assert reordered.status_code == 200 and reordered.json() == first.json()
    await drain(settings)
    after_commit = await client.post("/v1/orders", json=body, headers=auth(api_key))
    assert (
        after_commit.status_code == 200
        and after_commit.json()["order_id"] == first.json()["order_id"]
    )
    assert await pg.fetchval("SELECT count(*) FROM orders") == 1


async def test_concurrent_twins_create_one_order(client, api_key, settings, pg) -> None:
    body = order_body("twin-1")
    responses = await asyncio.gather(
        *(client.post("/v1/orders", json=body, headers=auth(api_key)) for _ in range(20))
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(202) == 1
    assert set(codes) <= {200, 202, 409}
    ids = {r.json()["order_id"] for r in responses if r.status_code in (200, 202)}
    assert len(ids) == 1
    await drain(settings)
    assert await pg.fetchval("SELECT count(*) FROM orders") == 1


async def test_same_id_with_a_different_body_is_422(client, api_key) -> None:
    first = await client.post("/v1/orders", json=order_body("X-1"), headers=auth(api_key))
    changed = await client.post(
        "/v1/orders", json=order_body("X-1", price=999), headers=auth(api_key)
    )
    assert changed.status_code == 422
    assert changed.headers["content-type"] == "application/problem+json"
    problem = changed.json()
    assert problem["type"] == "/problems/order-id-reused"
    assert problem["order_id"] == first.json()["order_id"]
    assert "X-1" in problem["detail"]


async def test_twin_in_flight_is_409_until_durable(
    app_factory, servers, api_key, settings, pg
) -> None:
    """durability=replica with no replica: the write lands but is never confirmed, so the gateway
    answers 503 and the idempotency lease makes the retry a 409 until the lease expires. After
    that a retry is a duplicate, but its batch's barrier fails too (no replica): still 503, never
    a receipt no replica backs. The order was written: the drain commits it once."""
    from tests.conftest import eventually, make_settings

    custom = make_settings(
        servers, durability="replica", durability_timeout_ms=50, inflight_lease_ms=1500
    )
    client = await app_factory(custom)
    body = order_body("lease-1")
    first = await client.post("/v1/orders", json=body, headers=auth(api_key))
    assert first.status_code == 503
    assert first.headers["retry-after"]
    assert first.json()["type"] == "/problems/buffer-unavailable"
    twin = await client.post("/v1/orders", json=body, headers=auth(api_key))
    assert twin.status_code == 409
    assert twin.json()["type"] == "/problems/order-in-flight"
    assert twin.headers["retry-after"] == "1"

    async def lease_over() -> Any:
        r = await client.post("/v1/orders", json=body, headers=auth(api_key))
        assert r.status_code in (409, 503), r.text
        return r if r.status_code == 503 else None

    r = await eventually(lease_over, timeout=10, interval=0.2)
    assert "no replica acknowledged" in r.json()["detail"], r.text
    await drain(settings)
    assert (
        await pg.fetchval("SELECT count(*) FROM orders WHERE storefront_order_id = 'lease-1'") == 1
    )


@pytest.mark.parametrize(
    ("headers", "content", "status", "ptype"),
    [
        ({}, b"{}", 401, "unauthorized"),
        ({"Authorization": "Bearer og_not-a-key"}, b"{}", 401, "unauthorized"),
        ({"Authorization": "Basic abc"}, b"{}", 401, "unauthorized"),
        ({"content-type": "text/plain"}, b"{}", 415, "unsupported-media-type"),
        ({"content-type": "application/json"}, b"{not json", 422, "malformed-json"),
        ({"content-type": "application/json"}, b"x" * 70000, 413, "payload-too-large"),
    ],
)
async def test_error_statuses_are_problem_json(
    client, api_key, headers, content, status, ptype
) -> None:
    h = {**auth(api_key), "content-type": "application/json", **headers}
    if "Authorization" in headers or headers == {}:
        h = {k: v for k, v in h.items() if k != "Authorization"} | {
            k: v for k, v in headers.items() if k == "Authorization"
        }
    r = await client.post("/v1/orders", content=content, headers=h)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["type"] == f"/problems/{ptype}" and body["status"] == status
    assert body["title"] and body["detail"]


async def test_chunked_body_over_the_limit_is_413(client, api_key) -> None:
    async def chunks():  # no content-length: the limit must hold while streaming
        for _ in range(20):
            yield b"x" * 4096

    r = await client.post(
        "/v1/orders",
        content=chunks(),
        headers={**auth(api_key), "content-type": "application/json"},
    )
    assert r.status_code == 413


async def test_invalid_order_names_every_bad_field(client, api_key) -> None:
    body = order_body()
    body["items"][0]["quantity"] = 0
    body["items"][1]["unit_price_minor"] = 12.5
    body["currency"] = "EURO"
    body["customer"]["email"] = "not-an-email"
    body["surprise"] = True
    del body["customer"]["id"]
    r = await client.post("/v1/orders", json=body, headers=auth(api_key))
    assert r.status_code == 422
    problem = r.json()
    assert problem["type"] == "/problems/invalid-order"
    pointers = {e["pointer"] for e in problem["errors"]}
    assert pointers == {
        "#/items/0/quantity",
        "#/items/1/unit_price_minor",
        "#/currency",
        "#/customer/email",
        "#/customer/id",
        "#/surprise",
    }


@pytest.mark.parametrize("depth", [40, 1000, 30000])
async def test_deep_nesting_is_a_422_not_a_500(client, api_key, depth) -> None:
    """JSON nested 1,000 levels deep once raised RecursionError in the error path (a 500)."""
    nested = "[" * depth + "]" * depth
    doc = json.dumps(order_body())
    for body in (nested, doc[:-1] + f', "metadata": {{"a": {nested}}}}}'):
        r = await client.post(
            "/v1/orders",
            content=body,
            headers={**auth(api_key), "content-type": "application/json"},
        )
        assert r.status_code == 422, r.text
        assert r.json()["type"] == "/problems/malformed-json"
        assert "deeper than 32 levels" in r.json()["detail"]


async def test_the_error_list_stops_after_20(client, api_key) -> None:
    """500 bad items, 3 errors each: the answer lists 20 and says there are more (it listed
    all 1,500 once: a 433 KB answer to a 44 KB body), and the walk stops there."""
    body = order_body()
    body["items"] = [{"sku": "", "quantity": 0, "unit_price_minor": -1}] * 500
    r = await client.post("/v1/orders", json=body, headers=auth(api_key))
    assert r.status_code == 422
    errors = r.json()["errors"]
    assert len(errors) == 21
    assert errors[:3] == [
        {"pointer": "#/items/0/sku", "detail": "Expected `str` of length >= 1"},
        {"pointer": "#/items/0/quantity", "detail": "Expected `int` >= 1"},
        {"pointer": "#/items/0/unit_price_minor", "detail": "Expected `int` >= 0"},
    ]
    assert errors[-1] == {"pointer": "#", "detail": "more than 20 errors, not listed"}
    assert len(r.content) < 4000


@pytest.mark.parametrize(
    ("mutate", "pointer"),
    [
        (lambda b: b.update(total_minor=b["total_minor"] + 1), "#/total_minor"),
        (lambda b: b.update(currency="ABC"), "#/currency"),
        (lambda b: b.update(items=[]), "#/items"),
        (lambda b: b.update(items=[b["items"][0]] * 501), "#/items"),
        (lambda b: b.update(storefront_order_id="x" * 65), "#/storefront_order_id"),
        (lambda b: b.update(storefront_order_id="bad\u0000id"), "#/storefront_order_id"),
        (lambda b: b.update(storefront_order_id="bad\u0085id"), "#/storefront_order_id"),  # C1
        (lambda b: b.update(storefront_order_id="evil\u202egpj.exe"), "#/storefront_order_id"),
        (lambda b: b.update(storefront_order_id="two\u2028lines"), "#/storefront_order_id"),
        (lambda b: b.update(storefront_order_id="zero\u200bwidth"), "#/storefront_order_id"),
        (lambda b: b["customer"].update(id="tag\U000e0041"), "#/customer/id"),
        (lambda b: b["items"][0].update(quantity=10001), "#/items/0/quantity"),
        (lambda b: b["items"][0].update(unit_price_minor=-1), "#/items/0/unit_price_minor"),
        (lambda b: b.update(metadata={f"k{i}": i for i in range(21)}), "#/metadata"),
        (lambda b: b.update(metadata={"nested": {"a": 1}}), "#/metadata/nested"),
        (lambda b: b.update(metadata={"big": "x" * 3000}), "#/metadata/big"),
        (lambda b: b.update(metadata={f"k{i}": "x" * 900 for i in range(3)}), "#/metadata"),
    ],
)
async def test_business_rules_are_422_with_pointer(client, api_key, mutate, pointer) -> None:
    body = order_body()
    mutate(body)
    r = await client.post("/v1/orders", json=body, headers=auth(api_key))
    assert r.status_code == 422, r.text
    assert pointer in {e["pointer"] for e in r.json()["errors"]}


async def test_tenant_isolation(client, api_key, other_key, settings, pg) -> None:
    mine = await client.post("/v1/orders", json=order_body("shared-id"), headers=auth(api_key))
    theirs = await client.post(
        "/v1/orders", json=order_body("shared-id", price=7), headers=auth(other_key)
    )
    assert mine.status_code == theirs.status_code == 202  # ids are per storefront
    assert mine.json()["order_id"] != theirs.json()["order_id"]
    peek = await client.get(mine.json()["status_url"], headers=auth(other_key))
    assert peek.status_code == 404 and peek.json()["type"] == "/problems/not-found"
    await drain(settings)
    peek = await client.get(mine.json()["status_url"], headers=auth(other_key))
    assert peek.status_code == 404
    rows = await pg.fetch(
        "SELECT storefront_id FROM orders WHERE storefront_order_id = 'shared-id'"
    )
    assert sorted(r["storefront_id"] for r in rows) == ["shop-a", "shop-b"]


async def test_unknown_and_malformed_order_ids_are_404(client, api_key) -> None:
    for oid in ("ord_3_01m880chz12z60f00n5cz923dt", "nope", "ord_99_01m880chz12z60f00n5cz923dt"):
        r = await client.get(f"/v1/orders/{oid}", headers=auth(api_key))
        assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


async def test_a_committed_orders_status_comes_from_its_row(
    client, api_key, other_key, settings, redis, pg
) -> None:
    """Settling deletes a committed order's status record: its status and timeline (accepted,
    processing, committed) come from its Postgres row, and another storefront still gets 404."""
    r = await client.post("/v1/orders", json=order_body("old-1"), headers=auth(api_key))
    await drain(settings)
    oid = r.json()["order_id"]
    assert not await redis.exists(Keys().status(int(oid.split("_")[1]), oid))
    from tests.conftest import eventually

    async def status() -> Any:  # the gateway connects to Postgres in the background
        s = await client.get(f"/v1/orders/{oid}", headers=auth(api_key))
        return s if s.status_code == 200 else None

    s = await eventually(status, timeout=10)
    assert s.json()["status"] == "committed" and s.json()["storefront_order_id"] == "old-1"
    row = await pg.fetchrow("SELECT accepted_at, taken_at, committed_at FROM orders")
    timeline = s.json()["timeline"]
    assert [c["status"] for c in timeline] == ["accepted", "processing", "committed"]
    assert row["accepted_at"] <= row["taken_at"] <= row["committed_at"]
    other = await client.get(f"/v1/orders/{oid}", headers=auth(other_key))
    assert other.status_code == 404


async def test_health_and_readiness(client) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    from tests.conftest import eventually

    async def ready() -> Any:
        r = await client.get("/readyz")
        return r if r.status_code == 200 else None

    r = await eventually(ready, timeout=10)
    assert r.json()["checks"] == {"redis": "ok"}
    await eventually(
        lambda: _postgres_reported(client), timeout=10
    )  # reported, but never decides readiness


async def _postgres_reported(client: Any) -> bool:
    return (await client.get("/readyz")).json()["info"]["postgres"] == "ok"


async def test_problem_types_are_documented(client) -> None:
    r = await client.get("/problems/order-id-reused")
    assert r.status_code == 200 and "422" in r.text
    assert (await client.get("/problems/nope")).status_code == 404


def _reordered_json(body: dict[str, Any]) -> bytes:
    import json

    reordered = dict(reversed(list(body.items())))
    return json.dumps(reordered, indent=2).encode()


async def test_an_unexpected_error_is_problem_json_with_a_request_id_in_the_log(
    settings, api_key, redis, caplog
) -> None:
    """Injects: a corrupted status record in Redis (a queue number that is not a number). The
    status read fails in a way no handler expects: 500 problem+json, never a bare traceback,
    naming a request id that the one error log line carries too."""
    app = create_app(gateway_config(settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://og") as client:
            order_id = new_order_id(0)
            await redis.hset(
                Keys().status(0, order_id),
                mapping={"status": "queued", "sf": "shop-a", "seq": "not-a-number"},
            )
            r = await client.get(
                f"/v1/orders/{order_id}",
                headers={**auth(api_key), "X-Request-Id": "support-42"},
            )
            assert r.status_code == 500
            assert r.headers["content-type"] == "application/problem+json"
            body = r.json()
            assert body["type"] == "/problems/internal-error"
            assert body["request_id"] == "support-42" == r.headers["x-request-id"]
            logged = [rec for rec in caplog.records if getattr(rec, "request_id", None)]
            assert [rec.request_id for rec in logged] == ["support-42"]
            assert logged[0].exc_info is not None
            r = await client.get(f"/v1/orders/{order_id}", headers=auth(api_key))
            assert len(r.json()["request_id"]) == 16  # none given: a fresh one


async def test_an_authorization_not_shaped_like_a_key_costs_no_lookup(client, api_key) -> None:
    """Injects: 40 requests, each with a distinct 1 MB Authorization value (they once took the
    gateway from 105 MB to 417 MB RSS, held by the key cache), then 40 well-shaped unknown keys.
    Audits: every one is 401; the misshapen ones reach neither the key cache nor Redis; the
    well-shaped ones are looked up once each, and the cache stays within its bound."""
    auth_state = client.app.state.gateway.auth
    before = auth_state.lookups
    for i in range(40):
        huge = f"Bearer og_{i}" + "x" * 1_000_000
        r = await client.post("/v1/orders", json=order_body(), headers={"Authorization": huge})
        assert r.status_code == 401 and r.json()["type"] == "/problems/unauthorized"
    assert auth_state.lookups == before
    assert all(len(k) < 100 for k in auth_state._cache)
    for i in range(40):
        unknown = "Bearer og_" + f"{i:043d}"
        r = await client.post("/v1/orders", json=order_body(), headers={"Authorization": unknown})
        assert r.status_code == 401
    assert auth_state.lookups == before + 40
    assert len(auth_state._cache) <= CACHE_ENTRIES
    ok = await client.post("/v1/orders", json=order_body(), headers=auth(api_key))
    assert ok.status_code == 202


async def test_two_authorization_headers_are_a_400(client, api_key) -> None:
    """POST read the last Authorization header and GET the first; now neither reads any."""
    headers = [("Authorization", f"Bearer {api_key}"), ("Authorization", "Bearer og_other")]
    r = await client.post(
        "/v1/orders",
        content=json.dumps(order_body()),
        headers=[*headers, ("content-type", "application/json")],
    )
    assert r.status_code == 400 and r.json()["type"] == "/problems/ambiguous-request"
    g = await client.get("/v1/orders/ord_0_x", headers=headers)
    assert g.status_code == 400 and g.json()["type"] == "/problems/ambiguous-request"


async def test_a_compressed_body_is_415(client, api_key) -> None:
    """Content-Encoding used to be ignored: a gzip body was decoded as if it were JSON."""
    r = await client.post(
        "/v1/orders",
        content=json.dumps(order_body()),
        headers={
            **auth(api_key),
            "content-type": "application/json",
            "content-encoding": "gzip",
        },
    )
    assert r.status_code == 415 and "Content-Encoding 'gzip'" in r.json()["detail"]


SERVER_ADDRESSES = ("http://og/",)  # the server address httpx's ASGI transport gives


@pytest.mark.parametrize("host", ["evil.example/../x", "a b", "og\r\nx: y", "x" * 300])
async def test_a_strange_host_header_does_not_go_into_receipt_urls(client, api_key, host) -> None:
    r = await client.post("/v1/orders", json=order_body(), headers={**auth(api_key), "host": host})
    assert r.status_code == 202, r.text
    assert host not in r.json()["queue_url"]
    assert r.json()["queue_url"].startswith(SERVER_ADDRESSES), r.json()["queue_url"]


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"total_minor": 1, "total_minor": 2500, "currency": "EUR"', "total_minor"),
        (b'{"currency": "USD", "currency": "EUR", "total_minor": 2500', "currency"),
        (b'{"metadata": {"a": 1, "a": 2}, "currency": "EUR", "total_minor": 2500', "a"),
        (b'{"tot\\u0061l_minor": 1, "total_minor": 2500, "currency": "EUR"', "total_minor"),
    ],
)
async def test_a_key_given_twice_is_a_422(client, api_key, body, key) -> None:
    """The same bytes must not mean two orders: msgspec keeps the last of two keys, a proxy or
    a log reader may keep the first."""
    rest = (
        b', "storefront_order_id": "dup-1", "customer": {"id": "c"},'
        b' "items": [{"sku": "s", "quantity": 1, "unit_price_minor": 2500}]}'
    )
    r = await client.post(
        "/v1/orders",
        content=body + rest,
        headers={**auth(api_key), "content-type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["errors"] == [{"pointer": "#", "detail": f"duplicate key {key!r}"}]


async def test_a_key_name_inside_a_value_is_no_duplicate(client, api_key) -> None:
    body = order_body("dup-ok")
    body["customer"]["id"] = '"currency"'
    r = await client.post("/v1/orders", json=body, headers=auth(api_key))
    assert r.status_code == 202, r.text

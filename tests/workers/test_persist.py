"""workers.persist on real Postgres: the COPY path, and the fallback past a unique key."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec

from ordergate.buffer.message import OrderMessage, row_summary
from ordergate.buffer.order import ORDER_DECODER
from ordergate.sharding.ids import new_order_id
from ordergate.sharding.routing import shard_for
from ordergate.workers.persist import Persister, row_of
from tests.conftest import order_body


def _message(sfo: str, order_id: str | None = None, seq: int = 1) -> OrderMessage:
    shard = shard_for("shop-a", sfo, 8)
    return OrderMessage(
        shard=shard,
        entry_id=f"{seq}-0",
        order_id=order_id or new_order_id(shard),
        storefront_id="shop-a",
        storefront_order_id=sfo,
        seq=seq,
        accepted_at_us=time.time_ns() // 1000,
        body=json.dumps(order_body(sfo)).encode(),
    )


async def test_new_orders_commit_in_one_copy(pg: Any) -> None:
    batch = [_message(f"p-{i}", seq=i) for i in range(1, 4)]
    async with pg.acquire() as conn:
        persisted, refused = await Persister(conn).write(batch)
    assert not refused
    assert [p.status for p in persisted] == ["committed"] * 3
    rows = await pg.fetch("SELECT order_id, committed_at FROM orders ORDER BY seq")
    assert [r["order_id"] for r in rows] == [m.order_id for m in batch]
    assert {p.at for p in persisted} == {r["committed_at"] for r in rows}  # one instant


async def test_redelivery_and_duplicates_go_through_on_conflict(pg: Any) -> None:
    first = [_message(f"r-{i}", seq=i) for i in range(1, 3)]
    async with pg.acquire() as conn:
        before, _ = await Persister(conn).write(first)
        twin = _message("r-1", seq=4)  # same storefront order, new order id (record expired)
        fresh = _message("r-new", seq=5)
        persisted, refused = await Persister(conn).write([*first, twin, fresh])
    assert not refused
    by_id = {p.message.order_id: p for p in persisted}
    for old in before:  # redelivered: committed, at their original commit time
        assert by_id[old.message.order_id].status == "committed"
        assert by_id[old.message.order_id].at == old.at
    assert by_id[twin.order_id].status == "rejected"
    assert by_id[twin.order_id].reason == f"duplicate of order {first[0].order_id}"
    assert by_id[fresh.order_id].status == "committed"
    assert await pg.fetchval("SELECT count(*) FROM orders") == 3


def test_the_entrys_row_field_gives_the_columns_the_body_gives() -> None:
    """An entry's ``r`` (written at admission) and its body (entries without ``r``, from before
    it) give the same row; so does an order without email."""
    for body in (order_body("c-1", items=3), {**order_body("c-2"), "customer": {"id": "x"}}):
        plain = _message(body["storefront_order_id"])
        plain = msgspec.structs.replace(plain, body=json.dumps(body).encode())
        order = ORDER_DECODER.decode(plain.body)
        carried = msgspec.structs.replace(plain, row=row_summary(order))
        assert carried.row
        assert row_of(carried) == row_of(plain)
        assert carried.columns() == (
            body["customer"]["id"],
            body["customer"].get("email"),
            "EUR",
            body["total_minor"],
            len(body["items"]),
        )

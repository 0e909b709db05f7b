"""A committed order, read from its Postgres row: Redis keeps no status record for it.

The row is in its shard's database (sharding.databases), read through that database's pool.

Settling a committed order deletes its status record (buffer/lua/settle.lua), so its status
and timeline -- accepted, processing (``taken_at``), committed -- come from the row, and the
"notified" mark from its idempotency record while that lasts (``idempotency_ttl_s``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import msgspec
from redis.exceptions import RedisError

from ordergate.buffer.idempotency import decode_record
from ordergate.buffer.status import Change
from ordergate.gateway.errors import OrderStoreUnavailable
from ordergate.gateway.state import GatewayState
from ordergate.sharding.routing import partition_table


class Committed(msgspec.Struct, frozen=True):
    order_id: str
    storefront_id: str
    storefront_order_id: str
    seq: int
    accepted_at: dt.datetime
    committed_at: dt.datetime
    timeline: list[Change]


async def read_committed(
    state: GatewayState, shard: int, order_id: str, storefront: str | None = None
) -> Committed | None:
    """The committed order ``order_id`` (of ``storefront``, if given), or None if Postgres has
    no such row; OrderStoreUnavailable while its shard's database cannot be asked."""
    database = state.database_of(shard)
    pool = state.pg[database] if database < len(state.pg) else None
    if pool is None:
        raise OrderStoreUnavailable(
            f"order {order_id} is settled, and its status is in {state.describe(database)},"
            " which this gateway cannot reach yet; retry shortly",
            headers={"Retry-After": "2"},
        )
    query = (
        "SELECT storefront_id, storefront_order_id, seq, accepted_at, taken_at, committed_at"
        f" FROM {partition_table(shard)} WHERE shard = $1 AND order_id = $2"
    )
    args: list[Any] = [shard, order_id]
    if storefront is not None:
        query += " AND storefront_id = $3"
        args.append(storefront)
    try:
        row = await pool.fetchrow(query, *args, timeout=2)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise OrderStoreUnavailable(
            f"{state.describe(database)} did not answer for order {order_id}: {exc}",
            headers={"Retry-After": "2"},
        ) from exc
    if row is None:
        return None
    timeline = [Change("accepted", row["accepted_at"])]
    if row["taken_at"] is not None:
        timeline.append(Change("processing", row["taken_at"]))
    timeline.append(Change("committed", row["committed_at"]))
    idem = state.keys.idem(shard, row["storefront_id"], row["storefront_order_id"])
    try:
        raw = await state.redis.get(idem)
        notified = decode_record(shard, raw).notified_at_us if raw else None
    except (RedisError, OSError, ValueError):
        notified = None  # the mark is a courtesy; the status is the row's
    if notified:
        timeline.append(Change("notified", dt.datetime.fromtimestamp(notified / 1e6, dt.UTC)))
    return Committed(
        order_id=order_id,
        storefront_id=row["storefront_id"],
        storefront_order_id=row["storefront_order_id"],
        seq=int(row["seq"]),
        accepted_at=row["accepted_at"],
        committed_at=row["committed_at"],
        timeline=timeline,
    )

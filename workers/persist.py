"""Write a batch into the partitioned ``orders`` table, exactly once.

One transaction per batch, which routes each row to its shard's partition. The batch spans
shards (the drain follows the one queue), and one transaction makes it commit at one instant.

The usual batch holds only new orders, and goes in by the fastest way Postgres has: a binary
``COPY`` into ``orders`` (about twice as fast here as the ``INSERT ... ON CONFLICT`` below, which
does a speculative insertion per row). COPY is one statement: it writes every row of the batch
or none. When it hits a unique key -- a redelivered entry (a worker died between COMMIT and
XACK), or an order whose storefront id was already used by a *different* order (its
idempotency record had expired) -- the transaction rolls back and the batch goes again as a
multi-row ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING``: redelivered rows change
nothing and count as committed, and the other kind is reported as a rejected duplicate.
A batch refused for a data reason is split in halves until the culprits are alone, so one poison
order never holds back the rest.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec

from ordergate.buffer.message import OrderMessage
from ordergate.workers.db import classify
from ordergate.workers.errors import PermanentPersistError


@dataclass(frozen=True, slots=True)
class Persisted:
    message: OrderMessage
    status: str  # committed | rejected
    at: dt.datetime
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Refused:
    message: OrderMessage
    error: str


COPY_COLUMNS = (
    "shard",
    "order_id",
    "storefront_id",
    "storefront_order_id",
    "customer_id",
    "customer_email",
    "currency",
    "total_minor",
    "item_count",
    "seq",
    "accepted_at",
    "body",
    "taken_at",
)
_COLUMNS = ", ".join(COPY_COLUMNS)


_INSERT = (
    f"INSERT INTO orders ({_COLUMNS})"
    " SELECT * FROM unnest($1::smallint[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::text[], $7::text[], $8::bigint[], $9::int[], $10::bigint[], $11::timestamptz[],"
    " $12::jsonb[], $13::timestamptz[])"
    " ON CONFLICT DO NOTHING RETURNING order_id, committed_at"
)
_EXISTING = (
    "SELECT order_id, storefront_id, storefront_order_id, committed_at FROM orders"
    " WHERE (shard, storefront_id, storefront_order_id) IN"
    " (SELECT * FROM unnest($1::smallint[], $2::text[], $3::text[]))"
)


class Persister:
    """Writes batches on one connection (the drain leader's, which holds the drain lock)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def write(
        self, messages: list[OrderMessage], taken_at: dt.datetime | None = None
    ) -> tuple[list[Persisted], list[Refused]]:
        """Persist ``messages``, taken from their lane at ``taken_at``; raises
        TransientPersistError if Postgres cannot take them now."""
        rows: list[tuple[OrderMessage, tuple[Any, ...]]] = []
        refused: list[Refused] = []
        for m in messages:
            try:
                rows.append((m, row_of(m, taken_at)))
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                refused.append(Refused(m, f"order body does not decode: {exc}"))
        persisted = await self._write_rows(rows, refused)
        return persisted, refused

    async def _write_rows(
        self, rows: list[tuple[OrderMessage, tuple[Any, ...]]], refused: list[Refused]
    ) -> list[Persisted]:
        if not rows:
            return []
        try:
            return await self._transaction(rows)
        except Exception as exc:
            error = classify(exc)
            if not isinstance(error, PermanentPersistError):
                raise error from exc
            if len(rows) == 1:
                refused.append(Refused(rows[0][0], str(error)))
                return []
        half = len(rows) // 2
        first = await self._write_rows(rows[:half], refused)
        return first + await self._write_rows(rows[half:], refused)

    async def _transaction(
        self, rows: list[tuple[OrderMessage, tuple[Any, ...]]]
    ) -> list[Persisted]:
        conn = self.conn
        try:
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "orders", records=[r for _, r in rows], columns=COPY_COLUMNS
                )
                # committed_at defaults to now(): the transaction's start, the same for all rows.
                committed_at = await conn.fetchval("SELECT now()")
        except asyncpg.UniqueViolationError:
            return await self._insert_on_conflict(rows)  # rolled back; some rows exist already
        return [Persisted(m, "committed", committed_at) for m, _ in rows]

    async def _insert_on_conflict(
        self, rows: list[tuple[OrderMessage, tuple[Any, ...]]]
    ) -> list[Persisted]:
        """The batch when some of its rows are in Postgres already (see the module docstring)."""
        columns = list(zip(*(r for _, r in rows), strict=True))
        conn = self.conn
        async with conn.transaction():
            inserted = {
                r["order_id"]: r["committed_at"] for r in await conn.fetch(_INSERT, *columns)
            }
            missing = [m for m, _ in rows if m.order_id not in inserted]
            existing: dict[tuple[str, str], tuple[str, dt.datetime]] = {}
            if missing:
                for r in await conn.fetch(
                    _EXISTING,
                    [m.shard for m in missing],
                    [m.storefront_id for m in missing],
                    [m.storefront_order_id for m in missing],
                ):
                    existing[(r["storefront_id"], r["storefront_order_id"])] = (
                        r["order_id"],
                        r["committed_at"],
                    )
        out: list[Persisted] = []
        now = dt.datetime.now(dt.UTC)
        for m, _ in rows:
            if m.order_id in inserted:
                out.append(Persisted(m, "committed", inserted[m.order_id]))
                continue
            prior = existing.get((m.storefront_id, m.storefront_order_id))
            if prior is None:
                # The same order_id exists under another storefront order id: cannot happen
                # with ids from sharding.ids; refuse rather than guess.
                raise PermanentPersistError(f"order {m.order_id} conflicts with an existing row")
            prior_id, prior_at = prior
            if prior_id == m.order_id:
                out.append(Persisted(m, "committed", prior_at))  # redelivery of a committed order
            else:
                out.append(Persisted(m, "rejected", now, f"duplicate of order {prior_id}"))
        return out


def row_of(m: OrderMessage, taken_at: dt.datetime | None = None) -> tuple[Any, ...]:
    """The ``orders`` row of one entry, in ``COPY_COLUMNS`` order: its columns from the entry's
    ``r`` field, not from decoding the body (raises if neither reads)."""
    customer, email, currency, total, items = m.columns()
    return (
        m.shard,
        m.order_id,
        m.storefront_id,
        m.storefront_order_id,
        customer,
        email,
        currency,
        total,
        items,
        m.seq,
        m.accepted_at,
        m.body.decode(),
        taken_at,
    )

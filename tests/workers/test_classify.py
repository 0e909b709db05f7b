"""Postgres errors are sorted into retry-later and never-will-work, from real server errors."""

from __future__ import annotations

import asyncpg
import pytest

from ordergate.workers.db import classify
from ordergate.workers.errors import PermanentPersistError, TransientPersistError


async def test_real_errors_are_sorted(pg) -> None:
    async with pg.acquire() as conn:
        with pytest.raises(asyncpg.PostgresError) as bad_value:
            await conn.execute("SELECT 'x'::int")
        with pytest.raises(asyncpg.PostgresError) as cancelled:
            await conn.execute("SET statement_timeout = 10; SELECT pg_sleep(1)")
        await conn.execute("RESET statement_timeout")
        with pytest.raises(asyncpg.PostgresError) as no_table:
            await conn.execute("INSERT INTO orders_gone VALUES (1)")
        with pytest.raises(asyncpg.DataError) as unencodable:
            await conn.fetchval("SELECT $1::int", "not an int")
    assert isinstance(classify(bad_value.value), PermanentPersistError)  # 22P02
    assert isinstance(classify(cancelled.value), TransientPersistError)  # 57014
    assert isinstance(classify(no_table.value), TransientPersistError)  # 42P01: schema, not data
    assert isinstance(classify(unencodable.value), PermanentPersistError)
    assert isinstance(classify(ConnectionResetError("gone")), TransientPersistError)

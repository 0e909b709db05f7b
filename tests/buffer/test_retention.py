"""What Redis keeps after an order settled, and for how long: the idempotency record for
``idempotency_ttl_s``, no status record for a committed order (one for ``status_ttl_s`` for a
rejected or dead-lettered one), a dead letter for ``deadletter_retention_s``."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from ordergate.buffer.idempotency import FIXED_LEN, decode_record
from ordergate.buffer.keys import Keys
from ordergate.sharding.ids import shard_of_order_id
from tests.conftest import admit, auth, drain, make_settings, order_body

KEYS = Keys()


async def test_a_committed_order_keeps_only_its_idempotency_record(
    client: Any, api_key: str, servers: Any, redis: Any
) -> None:
    receipts = await admit(client, api_key, 20)
    settings = make_settings(servers, idempotency_ttl_s=3600, status_ttl_s=7200)
    assert (await drain(settings)).committed == 20
    for r in receipts:
        shard = shard_of_order_id(r["order_id"], 8)
        idem = KEYS.idem(shard, "shop-a", r["storefront_order_id"])
        assert 3500 < await redis.ttl(idem) <= 3600
        # committed: the status record went at settlement (the Postgres row tells the status)
        assert await redis.ttl(KEYS.status(shard, r["order_id"])) == -2


async def test_the_idempotency_record_holds_a_replayed_receipt_in_52_bytes(
    client: Any, api_key: str, servers: Any, redis: Any
) -> None:
    """The compact record (buffer.idempotency): 52 bytes while in flight and once settled, and
    a resubmission, before and after its order commits, gets the very receipt the first
    submission got (order id, accepted_at, queue number, ahead, ticket), answered from it."""
    receipts = await admit(client, api_key, 12, prefix="rec")
    for r in receipts:
        shard = shard_of_order_id(r["order_id"], 8)
        assert shard is not None
        raw = await redis.get(KEYS.idem(shard, "shop-a", r["storefront_order_id"]))
        assert len(raw) == FIXED_LEN == 52
        record = decode_record(shard, raw)
        assert record.order_id == r["order_id"]
        assert record.seq == r["queue_number"]
        assert record.ahead == r["ahead_at_admission"]
        accepted = dt.datetime.fromisoformat(r["accepted_at"])
        assert record.accepted_at_us == round(accepted.timestamp() * 1e6)
        assert record.lease_until_ms is None  # the test Valkey fsyncs every write: no lease

    async def resubmitted() -> list[dict[str, Any]]:
        again = []
        for i in range(len(receipts)):
            resp = await client.post(
                "/v1/orders", json=order_body(f"rec-{i}"), headers=auth(api_key)
            )
            assert resp.status_code == 200, resp.text
            again.append(resp.json())
        return again

    assert await resubmitted() == receipts  # in flight
    assert (await drain(make_settings(servers))).committed == 12
    assert await resubmitted() == receipts  # settled: from the record alone
    for r in receipts:
        shard = shard_of_order_id(r["order_id"], 8)
        assert shard is not None
        assert len(await redis.get(KEYS.idem(shard, "shop-a", r["storefront_order_id"]))) == 52


async def test_dead_letters_older_than_the_retention_are_trimmed(
    client: Any, api_key: str, servers: Any, redis: Any
) -> None:
    """An old dead letter (its id two minutes old) goes when the next one is written under a
    60 s retention; with retention 0 it stays. (A malformed entry is taken where it stands in
    the queue: orders admitted after it carry the drain past it.)"""
    dlq = KEYS.deadletters(3)
    old = f"{int(time.time() * 1000) - 120_000}-0"
    await redis.xadd(dlq, {"error": "old"}, id=old)
    await redis.xadd(KEYS.stream(3), {"v": "1", "sf": "shop-a", "garbage": "yes"})
    await admit(client, api_key, 8, prefix="a")
    await drain(make_settings(servers, deadletter_retention_s=0))
    assert [e[0].decode() for e in await redis.xrange(dlq)][0] == old
    await redis.xadd(KEYS.stream(3), {"v": "1", "sf": "shop-a", "garbage": "again"})
    await admit(client, api_key, 8, prefix="b")
    await drain(make_settings(servers, deadletter_retention_s=60))
    entries = await redis.xrange(dlq)
    assert old not in [e[0].decode() for e in entries]
    assert len(entries) == 2  # the two new dead letters, the old one trimmed

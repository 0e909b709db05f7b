"""Routing is stable, spreads a hot storefront, and ids carry their shard."""

from __future__ import annotations

import hashlib

from ordergate.sharding import new_order_id, partition_table, shard_for, shard_of_order_id
from ordergate.sharding.ids import entry_id_of


def test_shard_is_a_stable_hash_of_the_pair() -> None:
    expected = int.from_bytes(hashlib.blake2b(b"shop-a\x00A-1", digest_size=8).digest(), "big") % 8
    assert shard_for("shop-a", "A-1", 8) == expected
    assert shard_for("shop-a", "A-1", 8) == shard_for("shop-a", "A-1", 8)
    # the separator keeps ("ab", "c") and ("a", "bc") apart
    assert {shard_for("ab", f"c{i}", 64) for i in range(50)} != {
        shard_for("a", f"bc{i}", 64) for i in range(50)
    }


def test_one_hot_storefront_spreads_over_every_shard() -> None:
    counts = [0] * 8
    for i in range(8000):
        counts[shard_for("hot-shop", f"order-{i}", 8)] += 1
    assert min(counts) > 800 and max(counts) < 1200


def test_order_ids_carry_their_shard() -> None:
    for shard in (0, 7, 123):
        oid = new_order_id(shard)
        assert shard_of_order_id(oid, 200) == shard
    assert shard_of_order_id(new_order_id(9), 8) is None  # a shard this deployment does not have
    for bad in (
        "",
        "ord_",
        "ord_x_01m880chz12z60f00n5cz923dt",
        "ord_1_short",
        "ord_1_01m880chz12z60f00n5cz923dU",
    ):
        assert shard_of_order_id(bad, 8) is None
    a, b = new_order_id(1, now_ms=1000), new_order_id(1, now_ms=2000)
    assert a < b  # time-sortable within a shard


def test_order_id_carries_the_admission_millisecond_and_queue_number_of_its_entry() -> None:
    for now_ms, seq in ((0, 1), (1, 2), (1_764_000_000_123, 123_456_789), ((1 << 48) - 1, 2**53)):
        oid = new_order_id(2, now_ms=now_ms, seq=seq)
        assert shard_of_order_id(oid, 8) == 2
        assert entry_id_of(oid) == f"{now_ms}-{seq}"  # where admit.lua put its stream entry
    nonces = {new_order_id(2, now_ms=5, seq=7) for _ in range(50)}
    assert len(nonces) > 40  # the 5-char random tail


def test_shards_are_aligned_to_partitions() -> None:
    assert partition_table(5) == "orders_p5"

"""Lanes are dealt over workers: each lane to exactly one, shares within one of each other."""

from __future__ import annotations

from ordergate.sharding import assign, lanes_of


def test_every_lane_has_one_owner_and_shares_differ_by_at_most_one() -> None:
    for lanes in (1, 7, 8, 64):
        for n in (1, 2, 3, 5, 9):
            workers = [f"w{i}" for i in range(n)]
            dealt = assign(lanes, workers)
            owned = sorted(lane for mine in dealt.values() for lane in mine)
            assert owned == list(range(lanes))
            sizes = [len(mine) for mine in dealt.values()]
            assert max(sizes) - min(sizes) <= 1
            assert set(dealt) == set(workers)


def test_the_deal_is_the_same_in_every_process_whatever_order_it_lists_the_workers() -> None:
    assert assign(8, ["b", "a", "c"]) == assign(8, ["c", "b", "a", "a"])
    assert lanes_of("a", 8, ["b", "a"]) == [0, 2, 4, 6]
    assert lanes_of("b", 8, ["b", "a"]) == [1, 3, 5, 7]


def test_a_worker_outside_the_membership_owns_nothing() -> None:
    assert lanes_of("gone", 8, ["a", "b"]) == []
    assert assign(8, []) == {}

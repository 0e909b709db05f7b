"""The fair drain's arithmetic, without I/O: how a lane's owner splits a batch among the
storefronts with a backlog (weighted round robin), and how many orders go before a waiting one.

Each lane holds one sub-lane per storefront (``Keys.sublane``), each first in, first out. A batch
of ``n`` goes round the storefronts with untaken orders, ``weight`` orders each per round (1 by
default; ``storefronts set-limit --weight``), starting one storefront further at each batch, so
over time each storefront with a backlog gets the lane's drain in proportion to its weight, and
one with a few orders behind another's thousands waits for a round, not for the thousands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def allocate(
    backlog: Mapping[str, int], weights: Mapping[str, int], n: int, start: int = 0
) -> dict[str, int]:
    """How many of each storefront's untaken orders go into a batch of at most ``n``:
    rounds of ``weight`` each (storefronts in id order, rotated by ``start``), skipping the
    ones with nothing left."""
    ids = sorted(sf for sf, b in backlog.items() if b > 0)
    if not ids or n <= 0:
        return {}
    k = start % len(ids)
    ids = ids[k:] + ids[:k]
    out = dict.fromkeys(ids, 0)
    left = n
    while left > 0:
        gave = 0
        for sf in ids:
            room = backlog[sf] - out[sf]
            if room <= 0:
                continue
            give = min(max(1, weights.get(sf, 1)), room, left)
            out[sf] += give
            left -= give
            gave += give
            if left == 0:
                break
        if gave == 0:
            break
    return {sf: c for sf, c in out.items() if c}


def orders_before(own: int, weight: int, others: Iterable[tuple[int, int]]) -> int:
    """Orders that will be settled before a waiting one: ``own`` of its storefront's ahead of
    it, and of each other storefront's backlog (``(backlog, weight)``) the share that the
    rounds until its turn give that storefront. Exact at round granularity while nothing
    drains; a storefront that starts a backlog later gets its share from then on."""
    rounds = own // max(1, weight) + 1
    return own + sum(min(b, rounds * max(1, w)) for b, w in others)

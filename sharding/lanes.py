"""Which worker owns which lane: a pure function of the lane count and the live workers.

Every worker computes it from the same membership, so they agree without talking to each other;
a worker that joins or leaves changes the answer, and the lanes move. Lanes are dealt round
robin over the workers sorted by name, so no worker owns two lanes more than another: nobody
sits idle while another owns several lanes with a backlog.
"""

from __future__ import annotations

from collections.abc import Sequence


def assign(lanes: int, workers: Sequence[str]) -> dict[str, list[int]]:
    """Lanes ``0..lanes-1`` dealt over ``workers``; every worker appears, maybe with none."""
    ordered = sorted(set(workers))
    out: dict[str, list[int]] = {w: [] for w in ordered}
    if not ordered:
        return out
    for lane in range(lanes):
        out[ordered[lane % len(ordered)]].append(lane)
    return out


def lanes_of(worker: str, lanes: int, workers: Sequence[str]) -> list[int]:
    """The lanes ``worker`` owns, by ``assign``; none when it is not among ``workers``."""
    return assign(lanes, workers).get(worker, [])

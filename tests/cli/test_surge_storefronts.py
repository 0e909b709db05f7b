"""The surge's storefronts: how users are split among them, and the audit per storefront."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from ordergate.errors import SurgeError
from ordergate.settings import Settings
from ordergate.surge_audit import Committed, Drain, audit, quantile, storefront_figures
from ordergate.surge_report import render
from ordergate.surge_results import EtaSample, Ledger, read_ledger
from ordergate.surge_target import (
    STOREFRONTS,
    Target,
    api_keys,
    storefront_count,
    user_order,
    user_shares,
)


def test_the_hot_storefront_gets_its_share_and_the_others_split_the_rest() -> None:
    assert user_shares(20, 4, 0.5) == [10, 4, 3, 3]
    assert user_shares(30, 3, 0.6) == [18, 6, 6]
    assert user_shares(300, 4, 0.25) == [75, 75, 75, 75]


def test_no_hot_share_spreads_the_users_evenly() -> None:
    assert user_shares(20, 4, 0.0) == [5, 5, 5, 5]
    assert user_shares(22, 4, 0.0) == [6, 6, 5, 5]
    assert user_shares(7, 1, 0.0) == [7]


def test_every_storefront_gets_a_user_whatever_the_share() -> None:
    assert user_shares(10, 4, 0.01) == [1, 3, 3, 3]  # 0.1 of a user: still one
    assert user_shares(10, 4, 0.95) == [7, 1, 1, 1]  # 9.5 users: the others keep one each
    assert user_shares(4, 4, 0.9) == [1, 1, 1, 1]


@pytest.mark.parametrize(
    ("users", "storefronts", "hot_share", "why"),
    [
        (3, 4, 0.0, "3 users cannot serve 4 storefronts"),
        (3, 4, 0.5, "3 users cannot serve 4 storefronts"),
        (10, 4, 1.0, "--hot-share must be in [0, 1)"),
        (10, 4, -0.1, "--hot-share must be in [0, 1)"),
        (10, 1, 0.5, "--hot-share needs 2 storefronts"),
        (10, 0, 0.0, "--storefronts must be at least 1"),
    ],
)
def test_impossible_splits_are_refused(
    users: int, storefronts: int, hot_share: float, why: str
) -> None:
    with pytest.raises(SurgeError, match=re.escape(why)):
        user_shares(users, storefronts, hot_share)


def test_the_user_order_realises_the_shares_in_every_prefix() -> None:
    """One user for each storefront first, the hot one leading (a spike's baseline of one user
    is the hot storefront's); then every prefix within two users of the shares, so the four
    in five Locust users that are storefronts (the rest are customers) hold the split too."""
    counts = [18, 6, 6]
    order = user_order(counts)
    assert Counter(order) == {0: 18, 1: 6, 2: 6}
    assert order[:3] == [0, 1, 2]
    for n in range(3, len(order) + 1):
        seen = Counter(order[:n])
        for k, count in enumerate(counts):
            assert abs(seen[k] - n * count / 30) < 2, (n, k, seen)
    assert Counter(order[:24]) == {0: 14, 1: 5, 2: 5}
    assert user_order([2, 2, 1]) == [0, 1, 2, 0, 1]
    assert user_order([5]) == [0] * 5


def test_the_storefront_count_defaults_to_what_the_surge_always_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ORDERGATE_API_KEY", raising=False)
    assert storefront_count(None, None) == STOREFRONTS == 4
    assert storefront_count(3, None) == 3
    monkeypatch.setenv("ORDERGATE_API_KEY", "og_a, og_b")
    assert storefront_count(None, "http://gateway") == 2  # the keys given for a running one
    assert storefront_count(None, None) == STOREFRONTS  # its own `up` makes its own keys
    with pytest.raises(SurgeError, match="at least 1"):
        storefront_count(0, None)


def test_given_keys_must_cover_the_storefronts(monkeypatch: pytest.MonkeyPatch) -> None:
    running = Target(url="http://gateway", redis_url=None, database_url=None, started="")
    monkeypatch.setenv("ORDERGATE_API_KEY", "og_a,og_b,og_c")
    assert api_keys(running, Settings(), "run", 2) == (["og_a", "og_b"], [])
    with pytest.raises(SurgeError, match="holds 3 keys, fewer than the 4 storefronts"):
        api_keys(running, Settings(), "run", 4)


def test_p50_and_p99_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.5) == 50.0 and quantile(values, 0.99) == 99.0
    assert quantile(values[:10], 0.99) == 10.0  # under 100 values, p99 is the largest
    assert quantile([4.0, 1.0], 0.5) == 1.0


def _ledger_doc(storefronts: dict[str, object], samples: list[list[object]]) -> str:
    return json.dumps(
        {
            "answers": {},
            "unanswered": {},
            "wrong_receipts": 0,
            "followed": {},
            "position_increases": 0,
            "eta_samples": samples,
            "eta_unfinished": 0,
            "storefronts": storefronts,
        }
    )


def test_the_ledgers_are_merged_per_storefront(tmp_path: Path) -> None:
    """Two Locust processes: answers and users add up, and each receipted order counts once,
    for its storefront, however many receipts it got."""
    (tmp_path / "ledger-1.json").write_text(
        _ledger_doc(
            {
                "0": {
                    "answers": {"new 202": 3, "new 429 /problems/rate-limited": 2},
                    "peak_users": 2,
                },
                "1": {"answers": {"new 202": 1}, "peak_users": 1},
            },
            [[3, 4.0, 10, 1.0, 0, 4.5], [None, 0.2, 0, 0.2, 1, 0.3]],
        )
    )
    (tmp_path / "ledger-2.json").write_text(
        _ledger_doc(
            {
                "0": {"answers": {"new 202": 1, "retry 200": 1}, "peak_users": 1},
                "2": {"answers": {"new 429 /problems/buffer-full": 1}, "peak_users": 1},
            },
            [],
        )
    )
    (tmp_path / "receipts-1.txt").write_text("o1 s1 0\no2 s2 0\no3 s3 0\no4 s4 1\n")
    (tmp_path / "receipts-2.txt").write_text("o5 s5 0\no1 s1 0\no6 s6\n")  # s6: no storefront
    ledger = read_ledger(tmp_path)
    assert ledger.storefront_answers == {
        0: Counter({"new 202": 4, "new 429 /problems/rate-limited": 2, "retry 200": 1}),
        1: Counter({"new 202": 1}),
        2: Counter({"new 429 /problems/buffer-full": 1}),
    }
    assert ledger.storefront_users == {0: 3, 1: 1, 2: 1}
    assert ledger.storefront_receipts == {0: 4, 1: 1}  # s1 twice: once
    assert len(ledger.receipts) == 6 and ledger.conflicting_receipts == 0
    assert ledger.eta_samples[0] == EtaSample(3, 4.0, 10, 1.0, 0, 4.5)
    assert ledger.eta_samples[0].receipt_wait_s == 4.0  # the middle of the last poll interval


def _sample(storefront: int, since_receipt: float) -> EtaSample:
    return EtaSample(None, since_receipt, 0, 0.0, storefront, since_receipt)


def test_the_figures_per_storefront() -> None:
    ledger = Ledger(
        answers=Counter({"new 202": 6, "new 429 /problems/storefront-share-full": 2}),
        storefront_answers={
            0: Counter(
                {
                    "new 202": 5,
                    "new 429 /problems/rate-limited": 3,
                    "retry 429 /problems/storefront-share-full": 2,
                    "retry 202": 2,
                    "resubmit 200": 1,
                    "invalid 422 /problems/invalid-order": 1,
                }
            ),
            1: Counter({"new 202": 1, "new 429 /problems/buffer-full": 1}),
        },
        storefront_users=Counter({0: 3, 1: 1}),
        storefront_receipts=Counter({0: 7, 1: 1}),
        eta_samples=[_sample(0, float(s)) for s in range(1, 101)]
        + [_sample(1, 2.0), EtaSample(1, 9.0, 0, 1.0)],  # a sample from before storefronts
    )
    hot, other, idle = storefront_figures(ledger, ["shop-a", "shop-b", "shop-c"], 0.5)
    assert (hot.storefront, hot.hot, hot.users, hot.orders, hot.receipts) == (
        "shop-a",
        True,
        3,
        8,
        7,
    )
    assert hot.too_many == {"rate-limited": 3, "storefront-share-full": 2, "buffer-full": 0}
    assert (hot.waits, hot.wait_p50_s, hot.wait_p99_s) == (100, 50.0, 99.0)
    assert (other.hot, other.orders, other.receipts, other.waits) == (False, 2, 1, 1)
    assert other.too_many["buffer-full"] == 1 and other.wait_p99_s == 2.0
    assert (idle.users, idle.orders, idle.waits, idle.wait_p50_s) == (0, 0, 0, None)
    assert not any(f.hot for f in storefront_figures(ledger, ["a", "b"], 0.0))
    named = [f.storefront for f in storefront_figures(ledger, [], 0.0)]
    assert named == ["key 1", "key 2"]  # given keys: the storefronts are not known


def test_the_audit_reports_the_storefronts_without_judging_them() -> None:
    """Fairness 429s are answers in the API's table; the verdict is what it was without them."""
    ledger = Ledger(
        answers=Counter(
            {
                "new 202": 3,
                "new 429 /problems/rate-limited": 4,
                "retry 429 /problems/storefront-share-full": 1,
                "retry 202": 1,
            }
        ),
        receipts={"s1": "o1", "s2": "o2", "s3": "o3", "s4": "o4"},
        storefront_answers={0: Counter({"new 202": 2, "new 429 /problems/rate-limited": 4})},
        storefront_users=Counter({0: 2, 1: 1}),
        storefront_receipts=Counter({0: 3, 1: 1}),
    )
    a = audit(
        "spike",
        ledger,
        {},
        Drain(drained=True, seconds=1.0, peak_depth=10, dead_letters=0),
        Committed(rows=4, of_accepted=4),
        None,
        0,
        ["surge-1", "surge-2"],
        0.6,
    )
    assert a.verdict == "PASS" and a.unexpected == {}
    assert a.too_many == 5
    assert a.too_many_by_problem == {"rate-limited": 4, "storefront-share-full": 1}
    doc = json.loads(json.dumps(a.to_json()))
    assert [s["storefront"] for s in doc["storefronts"]] == ["surge-1", "surge-2"]
    assert doc["storefronts"][0]["hot"] and doc["hot_share"] == 0.6
    assert sum(s["receipts"] for s in doc["storefronts"]) == doc["accepted"] == 4

    text = render(a)
    assert "429 too many" in text and "rate-limited: 4; storefront-share-full: 1" in text
    table = [line for line in text.splitlines() if "surge-" in line]
    assert table[0].startswith("* surge-1") and table[1].startswith("  surge-2")
    assert table[0].split()[2:5] == ["2", "6", "3"]  # users, orders (4 got 429), receipts
    assert "* hot, asked for 60 % of the users" in text

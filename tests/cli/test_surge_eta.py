"""The surge audit's ETA figures: customers' first ETAs against the waits they had."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ordergate.surge_audit import (
    ETA_MIN_TICKETS,
    Committed,
    Drain,
    EtaError,
    audit,
    eta_check,
    eta_error,
    percent,
    quantile,
)
from ordergate.surge_report import render
from ordergate.surge_results import EtaSample, Ledger, read_ledger


def _sample(eta: int | None, wait: float, gap: float = 0.0) -> EtaSample:
    return EtaSample(first_eta_s=eta, wait_s=wait, first_position=100, gap_s=gap)


def test_quantiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 11)]  # 1..10
    assert quantile(values, 0.5) == 5.0
    assert quantile(values, 0.9) == 9.0
    assert quantile(values[::-1], 0.9) == 9.0  # order does not matter
    assert quantile([3.0], 0.9) == 3.0
    assert quantile([], 0.5) is None


def test_percentages_are_whole() -> None:
    assert percent(0.123) == "12 %" and percent(0.2) == "20 %"
    assert percent(0.123, signed=True) == "+12 %" and percent(-0.3, signed=True) == "-30 %"
    assert percent(-0.004, signed=True) == "0 %" and percent(None) == "-"


def test_relative_error_p50_p90_and_signed_median() -> None:
    """Waits of 10 s; ETAs 10, 11, ..., 19 s: errors 0 % .. 90 %, all too long."""
    e = eta_error([_sample(10 + k, 10.0) for k in range(10)])
    assert (e.followed, e.tickets, e.short, e.without_eta) == (10, 10, 0, 0)
    assert e.p50 == 0.4 and e.p90 == 0.8
    assert e.signed_median == 0.4  # the ETA ran long
    assert e.median_wait_s == 10.0
    late = eta_error([_sample(5, 10.0), _sample(8, 10.0), _sample(9, 10.0)])
    assert late.signed_median == -0.2 and late.p50 == 0.2  # orders came later than told


def test_short_waits_and_missing_etas_are_counted_not_measured() -> None:
    samples = [
        _sample(0, 0.0),  # committed at its first answer
        _sample(1, 1.2),
        _sample(2, 1.99),
        _sample(None, 30.0),  # no ETA at its first answer: the rate was not measured yet
        _sample(10, 8.0),
        _sample(20, 20.0),
    ]
    e = eta_error(samples, unfinished=4)
    assert (e.followed, e.short, e.without_eta, e.tickets, e.unfinished) == (6, 3, 1, 2, 4)
    assert e.p50 == 0.0 and e.p90 == 0.25  # only the waits of 8 s and 20 s count
    assert e.median_wait_s == 8.0  # of the two measured


def test_the_wait_ends_in_the_middle_of_the_last_poll_interval() -> None:
    """Seen committed 12 s after the first answer, 4 s after the poll before: 10 s."""
    s = _sample(10, 12.0, gap=4.0)
    assert s.real_wait_s == 10.0
    assert eta_error([s]).p50 == 0.0
    assert eta_error([_sample(1, 2.5, gap=2.0)]).short == 1  # really 1.5 s: too short


def test_the_check_is_judged_only_after_a_real_backlog() -> None:
    good = [_sample(10, 10.0)] * ETA_MIN_TICKETS
    assert eta_check(eta_error(good)).ok is True
    bad_p90 = [_sample(10, 10.0)] * 8 + [_sample(15, 10.0)] * 2  # p90 50 %
    check = eta_check(eta_error(bad_p90))
    assert check.judged and check.ok is False and "p90 50 %" in check.detail
    bad_p50 = [_sample(13, 10.0)] * ETA_MIN_TICKETS  # p50 30 %
    assert eta_check(eta_error(bad_p50)).ok is False

    no_backlog = eta_check(eta_error([_sample(4, 3.0)] * 20))  # median wait 3 s
    assert not no_backlog.judged and no_backlog.ok is None
    assert "no real backlog" in no_backlog.detail
    # a quiet phase's tickets, committed at once, do not hide the backlog of the others
    mixed = eta_error([_sample(0, 0.0)] * 100 + [_sample(10, 10.0)] * ETA_MIN_TICKETS)
    assert mixed.judged and mixed.short == 100 and eta_check(mixed).ok is True
    few = eta_check(eta_error([_sample(30, 10.0)] * (ETA_MIN_TICKETS - 1)))
    assert not few.judged and "fewer than" in few.detail
    assert not eta_check(EtaError()).judged


def _audit(ledger: Ledger) -> str:
    a = audit(
        "spike",
        ledger,
        {},
        Drain(drained=True, seconds=1.0, peak_depth=10, dead_letters=0),
        Committed(rows=1, of_accepted=1),
        None,
        0,
    )
    return a.verdict + "\n" + render(a) + "\n" + json.dumps(a.to_json())


def test_an_unjudged_eta_check_does_not_change_the_verdict() -> None:
    ledger = Ledger(receipts={"sfo-1": "ord-1"}, answers=Counter({"new 202": 1}))
    ledger.eta_samples = [_sample(0, 0.3), _sample(3, 2.6, gap=0.4)]
    text = _audit(ledger)
    assert text.startswith("PASS\n")
    assert "--    customers' first ETAs" in text and "not judged" in text
    assert "1 under 2 s" in text  # the skipped short wait, counted in the report
    assert '"judged": false' in text  # and in audit.json

    ledger.eta_samples = [_sample(20, 10.0)] * ETA_MIN_TICKETS
    text = _audit(ledger)
    assert text.startswith("FAIL\n")
    assert "ETA error" in text and "p50 100 %" in text and "signed median +100 %" in text


def test_the_ledgers_eta_samples_are_merged(tmp_path: Path) -> None:
    base = {
        "answers": {},
        "unanswered": {},
        "wrong_receipts": 0,
        "followed": {"committed": 1},
        "position_increases": 0,
    }
    (tmp_path / "ledger-1.json").write_text(
        json.dumps({**base, "eta_samples": [[12, 10.5, 400, 1.0]], "eta_unfinished": 2})
    )
    (tmp_path / "ledger-2.json").write_text(
        json.dumps({**base, "eta_samples": [[None, 3.0, 50, 1.0]], "eta_unfinished": 1})
    )
    (tmp_path / "ledger-3.json").write_text(json.dumps(base))  # a ledger from before ETAs
    ledger = read_ledger(tmp_path)
    assert ledger.eta_samples == [EtaSample(12, 10.5, 400, 1.0), EtaSample(None, 3.0, 50, 1.0)]
    assert ledger.eta_unfinished == 3

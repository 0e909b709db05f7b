"""loadtests/capacity.py's arithmetic, on a small hand-made report of bench.py's shape."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from loadtests import capacity


@pytest.fixture(autouse=True)
def clean() -> None:
    """Replaces tests/conftest.py's `clean`, which starts the session's servers: none needed."""


def report(**changes: Any) -> dict[str, Any]:
    """A bench.py --only d post report, cut to what capacity.py reads, with round figures:
    2,000 orders/s per gateway core, 60 + 40 us of Valkey CPU per order, 8,000 orders/s
    drained by 2 workers over 8 lanes, COPY at 25,000 rows/s."""
    r: dict[str, Any] = {
        "command": "python loadtests/bench.py --only d post",
        "cpus": 2,
        "server_cpus": [0],
        "other_cpus": [1],
        "processes": 1,
        "options": {"set": [], "drain_workers": 2},
        "durability": "auto",
        "post": {
            "median_rps": {"a": 6000.0, "c": 2000.0},
            "median_run": {
                "c": {"watched_cpu": {"server": 0.9, "valkey": 0.2}},
            },
        },
        "drain": {
            "filled": 4000,
            "copy": {"rows": 4000, "batch_size": 500, "batched_rate": 25000.0},
            "drain": {"workers": 2, "committed": 4000, "seconds": 0.5, "rate": 8000.0},
            "valkey": {"admit_cpu_us": 60.0, "drain_cpu_us": 40.0, "cpu_us": 100.0},
            "delayed": None,
        },
    }
    for path, value in changes.items():
        node = r
        *parents, last = path.split("__")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return r


def plan_for(r: dict[str, Any], rate: float = 100_000) -> capacity.Plan:
    return capacity.plan(capacity.read_inputs(r), rate, 0.6)


def test_counts_are_the_rate_over_each_units_measured_rate() -> None:
    p = plan_for(report())
    assert p.gateway_cores == 50  # 100,000 / 2,000
    assert p.masters == 17  # 100,000 x 100 us = 10 s of CPU per second / 0.6 = 16.7
    assert p.workers == 25  # 100,000 / (8,000 / 2)
    assert p.postgres_low == 4  # 100,000 / 25,000
    assert p.postgres_high == 13  # 100,000 / (25,000 x 0.32) = 12.5
    assert p.shards == 100  # 25 workers x (8 lanes / 2 workers)
    assert p.cluster_gateway_cores is None and p.cluster_masters is None  # no (h) row


def test_doubling_a_units_rate_halves_its_count() -> None:
    base = plan_for(report())
    faster = plan_for(
        report(
            post__median_rps__c=4000.0,
            drain__drain__rate=16000.0,
            drain__copy__batched_rate=50000.0,
        )
    )
    assert faster.gateway_cores == base.gateway_cores / 2 == 25
    assert faster.workers * 2 in (base.workers, base.workers + 1)  # 12.5 rounds up to 13
    assert faster.postgres_low * 2 == base.postgres_low
    cheaper = plan_for(report(drain__valkey__admit_cpu_us=30.0, drain__valkey__drain_cpu_us=20.0))
    assert cheaper.masters == 9  # 100,000 x 50 us / 0.6 = 8.3
    assert plan_for(report(), rate=200_000).gateway_cores == 2 * base.gateway_cores


def test_a_gateway_pinned_to_two_cores_counts_per_core() -> None:
    assert plan_for(report(server_cpus=[0, 1])).gateway_cores == 100


def test_the_runs_shard_count_sets_the_lanes_per_worker() -> None:
    r = report(options={"set": ["batch_size=500", "shards=16"]})
    inputs = capacity.read_inputs(r)
    assert inputs.lane.value == 500  # 8,000 / 16
    assert inputs.lanes_per_worker.value == 8
    assert plan_for(r).shards == 200  # 25 workers x 8
    default = capacity.read_inputs(report())
    assert [f.kind for f in default.shown if f.label.startswith("(d) shards")] == ["assumed"]


def test_every_printed_figure_says_what_it_is() -> None:
    inputs = capacity.read_inputs(report())
    kinds = {f.label: f.kind for f in inputs.shown}
    assert kinds["(c) POST /v1/orders, closed loop"] == "measured"
    assert kinds["gateway orders/s per core"] == "derived"
    p = capacity.plan(inputs, 100_000, 0.6)
    assert {f.kind for f in p.rows} == {"extrapolated"}


def test_optional_rows_absent_and_present(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report()))
    assert capacity.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "no scaling checks" in out
    assert re.search(r"^100,000 +50 +17 +25 +4-13 +100$", out, re.M)  # the default rates
    assert re.search(r"^870,000 +435 ", out, re.M)

    r = report()
    r["post"]["median_rps"]["h"] = 1500.0  # h/c 0.75
    r["post"]["median_run"]["h"] = {
        "watched_cpu": {"server": 0.7, "valkey 127.0.0.1:1": 0.1, "valkey 127.0.0.1:2": 0.08}
    }
    r["drain_two_postgres"] = {
        "one": {"drain": {"rate": 8000.0}},
        "two": {"drain": {"rate": 7200.0}},
        "ratio": 0.9,
    }
    inputs = capacity.read_inputs(r)
    checks = {f.label: f.value for f in inputs.checks}
    assert checks["h/c, cluster / one primary"] == pytest.approx(0.75)
    assert checks["(d2) two / one"] == pytest.approx(0.9)
    # Valkey per admitted order: (c) 0.2 / 2,000 = 100 us, (h) 0.18 / 1,500 = 120 us: 1.2 x
    assert checks["(h)/(c), Valkey CPU per order"] == pytest.approx(1.2)
    p = capacity.plan(inputs, 100_000, 0.6)
    assert p.cluster_gateway_cores == 67  # 100,000 / 1,500
    assert p.cluster_masters == 19  # 100,000 x (60 x 1.2 + 40) us / 0.6 = 18.7
    path.write_text(json.dumps(r))
    assert capacity.main([str(path), "--rate", "100000", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| 100,000 | 50-67 | 17-19 | 25 | 4-13 | 100 |" in out
    assert "870,000" not in out


def test_a_small_rate_needs_one_of_each_and_no_cluster() -> None:
    p = plan_for(report(), rate=1000)
    assert (p.gateway_cores, p.masters, p.workers, p.postgres_low) == (1, 1, 1, 1)
    assert not any("busiest master" in f.label for f in p.rows)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"drain__copy__batched_rate": None}, "drain.copy.batched_rate"),
        ({"drain__valkey__drain_cpu_us": None}, "drain.valkey.drain_cpu_us"),
        ({"drain__drain__rate": 0.0}, "drain.drain.rate"),
        ({"post": None}, "post.median_rps.c"),
        ({"drain": None}, "drain.valkey.admit_cpu_us"),
        ({"server_cpus": []}, "server_cpus"),
    ],
)
def test_a_missing_required_figure_exits_2_naming_it(
    change: dict[str, Any], field: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report(**copy.deepcopy(change))))
    assert capacity.main([str(path)]) == 2
    captured = capsys.readouterr()
    assert field in captured.err
    assert captured.out == ""


def test_an_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert capacity.main([str(tmp_path / "none.json")]) == 2
    (tmp_path / "bad.json").write_text("{")
    assert capacity.main([str(tmp_path / "bad.json")]) == 2
    assert "cannot read" in capsys.readouterr().err

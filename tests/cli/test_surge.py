"""`ordergate surge` as a user runs it: a short real spike against its own `ordergate up`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}


def test_a_short_spike_is_audited_end_to_end(tmp_path: Path) -> None:
    """Baseline 1 user -> 30 users -> 1 user, 6 s each, against an `up` the surge starts."""
    results = tmp_path / "results"
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "ordergate", "surge", "--shape", "spike", "--users", "30"]
        + ["--duration", "18", "--results", str(results), "--drain-timeout", "60"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=150,
    )
    took = time.monotonic() - started
    print(out.stdout, f"\n(`ordergate surge` took {took:.1f} s)")
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert out.stdout.rstrip().endswith("PASS")

    audit = json.loads((results / "audit.json").read_text())
    assert audit["verdict"] == "PASS"
    committed = audit["committed"]
    assert committed["error"] == ""
    assert audit["accepted"] > 100
    assert committed["of_accepted"] == audit["accepted"]
    assert committed["missing"] == 0 and committed["doubled"] == 0
    assert committed["rows"] == committed["of_accepted"] + committed["without_receipt"]
    assert 0 < audit["duplicates_answered"] == audit["duplicates_sent"]
    assert audit["rejected"].get("422 /problems/invalid-order", 0) == audit["invalid_sent"] > 0
    assert audit["unexpected"] == {}
    assert audit["customers"].get("committed", 0) > 0
    assert audit["customers"]["position_increases"] == 0
    assert audit["drain"]["drained"] and audit["drain"]["dead_letters"] == 0
    assert audit["latency"]["POST /v1/orders [new]"]["p99"] is not None
    for report in ("report.html", "locust_stats.csv", "locust_stats_history.csv", "locust.log"):
        assert (results / report).is_file(), report

    # its own `up` was stopped, and its temporary data dir removed
    match = re.search(r"`ordergate up` \(pid (\d+), data in (\S+),", out.stdout)
    assert match, out.stdout
    pid, data_dir = int(match[1]), Path(match[2])
    assert not (psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    assert not data_dir.exists()


def test_surge_has_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ordergate", "surge", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "--shape {spike,ramp,soak}" in out.stdout


def test_surge_says_how_to_install_locust() -> None:
    """Without Locust (``sys.modules`` marks it missing) the command names the extra to install."""
    code = (
        "import sys; sys.modules['locust'] = None; from ordergate.cli import main; "
        "raise SystemExit(main(['surge', '--shape', 'spike']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "pip install -e '.[load]'" in out.stderr

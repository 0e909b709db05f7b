"""``ordergate surge``: rehearse a sale with Locust, then audit what the gateway promised.

Runs ``python -m locust`` headless on ``loadtests/locustfile.py`` and ``loadtests/shapes.py``
(a subprocess: Locust patches the standard library with gevent) against a running gateway or
an ``ordergate up`` of its own, shows progress while it runs, waits for the drain, and audits
(``ordergate/surge_audit.py``). Locust's CSV and HTML reports, its log, the ledgers of what its
users were told and ``audit.json`` stay in the results folder.

With ``--storefronts K --hot-share P`` the load comes from K storefronts, the first (hot) one
with P of the users: one storefront's flash sale among others, audited per storefront.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ordergate.errors import LocustNotInstalled, SurgeError
from ordergate.servers import die_with_parent
from ordergate.settings import Settings
from ordergate.surge_audit import Drain, audit, check_committed
from ordergate.surge_progress import OpsProbe, ProgressLine, read_history
from ordergate.surge_report import render
from ordergate.surge_results import CSV_PREFIX, read_knee, read_latencies, read_ledger
from ordergate.surge_target import (
    ORDER_ENV,
    Target,
    api_keys,
    own_gateway,
    running_gateway,
    storefront_count,
    user_order,
    user_shares,
)

SHAPES = ("spike", "ramp", "soak")
DEFAULT_USERS = {"spike": 300, "ramp": 500, "soak": 100}
SAMPLE_S = 0.5
LOCUST_STOP_S = 30.0
USER_STOP_S = 10
EXIT_CODES = {"PASS": 0, "FAIL": 1, "INCOMPLETE": 3}


@dataclass(frozen=True)
class SurgeOptions:
    shape: str
    host: str | None = None  # URL of a running gateway; None: start `ordergate up`
    users: int | None = None  # the most users the shape reaches (default per shape)
    duration: float | None = None  # seconds the shape lasts (default per shape, shapes.py)
    results: Path | None = None
    data_dir: str | None = None  # of the started `up`; None: a temporary directory
    processes: int | None = None  # gateway processes of the started `up`
    drain_rate: float | None = None  # the started `up`'s drain cap, orders/s; None: its setting
    drain_timeout: float = 600.0
    max_p95_ms: float = 500.0  # ramp: a step whose p95 passes this ends the ramp
    max_error_share: float = 0.01  # ramp: likewise for its share of failed requests
    storefronts: int | None = None  # K; None: the keys given for --host, else STOREFRONTS
    hot_share: float = 0.0  # of the users, for the first storefront; 0: spread evenly


def run_surge(options: SurgeOptions, settings: Settings) -> int:
    """Run the surge and print the audit; 0 PASS, 1 FAIL, 3 INCOMPLETE (not everything could
    be checked, e.g. no access to Postgres)."""
    users = options.users or DEFAULT_USERS[options.shape]
    shares = user_shares(
        users, storefront_count(options.storefronts, options.host), options.hot_share
    )
    locustfiles = _locustfiles()
    if options.drain_rate is not None and options.drain_rate < 0:
        raise SurgeError("--drain-rate must be >= 0 (0 = no cap)")
    if options.drain_rate is not None and options.host:
        raise SurgeError(
            "--drain-rate caps the drain of the `ordergate up` the surge starts; to cap a "
            "running gateway's drain, use `ordergate drain --rate N`"
        )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per status poll
    run_id = time.strftime("%Y%m%d-%H%M%S")
    results = options.results or Path("surge-results") / run_id
    if list(results.glob("ledger-*.json")):
        raise SurgeError(f"{results} holds an earlier surge's results; name another folder")
    results.mkdir(parents=True, exist_ok=True)
    with _target(options, settings, results) as target:
        keys, storefronts = api_keys(target, settings, run_id.replace("-", ""), len(shares))
        names = storefronts or [f"key {i}" for i in range(1, len(keys) + 1)]
        print(
            f"ordergate surge: {options.shape}, {users} users at most, against {target.url}"
            + (f"\n  on {target.started}" if target.started else "")
            + (f"\n  drain capped at {options.drain_rate:g} orders/s" if options.drain_rate else "")
            + f"\n  storefronts {_split(names, shares, options.hot_share)}"
            + f"\n  results in {results}",
            flush=True,
        )
        argv = [sys.executable, "-m", "locust", "-f", ",".join(map(str, locustfiles))]
        argv += ["--headless", "--only-summary", "--host", target.url]
        argv += ["--shape", options.shape, "-u", str(users)]
        if options.duration:
            argv += ["--shape-duration", str(options.duration)]
        argv += ["--ramp-max-p95-ms", str(options.max_p95_ms)]
        argv += ["--ramp-max-error-share", str(options.max_error_share)]
        argv += ["--csv", str(results / CSV_PREFIX), "--html", str(results / "report.html")]
        argv += ["--record-dir", str(results), "--exit-code-on-error", "0"]
        argv += ["--stop-timeout", str(USER_STOP_S)]  # a stopping user finishes its request
        env = {**os.environ, "ORDERGATE_API_KEY": ",".join(keys)}
        env[ORDER_ENV] = ",".join(map(str, user_order(shares)))
        probe = OpsProbe(target.url, target.admin_token or settings.admin_token)
        try:
            before = probe.read()
            with ProgressLine(options.shape) as line:
                exit_code = _run_locust(argv, env, results, probe, line)
                drain = _wait_drain(probe, line, options.drain_timeout, before)
        finally:
            probe.close()
        ledger = read_ledger(results)
        committed = check_committed(target.database_url, ledger)
    report = audit(
        options.shape,
        ledger,
        read_latencies(results),
        drain,
        committed,
        read_knee(results),
        exit_code,
        names,
        options.hot_share,
    )
    (results / "audit.json").write_text(json.dumps(report.to_json(), indent=1))
    print(render(report), flush=True)
    return EXIT_CODES[report.verdict]


def _split(names: list[str], shares: list[int], hot_share: float) -> str:
    """``a (hot) 18, b 6, c 6 of 30 users``: the split asked for. Locust's customers (one user
    in five) have no storefront; ``user_order`` gives each storefront about its share of the
    others, and the audit shows how many each had."""
    parts = [
        f"{name}{' (hot)' if hot_share > 0 and i == 0 else ''} {n}"
        for i, (name, n) in enumerate(zip(names, shares, strict=True))
    ]
    return f"{', '.join(parts)} of {sum(shares)} users"


def _locustfiles() -> tuple[Path, Path]:
    """loadtests/locustfile.py and shapes.py of this checkout (or of the current directory)."""
    if importlib.util.find_spec("locust") is None:
        raise LocustNotInstalled(
            "ordergate surge needs Locust, which is not installed: "
            "pip install -e '.[load]' in the ordergate checkout (or pip install 'locust>=2.30')"
        )
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        files = (root / "loadtests" / "locustfile.py", root / "loadtests" / "shapes.py")
        if all(f.is_file() for f in files):
            return files
    raise SurgeError("no loadtests/locustfile.py: run the surge from an ordergate checkout")


@contextlib.contextmanager
def _target(options: SurgeOptions, settings: Settings, results: Path) -> Iterator[Target]:
    if options.host:
        yield running_gateway(options.host, settings)
        return
    given = {} if options.drain_rate is None else {"drain_rate": f"{options.drain_rate:g}"}
    up = own_gateway(options.data_dir, options.processes, results / "up.log", given)
    with up as target:
        yield target


def _run_locust(
    argv: list[str], env: dict[str, str], results: Path, probe: OpsProbe, line: ProgressLine
) -> int:
    """Locust until its shape ends, sampling its figures and the buffer's depth meanwhile."""
    start = time.monotonic()
    history = results / f"{CSV_PREFIX}_stats_history.csv"
    with open(results / "locust.log", "wb") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    try:
        while proc.poll() is None:
            doc = probe.read()
            depth = None if doc is None else int(doc["buffered"])
            line.show(time.monotonic() - start, read_history(history), depth, probe.peak_depth)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(SAMPLE_S)
    finally:
        if proc.poll() is None:  # interrupted: let Locust write its reports
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(LOCUST_STOP_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if proc.returncode != 0 and not list(results.glob("ledger-*.json")):
        tail = (results / "locust.log").read_text(errors="replace").splitlines()[-15:]
        raise SurgeError(f"Locust exited with {proc.returncode}:\n" + "\n".join(tail))
    return proc.returncode


def _wait_drain(
    probe: OpsProbe, line: ProgressLine, timeout: float, before: dict[str, Any] | None
) -> Drain:
    """Poll the buffer's depth until it is 0 or ``timeout`` passes."""
    start = time.monotonic()
    dead_before = int(before["dead_letters"]) if before else 0
    while True:
        doc = probe.read()
        waited = time.monotonic() - start
        if doc is not None:
            line.note(f"{line.label}  draining: buffer {int(doc['buffered']):,}  ({waited:.0f} s)")
            if int(doc["buffered"]) == 0:
                dead = int(doc["dead_letters"]) - dead_before
                return Drain(True, round(waited, 2), probe.peak_depth, dead)
        if waited >= timeout:
            dead = int(doc["dead_letters"]) - dead_before if doc else 0
            error = "" if doc else probe.error
            return Drain(False, round(waited, 2), probe.peak_depth, dead, error)
        time.sleep(0.2)

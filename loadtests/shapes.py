"""Load shapes for surge rehearsals: spike, ramp and soak, picked with ``--shape``.

Load this file next to the locustfile; ``-u`` is the most users the shape reaches::

    locust -f loadtests/locustfile.py,loadtests/shapes.py --headless --host URL \\
        --shape spike -u 300 [--shape-duration 180]

* ``spike``: a baseline of ``-u / 30`` users, then all ``-u`` users at once (30x, the peak
  factor of a sale opening) for a third of the duration, then the baseline again. The default
  duration, 180 s, gives baseline 60 s -> 30x for a minute -> baseline 60 s; a shorter
  ``--shape-duration`` scales the three phases alike.
* ``ramp``: ``--ramp-steps`` equal steps up to ``-u`` users over the duration (default 300 s).
  After each step it judges that step's requests: when their error share passes
  ``--ramp-max-error-share`` or their p95 latency passes ``--ramp-max-p95-ms``, the test stops.
  The knee is the last step within both limits; it is logged and, with ``--record-dir``,
  written to ``knee.json`` with every step's figures.
* ``soak``: ``-u`` users, started over 10 s, held for the duration (default 3600 s).

Only ``SurgeShape`` is visible to Locust (the three shapes are abstract), so loading this file
never picks a shape by accident; without this file the locustfile runs Locust's usual ``-u``/
``-r``/``-t`` test.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from locust import LoadTestShape, events
from locust.stats import calculate_response_time_percentile

PEAK_FACTOR = 30
DEFAULT_DURATION_S = {"spike": 180.0, "ramp": 300.0, "soak": 3600.0}
MIN_STEP_S = 2.0
SOAK_SPAWN_S = 10.0
ENDING_S = 15.0

log = logging.getLogger(__name__)

Tick = tuple[int, float] | None


class Spike(LoadTestShape):
    """Baseline -> ``PEAK_FACTOR``x -> baseline, in three equal phases."""

    abstract = True

    def __init__(self, users: int, duration_s: float) -> None:
        super().__init__()
        self.peak = max(1, users)
        self.baseline = max(1, round(self.peak / PEAK_FACTOR))
        self.phase_s = duration_s / 3

    def tick(self) -> Tick:
        t = self.get_run_time()
        if t < self.phase_s:
            return self.baseline, float(self.baseline)
        if t < 2 * self.phase_s:
            return self.peak, float(self.peak)  # the whole surge arrives within a second
        if t < 3 * self.phase_s:
            return self.baseline, float(self.peak)
        return None


@dataclass(frozen=True)
class Step:
    """One ramp step's requests: how many users, how fast, how well answered."""

    users: int
    seconds: float
    requests: int
    failures: int
    rps: float
    p95_ms: int
    error_share: float
    within: bool


class Ramp(LoadTestShape):
    """Step up until a step's error share or p95 passes its limit; the knee is the step before."""

    abstract = True

    def __init__(
        self,
        users: int,
        duration_s: float,
        steps: int,
        max_error_share: float,
        max_p95_ms: float,
        report: Path | None,
    ) -> None:
        super().__init__()
        self.users = max(1, users)
        self.step_users = max(1, math.ceil(self.users / max(1, steps)))
        self.steps = math.ceil(self.users / self.step_users)
        self.step_s = max(MIN_STEP_S, duration_s / self.steps)
        self.max_error_share = max_error_share
        self.max_p95_ms = max_p95_ms
        self.report = report
        self.done: list[Step] = []
        self._step = -1
        self._mark: tuple[float, int, int, dict[int, int]] = (0.0, 0, 0, {})

    def tick(self) -> Tick:
        k = int(self.get_run_time() // self.step_s)
        if k != self._step:
            if self._step >= 0:
                step = self._measure()
                self.done.append(step)
                if not step.within:
                    self._finish(stopped_by=step)
                    return None
            if k >= self.steps:
                self._finish(stopped_by=None)
                return None
            self._step = k
            total = self._total()
            self._mark = (
                time.monotonic(),
                total.num_requests,
                total.num_failures,
                dict(total.response_times),
            )
        return min(self.users, (self._step + 1) * self.step_users), float(self.step_users)

    def _total(self) -> Any:
        assert self.runner is not None
        return self.runner.stats.total

    def _measure(self) -> Step:
        since, requests0, failures0, times0 = self._mark
        total = self._total()
        seconds = max(1e-3, time.monotonic() - since)
        requests = total.num_requests - requests0
        failures = total.num_failures - failures0
        times = {
            ms: n - times0.get(ms, 0)
            for ms, n in total.response_times.items()
            if n - times0.get(ms, 0) > 0
        }
        p95 = calculate_response_time_percentile(times, requests, 0.95) if requests else 0
        share = failures / requests if requests else 0.0
        return Step(
            users=min(self.users, (self._step + 1) * self.step_users),
            seconds=round(seconds, 2),
            requests=requests,
            failures=failures,
            rps=round(requests / seconds, 1),
            p95_ms=int(p95),
            error_share=round(share, 4),
            within=requests > 0 and share <= self.max_error_share and p95 <= self.max_p95_ms,
        )

    def knee(self) -> Step | None:
        """The last step within the limits (None: not even the first)."""
        within = [s for s in self.done if s.within]
        return within[-1] if within else None

    def _finish(self, stopped_by: Step | None) -> None:
        knee = self.knee()
        if knee is None:
            log.warning("ramp: no knee; the first step (%s users) passed a limit", self.step_users)
        else:
            log.warning(
                "ramp: knee at %d users, %.0f req/s, p95 %d ms, errors %.2f %% (%s)",
                knee.users,
                knee.rps,
                knee.p95_ms,
                100 * knee.error_share,
                f"next step {stopped_by.users} users passed a limit"
                if stopped_by
                else "every step within the limits",
            )
        if self.report is not None:
            doc = {
                "limits": {"max_error_share": self.max_error_share, "max_p95_ms": self.max_p95_ms},
                "knee": asdict(knee) if knee else None,
                "stopped_by": asdict(stopped_by) if stopped_by else None,
                "steps": [asdict(s) for s in self.done],
            }
            self.report.write_text(json.dumps(doc, indent=1))


class Soak(LoadTestShape):
    """``users`` users, started over ``SOAK_SPAWN_S``, held for the duration."""

    abstract = True

    def __init__(self, users: int, duration_s: float) -> None:
        super().__init__()
        self.users = max(1, users)
        self.duration_s = duration_s

    def tick(self) -> Tick:
        if self.get_run_time() >= self.duration_s:
            return None
        return self.users, max(1.0, self.users / SOAK_SPAWN_S)


@events.init_command_line_parser.add_listener
def add_shape_options(parser: Any, **_kwargs: Any) -> None:
    parser.add_argument("--shape", choices=sorted(DEFAULT_DURATION_S), default="spike")
    parser.add_argument(
        "--shape-duration",
        type=float,
        default=0.0,
        help="seconds the shape lasts (default: spike 180, ramp 300, soak 3600)",
    )
    parser.add_argument("--ramp-steps", type=int, default=10)
    parser.add_argument("--ramp-max-error-share", type=float, default=0.01)
    parser.add_argument("--ramp-max-p95-ms", type=float, default=500.0)


def build(options: Any) -> LoadTestShape:
    """The shape ``options`` (Locust's parsed options) ask for."""
    name = options.shape
    users = int(options.num_users or 1)
    duration = float(options.shape_duration or DEFAULT_DURATION_S[name])
    if name == "spike":
        return Spike(users, duration)
    if name == "soak":
        return Soak(users, duration)
    record_dir = getattr(options, "record_dir", "")
    return Ramp(
        users,
        duration,
        options.ramp_steps,
        options.ramp_max_error_share,
        options.ramp_max_p95_ms,
        Path(record_dir) / "knee.json" if record_dir else None,
    )


class SurgeShape(LoadTestShape):
    """The shape named by ``--shape``, sized by ``-u`` and ``--shape-duration``."""

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self.shape: LoadTestShape | None = None
        self.ending: float | None = None  # when ending, the deadline for users to stop

    def tick(self) -> Tick:
        assert self.runner is not None
        if self.ending is not None:
            # Down to 0 users before the end: a ramp-down lets each user finish its request
            # (within --stop-timeout), whereas the headless quit that follows None kills users
            # mid-request, and their orders end with no answer.
            live = len(self.runner.user_greenlets)
            return None if not live or time.monotonic() > self.ending else (0, float(live))
        if self.shape is None:
            self.shape = build(self.runner.environment.parsed_options)
            self.shape.runner = self.runner
        result = self.shape.tick()
        if result is None:
            self.ending = time.monotonic() + ENDING_S
            return 0, float(max(1, self.get_current_user_count()))
        return int(result[0]), float(result[1])

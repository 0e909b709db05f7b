"""What a surge shows while it runs: Locust's figures, the buffer's depth, one live line.

Locust (a separate process) appends a row to ``<prefix>_stats_history.csv`` every second; the
gateway's ``GET /v1/ops/status`` gives the buffer's depth. A terminal gets a rich live line;
anything else (CI logs) gets a plain line every few seconds.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.text import Text

PLAIN_EVERY_S = 5.0


@dataclass(frozen=True)
class LocustFigures:
    """Locust's latest aggregated row: the current users and rate, the totals so far."""

    users: int = 0
    rps: float = 0.0
    requests: int = 0
    failures: int = 0


def read_history(path: Path) -> LocustFigures:
    """The last row of Locust's ``_stats_history.csv`` (zeros until it has one)."""
    try:
        with open(path, "rb") as f:
            header = f.readline().decode()
            f.seek(0, io.SEEK_END)
            f.seek(max(len(header), f.tell() - 4096))
            tail = f.read().decode(errors="replace").splitlines()
    except OSError:
        return LocustFigures()
    rows = [r for r in csv.DictReader([header, *tail[-2:]]) if r.get("Name") == "Aggregated"]
    if not rows:
        return LocustFigures()
    row = rows[-1]
    try:
        return LocustFigures(
            users=int(row["User Count"]),
            rps=float(row["Requests/s"]),
            requests=int(row["Total Request Count"]),
            failures=int(row["Total Failure Count"]),
        )
    except (KeyError, ValueError):
        return LocustFigures()


class OpsProbe:
    """``GET /v1/ops/status`` of the target gateway, remembering the deepest buffer it saw."""

    def __init__(self, url: str, admin_token: str | None) -> None:
        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self._http = httpx.Client(base_url=url, timeout=2.0, headers=headers)
        self.peak_depth = 0
        self.error = ""  # why the last read failed ("" when it did not)

    def read(self) -> dict[str, Any] | None:
        try:
            resp = self._http.get("/v1/ops/status")
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return None
        if resp.status_code != 200:
            self.error = f"HTTP {resp.status_code} from /v1/ops/status"
            if resp.status_code == 401:
                self.error += " (set ORDERGATE_ADMIN_TOKEN)"
            return None
        try:
            doc: dict[str, Any] = resp.json()
            depth = int(doc["buffered"])
        except (ValueError, KeyError, TypeError) as exc:
            self.error = f"unexpected answer from /v1/ops/status: {exc}"
            return None
        self.error = ""
        self.peak_depth = max(self.peak_depth, depth)
        return doc

    def close(self) -> None:
        self._http.close()


class ProgressLine:
    """One line of progress: elapsed, users, req/s, failures, buffer depth."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._console = Console(file=sys.stderr)
        self._live: Live | None = None
        self._printed_at = 0.0

    def __enter__(self) -> ProgressLine:
        if self._console.is_terminal:
            self._live = Live(Text(""), console=self._console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.__exit__(kind, exc, tb)

    def show(self, elapsed: float, figures: LocustFigures, depth: int | None, peak: int) -> None:
        minutes, seconds = divmod(int(elapsed), 60)
        text = (
            f"{self.label}  {minutes:02d}:{seconds:02d}  users {figures.users}  "
            f"{figures.rps:,.0f} req/s  requests {figures.requests:,}  "
            f"failures {figures.failures:,}  buffer {'?' if depth is None else f'{depth:,}'}"
            f" (peak {peak:,})"
        )
        self.note(text)

    def note(self, text: str) -> None:
        """Replace the line (a terminal), or print it if the last print is a while ago."""
        if self._live is not None:
            self._live.update(Text(text))
        elif time.monotonic() - self._printed_at >= PLAIN_EVERY_S:
            self._printed_at = time.monotonic()
            print(text, file=sys.stderr, flush=True)

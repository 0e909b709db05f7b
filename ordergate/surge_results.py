"""What a surge's Locust processes left in the results folder, read back for the audit.

* ``ledger-<pid>.json`` and ``receipts-<pid>.txt`` (``loadtests/locustfile.py``, one pair per
  Locust process): every answer counted by kind, status and problem type, in all and per
  storefront; every receipt, with its storefront.
* ``locust_stats.csv``: Locust's latency percentiles per request name.
* ``knee.json``: the ramp's steps and knee (``loadtests/shapes.py``, ramp only).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ordergate.errors import SurgeError

CSV_PREFIX = "locust"


@dataclass(frozen=True)
class EtaSample:
    """One followed ticket that reached committed: its first answer against its wait.

    ``wait_s`` runs from the first answer to the first answer saying ``committed`` and
    overshoots the commit by up to ``gap_s``, the last poll interval (the customer polls every
    ``poll_after_seconds``); ``real_wait_s`` takes the middle of that interval.
    ``since_receipt_s`` runs to the same end from the order's receipt, and
    ``receipt_wait_s`` likewise takes the middle: the storefront's whole wait.
    """

    first_eta_s: int | None  # eta_seconds of the first answer (None: it had none)
    wait_s: float
    first_position: int | None
    gap_s: float  # from the last answer that was not final to the committed one
    storefront: int | None = None  # index into the run's keys (None: a ledger from before)
    since_receipt_s: float | None = None

    @property
    def real_wait_s(self) -> float:
        return max(0.0, self.wait_s - self.gap_s / 2)

    @property
    def receipt_wait_s(self) -> float | None:
        """From the receipt to the commit (the middle of the last poll interval)."""
        if self.since_receipt_s is None:
            return None
        return max(0.0, self.since_receipt_s - self.gap_s / 2)


@dataclass
class Ledger:
    """Every Locust process's ledger, merged."""

    answers: Counter[str] = field(default_factory=Counter)  # "kind status problem" -> count
    receipts: dict[str, str] = field(default_factory=dict)  # storefront_order_id -> order_id
    conflicting_receipts: int = 0  # a storefront_order_id receipted under two order ids
    unanswered: dict[str, str] = field(default_factory=dict)  # sfo without receipt -> last answer
    wrong_receipts: int = 0  # a duplicate answered with another order's id
    followed: Counter[str] = field(default_factory=Counter)  # final status customers saw
    position_increases: int = 0
    eta_samples: list[EtaSample] = field(default_factory=list)
    eta_unfinished: int = 0  # followed tickets still waiting when their customer stopped
    # Per storefront (index into the run's keys): answers to its users, its distinct receipts,
    # the most users it had at once (summed over Locust processes).
    storefront_answers: dict[int, Counter[str]] = field(default_factory=dict)
    storefront_receipts: Counter[int] = field(default_factory=Counter)
    storefront_users: Counter[int] = field(default_factory=Counter)

    def count(self, kind: str | None = None, status: str | None = None) -> int:
        """Answers of ``kind`` (e.g. ``new``) and/or ``status`` (e.g. ``503``)."""
        return sum(
            n
            for label, n in self.answers.items()
            if (kind is None or label.split(" ")[0] == kind)
            and (status is None or label.split(" ")[1] == status)
        )


def read_ledger(results: Path) -> Ledger:
    """The merged ledger of the run whose results are in ``results``."""
    ledgers = sorted(results.glob("ledger-*.json"))
    if not ledgers:
        raise SurgeError(f"Locust left no ledger in {results}; see {results / 'locust.log'}")
    merged = Ledger()
    for path in ledgers:
        doc: dict[str, Any] = json.loads(path.read_text())
        merged.answers.update(doc["answers"])
        merged.unanswered.update(doc["unanswered"])
        merged.wrong_receipts += doc["wrong_receipts"]
        merged.followed.update(doc["followed"])
        merged.position_increases += doc["position_increases"]
        merged.eta_samples += [EtaSample(*row) for row in doc.get("eta_samples", [])]
        merged.eta_unfinished += doc.get("eta_unfinished", 0)
        for key, figures in doc.get("storefronts", {}).items():
            merged.storefront_answers.setdefault(int(key), Counter()).update(figures["answers"])
            merged.storefront_users[int(key)] += figures["peak_users"]
    for path in sorted(results.glob("receipts-*.txt")):
        with open(path) as f:
            for line in f:
                order_id, sfo, storefront = _receipt(line)
                earlier = merged.receipts.get(sfo)
                if earlier is None:  # each storefront order counts once, like ``receipts``
                    merged.receipts[sfo] = order_id
                    if storefront is not None:
                        merged.storefront_receipts[storefront] += 1
                elif earlier != order_id:
                    merged.conflicting_receipts += 1
    for sfo in merged.receipts:  # receipted by a later attempt in another process: no longer
        merged.unanswered.pop(sfo, None)
    return merged


def _receipt(line: str) -> tuple[str, str, int | None]:
    """``order_id storefront_order_id [storefront]``: the storefront is missing in receipts
    from before storefronts were recorded."""
    order_id, _, rest = line.rstrip("\n").partition(" ")
    sfo, _, storefront = rest.partition(" ")
    return order_id, sfo, int(storefront) if storefront else None


@dataclass(frozen=True)
class Latency:
    """Locust's figures for one request name, in milliseconds."""

    requests: int
    rps: float
    p50: float | None
    p95: float | None
    p99: float | None


def read_latencies(results: Path) -> dict[str, Latency]:
    """Request name (``POST /v1/orders [new]``, ``Aggregated``, ...) -> its figures."""
    path = results / f"{CSV_PREFIX}_stats.csv"
    try:
        with open(path) as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return {}
    return {
        row["Name"]: Latency(
            requests=int(row["Request Count"]),
            rps=float(row["Requests/s"]),
            p50=_ms(row["50%"]),
            p95=_ms(row["95%"]),
            p99=_ms(row["99%"]),
        )
        for row in rows
    }


def _ms(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:  # "N/A" before any request
        return None


def read_knee(results: Path) -> dict[str, Any] | None:
    """The ramp's report (``knee.json``), or None for other shapes."""
    try:
        doc: dict[str, Any] = json.loads((results / "knee.json").read_text())
    except OSError:
        return None
    return doc

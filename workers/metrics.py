"""The drain's Prometheus metrics: orders settled and the batches that settle them.

Observed by the leading worker once per batch (``Drainer._process``). With ``metrics_dir`` set
they go to that directory (prometheus_client's multiprocess mode), where the gateway's
``/metrics`` on the same host adds them up; ``worker_metrics_port`` serves them from the worker.
"""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

log = logging.getLogger(__name__)

COMMITTED = Counter(
    "ordergate_orders_committed",
    "Orders committed to Postgres by the drain, counted once their batch is settled in Redis.",
)
SETTLED = Counter(
    "ordergate_orders_settled",
    "Orders that left the buffer, by outcome: committed, rejected (refused by Postgres as "
    "invalid) or dead_lettered.",
    ["outcome"],
)
BATCH_SECONDS = Histogram(
    "ordergate_commit_batch_seconds",
    "Time to write one batch to Postgres and settle it in Redis, retries included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_SIZE = Histogram(
    "ordergate_commit_batch_size",
    "Entries settled per batch.",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
OUTCOMES = ("committed", "rejected", "dead_lettered")
_SETTLED = {outcome: SETTLED.labels(outcome) for outcome in OUTCOMES}


def observe_batch(committed: int, rejected: int, dead: int, seconds: float) -> None:
    """One settled batch."""
    COMMITTED.inc(committed)
    for outcome, n in zip(OUTCOMES, (committed, rejected, dead), strict=True):
        if n:
            _SETTLED[outcome].inc(n)
    BATCH_SIZE.observe(committed + rejected + dead)
    BATCH_SECONDS.observe(seconds)


def serve(port: int, host: str, metrics_dir: str | None) -> None:
    """A worker's own /metrics on ``port`` (a thread): every process of ``metrics_dir`` when set,
    else this process's."""
    registry = REGISTRY
    if metrics_dir:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    start_http_server(port, host, registry=registry)
    log.info("worker metrics on http://%s:%d/metrics", host, port)

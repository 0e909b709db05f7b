"""The directory where the processes of one host keep their Prometheus metrics.

prometheus_client's multiprocess mode: each gateway and worker process writes its counters and
histograms to files in ``PROMETHEUS_MULTIPROC_DIR`` (one file per process and kind), and a
``/metrics`` endpoint adds up every file. The variable must be set before prometheus_client is
imported, so the commands set it first thing, and child processes inherit it. Files of dead
processes stay and keep counting in the totals, which is right for counters and histograms (no
gauge of ordergate lives in these files); ``ordergate up`` empties the directory when it starts.
"""

from __future__ import annotations

import os
from pathlib import Path

from ordergate.settings import Settings

ENV = "PROMETHEUS_MULTIPROC_DIR"


def use(settings: Settings) -> None:
    """Write this process's metrics, and its children's, to ``settings.metrics_dir`` (if set)."""
    if not settings.metrics_dir:
        return
    path = Path(settings.metrics_dir)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(path)


def fresh(settings: Settings) -> Settings:
    """For ``ordergate up``: ``metrics_dir`` (default ``<data_dir>/metrics``), emptied of the
    files of an earlier run (only prometheus_client's ``*.db`` files: the directory may be one
    an operator chose)."""
    path = Path(settings.metrics_dir) if settings.metrics_dir else settings.data_path / "metrics"
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)
    return settings.replace(metrics_dir=str(path.resolve()))

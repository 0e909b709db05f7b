"""The gateway a surge test hits: a running one (``--host``), or an ``ordergate up`` of its own.

Either way the surge needs the gateway's URL, API keys for a few storefronts and, for the audit,
the Postgres URL. Its own ``up`` runs as a child process on a free port and a temporary data
directory (or ``--data-dir``), exactly as a user would start it, and is stopped with SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from ordergate.errors import SurgeError
from ordergate.runtime import ADMIN_TOKEN_FILE, RUNTIME_FILE, read_runtime
from ordergate.servers import die_with_parent, free_port
from ordergate.settings import Settings

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 90.0
STOREFRONTS = 4


@dataclass(frozen=True)
class Target:
    """Where the load goes and where the audit looks."""

    url: str
    redis_url: str | None
    database_url: str | None
    started: str  # "" for a running gateway, else what was started (for the audit's header)
    admin_token: str | None = None  # of the started `up` (its data dir's), else the configured


def running_gateway(url: str, settings: Settings) -> Target:
    """A gateway someone else runs. Its servers are the configured ones, else those of a live
    ``ordergate up`` on the data dir (``runtime.json``), else unknown."""
    live = read_runtime(settings.data_path) or {}
    return Target(
        url=url.rstrip("/"),
        redis_url=settings.redis_url or live.get("redis_url"),
        database_url=settings.database_url or live.get("database_url"),
        started="",
    )


@contextlib.contextmanager
def own_gateway(
    data_dir: str | None,
    processes: int | None,
    log: Path,
    settings: Mapping[str, str] | None = None,
) -> Iterator[Target]:
    """``ordergate up`` as a child on a free port, until the block ends.

    On ``data_dir``, or on a temporary directory that is removed afterwards; ``settings`` go to
    it as ``ORDERGATE_<NAME>`` variables (`up` hands them on to its gateway and workers)."""
    temp = None if data_dir else tempfile.mkdtemp(prefix="ordergate-surge-")
    directory = Path(data_dir or temp or "")
    port = free_port()
    argv = [sys.executable, "-m", "ordergate", "up", "--port", str(port)]
    argv += ["--data-dir", str(directory)]
    if processes:
        argv += ["--processes", str(processes)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches the surge, which stops `up` in order
            preexec_fn=die_with_parent,
            env=os.environ | {f"ORDERGATE_{k.upper()}": v for k, v in (settings or {}).items()},
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, log)
        runtime = json.loads((directory / RUNTIME_FILE).read_text())
        yield Target(
            url=url,
            redis_url=runtime["redis_url"],
            database_url=runtime["database_url"],
            started=f"its own `ordergate up` (pid {proc.pid}, data in {directory}, log {log})",
            admin_token=_made_token(directory),
        )
    finally:
        _stop(proc)
        if temp:
            shutil.rmtree(temp, ignore_errors=True)


def _made_token(directory: Path) -> str | None:
    """The admin token `up` made in its data dir (none when one was configured)."""
    path = directory / ADMIN_TOKEN_FILE
    return path.read_text().strip() if path.exists() else None


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=url, timeout=1.0) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SurgeError(f"`ordergate up` exited with {proc.returncode}; see {log}")
            try:
                if http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.1)
    raise SurgeError(f"`ordergate up` was not ready within {READY_TIMEOUT_S:.0f}s; see {log}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does: gateway, workers, Postgres, Valkey
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def api_keys(target: Target, settings: Settings, run_id: str) -> tuple[list[str], list[str]]:
    """(keys, storefront ids): from ``ORDERGATE_API_KEY`` when set for a running gateway, else
    new keys for ``STOREFRONTS`` storefronts of this run, made in the target's Redis."""
    given = [k.strip() for k in os.environ.get("ORDERGATE_API_KEY", "").split(",") if k.strip()]
    if given and not target.started:
        return given, []
    if target.redis_url is None:
        raise SurgeError(
            "no API keys: set ORDERGATE_API_KEY (comma-separated keys of the gateway's "
            "storefronts), or ORDERGATE_REDIS_URL so the surge can make its own"
        )
    storefronts = [f"surge-{run_id}-{i}" for i in range(1, STOREFRONTS + 1)]
    return asyncio.run(_create_keys(target.redis_url, settings, storefronts)), storefronts


async def _create_keys(redis_url: str, settings: Settings, storefronts: list[str]) -> list[str]:
    from ordergate.buffer.connection import create_redis
    from ordergate.buffer.keys import Keys
    from ordergate.gateway.auth import create_key

    redis = create_redis(redis_url)
    try:
        return [await create_key(redis, Keys(settings.key_prefix), s) for s in storefronts]
    finally:
        await redis.aclose()

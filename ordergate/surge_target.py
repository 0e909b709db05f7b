"""The gateway a surge test hits: a running one (``--host``), or an ``ordergate up`` of its own.

Either way the surge needs the gateway's URL, API keys for its storefronts and, for the audit,
the Postgres URL. Its own ``up`` runs as a child process on a free port and a temporary data
directory (or ``--data-dir``), exactly as a user would start it, and is stopped with SIGINT.
Which storefront each Locust storefront user sends for (``user_shares``, ``user_order``) is
decided here too, so that one storefront can have a flash sale's share of the users.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
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
# The storefront (index into ORDERGATE_API_KEY) of each storefront user, in the order Locust
# starts them (loadtests/locustfile.py).
ORDER_ENV = "ORDERGATE_SURGE_STOREFRONTS"


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


def given_keys() -> list[str]:
    """The keys in ``ORDERGATE_API_KEY`` (comma-separated), for a running gateway."""
    return [k.strip() for k in os.environ.get("ORDERGATE_API_KEY", "").split(",") if k.strip()]


def storefront_count(requested: int | None, host: str | None) -> int:
    """K: ``--storefronts``, else the keys given for a running gateway, else ``STOREFRONTS``
    (what the surge always did)."""
    if requested is not None:
        if requested < 1:
            raise SurgeError("--storefronts must be at least 1")
        return requested
    given = given_keys() if host else []
    return len(given) or STOREFRONTS


def user_shares(users: int, storefronts: int, hot_share: float) -> list[int]:
    """Users per storefront: the first (hot) one gets ``hot_share`` of them, at least one when
    the share is above 0; the others split the rest evenly, at least one each, the first ones
    taking the remainder. ``hot_share`` 0 splits all of them evenly."""
    if not 0 <= hot_share < 1:
        raise SurgeError(f"--hot-share must be in [0, 1), not {hot_share:g}")
    if storefronts < 1:
        raise SurgeError("--storefronts must be at least 1")
    if users < storefronts:
        raise SurgeError(
            f"{users} users cannot serve {storefronts} storefronts: each needs one at least; "
            "raise --users or lower --storefronts"
        )
    if hot_share == 0:
        return _even(users, storefronts)
    if storefronts == 1:
        raise SurgeError("--hot-share needs 2 storefronts at least: the hot one and the others")
    hot = min(max(1, math.floor(hot_share * users + 0.5)), users - (storefronts - 1))
    return [hot, *_even(users - hot, storefronts - 1)]


def _even(users: int, storefronts: int) -> list[int]:
    base, extra = divmod(users, storefronts)
    return [base + int(i < extra) for i in range(storefronts)]


def user_order(counts: list[int]) -> list[int]:
    """The storefront of each user, in the order Locust starts them: one user for each
    storefront first (the hot one leading), then the rest interleaved by smooth weighted
    round-robin. Every prefix then holds each storefront's share to within a user or two: a
    spike's baseline, a ramp's early steps and the storefront users among Locust's users (its
    customers take one user in five and no storefront) all see the split in small."""
    order = [k for k, n in enumerate(counts) if n > 0]
    left = [max(0, n - 1) for n in counts]
    total = sum(left)
    credit = [0] * len(counts)
    for _ in range(total):
        credit = [c + n for c, n in zip(credit, left, strict=True)]
        pick = max(range(len(counts)), key=lambda k: (credit[k], -k))
        credit[pick] -= total
        order.append(pick)
    return order


def api_keys(
    target: Target, settings: Settings, run_id: str, count: int = STOREFRONTS
) -> tuple[list[str], list[str]]:
    """(keys, storefront ids): the first ``count`` keys of ``ORDERGATE_API_KEY`` when it is set
    for a running gateway (their storefronts are not known), else new keys for ``count``
    storefronts of this run, made in the target's Redis."""
    given = given_keys()
    if given and not target.started:
        if len(given) < count:
            raise SurgeError(
                f"ORDERGATE_API_KEY holds {len(given)} keys, fewer than the {count} storefronts "
                "asked for: give more keys or lower --storefronts"
            )
        return given[:count], []
    if target.redis_url is None:
        raise SurgeError(
            "no API keys: set ORDERGATE_API_KEY (comma-separated keys of the gateway's "
            "storefronts), or ORDERGATE_REDIS_URL so the surge can make its own"
        )
    storefronts = [f"surge-{run_id}-{i}" for i in range(1, count + 1)]
    return asyncio.run(_create_keys(target.redis_url, settings, storefronts)), storefronts


async def _create_keys(redis_url: str, settings: Settings, storefronts: list[str]) -> list[str]:
    from ordergate.buffer.connection import connect_redis, is_cluster
    from ordergate.buffer.keys import Keys
    from ordergate.gateway.auth import create_key

    redis = await connect_redis(redis_url)
    keys = Keys(settings.key_prefix, is_cluster(redis))
    try:
        return [await create_key(redis, keys, s, settings.shards) for s in storefronts]
    finally:
        await redis.aclose()

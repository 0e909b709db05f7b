"""Run the ``ordergate`` command line as a subprocess against the test servers."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from typing import Any

from ordergate.settings import Settings


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment minus any ORDERGATE_* of the caller, plus the test servers' URLs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}
    env["ORDERGATE_REDIS_URL"] = settings.redis_url or ""
    env["ORDERGATE_DATABASE_URL"] = settings.database_url or ""
    env.update(extra)
    return env


async def spawn(settings: Settings, *args: str, **extra: str) -> Any:
    """``ordergate ARGS`` started without waiting (the event loop keeps running meanwhile)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ordergate",
        *args,
        env=cli_env(settings, **extra),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def ordergate(settings: Settings, *args: str, timeout: float = 60) -> Done:
    """``ordergate ARGS`` run to its end."""
    proc = await spawn(settings, *args)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return Done(proc.returncode, out.decode(), err.decode())

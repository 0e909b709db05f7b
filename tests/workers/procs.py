"""Worker processes for fault-injection tests: real `ordergate work` processes we can kill -9."""

from __future__ import annotations

import os
import subprocess
import sys

from ordergate.settings import Settings


def spawn_worker(settings: Settings, *extra: str, logs: bool = False) -> subprocess.Popen[bytes]:
    """A worker; with ``logs`` its stderr is a pipe the caller must keep reading."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}
    env.update(settings.to_env())
    return subprocess.Popen(
        [sys.executable, "-m", "ordergate", "work", *extra],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        # A pipe only for a caller that reads it: unread, a worker logging a line per batch
        # would fill it and block on its next write.
        stderr=subprocess.PIPE if logs else subprocess.DEVNULL,
    )


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait(10)

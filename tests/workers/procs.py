"""Worker processes for fault-injection tests: real `ordergate work` processes we can kill -9."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator

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


class LoggedWorker:
    """A real ``ordergate work`` process. Its stderr is read as it comes (a full pipe would
    stall the worker and look like the very hang these tests look for) and shown on failure."""

    def __init__(self, settings: Settings, *extra: str) -> None:
        self.proc = spawn_worker(settings, *extra, logs=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr
        for line in self.proc.stderr:
            self.lines.append(line.decode(errors="replace").rstrip())

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def stop(self) -> int:
        """SIGTERM, as ``up`` sends it; the exit code (0: it stopped cleanly, never crashed)."""
        if self.alive():
            self.proc.terminate()
        try:
            code = await asyncio.to_thread(self.proc.wait, 30)
        finally:
            if self.alive():
                self.proc.kill()
                self.proc.wait(10)
            await asyncio.to_thread(self._reader.join, 5)
            if self.proc.stderr:
                self.proc.stderr.close()
        return code

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


@contextlib.asynccontextmanager
async def logged_worker(settings: Settings, *extra: str) -> AsyncIterator[LoggedWorker]:
    """A worker stopped with SIGTERM at the end of the block, which must exit 0."""
    worker = LoggedWorker(settings, *extra)
    try:
        yield worker
    except BaseException:
        await worker.stop()
        print(f"--- worker stderr (last lines) ---\n{worker.tail()}")
        raise
    code = await worker.stop()
    assert code == 0, f"the worker exited with {code}:\n{worker.tail()}"

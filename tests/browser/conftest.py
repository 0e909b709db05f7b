"""A real headless Chromium (Debian's ``chromium``) driven by Playwright, and a real gateway
process to point it at.

Chromium comes from ``$ORDERGATE_TEST_CHROMIUM``, else ``/usr/bin/chromium``; when neither is
there and we run as root with apt-get, the ``chromium_path`` fixture installs the Debian package
once. Playwright's own browser downloads (``playwright install``) are never used."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO

import httpx
import pytest
from playwright.async_api import Browser, async_playwright

from ordergate.settings import Settings

SYSTEM_CHROMIUM = "/usr/bin/chromium"
HOW_TO_INSTALL = (
    "the browser tests need Chromium: `apt-get install chromium` (Debian's package, as root),"
    " or point ORDERGATE_TEST_CHROMIUM at a Chromium/Chrome executable"
)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # we run as root in CI, where the sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
APT_TIMEOUT_S = 900


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        return subprocess.run(
            ["apt-get", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        output = b"".join(
            o if isinstance(o, bytes) else o.encode() for o in (exc.stdout, exc.stderr) if o
        )
        pytest.fail(
            f"`apt-get {' '.join(args)}` did not finish in {APT_TIMEOUT_S}s; {HOW_TO_INSTALL}\n"
            + output.decode(errors="replace"),
            pytrace=False,
        )


def _install_chromium() -> None:
    install = ("install", "-y", "--no-install-recommends", "chromium")
    done = _apt(*install)
    if done.returncode != 0:  # package lists missing or stale: refresh them once, then retry
        update = _apt("update")
        if update.returncode != 0:
            pytest.fail(
                f"`apt-get update` failed (exit {update.returncode}); {HOW_TO_INSTALL}\n"
                f"{update.stdout}{update.stderr}",
                pytrace=False,
            )
        done = _apt(*install)
    if done.returncode != 0:
        pytest.fail(
            f"`apt-get {' '.join(install)}` failed (exit {done.returncode}); {HOW_TO_INSTALL}\n"
            f"{done.stdout}{done.stderr}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """An executable Chromium, installed with apt-get when it is missing and we may."""
    explicit = os.environ.get("ORDERGATE_TEST_CHROMIUM")
    if explicit:
        if not os.access(explicit, os.X_OK):
            pytest.fail(f"ORDERGATE_TEST_CHROMIUM={explicit} is not an executable", pytrace=False)
        return explicit
    if os.access(SYSTEM_CHROMIUM, os.X_OK):
        return SYSTEM_CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"{SYSTEM_CHROMIUM} is missing; {HOW_TO_INSTALL}", pytrace=False)
    _install_chromium()
    if not os.access(SYSTEM_CHROMIUM, os.X_OK):
        pytest.fail(f"apt-get installed chromium but {SYSTEM_CHROMIUM} is missing", pytrace=False)
    return SYSTEM_CHROMIUM


@pytest.fixture
async def browser(chromium_path: str) -> AsyncIterator[Browser]:
    """A fresh headless Chromium per test (Playwright objects belong to one event loop)."""
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(
            executable_path=chromium_path, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield chromium
        finally:
            await chromium.close()


@dataclass
class Gateway:
    url: str
    settings: Settings
    proc: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def gateway(settings: Settings) -> Iterator[Gateway]:
    """``ordergate serve`` as a real process on a free port, up once /healthz answers."""
    settings = settings.replace(port=free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}
    env.update(settings.to_env())
    url = f"http://127.0.0.1:{settings.port}"
    # stderr goes to a file, not a pipe: nobody reads it while the test runs, and a full pipe
    # would block the gateway's logging
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ordergate", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_healthy(proc, url, log)
            yield Gateway(url, settings, proc)
        finally:
            _stop(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log: IO[bytes]) -> None:
    deadline = time.monotonic() + 30
    with httpx.Client(timeout=1.0) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if http.get(f"{url}/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # readiness polling of another process, not test synchronisation
    _stop(proc)
    log.seek(0)
    output = log.read().decode(errors="replace")
    pytest.fail(f"the gateway did not answer /healthz at {url}:\n{output}", pytrace=False)


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go (kept by pytest under its basetemp for a look afterwards)."""
    path = tmp_path / "screenshots"
    path.mkdir()
    return path


@pytest.fixture
def storefront() -> Iterator[Callable[[str], str]]:
    """A storefront on another origin (a second loopback port): ``serve(html)`` gives its URL.

    A real server, not a Playwright route: Chromium refuses to let a page it takes for public
    (as routed pages are) frame a loopback address (Local Network Access)."""
    pages: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages[-1] if pages else b""
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="storefront", daemon=True)
    thread.start()

    def serve(html: str) -> str:
        pages.append(html.encode())
        return f"http://127.0.0.1:{server.server_address[1]}/checkout"

    try:
        yield serve
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)

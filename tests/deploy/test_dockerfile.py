"""The Dockerfile, read (no Docker engine here): an init as PID 1, a user other than root, a
HEALTHCHECK on a route the gateway serves (and the check itself run against a stand-in
server), and COPY lines that bring in every package directory the wheel is built from."""

from __future__ import annotations

import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from ordergate.settings import Settings
from tests.deploy.deployfiles import ROOT, dockerfile, exec_form, gateway_routes

INSTRUCTIONS = dockerfile()


def _all(name: str) -> list[str]:
    return [rest for instruction, rest in INSTRUCTIONS if instruction == name]


def _healthcheck() -> list[str]:
    (rest,) = _all("HEALTHCHECK")
    options, _, command = rest.partition(" CMD ")
    assert all(o.startswith("--") for o in options.split()), options
    return exec_form(command)


def test_tini_is_the_entrypoint_and_comes_from_debian() -> None:
    (entrypoint,) = _all("ENTRYPOINT")
    assert exec_form(entrypoint) == ["tini", "--"]
    installs = [r for r in _all("RUN") if "apt-get install" in r]
    assert any(" tini" in r for r in installs), "tini is not installed"
    assert exec_form(_all("CMD")[-1])[0] == "ordergate"


def test_it_runs_as_a_user_other_than_root() -> None:
    (user,) = _all("USER")
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    assert any("useradd" in r and f" {user}" in r for r in _all("RUN")), "the user is not made"
    # One USER, after the install: the installed code is root's, and the process cannot change it.
    names = [i for i, _ in INSTRUCTIONS]
    assert names.index("USER") > max(i for i, n in enumerate(names) if n in ("RUN", "COPY"))


def test_the_healthcheck_asks_a_route_the_gateway_serves() -> None:
    argv = _healthcheck()
    assert argv[:2] == ["python", "-c"]
    m = re.search(r"'http://127\.0\.0\.1:%s(/[\w/]*)'", argv[2])
    assert m, argv[2]
    routes = gateway_routes()
    assert m[1] in routes and "GET" in routes[m[1]], f"the gateway does not serve GET {m[1]}"
    assert f"or '{Settings().port}'" in argv[2], "the default port is the gateway's"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" and self.server.healthy else 503)  # type: ignore[attr-defined]
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    server.healthy = True  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _check(port: int | None) -> int:
    argv = _healthcheck()
    env = {k: v for k, v in os.environ.items() if k != "ORDERGATE_PORT"}
    if port is not None:
        env["ORDERGATE_PORT"] = str(port)
    done = subprocess.run(
        [sys.executable, *argv[1:]], env=env, capture_output=True, timeout=30, check=False
    )
    return done.returncode


def test_the_healthcheck_passes_on_200_and_fails_otherwise(
    stand_in: http.server.HTTPServer,
) -> None:
    port = stand_in.server_address[1]
    assert _check(port) == 0
    stand_in.healthy = False  # type: ignore[attr-defined]
    assert _check(port) != 0
    with socket.socket() as s:  # a port nothing listens on: refused, not a hang
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert _check(closed) != 0


def test_the_image_gets_every_package_directory_and_the_files_pip_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied: dict[str, str] = {}
    for rest in _all("COPY"):
        *sources, target = rest.split()
        for source in sources:
            copied[source] = target
    tool = pyproject["tool"]["setuptools"]
    # The package directories carry their data (Lua, static pages, SQL) with them.
    needed = set(tool["package-dir"].values()) | {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed <= set(copied), needed - set(copied)
    for package, patterns in tool["package-data"].items():
        folder = ROOT / tool["package-dir"][package]
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: nothing matches {pattern}"
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not needed & ignored, needed & ignored
    for source in needed:
        assert (ROOT / source).exists(), source
    assert Path(copied["pyproject.toml"]) == Path("./")

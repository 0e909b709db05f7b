"""`ordergate up` as a user runs it: embedded servers, an order into Postgres, a clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from ordergate.servers import free_port
from tests.conftest import eventually, order_body

COMMANDS = [
    [],
    ["up"],
    ["serve"],
    ["work"],
    ["migrate"],
    ["keys"],
    ["keys", "create"],
    ["keys", "list"],
    ["keys", "revoke"],
    ["dlq"],
    ["dlq", "list"],
    ["dlq", "replay"],
]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "ordergate")
def test_every_command_has_help(command: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ordergate", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert out.returncode == 0 and "usage: ordergate" in out.stdout


async def _until_ready(http: httpx.AsyncClient) -> None:
    async def ready() -> bool:
        try:
            return (await http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await eventually(ready, timeout=60, interval=0.1)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ordergate", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


async def _run_up_once(
    cwd: Path, port: int, storefront_order_id: str
) -> tuple[str, list[int], str]:
    """Start `up`, create a key, admit one order, wait for its commit, stop with Ctrl-C."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ordergate", "up", "--port", str(port), "--workers", "2"],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:
            await _until_ready(http)
            runtime = json.loads((cwd / ".ordergate" / "runtime.json").read_text())
            created = _cli(cwd, "keys", "create", "shop-up")
            assert created.returncode == 0, created.stderr
            key = created.stdout.strip()
            headers = {"Authorization": f"Bearer {key}"}
            r = await http.post("/v1/orders", json=order_body(storefront_order_id), headers=headers)
            assert r.status_code == 202, r.text
            url = r.json()["status_url"]

            async def committed() -> bool:
                return (await http.get(url, headers=headers)).json()["status"] == "committed"

            await eventually(committed, timeout=30)
            # Secrets at rest: the data dir and the AOF's dir are the owner's alone; the
            # embedded Valkey wants the password kept beside runtime.json.
            data = cwd / ".ordergate"
            assert data.stat().st_mode & 0o766 == 0o700  # others may traverse (Postgres), not list
            assert (data / "valkey").stat().st_mode & 0o777 == 0o700
            for secret in ("runtime.json", "valkey-password", "admin-token"):
                assert (data / secret).stat().st_mode & 0o777 == 0o600, secret
            password = (data / "valkey-password").read_text().strip()
            assert f":{password}@" in runtime["redis_url"]
            port = int(runtime["redis_url"].rsplit(":", 1)[1].split("/")[0])
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET og:ticket-secret\r\n")
                assert sock.recv(200).startswith(b"-NOAUTH"), "Valkey answered without a password"
            # The operators' endpoints: `up` made an admin token, readable by its owner only.
            token_file = cwd / ".ordergate" / "admin-token"
            assert token_file.stat().st_mode & 0o777 == 0o600
            token = token_file.read_text().strip()
            assert (await http.get("/v1/ops/status")).status_code == 401
            ops = await http.get("/v1/ops/status", headers={"Authorization": f"Bearer {token}"})
            assert ops.status_code == 200 and ops.json()["settled"] >= 1
        children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert len(children) >= 4  # valkey, postgres, gateway, 2 workers
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        output, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, output
        return runtime["database_url"], children, output.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_up_serves_an_order_into_postgres_and_stops_cleanly(tmp_path: Path) -> None:
    _, children, output = await _run_up_once(tmp_path, free_port(), "up-1")
    assert "ordergate is up" in output
    assert f"want the admin token in {tmp_path / '.ordergate' / 'admin-token'}" in output
    assert not [
        pid
        for pid in children
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ], "orphan processes"
    assert not (tmp_path / ".ordergate" / "runtime.json").exists()
    assert (tmp_path / ".ordergate" / "valkey" / "appendonlydir").is_dir()

    # data is kept: a second `up` on the same directory still has the first order
    await _run_up_once(tmp_path, free_port(), "up-2")
    migrate = _cli(tmp_path, "migrate")  # no `up` running: the command starts servers itself
    assert migrate.returncode == 0, migrate.stderr
    assert "schema is up to date" in migrate.stdout
    listed = _cli(tmp_path, "keys", "list")
    assert listed.stdout.count("shop-up") == 2
    from ordergate.servers import EmbeddedPostgres

    pg = EmbeddedPostgres(tmp_path / ".ordergate")
    url = pg.start()
    try:
        conn = await asyncpg.connect(url)
        rows = await conn.fetch("SELECT storefront_order_id FROM orders ORDER BY 1")
        await conn.close()
    finally:
        pg.stop()
    assert [r["storefront_order_id"] for r in rows] == ["up-1", "up-2"]


def test_a_second_up_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    from ordergate.runtime import data_dir_lock

    with data_dir_lock(tmp_path / ".ordergate"):
        out = _cli(tmp_path, "up", "--port", str(free_port()))
    assert out.returncode == 2 and "in use" in out.stderr


async def test_up_with_configured_urls_starts_no_servers(tmp_path: Path, servers) -> None:
    """ORDERGATE_REDIS_URL / ORDERGATE_DATABASE_URL set: `up` runs gateway and workers only."""
    port = free_port()
    env = {
        **_env(),
        "ORDERGATE_REDIS_URL": servers.redis_url,
        "ORDERGATE_DATABASE_URL": servers.database_url,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "ordergate", "up", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            await _until_ready(http)
        names = {c.name() for c in psutil.Process(proc.pid).children(recursive=True)}
        assert not {"valkey-server", "postgres"} & names
        assert not (tmp_path / ".ordergate" / "valkey").exists()
        assert not (tmp_path / ".ordergate" / "postgres").exists()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_settings_refuse_typos_but_not_tooling_variables() -> None:
    from ordergate.errors import ConfigError
    from ordergate.settings import Settings

    env = {
        "ORDERGATE_API_KEY": "og_x",
        "ORDERGATE_TEST_REDIS_URL": "redis://x",
        "ORDERGATE_SHARDS": "4",
    }
    assert Settings.load(environ=env).shards == 4
    with pytest.raises(ConfigError, match="ORDERGATE_DRAN_RATE"):
        Settings.load(environ={"ORDERGATE_DRAN_RATE": "5"})
    with pytest.raises(ConfigError, match="ticket_secret"):
        Settings.load(environ={"ORDERGATE_TICKET_SECRET": "short"})

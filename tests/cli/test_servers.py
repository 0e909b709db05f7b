"""The embedded servers are ready when ``start`` returns, not merely listening, and the embedded
Valkey runs with the ``valkey_maxmemory`` setting."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from ordergate.errors import ConfigError
from ordergate.runtime import read_runtime, resolved
from ordergate.servers import (
    AUTO_MAXMEMORY_SHARE,
    MIB,
    EmbeddedValkey,
    auto_maxmemory,
    free_port,
    machine_memory,
)
from ordergate.settings import Settings, parse_valkey_maxmemory
from tests.conftest import eventually, make_settings


def test_valkey_restarted_on_a_large_data_set_answers_as_soon_as_start_returns(
    tmp_path: Path,
) -> None:
    """Injects: a restart on a ~40 MB append-only file, which Valkey loads after opening its
    port (commands meanwhile get LOADING). Audits: the first command after start() succeeds."""
    server = EmbeddedValkey(tmp_path)
    url = server.start()
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    value = b"x" * 100
    for i in range(300_000):
        pipe.set(f"k{i}", value)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    client.close()
    server.stop()
    server.start()
    try:
        client = redis.Redis.from_url(url)
        assert client.dbsize() == 300_000  # BusyLoadingError here before the fix
        client.close()
    finally:
        server.stop()


# valkey_maxmemory: the embedded Valkey's limit, which the gateway's memory guard measures against


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", None),
        (" AUTO ", None),
        ("0", 0),
        (0, 0),
        ("536870912", 512 * MIB),
        (536870912, 512 * MIB),
        ("512mb", 512 * MIB),
        ("512 MB", 512 * MIB),
        ("2gb", 2 * 1024**3),
        ("4096kb", 4 * MIB),
        ("2m", 2_000_000),  # valkey.conf's units: k, m, g are 1000-based
        ("1g", 10**9),
        ("1mb", MIB),
    ],
)
def test_valkey_maxmemory_parses_sizes_like_valkey_conf(value: str | int, expected: int) -> None:
    assert parse_valkey_maxmemory(value) == expected


@pytest.mark.parametrize(
    "value", ["", "lots", "-1", "1.5gb", "512tb", "mb", "512 mb extra", "1000", "1023kb", "1k"]
)
def test_a_bad_valkey_maxmemory_is_a_config_error(value: str) -> None:
    with pytest.raises(ValueError):
        parse_valkey_maxmemory(value)
    with pytest.raises(ConfigError, match=r"valkey_maxmemory: .*(not a size|below 1mb)"):
        Settings.load(environ={"ORDERGATE_VALKEY_MAXMEMORY": value or " "})


def test_valkey_maxmemory_comes_from_env_toml_and_defaults_to_auto(tmp_path: Path) -> None:
    assert Settings.load(environ={}).valkey_maxmemory == "auto"
    env = {"ORDERGATE_VALKEY_MAXMEMORY": "2gb"}
    assert Settings.load(environ=env).valkey_maxmemory == "2gb"
    toml = tmp_path / "og.toml"
    toml.write_text("[ordergate]\nvalkey_maxmemory = 0\n")
    assert Settings.load(environ={"ORDERGATE_CONFIG": str(toml)}).valkey_maxmemory == 0
    # `up` hands it to its children through the environment, unchanged
    assert Settings.load(environ=env).to_env()["ORDERGATE_VALKEY_MAXMEMORY"] == "2gb"


def test_auto_maxmemory_is_a_quarter_of_the_memory_in_whole_mib() -> None:
    assert AUTO_MAXMEMORY_SHARE == 0.25
    assert auto_maxmemory(16 * 1024**3) == 4 * 1024**3
    assert auto_maxmemory(1000 * MIB + 3) == 250 * MIB
    assert auto_maxmemory(1001 * MIB) == 250 * MIB  # 250.25 MiB, rounded down
    assert auto_maxmemory(MIB) == MIB  # never below 1 MiB (never "no limit")
    assert auto_maxmemory() == int(machine_memory() * 0.25) // MIB * MIB


def test_machine_memory_is_the_ram_or_a_lower_cgroup_limit(tmp_path: Path) -> None:
    ram = int(psutil.virtual_memory().total)
    assert machine_memory(tmp_path) == ram  # no cgroup files
    (tmp_path / "memory.max").write_text("max\n")  # cgroup v2, unlimited
    assert machine_memory(tmp_path) == ram
    (tmp_path / "memory.max").write_text(f"{512 * MIB}\n")  # a container's --memory 512m
    assert machine_memory(tmp_path) == 512 * MIB
    (tmp_path / "memory.max").unlink()
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1
    assert machine_memory(tmp_path) == ram
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{MIB * 256}\n")
    assert machine_memory(tmp_path) == 256 * MIB


def _config(url: str) -> dict[str, str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        config: dict[str, str] = client.config_get("maxmemory*")
        return config
    finally:
        client.close()


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("24mb", 24 * MIB), ("50000000", 50_000_000), ("0", 0), ("auto", None)],
)
def test_the_runtimes_embedded_valkey_runs_with_valkey_maxmemory(
    tmp_path: Path, servers: Any, setting: str, expected: int | None
) -> None:
    """The path of `ordergate keys create` and friends with no `up` running: resolved() starts
    the embedded Valkey, which reports the setting in CONFIG GET (auto: the computed share)."""
    settings = make_settings(
        servers, redis_url=None, data_dir=str(tmp_path), valkey_maxmemory=setting
    )
    with resolved(settings) as live:
        assert live.redis_url is not None
        config = _config(live.redis_url)
    assert int(config["maxmemory"]) == (auto_maxmemory() if expected is None else expected)
    assert config["maxmemory-policy"] == "noeviction"


@pytest.mark.parametrize(("setting", "expected"), [(None, None), ("32mb", 32 * MIB)])
async def test_up_runs_its_embedded_valkey_with_valkey_maxmemory(
    tmp_path: Path, servers: Any, setting: str | None, expected: int | None
) -> None:
    """`ordergate up` as a user runs it (Postgres given, so only Valkey is embedded): by default
    ("auto") its Valkey runs with the computed share, with ORDERGATE_VALKEY_MAXMEMORY with that
    size; the supervisor's restart of a crashed Valkey keeps it."""
    expected = auto_maxmemory() if expected is None else expected
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDERGATE_")}
    env["ORDERGATE_DATABASE_URL"] = servers.database_url
    if setting is not None:
        env["ORDERGATE_VALKEY_MAXMEMORY"] = setting
    data = tmp_path / ".ordergate"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ordergate", "up", "--port", str(free_port()), "--workers", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        runtime = await eventually(lambda: read_runtime(data), timeout=60, interval=0.1)
        config = _config(runtime["redis_url"])
        assert int(config["maxmemory"]) == expected
        assert config["maxmemory-policy"] == "noeviction"
        first = _valkey_pid(proc.pid)
        assert first is not None
        os.kill(first, signal.SIGKILL)  # the supervisor restarts it, on the same port

        def restarted() -> dict[str, str] | None:
            if _valkey_pid(proc.pid) in (None, first):
                return None
            try:
                return _config(runtime["redis_url"])
            except (redis.ConnectionError, redis.BusyLoadingError):
                return None

        config = await eventually(restarted, timeout=60, interval=0.1)
        assert int(config["maxmemory"]) == expected
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        output = proc.communicate(timeout=90)[0].decode()
        assert proc.returncode == 0, output
        assert f"maxmemory {expected // MIB} MiB" in output  # the supervisor's log says it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _valkey_pid(supervisor_pid: int) -> int | None:
    for child in psutil.Process(supervisor_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name().startswith("valkey") and child.status() != psutil.STATUS_ZOMBIE:
                return int(child.pid)
    return None

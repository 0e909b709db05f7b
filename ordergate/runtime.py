"""Finding the servers: configured URLs, a running ``ordergate up``, or embedded ones just for now.

``ordergate up`` writes ``<data_dir>/runtime.json`` with the URLs of the servers it started, so
``ordergate keys create`` and friends in another terminal talk to the same servers. With no
``up`` running, those commands start the embedded servers on the same data directory for the
length of the command.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from ordergate.errors import CommandError
from ordergate.servers import EmbeddedPostgres, EmbeddedValkey, auto_maxmemory
from ordergate.settings import Settings, parse_valkey_maxmemory

RUNTIME_FILE = "runtime.json"
ADMIN_TOKEN_FILE = "admin-token"  # `up`'s admin token when none is configured (mode 0600)
VALKEY_PASSWORD_FILE = "valkey-password"  # the embedded Valkey's requirepass (mode 0600)
LOCK_FILE = "lock"


def read_runtime(data_dir: Path) -> dict[str, str] | None:
    """The URLs of a live ``ordergate up`` on ``data_dir``, or None."""
    try:
        info = json.loads((data_dir / RUNTIME_FILE).read_text())
        os.kill(int(info["pid"]), 0)
        return {
            "pid": str(info["pid"]),
            "redis_url": info["redis_url"],
            "database_url": info["database_url"],
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_runtime(data_dir: Path, redis_url: str, database_url: str) -> None:
    tmp = data_dir / (RUNTIME_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # its URLs hold passwords
    with os.fdopen(fd, "w") as out:
        out.write(
            json.dumps({"pid": os.getpid(), "redis_url": redis_url, "database_url": database_url})
        )
    tmp.replace(data_dir / RUNTIME_FILE)


def admin_token(data_dir: Path) -> str:
    """The data dir's admin token, made (256 random bits, readable by its owner only) the first
    time: the operators' endpoints are off without one, and `up` should not start with them
    unreachable, nor open."""
    return _secret_file(data_dir, ADMIN_TOKEN_FILE)


def _secret_file(data_dir: Path, name: str) -> str:
    """A secret kept in the data dir (mode 0600), made the first time it is asked for."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def clear_runtime(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / RUNTIME_FILE).unlink()


def embedded_valkey(settings: Settings) -> EmbeddedValkey:
    """The embedded Valkey of ``settings`` (not started): on its data dir, with the maxmemory
    its ``valkey_maxmemory`` names (``auto``: ordergate.servers.auto_maxmemory)."""
    maxmemory = parse_valkey_maxmemory(settings.valkey_maxmemory)
    return EmbeddedValkey(
        settings.data_path,
        maxmemory=auto_maxmemory() if maxmemory is None else maxmemory,
        password=_secret_file(settings.data_path, VALKEY_PASSWORD_FILE),
    )


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[IO[str]]:
    """Exclusive use of a data directory (two servers on one AOF or PGDATA would corrupt it)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # Its servers' data, their password and the admin token: the owner's alone. Others keep
    # only the x bit, if they had it: embedded Postgres runs as its own user when we are root.
    data_dir.chmod(0o700 | (data_dir.stat().st_mode & 0o011))
    with open(data_dir / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CommandError(
                f"{data_dir} is in use by another ordergate process (is `ordergate up` running?)"
            ) from None
        yield handle


@contextlib.contextmanager
def resolved(settings: Settings) -> Iterator[Settings]:
    """Settings whose redis_url and database_url point at servers that are up."""
    if not settings.embedded:
        yield settings
        return
    data_dir = settings.data_path
    live = read_runtime(data_dir)
    if live is not None:
        yield settings.replace(
            redis_url=settings.redis_url or live["redis_url"],
            database_url=settings.database_url or live["database_url"],
        )
        return
    with data_dir_lock(data_dir):
        valkey = embedded_valkey(settings) if settings.redis_url is None else None
        postgres = EmbeddedPostgres(data_dir) if settings.database_url is None else None
        try:
            redis_url = valkey.start() if valkey else settings.redis_url
            database_url = postgres.start() if postgres else settings.database_url
            yield settings.replace(redis_url=redis_url, database_url=database_url)
        finally:
            if postgres:
                postgres.stop()
            if valkey:
                valkey.stop()

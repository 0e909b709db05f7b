"""``ordergate up``: servers, schema, gateway and workers, supervised until Ctrl-C.

Children run in their own sessions, so a terminal's Ctrl-C reaches only the supervisor, which
then stops them in dependency order: gateway first (no new orders), workers next (they finish
the batch in flight), Postgres, Valkey last (it fsyncs its AOF). A child that dies is restarted
with backoff; if the supervisor itself is killed, PR_SET_PDEATHSIG stops every child.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ordergate import metricsdir
from ordergate.buffer.connection import connect_redis, is_cluster
from ordergate.buffer.keys import Keys
from ordergate.buffer.streams import ensure_streams
from ordergate.runtime import (
    ADMIN_TOKEN_FILE,
    VALKEY_PASSWORD_FILE,
    admin_token,
    clear_runtime,
    data_dir_lock,
    embedded_valkey,
    write_runtime,
)
from ordergate.servers import MIB, EmbeddedPostgres, EmbeddedValkey, die_with_parent
from ordergate.settings import Settings
from ordergate.sharding.databases import redacted
from ordergate.workers.migrate import migrate_all

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    def stop(self, timeout: float) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs; killing it", self.name, timeout)
            self.proc.kill()
            self.proc.wait()


class Supervisor:
    def __init__(self, settings: Settings, *, gateway: bool = True, migrate: bool = True) -> None:
        self.settings = settings
        self.with_gateway = gateway
        self.with_migrate = migrate
        self.data_dir: Path = settings.data_path
        self.valkey: EmbeddedValkey | None = None
        self.postgres: EmbeddedPostgres | None = None
        self.gateway: Child | None = None
        self.workers: list[Child] = []
        self._stopping = False

    def run(self) -> int:
        with data_dir_lock(self.data_dir):
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, self._on_signal)
            try:
                settings = self._start_servers()
                if self.with_gateway:  # `up`: the host's processes share one metrics dir
                    settings = metricsdir.fresh(settings)
                    if settings.admin_token is None:
                        settings = settings.replace(admin_token=admin_token(self.data_dir))
                if self.with_migrate:
                    self._prepare(settings)
                write_runtime(self.data_dir, settings.redis_url or "", settings.database_url or "")
                self._start_processes(settings)
                if self.with_gateway:
                    self._banner(settings)
                self._watch()
            finally:
                self._shutdown()
                clear_runtime(self.data_dir)
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        if not self._stopping:
            log.info("received %s; stopping", signal.Signals(signum).name)
        self._stopping = True

    def _start_servers(self) -> Settings:
        s = self.settings
        redis_url, database_url = s.redis_url, s.database_url
        if redis_url is None:
            self.valkey = embedded_valkey(s)
            redis_url = self.valkey.start()
            limit = self.valkey.maxmemory
            log.info(
                "embedded Valkey on %s (AOF fsync always, maxmemory %s, password in %s) in %s",
                _without_password(redis_url),
                f"{limit // MIB} MiB" if limit else "unlimited",
                self.data_dir / VALKEY_PASSWORD_FILE,
                self.valkey.dir,
            )
        if database_url is None:
            self.postgres = EmbeddedPostgres(self.data_dir)
            database_url = self.postgres.start()
            log.info("embedded PostgreSQL on %s in %s", database_url, self.postgres.dir)
        return s.replace(redis_url=redis_url, database_url=database_url)

    @staticmethod
    def _prepare(settings: Settings) -> None:
        async def prepare() -> None:
            for line in await migrate_all(
                settings.database_urls, settings.shards, settings.key_prefix
            ):
                log.info("migrate: %s", line)
            redis = await connect_redis(settings.redis_url or "")
            try:
                keys = Keys(settings.key_prefix, is_cluster(redis))
                await ensure_streams(redis, keys, settings.shards)
            finally:
                await redis.aclose()

        asyncio.run(prepare())

    def _start_processes(self, settings: Settings) -> None:
        env = {**os.environ, **settings.to_env()}
        exe = [sys.executable, "-m", "ordergate"]
        if self.with_gateway:
            self.gateway = Child("gateway", [*exe, "serve"], env)
            self.gateway.start()
        for i in range(settings.workers):
            child = Child(f"worker-{i}", [*exe, "work", "--worker-index", str(i)], env)
            child.start()
            self.workers.append(child)

    def _banner(self, settings: Settings) -> None:
        print(
            f"\nordergate is up: http://{settings.host}:{settings.port}  "
            f"({settings.processes} gateway process(es), {settings.workers} worker(s), "
            f"{settings.shards} shards)\n"
            f"  data:      {self.data_dir}\n"
            f"  redis:     {_without_password(settings.redis_url)}\n"
            f"  postgres:  {' '.join(map(redacted, settings.database_urls))}\n"
            f"  API key:   ordergate keys create <storefront-id>   (in another terminal)\n"
            f"  operators: /dashboard, /v1/ops/*, /metrics want the admin token"
            + (
                f" in {self.data_dir / ADMIN_TOKEN_FILE}\n"
                if self.settings.admin_token is None
                else " (configured)\n"
            )
            + "  stop:      Ctrl-C\n",
            flush=True,
        )

    def _watch(self) -> None:
        while not self._stopping:
            for child in [c for c in (self.gateway, *self.workers) if c is not None]:
                self._check_child(child)
            for server in (self.valkey, self.postgres):
                if server is not None and not server.running() and not self._stopping:
                    log.error(
                        "embedded %s died (exit %s); restarting it",
                        type(server).__name__,
                        server.proc.returncode if server.proc else None,
                    )
                    try:
                        server.start()
                    except Exception:
                        log.exception("restart failed")
            time.sleep(0.2)

    def _check_child(self, child: Child) -> None:
        if child.proc is None or child.proc.poll() is None:
            return
        now = time.monotonic()
        if child.next_start == 0.0:
            if now - child.started_at > 30:
                child.restarts = 0  # it had run fine for a while: no backoff
            delay = min(30.0, 0.5 * 2**child.restarts)
            log.error(
                "%s exited with %s; restarting in %.1fs", child.name, child.proc.returncode, delay
            )
            child.next_start = now + delay
        elif now >= child.next_start:
            child.restarts += 1
            child.next_start = 0.0
            child.start()

    def _shutdown(self) -> None:
        if self.gateway:
            self.gateway.stop(timeout=15)
        for child in self.workers:
            if child.proc and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in self.workers:
            child.stop(timeout=30)
        if self.postgres:
            self.postgres.stop()
        if self.valkey:
            self.valkey.stop()
        log.info("stopped; data kept in %s", self.data_dir)


def _without_password(url: str | None) -> str:
    """A server URL as it may be printed: its password replaced by ***."""
    parts = urlsplit(url or "")
    if parts.password is None:
        return url or ""
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit(parts._replace(netloc=netloc))

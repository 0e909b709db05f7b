"""One frozen settings object per process, built from ``ORDERGATE_*`` env vars and a TOML file.

Precedence (highest first): explicit overrides (CLI flags, tests) > environment > TOML file >
defaults. The TOML file is ``ORDERGATE_CONFIG`` if set, else ``./ordergate.toml`` if present;
keys are the field names below, at top level or under an ``[ordergate]`` table.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from ordergate.errors import ConfigError
from ordergate.sharding.databases import parse_database_urls

ENV_PREFIX = "ORDERGATE_"

# The admission barrier (see the README's Durability section). "auto": as "aof-always" while
# each batch's CONFIG GET sees appendonly yes + appendfsync always, else as "fsync" (WAITAOF).
Durability = Literal["auto", "fsync", "aof-always", "replica", "none"]


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Every knob of ordergate; see the README's configuration table."""

    # Where the servers are; None means "start embedded ones under data_dir". database_url may
    # list several PostgreSQL URLs separated by spaces: the shards split over them in order
    # (sharding.databases).
    redis_url: str | None = None
    database_url: str | None = None
    data_dir: str = ".ordergate"
    # maxmemory of the embedded Valkey: "auto" (a share of the machine's memory), a size such
    # as "512mb", or bytes; 0: no limit. See parse_valkey_maxmemory.
    valkey_maxmemory: int | str = "auto"

    # Buffer pool
    shards: int = 8
    durability: Durability = "auto"
    durability_timeout_ms: int = 1000
    max_buffered: int = 1_000_000
    memory_guard: float = 0.9
    key_prefix: str = "og"
    # Storefronts (README Fairness): a storefront without a limit of its own may send
    # storefront_rate orders/s with storefront_burst at once (0: no limit; a burst of 0 is one
    # second of the rate). Past max_buffered * (1 - storefront_reserve), a storefront holding
    # its share of the buffer (max_buffered / storefronts with orders buffered) gets 429.
    storefront_rate: float = 0.0
    storefront_burst: int = 0
    storefront_reserve: float = 0.1
    metrics_storefronts: int = 10  # storefronts named in metrics (<= 20); the rest are "other"

    # Gateway
    host: str = "127.0.0.1"
    port: int = 8000
    processes: int = 1
    max_body_bytes: int = 65536
    header_timeout_s: float = 10.0  # request line + headers, from the request's first byte
    body_timeout_s: float = 10.0  # the body, from the end of the headers
    max_header_bytes: int = 16384  # request line + headers
    max_headers: int = 100
    max_connections: int = 4096  # per gateway process; beyond it, 503
    sse_per_ticket: int = 4  # open event streams of one ticket, per gateway process
    sse_streams: int = 1000  # open event streams per gateway process
    sse_max_s: float = 3600.0  # a stream's lifetime (EventSource reconnects)
    admission_timeout_ms: int = 2000
    admission_max_batch: int = 256
    admission_max_inflight_batches: int = 2
    inflight_lease_ms: int = 10000
    status_ttl_s: int = 7 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600  # the usual window of payment APIs' idempotency keys
    deadletter_retention_s: int = 30 * 24 * 3600  # 0: dead letters are kept until replayed
    auth_cache_s: float = 5.0
    public_url: str | None = None
    ticket_secret: str | None = None
    ticket_ttl_s: int = 3600
    drain_stale_s: float = 5.0

    # Workers
    workers: int = 2
    drain_rate: float = 0.0
    batch_size: int = 500
    read_block_ms: int = 1000
    max_deliveries: int = 5
    pg_pool_size: int = 4
    retry_backoff_max_s: float = 5.0
    health_ttl_s: int = 10

    # Circuit breakers (every non-critical step; now: each storefront's webhook)
    breaker_slow_ms: int = 500
    breaker_window: int = 20
    breaker_minimum_calls: int = 5
    breaker_failure_rate: float = 0.5
    breaker_slow_rate: float = 0.5
    breaker_open_s: float = 5.0

    # Notifications (webhooks)
    notify_timeout_ms: int = 5000
    notify_concurrency: int = 16
    notify_backoff_max_s: float = 60.0
    notify_give_up_s: float = 24 * 3600.0
    notify_max_held: int = 10_000
    webhook_allow_private: bool = False  # tests and private networks: loopback, 10/8, http
    ops_port: int = 0  # /v1/ops/*, /dashboard and /metrics on a port of their own (0: off)
    admin_token: str | None = None

    # Metrics (Prometheus)
    metrics_dir: str | None = None  # prometheus_client multiprocess dir; up: <data_dir>/metrics
    worker_metrics_port: int = 0  # a worker's own /metrics port (0: off)

    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= 1024:
            raise ConfigError("shards must be between 1 and 1024")
        if min(self.header_timeout_s, self.body_timeout_s) <= 0:
            raise ConfigError("header_timeout_s and body_timeout_s must be positive")
        if self.max_header_bytes < 1024 or self.max_headers < 8 or self.max_connections < 1:
            raise ConfigError(
                "max_header_bytes must be >= 1024, max_headers >= 8, max_connections >= 1"
            )
        if self.processes < 1 or self.workers < 1:
            raise ConfigError("processes and workers must be at least 1")
        if self.ticket_secret is not None and len(self.ticket_secret) < 16:
            raise ConfigError("ticket_secret must be at least 16 characters")
        if not 0 <= self.memory_guard <= 1:
            raise ConfigError("memory_guard must be between 0 and 1 (0 = off)")
        if self.ticket_ttl_s < 1 or self.drain_stale_s <= 0:
            raise ConfigError("ticket_ttl_s and drain_stale_s must be positive")
        if self.max_deliveries < 1:
            raise ConfigError("max_deliveries must be at least 1")
        if not (0 <= self.storefront_rate <= 1_000_000 and self.storefront_burst >= 0):
            raise ConfigError("storefront_rate must be in [0, 1e6] and storefront_burst >= 0")
        if not 0 <= self.storefront_reserve < 1 or not 0 <= self.metrics_storefronts <= 20:
            raise ConfigError("storefront_reserve must be in [0, 1), metrics_storefronts 0-20")
        if self.drain_rate < 0:
            raise ConfigError("drain_rate must be >= 0 (0 = unlimited)")
        if not (0 < self.breaker_failure_rate <= 1 and 0 < self.breaker_slow_rate <= 1):
            raise ConfigError("breaker_failure_rate and breaker_slow_rate must be in (0, 1]")
        if self.breaker_minimum_calls < 1 or self.breaker_window < self.breaker_minimum_calls:
            raise ConfigError("breaker_window must be >= breaker_minimum_calls >= 1")
        if min(self.breaker_slow_ms, self.notify_timeout_ms, self.notify_concurrency) < 1:
            raise ConfigError("breaker_slow_ms, notify_timeout_ms, notify_concurrency must be >= 1")
        if self.breaker_open_s <= 0 or self.notify_give_up_s <= 0:
            raise ConfigError("breaker_open_s and notify_give_up_s must be positive")
        if not 0 <= self.worker_metrics_port <= 65535:
            raise ConfigError("worker_metrics_port must be a port number (0 = off)")
        if min(self.idempotency_ttl_s, self.status_ttl_s) < 1 or self.deadletter_retention_s < 0:
            raise ConfigError(
                "idempotency_ttl_s and status_ttl_s must be positive, deadletter_retention_s >= 0"
            )
        if self.read_block_ms < 1 or self.batch_size < 1:
            raise ConfigError("read_block_ms and batch_size must be at least 1")
        try:
            parse_valkey_maxmemory(self.valkey_maxmemory)
        except ValueError as exc:
            raise ConfigError(f"valkey_maxmemory: {exc}") from None
        if self.database_url is not None:
            try:
                parse_database_urls(self.database_url, self.shards)
            except ValueError as exc:
                raise ConfigError(f"database_url: {exc}") from None

    @property
    def database_urls(self) -> tuple[str, ...]:
        """The databases of ``database_url``, in the deployment's order (none while unset)."""
        if self.database_url is None:
            return ()
        return parse_database_urls(self.database_url, self.shards)

    @property
    def embedded(self) -> bool:
        """True when at least one server must be started by ordergate itself."""
        return self.redis_url is None or self.database_url is None

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return msgspec.structs.replace(self, **changes)

    @classmethod
    def load(
        cls, overrides: dict[str, Any] | None = None, environ: dict[str, str] | None = None
    ) -> Settings:
        """Build the settings from file, environment and explicit overrides."""
        env = os.environ if environ is None else environ
        merged: dict[str, Any] = {}
        merged.update(_read_toml(env))
        fields = {f.name for f in msgspec.structs.fields(cls)}
        for key, value in env.items():
            if key.startswith(ENV_PREFIX) and not _is_tooling_variable(key):
                name = key[len(ENV_PREFIX) :].lower()
                if name not in fields:
                    raise ConfigError(f"unknown setting {key}")
                merged[name] = value if value != "" else None
        merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return msgspec.convert(merged, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid configuration: {exc}") from exc

    def to_env(self) -> dict[str, str]:
        """The environment that makes a child process load exactly these settings."""
        env: dict[str, str] = {}
        for name, value in msgspec.structs.asdict(self).items():
            if value is None:
                continue
            env[ENV_PREFIX + name.upper()] = (
                str(value).lower() if isinstance(value, bool) else str(value)
            )
        return env

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
}
_SIZE = re.compile(r"([0-9]+)\s*([a-z]*)")


def parse_valkey_maxmemory(value: str | int) -> int | None:
    """The embedded Valkey's maxmemory in bytes for a ``valkey_maxmemory`` setting, or None for
    ``"auto"`` (the server decides at start: ordergate.servers.auto_maxmemory). A size is bytes
    or a number with valkey.conf's units: ``kb``/``mb``/``gb`` are 1024-based, ``k``/``m``/``g``
    1000-based. ``0`` is no limit; any other size must be at least 1mb (below that Valkey would
    refuse every write). ValueError for anything else."""
    text = str(value).strip().lower()
    if text == "auto":
        return None
    match = _SIZE.fullmatch(text)
    if match is None or match[2] not in _SIZE_UNITS:
        raise ValueError(
            f"{value!r} is not a size: use 'auto', 0 (no limit), bytes, or a whole number "
            "with kb, mb or gb (as '512mb')"
        )
    size = int(match[1]) * _SIZE_UNITS[match[2]]
    if 0 < size < 1024**2:
        raise ValueError(f"{value!r} is below 1mb; use at least 1mb, or 0 for no limit")
    return size


def _is_tooling_variable(key: str) -> bool:
    """ORDERGATE_* variables that are not settings: the config path, the load tests' API key
    and the test suite's server URLs. Any other unknown ORDERGATE_* name is a typo: refused."""
    return key in (ENV_PREFIX + "CONFIG", ENV_PREFIX + "API_KEY") or key.startswith(
        ENV_PREFIX + "TEST_"
    )


def _read_toml(env: Any) -> dict[str, Any]:
    path_str = env.get(ENV_PREFIX + "CONFIG")
    path = Path(path_str) if path_str else Path("ordergate.toml")
    if not path.exists():
        if path_str:
            raise ConfigError(f"config file {path} does not exist")
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    table = data.get("ordergate", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [ordergate] must be a table")
    return dict(table)

"""The shell builds each component's frozen config from the one Settings object; components
never see Settings (nor import the shell)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ordergate.buffer.admission import AdmissionConfig
from ordergate.errors import ConfigError
from ordergate.gateway.config import GatewayConfig
from ordergate.settings import Settings
from ordergate.workers.breaker import BreakerConfig
from ordergate.workers.config import WorkerConfig

if TYPE_CHECKING:
    from ordergate.gateway.app import GatewayApp


def gateway_config(s: Settings) -> GatewayConfig:
    if not s.redis_url:
        raise ConfigError("the gateway needs ORDERGATE_REDIS_URL (ordergate up sets it)")
    return GatewayConfig(
        redis_url=s.redis_url,
        database_url=s.database_url,
        key_prefix=s.key_prefix,
        shards=s.shards,
        admission=AdmissionConfig(
            shards=s.shards,
            durability=s.durability,
            durability_timeout_ms=s.durability_timeout_ms,
            timeout_s=s.admission_timeout_ms / 1000,
            max_batch=s.admission_max_batch,
            max_inflight_batches=s.admission_max_inflight_batches,
            lease_ms=s.inflight_lease_ms,
            max_buffered=s.max_buffered,
        ),
        max_body_bytes=s.max_body_bytes,
        memory_guard=s.memory_guard,
        auth_cache_s=s.auth_cache_s,
        public_url=s.public_url,
        ticket_secret=s.ticket_secret,
        ticket_ttl_s=s.ticket_ttl_s,
        drain_stale_s=s.drain_stale_s,
        admin_token=s.admin_token,
        metrics_dir=s.metrics_dir,
        pg_pool_size=s.pg_pool_size,
    )


def worker_config(s: Settings) -> WorkerConfig:
    if not (s.redis_url and s.database_url):
        raise ConfigError("a worker needs ORDERGATE_REDIS_URL and ORDERGATE_DATABASE_URL")
    return WorkerConfig(
        redis_url=s.redis_url,
        database_url=s.database_url,
        key_prefix=s.key_prefix,
        shards=s.shards,
        drain_rate=s.drain_rate,
        batch_size=s.batch_size,
        read_block_ms=s.read_block_ms,
        max_deliveries=s.max_deliveries,
        retry_backoff_max_s=s.retry_backoff_max_s,
        status_ttl_s=s.status_ttl_s,
        idempotency_ttl_s=s.idempotency_ttl_s,
        deadletter_retention_s=s.deadletter_retention_s,
        health_ttl_s=s.health_ttl_s,
        breaker=BreakerConfig(
            slow_call_s=s.breaker_slow_ms / 1000,
            call_timeout_s=s.notify_timeout_ms / 1000,
            window=s.breaker_window,
            minimum_calls=s.breaker_minimum_calls,
            failure_rate=s.breaker_failure_rate,
            slow_rate=s.breaker_slow_rate,
            open_s=s.breaker_open_s,
        ),
        notify_timeout_s=s.notify_timeout_ms / 1000,
        notify_concurrency=s.notify_concurrency,
        notify_backoff_max_s=s.notify_backoff_max_s,
        notify_give_up_s=s.notify_give_up_s,
        notify_max_held=s.notify_max_held,
    )


def gateway_app() -> GatewayApp:
    """uvicorn's factory in each gateway process: the settings come from the environment that
    ``ordergate serve`` exported. Imported here, not above: the app's metrics must not be
    registered in a worker process, which builds its config from this module too."""
    from ordergate.gateway.app import create_app

    return create_app(gateway_config(Settings.load()))

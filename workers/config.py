"""What a worker process needs to know, frozen; the shell builds it from its settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ordergate.workers.breaker import BreakerConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    redis_url: str
    database_urls: tuple[str, ...]  # lane k writes to database_of(k, len(...), shards)
    key_prefix: str = "og"
    shards: int = 8
    # The drain
    drain_rate: float = 0.0  # orders/s over the whole drain; 0 = no limit
    batch_size: int = 500
    read_block_ms: int = 1000
    max_deliveries: int = 5
    retry_backoff_max_s: float = 5.0
    status_ttl_s: int = 7 * 24 * 3600
    idempotency_ttl_s: int = 24 * 3600
    deadletter_retention_s: int = 30 * 24 * 3600
    health_ttl_s: int = 10
    # Notifications (webhooks), each destination behind its own breaker
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    notify_timeout_s: float = 5.0
    notify_concurrency: int = 16
    notify_backoff_max_s: float = 60.0
    notify_give_up_s: float = 24 * 3600.0
    notify_max_held: int = 10_000
    webhook_allow_private: bool = False

"""What a gateway process needs to know, frozen; the shell builds it from its settings."""

from __future__ import annotations

from dataclasses import dataclass

from ordergate.buffer.admission import AdmissionConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    redis_url: str
    # Committed orders' statuses and readiness's detail: shard k's rows live on database
    # sharding.databases.database_of(k, len(database_urls), shards). Empty: the gateway runs
    # on Redis alone.
    database_urls: tuple[str, ...] = ()
    key_prefix: str = "og"
    shards: int = 8
    admission: AdmissionConfig
    max_body_bytes: int = 65536
    memory_guard: float = 0.9
    auth_cache_s: float = 5.0
    public_url: str | None = None
    ticket_secret: str | None = None
    ticket_ttl_s: int = 3600
    drain_stale_s: float = 5.0
    admin_token: str | None = None
    ops_port: int = 0  # the operators' endpoints on a port of their own (0: the main one)
    sse_per_ticket: int = 4
    sse_streams: int = 1000
    sse_max_s: float = 3600.0
    metrics_dir: str | None = None
    metrics_storefronts: int = 10  # storefronts named in metrics; the rest are "other"
    pg_pool_size: int = 4

    @property
    def admission_timeout_s(self) -> float:
        return self.admission.timeout_s

    @property
    def max_buffered(self) -> int:
        return self.admission.max_buffered

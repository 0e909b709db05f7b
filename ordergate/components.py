"""The shell builds each component's frozen config from the one Settings object; components
never see Settings (nor import the shell).

A config field named as a setting takes that setting's value; the builders below name only the
fields that are derived (units, nested configs)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar

from ordergate.buffer.admission import AdmissionConfig
from ordergate.errors import ConfigError
from ordergate.gateway.config import GatewayConfig
from ordergate.settings import Settings
from ordergate.workers.breaker import BreakerConfig
from ordergate.workers.config import WorkerConfig

if TYPE_CHECKING:
    from ordergate.gateway.app import GatewayApp

C = TypeVar("C")


def gateway_config(s: Settings) -> GatewayConfig:
    if not s.redis_url:
        raise ConfigError("the gateway needs ORDERGATE_REDIS_URL (ordergate up sets it)")
    admission = AdmissionConfig(
        shards=s.shards,
        durability=s.durability,
        durability_timeout_ms=s.durability_timeout_ms,
        timeout_s=s.admission_timeout_ms / 1000,
        max_batch=s.admission_max_batch,
        max_inflight_batches=s.admission_max_inflight_batches,
        lease_ms=s.inflight_lease_ms,
        max_buffered=s.max_buffered,
        storefront_rate=s.storefront_rate,
        storefront_burst=s.storefront_burst,
        storefront_reserve=round(s.max_buffered * s.storefront_reserve),
    )
    return _from_settings(GatewayConfig, s, admission=admission)


def worker_config(s: Settings) -> WorkerConfig:
    if not (s.redis_url and s.database_url):
        raise ConfigError("a worker needs ORDERGATE_REDIS_URL and ORDERGATE_DATABASE_URL")
    breaker = BreakerConfig(
        slow_call_s=s.breaker_slow_ms / 1000,
        call_timeout_s=s.notify_timeout_ms / 1000,
        window=s.breaker_window,
        minimum_calls=s.breaker_minimum_calls,
        failure_rate=s.breaker_failure_rate,
        slow_rate=s.breaker_slow_rate,
        open_s=s.breaker_open_s,
    )
    return _from_settings(
        WorkerConfig, s, breaker=breaker, notify_timeout_s=s.notify_timeout_ms / 1000
    )


def _from_settings(cls: type[C], s: Settings, **given: Any) -> C:
    """``cls(**given)``, each other field taken from the setting of its name (AttributeError
    for a field that has neither: a config must not invent a knob the settings lack)."""
    names = {f.name for f in dataclasses.fields(cls)} - given.keys()  # type: ignore[arg-type]
    return cls(**given, **{name: getattr(s, name) for name in names})


def gateway_app() -> GatewayApp:
    """uvicorn's factory in each gateway process: the settings come from the environment that
    ``ordergate serve`` exported. Imported here, not above: the app's metrics must not be
    registered in a worker process, which builds its config from this module too."""
    from ordergate.gateway.app import create_app

    return create_app(gateway_config(Settings.load()))

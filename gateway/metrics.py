"""GET /metrics: the gateway's counters, and the buffer's state as Redis holds it, for Prometheus.

Two kinds of metrics, so that every number is true whatever the number of processes:

* counters and histograms each process keeps (orders accepted, refused, admission time here;
  orders committed and batch times in ``workers.metrics``). With ``metrics_dir`` set, every
  gateway and worker process of the host writes them there (prometheus_client's multiprocess
  mode) and this endpoint adds them up; without it, they are this process's own;
* gauges of the one buffer (depth and oldest age per shard, dead letters, the drain, the
  breakers), read from Redis at each scrape: every gateway reports the same values.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from ordergate.buffer.errors import BufferUnavailable
from ordergate.buffer.keys import Keys
from ordergate.buffer.overview import Overview, read_overview
from ordergate.buffer.storefronts import OTHER, REASONS
from ordergate.gateway.errors import (
    PROBLEM_TYPES,
    BufferFull,
    Problem,
    RateLimited,
    ServiceUnavailable,
    ShareExhausted,
)
from ordergate.gateway.ops import require_admin_if_set

ACCEPTED = Counter(
    "ordergate_orders_accepted", "Orders admitted into the buffer (POST /v1/orders answered 202)."
)
DUPLICATE = Counter(
    "ordergate_orders_duplicate",
    "POSTs of an order already admitted, answered 200 with the first receipt (nothing new).",
)
REJECTED = Counter(
    "ordergate_orders_rejected",
    "POSTs refused for the request itself (4xx, or 500 'internal-error'), by problem type.",
    ["reason"],
)
SHED = Counter(
    "ordergate_orders_shed",
    "POSTs shed for load: 429 buffer full (or a storefront's rate limit or share of it; by"
    " storefront in ordergate_storefront_refused), 503 buffer unavailable (Redis down or near its "
    "memory limit, durability barrier timed out).",
    ["status"],
)
ADMISSION = Histogram(
    "ordergate_admission_seconds",
    "Time of a whole POST /v1/orders that got a receipt (202 or 200): API key, body, validation, "
    "admission and its durability barrier, until the receipt is ready to send.",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
)

# Children made once: the hot path does a dict look-up and an inc(), no label formatting, and
# every series exists (at 0) from the start, so rate() and increase() see the first refusal.
_SHED_429 = SHED.labels("429")
_SHED_503 = SHED.labels("503")
_REJECTED = {
    name: REJECTED.labels(name)
    for name in PROBLEM_TYPES
    if name
    not in (
        "buffer-full",
        "rate-limited",
        "storefront-share-full",
        "buffer-unavailable",
        "not-found",
        "ticket-not-found",
    )
}
_REJECTED["internal-error"] = REJECTED.labels("internal-error")

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
SCRAPE_TIMEOUT_S = 2.0


def count_refusal(exc: BaseException) -> None:
    """Count a POST /v1/orders that raised ``exc`` (answered as problem+json)."""
    if isinstance(exc, BufferFull | RateLimited | ShareExhausted):
        _SHED_429.inc()
    elif isinstance(exc, BufferUnavailable | ServiceUnavailable | RedisError):
        _SHED_503.inc()
    else:
        reason = exc.type if isinstance(exc, Problem) else "internal-error"
        child = _REJECTED.get(reason)
        (child if child is not None else REJECTED.labels(reason)).inc()


class BufferSnapshot:
    """The buffer's gauges from one read of the operators' overview (a prometheus_client
    collector, built per scrape); ``overview`` None: Redis could not be read."""

    def __init__(self, overview: Overview | None, storefronts: int = 10) -> None:
        self.overview = overview
        self.storefronts = storefronts  # named in the storefront label; the rest are "other"

    def collect(self) -> list[Metric]:
        up = GaugeMetricFamily(
            "ordergate_redis_up", "1 when this scrape could read the buffer's state from Redis."
        )
        up.add_metric([], 0 if self.overview is None else 1)
        o = self.overview
        if o is None:
            return [up]
        depth = GaugeMetricFamily(
            "ordergate_buffer_depth",
            "Orders admitted into the shard's stream and not yet settled (committed, rejected "
            "or dead-lettered); summed over shards: the orders not yet committed.",
            labels=["shard"],
        )
        age = GaugeMetricFamily(
            "ordergate_buffer_oldest_age_seconds",
            "Age of the shard's oldest order not yet settled (0 when the shard is empty).",
            labels=["shard"],
        )
        for shard in o.shards:
            depth.add_metric([str(shard.shard)], shard.depth)
            age.add_metric([str(shard.shard)], shard.oldest_age_s or 0.0)
        dead = GaugeMetricFamily(
            "ordergate_dead_letters",
            "Dead letters: orders in the dead-letter streams (kind=orders), notification events "
            "that gave up (kind=notifications).",
            labels=["kind"],
        )
        dead.add_metric(["orders"], o.dead_letters)
        dead.add_metric(["notifications"], o.notifications.dead)
        breaker = GaugeMetricFamily(
            "ordergate_breaker_state",
            "Circuit breakers as the leading notifier reports them: 0 closed, 1 half-open, 2 open."
            " One per storefront with a webhook (name webhook:<storefront>).",
            labels=["name"],
        )
        for b in o.breakers:
            breaker.add_metric([b.name], BREAKER_STATES.get(b.state, 2))
        rate = o.drain.rate_per_s if o.drain.state == "draining" else None
        return [
            *self._storefronts(o),
            up,
            depth,
            age,
            dead,
            breaker,
            _gauge(
                "ordergate_notifications_deferred",
                "Notification events waiting in destinations' deferred streams.",
                o.notifications.deferred,
            ),
            _gauge(
                "ordergate_notifications_waiting",
                "Notification events queued by settle, not yet delivered nor deferred.",
                o.notifications.waiting,
            ),
            _gauge("ordergate_queue_issued", "The last queue number handed out.", o.issued),
            _gauge(
                "ordergate_queue_settled",
                "Orders settled so far (committed, rejected or dead-lettered), over all lanes.",
                o.settled,
            ),
            _gauge(
                "ordergate_drain_rate",
                "Orders/s the drain achieves while busy: the sum of what each lane's owner "
                "measures (0 when not draining).",
                rate or 0.0,
            ),
            _gauge(
                "ordergate_drain_paused",
                "1 while an operator has paused the drain.",
                1 if o.control.paused else 0,
            ),
            _gauge(
                "ordergate_drain_rate_limit",
                "The operators' cap on the drain in orders/s (0: none).",
                o.control.rate or 0.0,
            ),
        ]

    def _storefronts(self, o: Overview) -> list[Metric]:
        """Per storefront, for the top ``storefronts`` of the overview (most buffered, then
        most admitted) and ``other``: a bounded label set whatever the number of storefronts.
        As a storefront moves in or out of the top, its counts move between its own series and
        ``other``."""
        named = [s for s in o.storefronts if s.storefront_id != OTHER][: self.storefronts]
        rest = [s for s in o.storefronts if s not in named]
        rows: list[tuple[str, int, int, int, dict[str, int]]] = [
            (s.storefront_id, s.buffered, s.admitted, s.settled, s.refused) for s in named
        ]
        if rest:
            refused = {r: sum(s.refused.get(r, 0) for s in rest) for r in REASONS}
            rows.append(
                (
                    OTHER,
                    sum(s.buffered for s in rest),
                    sum(s.admitted for s in rest),
                    sum(s.settled for s in rest),
                    refused,
                )
            )
        buffered = GaugeMetricFamily(
            "ordergate_storefront_buffered",
            "A storefront's orders in the buffer, admitted and not yet settled.",
            labels=["storefront"],
        )
        admitted = CounterMetricFamily(
            "ordergate_storefront_admitted",
            "A storefront's orders admitted so far (over every gateway).",
            labels=["storefront"],
        )
        settled = CounterMetricFamily(
            "ordergate_storefront_settled",
            "A storefront's orders settled so far: committed, rejected or dead-lettered.",
            labels=["storefront"],
        )
        refused_family = CounterMetricFamily(
            "ordergate_storefront_refused",
            "A storefront's POSTs answered 429 so far, by reason: rate (its rate limit), share "
            "(its share of the buffer), full (the buffer's bound); added up every second.",
            labels=["storefront", "reason"],
        )
        for name, b, a, st, refused in rows:
            buffered.add_metric([name], b)
            admitted.add_metric([name], a)
            settled.add_metric([name], st)
            for reason in REASONS:
                refused_family.add_metric([name, reason], refused.get(reason, 0))
        return [buffered, admitted, settled, refused_family]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


async def read_snapshot(
    redis: Any, keys: Keys, shards: int, storefronts: int = 10
) -> BufferSnapshot:
    """The buffer's gauges from Redis; a snapshot with ``ordergate_redis_up 0`` when it fails."""
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT_S):
            return BufferSnapshot(await read_overview(redis, keys, shards), storefronts)
    except (RedisError, OSError, TimeoutError):
        return BufferSnapshot(None)


class _Process:
    """This process's own metrics (no ``metrics_dir``: one process serves them all)."""

    def collect(self) -> Any:
        return REGISTRY.collect()


def _processes(metrics_dir: str | None) -> CollectorRegistry:
    """A registry of the counters and histograms of every process writing to ``metrics_dir``,
    or of this process alone."""
    registry = CollectorRegistry()
    if metrics_dir:
        MultiProcessCollector(registry, path=metrics_dir)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Process())
    return registry


def exposition(snapshot: BufferSnapshot, metrics_dir: str | None) -> bytes:
    """The Prometheus text: every process's counters (or this one's) and the buffer's gauges."""
    registry = _processes(metrics_dir)
    registry.register(snapshot)
    return generate_latest(registry)


def admission_buckets(metrics_dir: str | None) -> list[tuple[float, int]]:
    """``ordergate_admission_seconds`` as cumulative buckets (upper bound in s, count), +Inf
    last, over every process of ``metrics_dir`` (or this one): for the operators' dashboard."""
    collected = ADMISSION.collect() if not metrics_dir else _processes(metrics_dir).collect()
    return sorted(
        (float(s.labels["le"]), int(s.value))
        for family in collected
        if family.name == "ordergate_admission_seconds"
        for s in family.samples
        if s.name.endswith("_bucket")
    )


async def metrics(request: Request) -> Response:
    """GET /metrics (behind ``admin_token`` when one is set, as /v1/ops/status)."""
    state = require_admin_if_set(request)
    config = state.config
    snapshot = await read_snapshot(
        state.redis, state.keys, config.shards, config.metrics_storefronts
    )
    return Response(
        exposition(snapshot, state.config.metrics_dir),
        media_type=CONTENT_TYPE_LATEST,
        headers={"Cache-Control": "no-store"},
    )

"""GET /metrics tells the truth: counters against what the test did, the buffer's depth against
the orders not yet committed, with workers stopped and then running, in one process and across
real gateway and worker processes sharing a metrics dir."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from ordergate.buffer.keys import Keys
from ordergate.gateway.metrics import admission_buckets
from ordergate.servers import die_with_parent, free_port
from ordergate.settings import Settings
from tests.conftest import admit, auth, eventually, order_body, worker_running

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "ordergate.json"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(client: httpx.AsyncClient) -> Samples:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, /, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    """A metric summed over its labels (e.g. the depth over shards)."""
    return sum(v for (n, _), v in samples.items() if n == name)


def grew(before: Samples, after: Samples, name: str, /, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_counters_and_depth_are_true_with_workers_stopped_then_running(
    client: httpx.AsyncClient, api_key: str, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = await scrape(client)
    n = 60
    await admit(client, api_key, n, prefix="m")
    duplicates = [
        await client.post("/v1/orders", json=order_body(f"m-{i}"), headers=auth(api_key))
        for i in range(4)
    ]
    assert {r.status_code for r in duplicates} == {200}
    invalid = [
        await client.post("/v1/orders", json=order_body(total_minor=1), headers=auth(api_key))
        for _ in range(3)
    ]
    assert {r.status_code for r in invalid} == {422}
    malformed = await client.post(
        "/v1/orders",
        content=b"{not json",
        headers={**auth(api_key), "Content-Type": "application/json"},
    )
    assert malformed.status_code == 422
    reused = await client.post("/v1/orders", json=order_body("m-0", items=3), headers=auth(api_key))
    assert reused.status_code == 422
    unauthorized = await client.post("/v1/orders", json=order_body(), headers=auth("og_nope"))
    assert unauthorized.status_code == 401

    after = await scrape(client)
    assert grew(before, after, "ordergate_orders_accepted_total") == n
    assert grew(before, after, "ordergate_orders_duplicate_total") == 4
    assert grew(before, after, "ordergate_orders_rejected_total", reason="invalid-order") == 3
    assert grew(before, after, "ordergate_orders_rejected_total", reason="malformed-json") == 1
    assert grew(before, after, "ordergate_orders_rejected_total", reason="order-id-reused") == 1
    assert grew(before, after, "ordergate_orders_rejected_total", reason="unauthorized") == 1
    shed = "ordergate_orders_shed_total"
    assert total(after, shed) == total(before, shed)
    assert grew(before, after, "ordergate_admission_seconds_count") == n + 4
    inf, count = admission_buckets(None)[-1]  # what the operators' dashboard reads
    assert (inf, count) == (math.inf, value(after, "ordergate_admission_seconds_count"))
    # No worker runs: every accepted order is in the buffer, and the depth says so.
    assert total(after, "ordergate_buffer_depth") == n
    assert value(after, "ordergate_queue_issued") - value(after, "ordergate_queue_settled") == n
    assert (
        max(v for (name, _), v in after.items() if name == "ordergate_buffer_oldest_age_seconds")
        > 0
    )
    assert value(after, "ordergate_redis_up") == 1
    assert value(after, "ordergate_dead_letters", kind="orders") == 0
    assert not [r for r in caplog.records if r.name.startswith("gateway")]  # nothing per request

    async with worker_running(settings):

        async def drained() -> Samples | None:
            now = await scrape(client)
            return now if total(now, "ordergate_buffer_depth") == 0 else None

        done = await eventually(drained)
    assert grew(before, done, "ordergate_orders_committed_total") == n
    assert grew(before, done, "ordergate_orders_settled_total", outcome="committed") == n
    assert grew(before, done, "ordergate_commit_batch_seconds_count") > 0
    assert grew(before, done, "ordergate_commit_batch_size_sum") == n
    assert total(done, "ordergate_buffer_oldest_age_seconds") == 0
    assert value(done, "ordergate_queue_settled") == value(done, "ordergate_queue_issued")
    batches = [
        r.getMessage() for r in caplog.records if re.match(r"lane \d+ batch q", r.getMessage())
    ]  # one line per batch, named by its lane and queue numbers
    assert batches and all(
        re.fullmatch(
            r"lane \d+ batch q\d+-\d+: \d+ entries, \d+ committed, 0 rejected, "
            r"0 dead-lettered in [\d.]+ s",
            line,
        )
        for line in batches
    ), batches
    assert sum(int(line.split(", ")[1].split()[0]) for line in batches) == n


async def test_a_full_buffer_counts_as_shed_429(
    app_factory: Any, api_key: str, settings: Settings
) -> None:
    client = await app_factory(settings.replace(max_buffered=5))
    before = await scrape(client)
    await admit(client, api_key, 5)
    refused = await client.post("/v1/orders", json=order_body(), headers=auth(api_key))
    assert refused.status_code == 429
    after = await scrape(client)
    assert grew(before, after, "ordergate_orders_shed_total", status="429") == 1
    assert grew(before, after, "ordergate_orders_shed_total", status="503") == 0
    assert grew(before, after, "ordergate_orders_accepted_total") == 5
    assert total(after, "ordergate_buffer_depth") == 5


async def test_gauges_of_breakers_dead_letters_and_drain_controls(
    client: httpx.AsyncClient, redis: Any
) -> None:
    keys = Keys()
    lane = {
        "failure_rate": 1.0,
        "slow_rate": 0.0,
        "open_for_s": 2.0,
        "inflight": 0,
        "deferred": 7,
        "delivered": 1,
        "failed": 5,
        "last_error": "HTTP 503",
    }
    state = {
        "leader": "n1",
        "lanes": {
            "shop-a": {**lane, "breaker": "open"},
            "shop-b": {**lane, "breaker": "half_open"},
            "shop-c": {**lane, "breaker": "closed"},
        },
    }
    await redis.set(keys.notify_state(), json.dumps(state))
    await redis.xadd(keys.deadletters(3), {"error": "poison"})
    await redis.xadd(keys.notify_deferred("shop-a"), {"type": "order.committed"})
    await redis.sadd(keys.notify_lanes(), "shop-a")
    await redis.xadd(keys.notify_dead(), {"type": "order.committed"})
    await redis.hset(keys.drain_control(), mapping={"paused": "1", "rate": "250.5"})

    samples = await scrape(client)
    assert value(samples, "ordergate_breaker_state", name="webhook:shop-a") == 2
    assert value(samples, "ordergate_breaker_state", name="webhook:shop-b") == 1
    assert value(samples, "ordergate_breaker_state", name="webhook:shop-c") == 0
    assert value(samples, "ordergate_dead_letters", kind="orders") == 1
    assert value(samples, "ordergate_dead_letters", kind="notifications") == 1
    assert value(samples, "ordergate_notifications_deferred") == 1
    assert value(samples, "ordergate_drain_paused") == 1
    assert value(samples, "ordergate_drain_rate_limit") == 250.5

    await redis.hset(keys.drain_control(), mapping={"paused": "0"})
    await redis.hdel(keys.drain_control(), "rate")
    samples = await scrape(client)
    assert value(samples, "ordergate_drain_paused") == 0
    assert value(samples, "ordergate_drain_rate_limit") == 0


async def test_metrics_want_the_admin_token_when_one_is_set(
    app_factory: Any, settings: Settings
) -> None:
    client = await app_factory(settings.replace(admin_token="s3cret-token"))
    assert (await client.get("/metrics")).status_code == 401
    ok = await client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200


async def test_every_metric_of_the_grafana_dashboard_is_exported(
    client: httpx.AsyncClient,
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {name for e in exprs for name in re.findall(r"\bordergate_[a-z0-9_]+", e)}
    response = await client.get("/metrics")
    exported = {
        name
        for family in text_string_to_metric_families(response.text)
        for name in (family.name, *(s.name for s in family.samples))
    }
    assert len(used) > 15
    assert used <= exported, used - exported
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"


async def answers_200(http: httpx.AsyncClient, path: str) -> bool:
    """Whether a started gateway answers ``path`` with 200 yet (for ``eventually``)."""
    try:
        return (await http.get(path)).status_code == 200
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def processes(settings: Settings, log: Path, *commands: list[str]) -> Iterator[None]:
    """Real ``ordergate`` processes (one per command) with ``settings``; stopped at the end."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERGATE_", "PROMETHEUS"))}
    env.update(settings.to_env())
    procs = []
    try:
        with open(log, "ab") as out:
            for command in commands:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "ordergate", *command],
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        preexec_fn=die_with_parent,
                    )
                )
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_two_gateway_processes_and_a_worker_process_add_up(
    settings: Settings, api_key: str, tmp_path: Path
) -> None:
    """``serve --processes 2`` and ``work`` share a metrics dir: /metrics of either gateway
    process counts every order accepted by both, and the orders the worker process committed."""
    custom = settings.replace(
        port=free_port(),
        processes=2,
        metrics_dir=str(tmp_path / "metrics"),
        workers=1,
        worker_metrics_port=free_port(),
    )
    (tmp_path / "metrics").mkdir()
    log = tmp_path / "processes.log"
    n = 200
    with processes(custom, log, ["serve"], ["work", "--worker-index", "0"]):
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{custom.port}", timeout=10, limits=limits
        ) as http:
            await eventually(partial(answers_200, http, "/readyz"), timeout=60)
            before = await scrape(http)
            responses = await asyncio.gather(
                *(
                    http.post("/v1/orders", json=order_body(f"mp-{i}"), headers=auth(api_key))
                    for i in range(n)
                )
            )
            assert {r.status_code for r in responses} == {202}, log.read_text()[-3000:]

            async def settled() -> Samples | None:
                now = await scrape(http)
                committed = grew(before, now, "ordergate_orders_committed_total")
                return now if total(now, "ordergate_buffer_depth") == 0 and committed == n else None

            after = await eventually(settled, timeout=60)
            assert grew(before, after, "ordergate_orders_accepted_total") == n
            # Every scrape, whichever process answers it, gives the same totals.
            again = await asyncio.gather(*(scrape(http) for _ in range(6)))
            for samples in again:
                assert value(samples, "ordergate_orders_accepted_total") == value(
                    after, "ordergate_orders_accepted_total"
                )
        # The worker's own port serves the same directory (a worker host without a gateway).
        port = custom.worker_metrics_port
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as worker:
            own = await scrape(worker)
        assert value(own, "ordergate_orders_committed_total") == n
        assert value(own, "ordergate_commit_batch_size_sum") == n
    assert admission_buckets(str(tmp_path / "metrics"))[-1] == (math.inf, n)
    per_process = [accepted_in(f, tmp_path / f.name) for f in (tmp_path / "metrics").glob("c*")]
    gateways = [a for a in per_process if a is not None]
    assert len(gateways) == 2 and sum(gateways) == n, per_process
    assert min(gateways) > 0  # both processes took orders; /metrics added them up


def accepted_in(counter_file: Path, alone: Path) -> float | None:
    """``ordergate_orders_accepted_total`` of one process's counter file (None if it has none)."""
    alone.mkdir()
    (alone / counter_file.name).write_bytes(counter_file.read_bytes())
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(alone))
    return registry.get_sample_value("ordergate_orders_accepted_total")

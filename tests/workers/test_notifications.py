"""Signed webhooks behind circuit breakers: late at worst, never lost, never in the commit path."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

from ordergate.buffer.keys import Keys
from ordergate.buffer.notifications import NotificationStreams
from ordergate.buffer.overview import read_overview
from ordergate.sharding.ids import shard_of_order_id
from ordergate.workers.signing import sign, verify
from tests.conftest import admit, auth, eventually, make_settings, order_body, worker_running
from tests.faults import audit
from tests.workers.receiver import receiving
from tests.workers.test_deadletters import cli

KEYS = Keys()


def fast_breakers(servers: Any, **extra: Any) -> Any:
    """Breakers that judge after 4 calls and probe after 0.5 s, so tests see every state."""
    base: dict[str, Any] = {
        "breaker_minimum_calls": 4,
        "breaker_window": 10,
        "breaker_open_s": 0.5,
        "notify_concurrency": 4,
        "webhook_allow_private": True,  # the receiver listens on 127.0.0.1, plain http
        "notify_backoff_max_s": 0.5,
        "read_block_ms": 100,
    }
    base.update(extra)
    return make_settings(servers, **base)


def set_webhook(settings: Any, url: str) -> str:
    """``ordergate storefronts set-webhook``: the secret it prints once."""
    done = cli(settings, "storefronts", "set-webhook", "shop-a", url)
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip()
    assert secret.startswith("whsec_") and "shown once" in done.stderr
    return secret


async def _lanes(redis: Any) -> int:
    return sum((await NotificationStreams(redis, KEYS, 8).lane_lengths()).values())


async def _breaker(redis: Any) -> str | None:
    o = await read_overview(redis, KEYS, 8)
    return o.breakers[0].state if o.breakers else None


def test_signatures_verify_and_refuse_tampering() -> None:
    body = b'{"event_id":"evt_1"}'
    header = sign("whsec_x", body, timestamp=1_700_000_000)
    assert verify("whsec_x", header, body, now=1_700_000_100)
    assert not verify("whsec_x", header, body + b" ", now=1_700_000_100)  # body changed
    assert not verify("whsec_y", header, body, now=1_700_000_100)  # other secret
    assert not verify("whsec_x", header, body, now=1_700_000_400)  # replayed 400 s later
    assert not verify("whsec_x", "v1=abc", body)


async def test_every_outcome_is_posted_once_signed_and_on_the_timeline(
    client, api_key, servers, redis, pg
) -> None:
    """A committed and a dead-lettered order each give one signed event that the receiver can
    verify with the secret shown once; the order's timeline ends with "notified"."""
    settings = fast_breakers(servers)
    from ordergate.sharding.routing import partition_table, shard_for

    table = partition_table(shard_for("shop-a", "refused-1", 8))
    await pg.execute(f"ALTER TABLE {table} ADD CONSTRAINT no_refuse CHECK (customer_id <> 'no')")
    try:
        async with receiving() as receiver:
            receiver.secret = set_webhook(settings, receiver.url)
            listed = cli(settings, "storefronts", "list")
            assert receiver.url in listed.stdout and receiver.secret not in listed.stdout
            refused = order_body("refused-1")
            refused["customer"]["id"] = "no"
            bad = await client.post("/v1/orders", json=refused, headers=auth(api_key))
            receipts = await admit(client, api_key, 30)
            async with worker_running(settings):
                await eventually(lambda: len(receiver.delivered()) == 31, timeout=30)
    finally:
        await pg.execute(f"ALTER TABLE {table} DROP CONSTRAINT no_refuse")
    events = receiver.delivered()
    assert all(c.signature_ok for c in receiver.calls)
    assert all(c.event_id_header == c.event["event_id"] for c in receiver.calls)
    by_order = {e["order_id"]: e for e in events.values()}
    assert set(by_order) == {r["order_id"] for r in receipts} | {bad.json()["order_id"]}
    dead = by_order[bad.json()["order_id"]]
    assert dead["type"] == "order.dead_lettered" and dead["status"] == "dead_lettered"
    assert dead["storefront_order_id"] == "refused-1"
    ok = by_order[receipts[0]["order_id"]]
    assert ok["type"] == "order.committed" and ok["storefront_order_id"] == "o-0"
    assert set(ok) == {"event_id", "type", "order_id", "storefront_order_id", "status", "at"}
    oid = receipts[0]["order_id"]
    shard = shard_of_order_id(oid, 8)
    assert shard is not None

    async def notified() -> bool:  # committed: its timeline comes from its row, "notified"
        status = (await client.get(f"/v1/orders/{oid}", headers=auth(api_key))).json()
        return [c["status"] for c in status.get("timeline", [])][-1:] == ["notified"]

    await eventually(notified, timeout=10)
    assert await redis.xlen(KEYS.notify()) == 0 and await _lanes(redis) == 0


async def test_storefront_without_webhook_gets_no_events(client, api_key, settings, redis) -> None:
    await admit(client, api_key, 10)
    async with worker_running(settings):
        await eventually(lambda: _settled(redis, 10), timeout=30)
    assert await redis.xlen(KEYS.notify()) == 0


async def _settled(redis: Any, n: int) -> bool:
    return (await read_overview(redis, KEYS, 8)).settled >= n


async def test_slow_receiver_opens_the_breaker_and_commits_go_on(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: a webhook receiver that answers in 2 s. Audits: its breaker opens after a few
    calls, all 400 orders commit meanwhile (exactly once), events are deferred, and once the
    receiver is fast again every event arrives (deduplicated by event_id); prints the time from
    recovery to an empty deferred stream."""
    settings = fast_breakers(servers)
    async with receiving() as receiver:
        receiver.secret = set_webhook(settings, receiver.url)
        receiver.delay = 2.0
        async with worker_running(settings):
            receipts = await admit(client, api_key, 400)
            await eventually(lambda: _settled(redis, 400), timeout=60)
            slow_calls = receiver.received
            deferred = await _lanes(redis)
            assert deferred > 0, "nothing was deferred"
            await eventually(lambda: _breaker_in(redis, "open", "half_open"), timeout=10)
            # in-flight deliveries (concurrency 4) plus half-open probes, not 400 slow calls
            assert slow_calls <= 20, slow_calls
            receiver.delay = 0.0
            recovered = time.monotonic()
            await eventually(lambda: len(receiver.delivered()) >= 400, timeout=60)
            await eventually(lambda: _lanes_empty(redis), timeout=30)
            drained = time.monotonic() - recovered
            await eventually(lambda: _breaker_is(redis, "closed"), timeout=10)
    print(
        f"\nslow receiver: {slow_calls} calls while 400 orders committed, {deferred} deferred;"
        f" recovery -> empty deferred stream in {drained:.2f} s"
    )
    assert {e["order_id"] for e in receiver.delivered().values()} == {
        r["order_id"] for r in receipts
    }
    await audit(pg, redis, receipts)


async def _lanes_empty(redis: Any) -> bool:
    return await _lanes(redis) == 0 and await redis.xlen(KEYS.notify()) == 0


async def _breaker_is(redis: Any, state: str) -> bool:
    return await _breaker(redis) == state


async def _breaker_in(redis: Any, *states: str) -> bool:
    return await _breaker(redis) in states


async def test_receiver_failing_with_500s_then_recovering_gets_every_event(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: a receiver answering HTTP 500 until it has refused 30 calls. Audits: failed
    events are retried with backoff until it recovers, then every event arrives; the status
    shows the last error while it fails."""
    settings = fast_breakers(servers)
    async with receiving() as receiver:
        receiver.secret = set_webhook(settings, receiver.url)
        receiver.status = 500
        async with worker_running(settings):
            receipts = await admit(client, api_key, 100)
            await eventually(lambda: len(receiver.calls) >= 30, timeout=60)
            overview = await read_overview(redis, KEYS, 8)
            assert overview.breakers and "HTTP 500" in overview.breakers[0].last_error
            assert overview.notifications.deferred > 0
            receiver.status = 200
            await eventually(lambda: len(receiver.delivered()) >= 100, timeout=60)
            await eventually(lambda: _lanes_empty(redis), timeout=30)
    retried = {c.event["event_id"] for c in receiver.calls if c.status == 500}
    assert retried <= set(receiver.delivered()), "an event that failed was never delivered"
    assert {e["order_id"] for e in receiver.delivered().values()} == {
        r["order_id"] for r in receipts
    }
    await audit(pg, redis, receipts)


async def test_receiver_that_never_recovers_ends_in_the_dead_list(
    client, api_key, servers, redis
) -> None:
    """Injects: a receiver that answers 503 forever. Audits: after notify_give_up_s every event
    is in the notification dead list with its last error, nothing stays deferred, and
    ``ordergate notifications replay --all`` delivers them once the receiver is back."""
    settings = fast_breakers(servers, notify_give_up_s=1.0)
    async with receiving() as receiver:
        receiver.secret = set_webhook(settings, receiver.url)
        receiver.status = 503
        async with worker_running(settings):
            receipts = await admit(client, api_key, 20)
            streams = NotificationStreams(redis, KEYS, 8)
            await eventually(lambda: _dead_count(streams, 20), timeout=60)
            assert await _lanes(redis) == 0
            listed = cli(settings, "notifications", "dead", "--json")
            dead = json.loads(listed.stdout)
            assert len(dead) == 20 and all("HTTP 503" in d["error"] for d in dead)
            # Each refused call was counted against its event, and nothing else was.
            refused = Counter(c.event["event_id"] for c in receiver.calls if c.status == 503)
            counted = {d["event"]["event_id"]: d["attempts"] for d in dead if d["attempts"]}
            assert refused and counted == dict(refused)
            receiver.status = 200
            replayed = cli(settings, "notifications", "replay", "--all")
            assert "re-queued 20" in replayed.stdout, replayed.stderr
            await eventually(lambda: len(receiver.delivered()) == 20, timeout=30)
    assert {e["order_id"] for e in receiver.delivered().values()} == {
        r["order_id"] for r in receipts
    }


async def _dead_count(streams: NotificationStreams, n: int) -> bool:
    return (await streams.counts())[2] >= n


async def test_ops_status_endpoint_and_cli_show_breakers(
    app_factory, api_key, servers, redis
) -> None:
    """GET /v1/ops/status (behind admin_token when set) and ``ordergate status --json`` report the
    breakers and the notification counts."""
    settings = fast_breakers(servers, admin_token="admin-secret-123")
    client = await app_factory(settings)
    assert (await client.get("/v1/ops/status")).status_code == 401
    async with receiving() as receiver:
        receiver.secret = set_webhook(settings, receiver.url)
        receiver.status = 500
        async with worker_running(settings):
            await admit(client, api_key, 12)
            await eventually(lambda: _breaker_is(redis, "open"), timeout=30)
            r = await client.get("/v1/ops/status", headers=auth("admin-secret-123"))
            assert r.status_code == 200
            body = r.json()
            assert body["breakers"][0]["name"] == "webhook:shop-a"
            assert body["breakers"][0]["state"] in ("open", "half_open")
            assert body["notifications"]["leader"]
            printed = json.loads(cli(settings, "status", "--json").stdout)
            assert printed["breakers"][0]["name"] == "webhook:shop-a"
            human = cli(settings, "status")
            assert human.returncode == 0 and "webhook:shop-a" in human.stdout


async def test_notifier_killed_mid_delivery_loses_no_event(
    client, api_key, servers, redis, pg
) -> None:
    """Injects: SIGKILL of the worker process whose notifier is delivering (receiver answers in
    0.2 s, so deliveries are in flight), with a standby worker running. Audits: the standby takes
    the lease when it expires and every event arrives at least once (deduplicated by event_id),
    every order once in Postgres."""
    from tests.workers.procs import kill9, spawn_worker

    settings = fast_breakers(servers, breaker_slow_ms=1000, notify_concurrency=8)
    async with receiving() as receiver:
        receiver.secret = set_webhook(settings, receiver.url)
        receiver.delay = 0.2
        workers = [spawn_worker(settings), spawn_worker(settings)]
        try:
            receipts = await admit(client, api_key, 300)
            await eventually(lambda: receiver.received >= 20, timeout=30)
            leader = (await redis.get(KEYS.notify_leader())).decode()
            pid = int(leader.split("-")[-2])
            victim = next(w for w in workers if w.pid == pid)
            kill9(victim)
            killed_at = len(receiver.delivered())
            await eventually(lambda: len(receiver.delivered()) >= 300, timeout=60)
            await eventually(lambda: _lanes_empty(redis), timeout=30)
        finally:
            for w in workers:
                kill9(w)
    print(f"\nnotifier killed after {killed_at} of 300 events; the standby delivered the rest")
    assert {e["order_id"] for e in receiver.delivered().values()} == {
        r["order_id"] for r in receipts
    }
    await audit(pg, redis, receipts)


async def test_a_webhook_may_not_point_inside(servers: Any) -> None:
    """Injects: the addresses an attacker registers to reach internal services (they were all
    accepted, and events went to an internal service). Audits: each is refused at registration
    with a clear message, exit 2, and nothing is stored."""
    settings = make_settings(servers)  # webhook_allow_private off, as by default
    for url in (
        "https://127.0.0.1/hook",
        "https://[::1]/hook",
        "https://2130706433/hook",
        "https://0x7f.1/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://metadata.google.internal/computeMetadata",
        "https://localhost:8443/hook",
        "https://10.1.2.3/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "http://203.0.113.7/hook",  # plain http
        "https://shop.example/hook\r\nX-Injected: 1",
        "https://shop.example/ hook",
    ):
        done = cli(settings, "storefronts", "set-webhook", "shop-a", url)
        assert done.returncode == 2, (url, done.stdout, done.stderr)
        assert "webhook" in done.stderr, (url, done.stderr)
    bad_id = cli(settings, "storefronts", "set-webhook", "shop a/../x", "https://203.0.113.7/")
    assert bad_id.returncode == 2 and "storefront id" in bad_id.stderr
    listed = cli(settings, "storefronts", "list")
    assert "shop-a" not in listed.stdout


async def test_a_webhook_url_is_shown_without_credentials_or_query(servers: Any) -> None:
    settings = fast_breakers(servers)
    url = "http://user:s3cret@127.0.0.1:9/hook?token=abc123"
    done = cli(settings, "storefronts", "set-webhook", "shop-a", url)
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in done.stderr and "abc123" not in done.stderr
    listed = cli(settings, "storefronts", "list")
    assert "http://***@127.0.0.1:9/hook?***" in listed.stdout
    assert "s3cret" not in listed.stdout and "abc123" not in listed.stdout


async def test_deliveries_connect_to_public_addresses_only(client, api_key, servers, redis) -> None:
    """Injects: DNS rebinding, as it looks from the worker: a webhook registered where its host
    was allowed (webhook_allow_private on), delivered by a worker with it off (the name now
    resolves to 127.0.0.1). Audits: no event reaches the receiver, the deliveries fail with the
    refusal, and the orders commit regardless."""
    registered = fast_breakers(servers)
    delivering = fast_breakers(servers, webhook_allow_private=False)
    async with receiving() as receiver:
        receiver.secret = set_webhook(registered, receiver.url)
        receipts = await admit(client, api_key, 5)
        async with worker_running(delivering):

            async def refused() -> bool:
                overview = await read_overview(redis, KEYS, 8)
                return any(
                    "not a public address" in (b.last_error or "") for b in overview.breakers
                )

            await eventually(refused, timeout=30)
            await eventually(lambda: _all_committed(redis, len(receipts)), timeout=30)
        assert receiver.calls == []


async def _all_committed(redis: Any, n: int) -> bool:
    return int(await redis.hget(KEYS.drain(), "s") or 0) >= n

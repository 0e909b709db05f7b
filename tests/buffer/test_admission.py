"""Admission: group commit, durability across a Valkey crash under load, durability auto's choice
of barrier (seen in the server's INFO commandstats), failure when Redis is gone, and a lease
confirmation Redis refuses."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis.exceptions import NoPermissionError

from ordergate.buffer.admission import AdmissionConfig, Admitter, Outcome
from ordergate.buffer.connection import create_redis
from ordergate.buffer.errors import BufferUnavailable, NotDurable
from ordergate.buffer.idempotency import decode_record
from ordergate.buffer.keys import Keys
from ordergate.buffer.message import admission_args
from ordergate.buffer.streams import ensure_streams
from ordergate.servers import EmbeddedValkey
from ordergate.sharding import shard_for
from ordergate.sharding.ids import new_nonce
from tests.conftest import auth, eventually, make_settings, order_body, worker_running
from tests.faults import (
    DelayProxy,
    PrivateValkey,
    accepted,
    audit,
    buffered,
    committed,
    load,
    one_row_per_order,
    own_valkey,
    retry_until_receipts,
    shoot,
)

KEYS = Keys()


def _args(sfo: str, shard: int) -> tuple:
    body = f'{{"sfo":"{sfo}"}}'.encode()
    fp = hashlib.blake2b(body, digest_size=16).digest()
    row = b"cust-1\x1f\x1fEUR\x1f100\x1f1"
    return admission_args(new_nonce(), "shop-a", sfo, time.time_ns() // 1000, fp, body, row)


async def _cmdstat(redis: Any, command: str, field: str = "calls") -> int:
    """The server's INFO commandstats figure of ``command`` (a subcommand as ``config|get``);
    commands run by scripts count too (confirm.lua's HDEL)."""
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get(field, 0))


async def _cmdstat_above(redis: Any, command: str, count: int) -> bool:
    return await _cmdstat(redis, command) > count


def _idem(sfo: str) -> str:
    return KEYS.idem(shard_for("shop-a", sfo, 8), "shop-a", sfo)


async def _admit_many(admitter: Admitter, prefix: str, n: int) -> list[Outcome]:
    """``n`` concurrent admissions (one batch or a few); their outcomes."""
    results = await asyncio.gather(
        *(
            admitter.admit(i % 8, "shop-a", f"{prefix}-{i}", _args(f"{prefix}-{i}", i % 8))
            for i in range(n)
        )
    )
    return [r.outcome for r in results]


async def test_concurrent_admissions_share_round_trips(redis) -> None:
    admitter = Admitter(redis, KEYS, AdmissionConfig(shards=8))
    await admitter.start()
    try:
        sfos = [f"g-{i}" for i in range(400)]
        results = await asyncio.gather(
            *(
                admitter.admit(
                    shard_for("shop-a", s, 8), "shop-a", s, _args(s, shard_for("shop-a", s, 8))
                )
                for s in sfos
            )
        )
    finally:
        await admitter.close()
    assert [r.outcome for r in results] == [Outcome.ADMITTED] * 400
    assert admitter.stats.orders == 400
    assert admitter.stats.batches < 100, "group commit: many orders per round trip"
    total = sum([await buffered(redis, KEYS, s) for s in range(8)])
    assert total == 400
    # queue numbers are dense and unique over all shards, and grow along every stream
    every: list[int] = []
    for shard in range(8):
        seqs = [int(f[b"seq"]) for _, f in await redis.xrange(KEYS.sublane(shard, "shop-a"))]
        assert seqs == sorted(seqs)
        every.extend(seqs)
    assert sorted(every) == list(range(1, 401))


async def test_unreachable_redis_is_a_prompt_error_not_a_hang() -> None:
    from ordergate.servers import free_port

    dead = create_redis(f"redis://127.0.0.1:{free_port()}/0")
    admitter = Admitter(dead, KEYS, AdmissionConfig(shards=8, timeout_s=1.0))
    await admitter.start()
    try:
        started = time.monotonic()
        with pytest.raises(BufferUnavailable):
            await admitter.admit(0, "shop-a", "x", _args("x", 0))
        assert time.monotonic() - started < 5
    finally:
        await admitter.close()
        await dead.aclose()


@pytest.fixture
async def private_valkey(tmp_path: Path) -> AsyncIterator[PrivateValkey]:
    async with own_valkey(tmp_path) as valkey:
        yield valkey


@pytest.mark.parametrize("durability", ["auto", "fsync", "aof-always"])
async def test_acknowledged_orders_survive_kill_9_of_valkey_under_load(
    private_valkey, app_factory, servers, pg, durability
) -> None:
    """Injects: SIGKILL of Valkey while 24 clients post orders and a worker drains, then a
    restart from its append-only file. Audits: every 202 commits exactly once; the orders that
    got no receipt, retried with the same ids, get one receipt each and create no duplicates.
    Every barrier: WAITAOF, aof-always's reliance on the server's appendfsync always, and auto,
    which (the server's commandstats show) sent WAITAOF only while learning the policy."""
    valkey = private_valkey
    settings = make_settings(
        servers, redis_url=valkey.server.url, inflight_lease_ms=3000, durability=durability
    )
    http = await app_factory(settings)
    async with worker_running(settings):
        async with load(http, valkey.api_key, "k") as shots:
            await eventually(lambda: accepted(shots) >= 1000)
            await eventually(lambda: committed(pg, 300))  # the drain is under way
            admitter = http.app.state.gateway.admitter
            learning = admitter.stats.failures + 1  # times auto started from "fsync"
            waits = await _cmdstat(valkey.redis, "waitaof")
            probes = await _cmdstat(valkey.redis, "config|get")
            if durability == "auto":  # at most the batches in flight before a reply said always
                assert waits <= settings.admission_max_inflight_batches * learning, (waits, probes)
            valkey.server.kill()
            killed = time.monotonic()
            down = await shoot(http, valkey.api_key, "while-down")
            valkey.server.start()  # same port, same data directory: it loads the AOF
            restarted = time.monotonic()
            await valkey.redis.connection_pool.disconnect()  # the test's own: they died
            await eventually(lambda: accepted(shots, after=restarted))
        first = min(s.answered for s in shots if s.sent > restarted and s.status == 202)
        assert down.status == 503 and down.response is not None, down.text
        assert int(down.response.headers["retry-after"]) >= 1
        assert {s.status for s in shots if killed < s.sent and s.answered < restarted} <= {503}
        receipts = await retry_until_receipts(http, valkey.api_key, [*shots, down])
        print(
            f"\n[{durability}] Valkey SIGKILLed under load"
            f" ({accepted(shots, before=killed)} orders taken),"
            f" restarted from its AOF in {restarted - killed:.2f} s; a new order had its 202"
            f" {first - restarted:.2f} s later, every order its receipt"
            f" {time.monotonic() - restarted:.2f} s later; {receipts.replayed} retries found"
            f" the order written; before the kill, WAITAOF {waits} calls, CONFIG GET {probes}"
        )
        await eventually(lambda: committed(pg, len(receipts.by_sfo)))
    await audit(pg, valkey.redis, receipts.by_sfo.values())
    await one_row_per_order(pg, set(receipts.by_sfo))


async def test_aof_always_gives_no_receipt_once_the_server_stops_fsyncing_every_write(
    private_valkey,
) -> None:
    """Injects: ``CONFIG SET appendfsync everysec`` on the running server. Audits: with
    durability aof-always an admission is durable on its reply and carries no lease (a twin gets
    the receipt at once); after the switch, no order gets a receipt (NotDurable, 503), and once
    the policy is back, orders are admitted again."""
    valkey = private_valkey
    await ensure_streams(valkey.redis, KEYS, 8)
    config = AdmissionConfig(shards=8, durability="aof-always", timeout_s=5)
    admitter = Admitter(valkey.redis, KEYS, config)
    await admitter.start()
    try:
        first = await admitter.admit(0, "shop-a", "a-1", _args("a-1", 0))
        assert first.outcome is Outcome.ADMITTED
        assert await _lease(valkey.redis, KEYS.idem(0, "shop-a", "a-1")) is None
        twin = await admitter.admit(0, "shop-a", "a-1", _args("a-1", 0))
        assert twin.outcome is Outcome.DUPLICATE and twin.order_id == first.order_id
        await valkey.redis.config_set("appendfsync", "everysec")
        try:
            with pytest.raises(NotDurable, match="appendfsync everysec"):
                await admitter.admit(1, "shop-a", "a-2", _args("a-2", 1))
        finally:
            await valkey.redis.config_set("appendfsync", "always")
        # The refused order was written; its retry finds it, and this reply went out after an
        # always-policy fsync of everything before it: a true receipt.
        again = await admitter.admit(1, "shop-a", "a-2", _args("a-2", 1))
        assert again.outcome is Outcome.DUPLICATE
        other = await admitter.admit(2, "shop-a", "a-3", _args("a-3", 2))
        assert other.outcome is Outcome.ADMITTED
    finally:
        await admitter.close()


async def test_auto_pays_no_waitaof_while_the_server_fsyncs_every_write(
    private_valkey, app_factory, servers
) -> None:
    """Injects: nothing; the default durability, auto, against a server that runs appendonly yes
    and appendfsync always. Audits, from the server's INFO commandstats: once the first batch
    (sent with WAITAOF, before any reply said always) has learnt the policy, 24 clients posting
    back to back get 202s for 1000 orders (dozens of batches) without one more WAITAOF, every
    batch carries its CONFIG GET, and no order's idempotency record holds a lease."""
    valkey = private_valkey
    settings = make_settings(servers, redis_url=valkey.server.url)
    assert settings.durability == "auto"
    policy = await valkey.redis.config_get("append*")
    assert (policy["appendonly"], policy["appendfsync"]) == ("yes", "always"), policy
    http = await app_factory(settings)
    admitter = http.app.state.gateway.admitter
    first = await http.post("/v1/orders", json=order_body("first"), headers=auth(valkey.api_key))
    assert first.status_code == 202, first.text
    assert await _cmdstat(valkey.redis, "waitaof") == 1
    await eventually(lambda: _lifted(valkey.redis, _idem("first")))  # its lease, lifted
    await eventually(lambda: admitter.stats.batches == 2)  # the order's, the confirmation's
    probes = await _cmdstat(valkey.redis, "config|get")

    async with load(http, valkey.api_key, "w") as shots:
        await eventually(lambda: accepted(shots) >= 1000)

    assert {s.status for s in shots} == {202}, next(s.text for s in shots if s.status != 202)
    batches = admitter.stats.batches - 2
    assert batches >= 20, "group commit, yet many batches"
    assert await _cmdstat(valkey.redis, "waitaof") == 1
    assert await _cmdstat(valkey.redis, "config|get") - probes == batches
    pipe = valkey.redis.pipeline(transaction=False)
    for shot in shots:
        pipe.get(_idem(shot.sfo))
    records = [decode_record(0, raw) for raw in await pipe.execute()]
    assert {r.lease_until_ms for r in records} == {None}
    print(
        f"\n[auto] {len(shots)} orders, 202 each, in {batches} batches: cmdstat_waitaof calls=1"
        f" (the first order's batch), cmdstat_config|get calls +{batches}"
    )


async def test_auto_follows_the_servers_aof_policy(private_valkey) -> None:
    """Injects: ``CONFIG SET appendfsync everysec`` on the running server, then ``always`` again.
    Audits: auto sends no WAITAOF while the server fsyncs every write; the batch sent without it
    just after the change gets no receipt (NotDurable, as with aof-always), and from then on
    orders get receipts again, each batch with WAITAOF and leases (lifted by confirm.lua); once
    the policy is back to always, WAITAOF calls stop growing."""
    valkey = private_valkey
    redis = valkey.redis
    await ensure_streams(redis, KEYS, 8)
    config = AdmissionConfig(shards=8, timeout_s=5)
    assert config.durability == "auto"
    admitter = Admitter(redis, KEYS, config)
    await admitter.start()
    try:
        learnt = await admitter.admit(0, "shop-a", "a", _args("a", 0))
        assert learnt.outcome is Outcome.ADMITTED
        assert await _cmdstat(redis, "waitaof") == 1  # sent before any reply said always
        await eventually(lambda: _lifted(redis, KEYS.idem(0, "shop-a", "a")))
        waits = await _cmdstat(redis, "waitaof")
        assert await _admit_many(admitter, "a", 200) == [Outcome.ADMITTED] * 200
        assert await _cmdstat(redis, "waitaof") == waits
        assert await _leases(redis, _many_keys("a", 200)) == 0  # none to lift

        await redis.config_set("appendfsync", "everysec")
        try:
            # Sent without WAITAOF (the last reply said always); its own CONFIG GET says not.
            with pytest.raises(NotDurable, match="appendfsync everysec"):
                await admitter.admit(1, "shop-a", "t", _args("t", 1))
            assert await _cmdstat(redis, "waitaof") == waits
            for r in range(4):  # a batch each
                assert await _admit_many(admitter, f"b{r}", 50) == [Outcome.ADMITTED] * 50
            during = await _cmdstat(redis, "waitaof")
            assert during >= waits + 4
            b_orders = [key for r in range(4) for key in _many_keys(f"b{r}", 50)]
            await eventually(lambda: _no_leases(redis, b_orders))  # written with, then lifted
            one = await admitter.admit(2, "shop-a", "c", _args("c", 2))
            assert one.outcome is Outcome.ADMITTED
            assert await _cmdstat(redis, "waitaof") == during + 1
        finally:
            await redis.config_set("appendfsync", "always")
        back = await admitter.admit(3, "shop-a", "d", _args("d", 3))  # WAITAOF, learns always
        assert back.outcome is Outcome.ADMITTED
        after = await _cmdstat(redis, "waitaof")
        assert after == during + 2
        assert await _admit_many(admitter, "e", 200) == [Outcome.ADMITTED] * 200
        assert await _cmdstat(redis, "waitaof") == after
        # The refused order was written; its retry finds it.
        again = await admitter.admit(1, "shop-a", "t", _args("t", 1))
        assert again.outcome is Outcome.DUPLICATE
        print(
            f"\n[auto] cmdstat_waitaof calls: {waits} after 201 orders under always,"
            f" {during} after 200 more in 4 batches under everysec, {after} after 201 more"
            " under always again"
        )
    finally:
        await admitter.close()


async def test_auto_falls_back_to_waitaof_where_config_is_refused(private_valkey) -> None:
    """Injects: a Redis user denied CONFIG (as managed services rename or deny it). Audits: auto
    admits every order with its receipt, each batch with WAITAOF and a lease lifted by
    confirm.lua, never a 503 for the refused CONFIG GET; aof-always, which has nothing else to
    confirm a write with, gives no receipt."""
    valkey = private_valkey
    await ensure_streams(valkey.redis, KEYS, 8)
    await valkey.redis.execute_command(
        "ACL", "SETUSER", "no-config", "on", ">secret", "~*", "&*", "+@all", "-config"
    )
    limited = create_redis(valkey.server.url.replace("redis://", "redis://no-config:secret@"))
    try:
        with pytest.raises(NoPermissionError):
            await limited.config_get("appendfsync")
        auto = Admitter(limited, KEYS, AdmissionConfig(shards=8, timeout_s=5))
        await auto.start()
        try:
            waits = await _cmdstat(valkey.redis, "waitaof")
            for i in range(3):  # one batch each
                sets = await _cmdstat(valkey.redis, "set")
                result = await auto.admit(i, "shop-a", f"n-{i}", _args(f"n-{i}", i))
                assert result.outcome is Outcome.ADMITTED
                assert await _cmdstat(valkey.redis, "waitaof") == waits + i + 1
                # written under a lease (admit.lua's MSET), then lifted by confirm.lua (a SET)
                await eventually(partial(_cmdstat_above, valkey.redis, "set", sets))
                assert await _lifted(valkey.redis, KEYS.idem(i, "shop-a", f"n-{i}"))
            assert await _admit_many(auto, "m", 100) == [Outcome.ADMITTED] * 100
            assert await _cmdstat(valkey.redis, "waitaof") > waits + 3
            assert await _cmdstat(valkey.redis, "config|get", "rejected_calls") >= 4
        finally:
            await auto.close()
        strict = Admitter(limited, KEYS, AdmissionConfig(shards=8, durability="aof-always"))
        await strict.start()
        try:
            with pytest.raises(NotDurable, match="barrier failed"):
                await strict.admit(0, "shop-a", "s", _args("s", 0))
        finally:
            await strict.close()
    finally:
        await limited.aclose()


async def _refusals(redis: Any) -> int:
    """How many commands Redis refused as out of memory since it started."""
    stats = await redis.info("errorstats")
    return int(stats.get("errorstat_OOM", {}).get("count", 0))


async def _refused_since(redis: Any, count: int) -> bool:
    return await _refusals(redis) > count


async def _lease(redis: Any, idem: str) -> int | None:
    raw = await redis.get(idem)
    return decode_record(0, raw).lease_until_ms if raw else None


def _many_keys(prefix: str, n: int) -> list[str]:
    """The idempotency keys of ``_admit_many(admitter, prefix, n)``'s orders."""
    return [KEYS.idem(i % 8, "shop-a", f"{prefix}-{i}") for i in range(n)]


async def _leases(redis: Any, idems: list[str]) -> int:
    """How many of these idempotency records hold a lease."""
    pipe = redis.pipeline(transaction=False)
    for idem in idems:
        pipe.get(idem)
    raws = await pipe.execute()
    return sum(1 for raw in raws if raw and decode_record(0, raw).lease_until_ms is not None)


async def _no_leases(redis: Any, idems: list[str]) -> bool:
    return await _leases(redis, idems) == 0


async def _lifted(redis: Any, idem: str) -> bool:
    return await _lease(redis, idem) is None


async def test_a_refused_lease_confirmation_waits_for_the_next_batch(servers, redis) -> None:
    """Injects: Redis out of memory (maxmemory below use) between an order's write and its lease
    confirmation (the write's reply held back by a proxy meanwhile). Audits: the order still gets
    its receipt; the refused confirmation is not re-sent in a loop (Redis counts one refusal),
    a new order is refused as out of memory with Retry-After 5, and once memory is back the
    confirmation goes out with the next batch."""
    url = urlsplit(servers.redis_url)
    proxy = await DelayProxy(url.hostname or "127.0.0.1", url.port or 6379).start()
    proxied = create_redis(proxy.url(servers.redis_url))
    admitter = Admitter(proxied, KEYS, AdmissionConfig(shards=8, timeout_s=30))
    await admitter.start()
    idem = KEYS.idem(0, "shop-a", "m-1")
    try:
        try:
            proxy.delay = 30
            first = asyncio.create_task(admitter.admit(0, "shop-a", "m-1", _args("m-1", 0)))
            await eventually(lambda: _lease(redis, idem))  # written, reply held
            refused = await _refusals(redis)
            await redis.config_set("maxmemory", "1")
            proxy.delay = 0
            assert (await first).outcome is Outcome.ADMITTED
            await eventually(partial(_refused_since, redis, refused))  # the confirmation
            assert await _refusals(redis) == refused + 1, "the confirmation was re-sent in a loop"
            with pytest.raises(BufferUnavailable, match="out of memory") as full:
                await admitter.admit(1, "shop-a", "m-2", _args("m-2", 1))
            assert full.value.retry_after == 5
        finally:
            await redis.config_set("maxmemory", "0")
        second = await admitter.admit(2, "shop-a", "m-3", _args("m-3", 2))
        assert second.outcome is Outcome.ADMITTED
        await eventually(lambda: _lifted(redis, idem))
    finally:
        await admitter.close()
        await proxied.aclose()
        await proxy.close()


async def test_a_receipt_given_again_waits_for_the_replica_like_a_new_one(tmp_path: Path) -> None:
    """Injects: SIGSTOP of the only replica. An order is written by one gateway while the
    replica is stopped (503: no replica acknowledged it); once its lease is over, its retry goes
    down another gateway's connection, whose last write the replica acknowledged before it
    stopped. Audits: the retry gets no receipt either (admit.lua's write moves the connection's
    offset past the order's own, so WAIT waits for it), and gets it once the replica is back."""
    master = EmbeddedValkey(tmp_path, name="master")
    master.start()
    replica = EmbeddedValkey(
        tmp_path, name="replica", extra_conf=(f"replicaof {master.host} {master.port}",)
    )
    replica.start()
    config = AdmissionConfig(
        shards=8, durability="replica", durability_timeout_ms=300, lease_ms=300, timeout_s=5
    )
    clients = [create_redis(master.url, max_connections=1) for _ in range(2)]
    first, second = (Admitter(c, KEYS, config) for c in clients)
    try:
        await eventually(lambda: _replicas(clients[0]), timeout=30)
        await ensure_streams(clients[0], KEYS, 8)
        for admitter in (first, second):
            await admitter.start()
        earlier = await first.admit(1, "shop-a", "b-1", _args("b-1", 1))
        assert earlier.outcome is Outcome.ADMITTED  # the replica acknowledged it
        # its lease lifted (confirm.lua, a write of the same connection), and that write too
        # acknowledged: the connection's last write is one the replica has
        await eventually(partial(_lifted, clients[0], KEYS.idem(1, "shop-a", "b-1")))
        assert await clients[0].execute_command("WAIT", 1, 5000) == 1
        replica.signal(signal.SIGSTOP)
        with pytest.raises(NotDurable, match="no replica"):
            await second.admit(0, "shop-a", "a-1", _args("a-1", 0))

        async def refused_after_the_lease() -> bool:
            try:
                twin = await first.admit(0, "shop-a", "a-1", _args("a-1", 0))
            except NotDurable:
                return True  # a duplicate now, and its barrier failed: no receipt
            assert twin.outcome is Outcome.INFLIGHT, twin  # never DUPLICATE: a receipt
            return False

        await eventually(refused_after_the_lease, timeout=10, interval=0.1)
        replica.signal(signal.SIGCONT)

        async def receipt() -> Any:
            try:
                again = await first.admit(0, "shop-a", "a-1", _args("a-1", 0))
            except NotDurable:
                return None
            return again

        again = await eventually(receipt, timeout=20, interval=0.2)
        assert again.outcome is Outcome.DUPLICATE
    finally:
        replica.signal(signal.SIGCONT)
        for admitter in (first, second):
            await admitter.close()
        for client in clients:
            await client.aclose()
        replica.stop()
        master.stop()


async def _replicas(redis: Any) -> bool:
    info = await redis.info("replication")
    return int(info.get("connected_slaves", 0)) >= 1 and "online" in str(info.get("slave0"))

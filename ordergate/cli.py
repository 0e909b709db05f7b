"""The ``ordergate`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ordergate import __version__, metricsdir
from ordergate.errors import CommandError, OrdergateError
from ordergate.logs import configure as configure_logging
from ordergate.settings import Settings

WORKERS_HELP = "worker processes (default 2: the setting workers)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ordergate",
        description="Peak-load order ingestion gateway: durable receipts, Redis Streams buffer, "
        "sharded exactly-once drain into PostgreSQL.",
    )
    p.add_argument("--version", action="version", version=f"ordergate {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_)

    def gateway_opts(q: argparse.ArgumentParser) -> None:
        q.add_argument("--host", help="bind address (default 127.0.0.1)")
        q.add_argument("--port", type=int, help="port (default 8000)")
        q.add_argument("--processes", type=int, help="gateway processes (default 1)")

    def data_dir_opt(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", help="where embedded servers keep data (default ./.ordergate)")

    up = add(
        "up",
        "Start everything: embedded Valkey and PostgreSQL (unless URLs are "
        "configured), the schema, the gateway and the workers; Ctrl-C stops it all.",
    )
    gateway_opts(up)
    up.add_argument("--workers", type=int, help=WORKERS_HELP)
    data_dir_opt(up)

    serve = add(
        "serve",
        "Run the gateway only (needs ORDERGATE_REDIS_URL and ORDERGATE_DATABASE_URL,"
        " or a running `up`).",
    )
    gateway_opts(serve)
    data_dir_opt(serve)

    work = add("work", "Run workers only: drain the buffer into PostgreSQL.")
    work.add_argument("--workers", type=int, help=WORKERS_HELP)
    work.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    work.add_argument(
        "--burst",
        action="store_true",
        help="drain until the buffer is empty, print counts as JSON, exit",
    )
    data_dir_opt(work)

    mig = add("migrate", "Create or update the PostgreSQL schema and partitions, and the streams.")
    data_dir_opt(mig)

    keys = add("keys", "Manage storefront API keys.")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = ksub.add_parser(
        "create",
        help="print a new API key for a storefront",
        description="Print a new API key for STOREFRONT_ID (stored hashed).",
    )
    kc.add_argument("storefront_id")
    data_dir_opt(kc)
    kl = ksub.add_parser(
        "list",
        help="list keys (hash prefix and storefront)",
        description="List keys: hash prefix and storefront.",
    )
    data_dir_opt(kl)
    kr = ksub.add_parser(
        "revoke",
        help="revoke a key (the key, or its hash prefix)",
        description="Revoke a key, given the key or its listed hash prefix.",
    )
    kr.add_argument("key")
    data_dir_opt(kr)

    dlq = add("dlq", "Show and re-queue dead-lettered orders.")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dl = dsub.add_parser(
        "list",
        help="list dead letters with their errors",
        description="List dead letters with their errors.",
    )
    dl.add_argument("--limit", type=int, default=100, help="per shard (default 100)")
    dl.add_argument("--json", action="store_true", help="print JSON")
    data_dir_opt(dl)
    dr = dsub.add_parser(
        "replay",
        help="put dead letters back into the buffer",
        description="Put dead letters back into their shard's stream.",
    )
    dr.add_argument("ids", nargs="*", help="dead letters as listed (SHARD/ID); none with --all")
    dr.add_argument("--all", action="store_true", help="replay every dead letter")
    data_dir_opt(dr)

    sf = add(
        "storefronts",
        "Storefronts: their rate limits and drain weights, their share of the buffer, their"
        " webhooks (signed order notifications).",
    )
    ssub = sf.add_subparsers(dest="storefronts_command", required=True, metavar="ACTION")
    sw = ssub.add_parser(
        "set-webhook",
        help="register a webhook URL; prints its new signing secret once",
        description="Send STOREFRONT_ID's order events (committed, rejected, dead-lettered) to "
        "URL, signed with a new secret that is printed once.",
    )
    sw.add_argument("storefront_id")
    sw.add_argument("url")
    data_dir_opt(sw)
    su = ssub.add_parser(
        "remove-webhook",
        help="stop sending a storefront's events",
        description="Stop queueing STOREFRONT_ID's events (queued ones wait for a new webhook).",
    )
    su.add_argument("storefront_id")
    data_dir_opt(su)
    sl = ssub.add_parser(
        "list",
        help="each storefront's buffered orders, share, drain rate, 429s, limit; the webhooks",
        description="Each storefront the buffer knows: its orders buffered and share of the"
        " buffer, its drain rate (measured over --interval), its 429s by reason, its limit and"
        " weight; then the webhooks (without secrets).",
    )
    sl.add_argument("--json", action="store_true", help="print JSON")
    sl.add_argument(
        "--interval", type=float, default=1.0, help="seconds to measure drain rates (default 1)"
    )
    data_dir_opt(sl)
    sp = ssub.add_parser(
        "set-limit",
        help="give a storefront its own rate limit and drain weight (or --clear it)",
        description="Give STOREFRONT_ID its own order rate limit (--rate orders/s, 0 = none;"
        " --burst orders at once, 0 = one second of the rate) and drain weight (--weight, its"
        " share of each lane's drain while it has a backlog). Every gateway applies it to its"
        " next batch. --clear puts it back on the defaults (storefront_rate, storefront_burst,"
        " weight 1).",
    )
    sp.add_argument("storefront_id")
    sp.add_argument("--rate", type=float, help="orders per second (0 = no limit)")
    sp.add_argument("--burst", type=int, help="orders at once (default: one second of the rate)")
    sp.add_argument("--weight", type=int, help="drain weight, 1-1000 (default 1)")
    sp.add_argument("--clear", action="store_true", help="back to the defaults")
    data_dir_opt(sp)

    nt = add("notifications", "Show and re-queue notifications that gave up.")
    nsub = nt.add_subparsers(dest="notifications_command", required=True, metavar="ACTION")
    nd = nsub.add_parser(
        "dead",
        help="list events that kept failing, with their last error",
        description="List notification events that kept failing for notify_give_up_s.",
    )
    nd.add_argument("--limit", type=int, default=100)
    nd.add_argument("--json", action="store_true", help="print JSON")
    data_dir_opt(nd)
    nr = nsub.add_parser(
        "replay",
        help="put dead events back for delivery",
        description="Put dead notification events back in the notification stream.",
    )
    nr.add_argument("ids", nargs="*", help="entry ids as listed; none with --all")
    nr.add_argument("--all", action="store_true", help="replay every dead event")
    data_dir_opt(nr)

    st = add("status", "Show the buffer, the drain, notifications and circuit breakers.")
    st.add_argument("--json", action="store_true", help="print the JSON of GET /v1/ops/status")
    st.add_argument("--watch", action="store_true", help="keep the screen live until Ctrl-C")
    st.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    st.add_argument(
        "--storefront",
        metavar="ID",
        help="one storefront: its orders buffered, share, rates over --interval, 429s, limit",
    )
    data_dir_opt(st)

    dr = add(
        "drain",
        "Pause, resume or rate-limit the drain without a restart; the leading worker follows "
        "within a second.",
    )
    what = dr.add_mutually_exclusive_group(required=True)
    what.add_argument("--pause", action="store_true", help="take nothing until --resume")
    what.add_argument("--resume", action="store_true", help="drain again")
    what.add_argument(
        "--rate",
        type=float,
        metavar="N",
        help="drain at most N orders per second (0 removes the limit; drain_rate still applies)",
    )
    dr.add_argument("--json", action="store_true", help="print the controls as JSON")
    data_dir_opt(dr)

    sg = add(
        "surge",
        "Rehearse a sale: Locust (the `load` extra) runs a spike, ramp or soak against a gateway, "
        "then every receipt is audited against Postgres. Exit 0 pass, 1 fail, 3 incomplete.",
    )
    sg.add_argument("--shape", choices=["spike", "ramp", "soak"], required=True)
    sg.add_argument(
        "--host",
        dest="target",
        metavar="URL",
        help="a running gateway (default: start `ordergate up` on a free port and a temporary "
        "data dir, or --data-dir)",
    )
    sg.add_argument(
        "--users",
        type=int,
        help="most users: the spike's peak (30x its baseline), the ramp's ceiling, the soak's "
        "level (default 300, 500, 100)",
    )
    sg.add_argument(
        "--duration", type=float, help="seconds the shape lasts (default 180, 300, 3600)"
    )
    sg.add_argument("--results", help="results folder (default ./surge-results/<timestamp>)")
    sg.add_argument("--processes", type=int, help="gateway processes of the started `up`")
    sg.add_argument(
        "--drain-rate",
        type=float,
        metavar="N",
        help="cap the started `up`'s drain at N orders/s over all lanes (its setting drain_rate; "
        "0 = no cap), to rehearse a backlog and audit customers' ETAs",
    )
    sg.add_argument(
        "--max-p95-ms", type=float, default=500.0, help="ramp: p95 limit of a step (500)"
    )
    sg.add_argument(
        "--max-error-share", type=float, default=0.01, help="ramp: error limit of a step (0.01)"
    )
    sg.add_argument(
        "--drain-timeout", type=float, default=600.0, help="seconds to wait for the drain"
    )
    sg.add_argument(
        "--storefronts",
        type=int,
        metavar="K",
        help="storefronts sending orders (default 4, or as many keys as ORDERGATE_API_KEY "
        "holds for --host)",
    )
    sg.add_argument(
        "--hot-share",
        type=float,
        default=0.0,
        metavar="P",
        help="the share of the users, in [0, 1), of the first storefront (a flash sale among "
        "the others, which split the rest); default 0: spread evenly",
    )
    data_dir_opt(sg)
    return p


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(args, name, None)
        for name in ("host", "port", "processes", "workers", "data_dir")
    }
    return Settings.load(overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        configure_logging(settings.log_level, settings.log_format, f"ordergate-{args.command}")
        handler: Callable[[argparse.Namespace, Settings], int] = COMMANDS[args.command]
        return handler(args, settings)
    except OrdergateError as exc:
        print(f"ordergate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(coro: Awaitable[Any]) -> Any:
    import uvloop

    return uvloop.run(coro)  # type: ignore[arg-type]


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.supervisor import Supervisor

    return Supervisor(settings).run()


def _live_urls(settings: Settings) -> Settings:
    """For serve/work: configured URLs, else those of a running `ordergate up`."""
    from ordergate.runtime import read_runtime

    if not settings.embedded:
        return settings
    live = read_runtime(settings.data_path)
    if live is None:
        raise CommandError(
            "no servers: set ORDERGATE_REDIS_URL and ORDERGATE_DATABASE_URL, or run `ordergate up`"
        )
    return settings.replace(
        redis_url=settings.redis_url or live["redis_url"],
        database_url=settings.database_url or live["database_url"],
    )


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    import tempfile

    from ordergate.preflight import check_deployment

    settings = _live_urls(settings)
    _run(check_deployment(settings))
    with tempfile.TemporaryDirectory(prefix="ordergate-metrics-") as own:
        if settings.processes > 1 and not settings.metrics_dir:
            settings = settings.replace(metrics_dir=own)  # /metrics adds up its processes
        metricsdir.use(settings)  # before anything imports prometheus_client
        os.environ.update(settings.to_env())  # each uvicorn worker process rebuilds the settings
        _uvicorn(settings)
    return 0


def _uvicorn(settings: Settings) -> None:
    import uvicorn

    from ordergate.httpserver import GuardedHttpToolsProtocol

    config = uvicorn.Config(
        "ordergate.components:gateway_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.processes if settings.processes > 1 else None,
        loop="uvloop",
        http=GuardedHttpToolsProtocol,
        limit_concurrency=settings.max_connections,
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=10,
    )
    # With ops_port, the operators' port beside the customers': one app on both sockets,
    # which answers each path on its own port only (gateway.app.GatewayApp).
    sockets = [config.bind_socket()]
    if settings.ops_port:
        sockets.append(_bind(settings.host, settings.ops_port))
    if config.workers > 1:
        _multiprocess(config, sockets)
        return
    server = uvicorn.Server(config)
    server.run(sockets=sockets)
    if not server.started:
        raise SystemExit(3)  # as uvicorn.run: the app did not start


def _bind(host: str, port: int) -> Any:
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _multiprocess(config: Any, sockets: list[Any]) -> None:
    from uvicorn.supervisors import Multiprocess

    Multiprocess(config, sockets=sockets).run()


def cmd_work(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.preflight import check_deployment

    settings = _live_urls(settings)
    if args.worker_index is None:  # the supervisor's children were checked by their parent
        _run(check_deployment(settings))
    if args.worker_index is None and settings.workers > 1 and not args.burst:
        import tempfile

        from ordergate.supervisor import Supervisor

        with tempfile.TemporaryDirectory(prefix="ordergate-metrics-") as own:
            if settings.worker_metrics_port and not settings.metrics_dir:
                settings = settings.replace(metrics_dir=own)  # worker 0 reports them all
            return Supervisor(settings, gateway=False, migrate=False).run()
    metricsdir.use(settings)  # before anything imports prometheus_client
    from ordergate.components import worker_config
    from ordergate.workers import metrics
    from ordergate.workers.runner import run_worker

    if not args.burst and settings.worker_metrics_port and not args.worker_index:
        metrics.serve(settings.worker_metrics_port, settings.host, settings.metrics_dir)
    report = _run(
        run_worker(
            worker_config(settings), args.worker_index or 0, burst=args.burst, install_signals=True
        )
    )
    if args.burst:
        print(
            json.dumps(
                {
                    "committed": report.committed,
                    "rejected": report.rejected,
                    "dead_lettered": report.dead_lettered,
                }
            )
        )
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.buffer.connection import connect_redis, is_cluster
    from ordergate.buffer.keys import Keys
    from ordergate.buffer.streams import ensure_streams
    from ordergate.runtime import resolved
    from ordergate.workers.migrate import migrate_all

    with resolved(settings) as s:

        async def go() -> list[str]:
            done = await migrate_all(s.database_urls, s.shards, s.key_prefix)
            redis = await connect_redis(s.redis_url or "")
            try:
                await ensure_streams(redis, Keys(s.key_prefix, is_cluster(redis)), s.shards)
            finally:
                await redis.aclose()
            return done

        done = _run(go())
    print("\n".join(done) if done else "schema is up to date")
    return 0


def _with_redis(settings: Settings, fn: Callable[[Any, Any, Settings], Awaitable[Any]]) -> Any:
    from redis.exceptions import ConnectionError, TimeoutError

    from ordergate.buffer.connection import connect_redis, is_cluster
    from ordergate.buffer.keys import Keys
    from ordergate.runtime import resolved

    with resolved(settings) as s:

        async def go() -> Any:
            redis = await connect_redis(s.redis_url or "")
            try:
                return await fn(redis, Keys(s.key_prefix, is_cluster(redis)), s)
            except (ConnectionError, TimeoutError, OSError) as exc:
                raise CommandError(f"cannot reach Redis at {_where(s.redis_url)}: {exc}") from None
            finally:
                await redis.aclose()

        return _run(go())


def _where(url: str | None) -> str:
    """host:port of a URL, without the password it may carry."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url or "")
        return f"{parts.hostname}:{parts.port or 6379}"
    except ValueError:
        return "(unparseable URL)"


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.gateway import auth

    if args.keys_command == "create":
        try:
            key = _with_redis(
                settings, lambda r, k, s: auth.create_key(r, k, args.storefront_id, s.shards)
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        print(key)
        print(
            f"(API key for storefront {args.storefront_id!r}; shown once, stored hashed)",
            file=sys.stderr,
        )
    elif args.keys_command == "list":
        for prefix, storefront in _with_redis(settings, lambda r, k, s: auth.list_keys(r, k)):
            print(f"{prefix}  {storefront}")
    else:
        n = _with_redis(settings, lambda r, k, s: auth.revoke_key(r, k, args.key, s.shards))
        if not n:
            raise CommandError("no such key")
        print(f"revoked {n} key(s)")
    return 0


def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.buffer import deadletters

    if args.dlq_command == "list":
        letters = _with_redis(
            settings, lambda r, k, s: deadletters.list_dead_letters(r, k, s.shards, args.limit)
        )
        if args.json:
            print(msgspec.json.encode(letters).decode())
        elif not letters:
            print("no dead letters")
        else:
            for d in letters:
                print(
                    f"{d.handle}  shard {d.shard}  order {d.order_id or '-'}  "
                    f"deliveries {d.deliveries}  {d.failed_at:%Y-%m-%d %H:%M:%S}Z\n    {d.error}"
                )
        return 0
    if not args.all and not args.ids:
        raise CommandError("name dead-letter ids, or pass --all")

    async def replay(redis: Any, keys: Any, s: Settings) -> int:
        letters = await deadletters.list_dead_letters(redis, keys, s.shards, limit=100000)
        chosen = letters if args.all else [d for d in letters if d.handle in set(args.ids)]
        missing = set(args.ids) - {d.handle for d in chosen}
        if missing:
            raise CommandError(f"no dead letter with id {', '.join(sorted(missing))}")
        return await deadletters.replay(redis, keys, s.shards, chosen)

    print(f"re-queued {_with_redis(settings, replay)} dead letter(s)")
    return 0


def cmd_storefronts(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.buffer import webhooks
    from ordergate.buffer.errors import InvalidWebhook

    if args.storefronts_command == "set-webhook":
        try:
            hook = _with_redis(
                settings,
                lambda r, k, s: webhooks.set_webhook(
                    r, k, args.storefront_id, args.url, s.webhook_allow_private, s.shards
                ),
            )
        except InvalidWebhook as exc:
            raise CommandError(str(exc)) from None
        print(hook.secret)
        print(
            f"(signing secret for {args.storefront_id!r} -> {webhooks.redacted(hook.url)};"
            " shown once: events carry "
            "Ordergate-Signature: t=<unix>,v1=<HMAC-SHA256 of '<t>.' + body>)",
            file=sys.stderr,
        )
    elif args.storefronts_command == "remove-webhook":
        if not _with_redis(
            settings, lambda r, k, s: webhooks.remove_webhook(r, k, args.storefront_id, s.shards)
        ):
            raise CommandError(f"storefront {args.storefront_id!r} has no webhook")
        print(f"removed the webhook of {args.storefront_id!r}")
    elif args.storefronts_command == "set-limit":
        return _set_limit(args, settings)
    else:
        from ordergate.storefrontsview import measure, render_counts

        listing = _with_redis(settings, lambda r, k, s: measure(r, k, args.interval, s.shards))
        if args.json:
            print(msgspec.json.encode(listing).decode())
            return 0
        print(render_counts(listing, settings))
        hooks = _with_redis(settings, lambda r, k, s: webhooks.list_webhooks(r, k))
        for hook in hooks:
            print(f"webhook {hook.storefront_id}  {webhooks.redacted(hook.url)}")
        if not hooks:
            print("no webhooks")
    return 0


def _set_limit(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.buffer import storefronts

    sf = args.storefront_id
    if args.clear:
        if any(v is not None for v in (args.rate, args.burst, args.weight)):
            raise CommandError("--clear takes no --rate, --burst or --weight")
        if not _with_redis(settings, lambda r, k, s: storefronts.clear_limit(r, k, sf, s.shards)):
            raise CommandError(f"storefront {sf!r} has no limit of its own")
        print(f"{sf!r} is back on the defaults")
        return 0
    if all(v is None for v in (args.rate, args.burst, args.weight)):
        raise CommandError("give --rate, --burst and/or --weight, or --clear")

    async def change(redis: Any, keys: Any, s: Settings) -> Any:
        old = (await storefronts.limits(redis, keys)).get(sf)
        rate = args.rate if args.rate is not None else (old.rate if old else s.storefront_rate)
        burst = (
            args.burst
            if args.burst is not None
            else (old.burst if old and args.rate is None else 0)
        )
        weight = args.weight if args.weight is not None else (old.weight if old else 1)
        limit = storefronts.check_limit(sf, rate, burst, weight)
        await storefronts.set_limit(redis, keys, sf, limit, s.shards)
        return limit

    try:
        limit = _with_redis(settings, change)
    except storefronts.InvalidLimit as exc:
        raise CommandError(str(exc)) from None
    rate = f"{limit.rate:g} orders/s, burst {limit.burst}" if limit.rate else "no rate limit"
    print(f"{sf!r}: {rate}, weight {limit.weight}")
    return 0


def cmd_notifications(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.buffer.notifications import NotificationStreams

    def streams(redis: Any, keys: Any, s: Settings) -> NotificationStreams:
        return NotificationStreams(redis, keys, s.shards)

    if args.notifications_command == "dead":
        dead = _with_redis(settings, lambda r, k, s: streams(r, k, s).dead(args.limit))
        if args.json:
            print(msgspec.json.encode(dead).decode())
            return 0
        if not dead:
            print("no dead notifications")
        for d in dead:
            print(
                f"{d.event.entry_id}  {d.event.event_id}  {d.event.type}  "
                f"storefront {d.event.storefront_id}  order {d.event.order_id}  "
                f"attempts {d.attempts}  {d.failed_at:%Y-%m-%d %H:%M:%S}Z\n    {d.error}"
            )
        return 0
    if not args.all and not args.ids:
        raise CommandError("name dead notification ids, or pass --all")
    ids = None if args.all else list(args.ids)
    n = _with_redis(settings, lambda r, k, s: streams(r, k, s).requeue_dead(ids))
    print(f"re-queued {n} notification(s)")
    return 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.buffer.overview import read_overview
    from ordergate.statusview import Interrupts, render, watch

    def read(r: Any, k: Any, s: Settings) -> Awaitable[Any]:
        return read_overview(r, k, s.shards, s.drain_stale_s)

    if args.storefront:
        return _storefront_status(args, settings)
    if args.watch:
        if not args.interval > 0:
            raise CommandError("--interval must be a positive number of seconds")
        try:
            # SIGINT or SIGTERM ends the watch: its screen restored, exit 0, within GRACE_S
            with Interrupts() as interrupts:

                async def watching(r: Any, k: Any, s: Settings) -> None:
                    await watch(lambda: read(r, k, s), args.interval, interrupts.stop_event())

                _with_redis(settings, watching)
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends (this one came while no watch ran)
        return 0
    overview = _with_redis(settings, read)
    if args.json:
        print(msgspec.json.encode(overview).decode())
    else:
        render(overview)
    return 0


def _storefront_status(args: argparse.Namespace, settings: Settings) -> int:
    from ordergate.storefrontsview import StorefrontListing, measure, render_counts

    if args.watch:
        raise CommandError("--storefront shows one reading; leave out --watch")
    listing = _with_redis(
        settings, lambda r, k, s: measure(r, k, max(0.0, args.interval), s.shards)
    )
    rows = [row for row in listing.storefronts if row.storefront_id == args.storefront]
    if not rows:
        raise CommandError(f"the buffer knows no storefront {args.storefront!r}")
    if args.json:
        print(msgspec.json.encode(rows[0]).decode())
    else:
        print(render_counts(StorefrontListing(listing.interval_s, rows), settings))
    return 0


def cmd_drain(args: argparse.Namespace, settings: Settings) -> int:
    import getpass
    import socket
    import time

    from ordergate.buffer.control import check_rate, set_control

    if args.rate is not None:
        try:
            check_rate(args.rate)
        except ValueError as exc:
            raise CommandError(f"--rate: {exc}") from None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    who = f"cli:{user}@{socket.gethostname()}"
    paused = True if args.pause else False if args.resume else None
    control = _with_redis(
        settings, lambda r, k, s: set_control(r, k, paused=paused, rate=args.rate, by=who)
    )
    if args.json:
        print(msgspec.json.encode(control).decode())
        return 0
    at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(control.at_us / 1e6))
    print(
        f"drain {'paused' if control.paused else 'running'}; operator rate limit "
        f"{f'{control.rate:g} orders/s' if control.rate else 'none'}; set by {control.by} at {at}"
    )
    print(
        "(the leading worker applies it within a second; see `ordergate status`)", file=sys.stderr
    )
    return 0


def cmd_surge(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from ordergate.surge import SurgeOptions, run_surge

    options = SurgeOptions(
        shape=args.shape,
        host=args.target,
        users=args.users,
        duration=args.duration,
        results=Path(args.results) if args.results else None,
        data_dir=args.data_dir,
        processes=args.processes,
        drain_rate=args.drain_rate,
        drain_timeout=args.drain_timeout,
        max_p95_ms=args.max_p95_ms,
        max_error_share=args.max_error_share,
        storefronts=args.storefronts,
        hot_share=args.hot_share,
    )
    return run_surge(options, settings)


COMMANDS: dict[str, Callable[[argparse.Namespace, Settings], int]] = {
    "up": cmd_up,
    "serve": cmd_serve,
    "work": cmd_work,
    "migrate": cmd_migrate,
    "keys": cmd_keys,
    "dlq": cmd_dlq,
    "storefronts": cmd_storefronts,
    "notifications": cmd_notifications,
    "status": cmd_status,
    "drain": cmd_drain,
    "surge": cmd_surge,
}

"""``ordergate status`` for people: the overview as one rich screen, printed once or kept live."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ordergate.buffer.overview import Overview

_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}
_DRAIN_STYLE = {"draining": "green", "paused": "bold yellow", "stalled": "bold red"}


def _console() -> Console:
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze into 80 columns
        console = Console(width=200)
    return console


def render(o: Overview, console: Console | None = None) -> None:
    """Print the screen once."""
    (console or _console()).print(screen(o))


async def watch(
    read: Callable[[], Awaitable[Overview]], interval: float, console: Console | None = None
) -> None:
    """Keep the screen live, re-read every ``interval`` seconds, until cancelled (Ctrl-C). A
    failed read keeps the last screen under a line that says so."""
    last: RenderableType = Text("reading ...")
    with Live(last, console=console or _console(), auto_refresh=False) as live:
        while True:
            try:
                last = screen(await read())
                live.update(last, refresh=True)
            except (RedisError, OSError) as exc:
                note = Text(f"cannot read Redis ({exc}); retrying", style="bold red")
                live.update(Group(note, last), refresh=True)
            await asyncio.sleep(interval)


def screen(o: Overview) -> RenderableType:
    """The overview as one screen: drain and controls, rates, shards, breakers."""
    return Group(_header(o), Text(), _summary(o), Text(), _shards(o), Text(), _breakers(o))


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.0f}/s"


def _header(o: Overview) -> Text:
    d, c = o.drain, o.control
    state = d.state or "never started"
    text = Text.assemble(
        ("ordergate ", "bold"),
        time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(o.at)),
        "   drain ",
        (state, _DRAIN_STYLE.get(state, "bold red")),
        f"   leader {d.leader or '-'}",
        f" (heard {d.heard_s_ago:.1f} s ago)" if d.heard_s_ago is not None else " (never heard)",
    )
    if d.reason:
        text.append(f"\n  {d.reason}", style="yellow")
    text.append("\ncontrols ")
    if c.paused:
        text.append("PAUSED", style="bold yellow")
    else:
        text.append("running")
    text.append(f"   operator limit {_rate(c.rate) if c.rate else 'none'}")
    text.append(f"   cap in force {_rate(d.cap_per_s) if d.cap_per_s else 'none'}")
    if c.by:
        at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(c.at_us / 1e6))
        text.append(f"\n  last set by {c.by} at {at}", style="dim")
    return text


def _summary(o: Overview) -> Table:
    if o.eta_tail_s is not None:
        eta = f"{o.eta_tail_s:,} s"
    else:
        eta = f"none: {o.eta_tail_reason}"
    n = o.notifications
    grid = Table.grid(padding=(0, 2))
    grid.add_row("buffered", f"{o.buffered:,}", "queue numbers issued", f"{o.issued:,}")
    grid.add_row("ingest", _rate(o.ingest_rate), "settled (watermark)", f"{o.settled:,}")
    grid.add_row("drain", _rate(o.drain_rate), "busy rate (ETA)", _rate(o.drain.rate_per_s))
    grid.add_row("tail ETA", eta, "dead-lettered orders", f"{o.dead_letters:,}")
    grid.add_row(
        "notifications",
        f"{n.waiting:,} waiting, {n.deferred:,} deferred, {n.dead:,} dead",
        "notifier",
        n.leader or "none running",
    )
    return grid


def _shards(o: Overview) -> Table:
    table = Table(title="shards", title_justify="left")
    table.add_column("shard", justify="right")
    for column in ("depth", "pending", "oldest"):
        table.add_column(column, justify="right")
    for s in o.shards:
        oldest = "-" if s.oldest_age_s is None else f"{s.oldest_age_s:,.1f} s"
        table.add_row(str(s.shard), f"{s.depth:,}", f"{s.pending:,}", oldest)
    ages = [s.oldest_age_s for s in o.shards if s.oldest_age_s is not None]
    table.add_row(
        "all",
        f"{sum(s.depth for s in o.shards):,}",
        f"{sum(s.pending for s in o.shards):,}",
        f"{max(ages):,.1f} s" if ages else "-",
        style="bold",
    )
    return table


def _breakers(o: Overview) -> RenderableType:
    if not o.breakers:
        return Text("circuit breakers: none reported (the leading notifier reports each second)")
    table = Table(title="circuit breakers", title_justify="left")
    table.add_column("breaker", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for column in ("fail %", "slow %", "in flight", "deferred", "delivered"):
        table.add_column(column, justify="right")
    table.add_column("last error", overflow="fold")
    for b in o.breakers:
        state = b.state + (f" ({b.open_for_s:.1f} s)" if b.state == "open" else "")
        table.add_row(
            b.name,
            f"[{_STYLE.get(b.state, '')}]{state}[/]",
            f"{b.failure_rate * 100:.0f}",
            f"{b.slow_rate * 100:.0f}",
            str(b.inflight),
            f"{b.deferred:,}",
            f"{b.delivered:,}",
            b.last_error or "",
        )
    return table

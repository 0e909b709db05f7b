"""``ordergate status`` for people: the overview as rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from buffer.overview import Overview

_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}


def render(o: Overview, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: do not squeeze into 80 columns
            console = Console(width=200)
    d = o.drain
    rate = f"{d.rate_per_s:,.0f}/s" if d.rate_per_s is not None else "not measured"
    heard = f"{d.heard_s_ago:.1f} s ago" if d.heard_s_ago is not None else "never"
    summary = Table.grid(padding=(0, 2))
    summary.add_row("buffered", f"{o.buffered:,}", "queue numbers issued", f"{o.issued:,}")
    summary.add_row("drain", f"{d.state or 'never started'}", "rate", rate)
    summary.add_row("leader", d.leader or "-", "last heard", heard)
    if d.reason:
        summary.add_row("reason", d.reason, "", "")
    summary.add_row("dead-lettered orders", f"{o.dead_letters:,}", "", "")
    n = o.notifications
    summary.add_row(
        "notifications",
        f"{n.waiting:,} waiting, {n.deferred:,} deferred, {n.dead:,} dead",
        "notifier",
        n.leader or "none running",
    )
    console.print(summary)
    if not o.breakers:
        console.print("circuit breakers: none reported (the leading notifier reports each second)")
        return
    table = Table(title="circuit breakers")
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
    console.print(table)

"""``ordergate status`` for people: the overview as one rich screen, printed once or kept live."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from types import FrameType, TracebackType
from typing import Any

from redis.exceptions import RedisError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ordergate.buffer.connection import cancel_and_wait
from ordergate.buffer.overview import Overview

_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red"}
_DRAIN_STYLE = {"draining": "green", "paused": "bold yellow", "stalled": "bold red"}

GRACE_S = 5.0  # after SIGINT/SIGTERM, the watch has this long to restore the screen and close
ABANDON_S = 1.0  # of which a read still running when the watch stops gets this long to end


def _console() -> Console:
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze into 80 columns
        console = Console(width=200)
    return console


def render(o: Overview, console: Console | None = None) -> None:
    """Print the screen once."""
    (console or _console()).print(screen(o))


class Interrupts:
    """SIGINT and SIGTERM end ``status --watch`` promptly, whatever it is doing.

    The first signal sets the event of ``stop_event`` (the watch leaves the read it waits for,
    restores the terminal and returns; the command exits 0) and starts a watchdog: if the ``with``
    block is still not left ``grace`` seconds later (a teardown stuck, stdout blocked: a write to
    a pipe nobody reads), the process exits at once with status 128 + the signal, as it does on a
    second signal. A signal that comes while no loop runs the watch (before it starts, after it
    ends) raises KeyboardInterrupt, as Python's own SIGINT handler does.

    The watch is stopped by an event, never by cancelling its task, which is what asyncio.run's
    SIGINT handler does: a cancel that comes while the task runs towards a Redis call is lost
    (Python 3.11's asyncio.wait_for, which redis-py sends every command with, returns the
    command's result instead of raising CancelledError when the command completes in the same
    loop turn), and the watch then refreshed forever. The handler only sets a flag and wakes the
    loop (``call_soon_threadsafe``), so it can come at any moment safely."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, grace: float = GRACE_S) -> None:
        self.grace = grace
        self.signum: int | None = None  # the first signal, once one came
        self._fired = threading.Event()  # a signal came: the watchdog's clock runs
        self._left = threading.Event()  # the with block was left: the watchdog stands down
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Interrupts:
        threading.Thread(target=self._watchdog, name="status-watchdog", daemon=True).start()
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._restore()  # first: a signal now must not find this object half torn down
        self._left.set()
        self._fired.set()  # the watchdog thread ends

    def stop_event(self) -> asyncio.Event:
        """The event the first signal sets, for the running loop (set already if one came)."""
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self.signum is not None:
            self._event.set()
        return self._event

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:  # None: not installed from Python, nothing to put back
                signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # a second signal: the user insists
        self.signum = signum
        self._fired.set()
        loop, event = self._loop, self._event
        if loop is None or event is None or loop.is_closed() or not loop.is_running():
            raise KeyboardInterrupt  # not watching (yet, or any more): stop what is running
        loop.call_soon_threadsafe(event.set)

    def _watchdog(self) -> None:
        self._fired.wait()
        if not self._left.wait(self.grace):
            os._exit(128 + (self.signum or signal.SIGINT))


async def watch(
    read: Callable[[], Awaitable[Overview]],
    interval: float,
    stop: asyncio.Event,
    console: Console | None = None,
) -> None:
    """Keep the screen live, re-read every ``interval`` seconds, until ``stop`` is set; then
    return at once (a read in flight gets ABANDON_S to end). A failed read keeps the last screen
    under a line that says so.

    Each read is a task of its own that the watch waits for beside ``stop``, so no stop waits for
    Redis (stalled, or slow to answer) and none is lost in it (see Interrupts)."""
    stopping = asyncio.ensure_future(stop.wait())
    last: RenderableType = Text("reading ...")
    try:
        with Live(last, console=console or _console(), auto_refresh=False) as live:
            while not stop.is_set():
                reading = asyncio.ensure_future(read())
                try:
                    await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if stop.is_set() or not reading.done():
                        await cancel_and_wait(
                            [reading], ABANDON_S
                        )  # a cancel can be lost: see Interrupts
                if stop.is_set():
                    break
                try:
                    last = screen(reading.result())
                    live.update(last, refresh=True)
                except (RedisError, OSError) as exc:
                    note = Text(f"cannot read Redis ({exc}); retrying", style="bold red")
                    live.update(Group(note, last), refresh=True)
                await asyncio.wait((stopping,), timeout=interval)
    finally:
        stopping.cancel()


def screen(o: Overview) -> RenderableType:
    """The overview as one screen: drain and controls, rates, shards, breakers."""
    return Group(
        _header(o),
        Text(),
        _summary(o),
        Text(),
        _shards(o),
        Text(),
        _storefronts(o),
        Text(),
        _breakers(o),
    )


def _storefronts(o: Overview) -> RenderableType:
    if not o.storefronts:
        return Text("storefronts: none has sent orders yet")
    table = Table(title="top storefronts", title_justify="left")
    table.add_column("storefront", no_wrap=True)
    for column in ("buffered", "share", "ingest", "drain", "429 rate/share/full", "weight"):
        table.add_column(column, justify="right")
    for s in o.storefronts:
        table.add_row(
            s.storefront_id,
            f"{s.buffered:,}",
            f"{s.share:.0%}",
            _rate(s.ingest_rate),
            _rate(s.drain_rate),
            "/".join(str(s.refused.get(r, 0)) for r in ("rate", "share", "full")),
            str(s.weight),
        )
    return table


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
        f"   workers {d.leader or '-'}",
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
    grid.add_row("ingest", _rate(o.ingest_rate), "settled", f"{o.settled:,}")
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
    table = Table(title="lanes", title_justify="left")
    table.add_column("lane", justify="right")
    for column in ("depth", "pending", "oldest", "rate"):
        table.add_column(column, justify="right")
    table.add_column("state")
    table.add_column("owner")
    for s in o.shards:
        oldest = "-" if s.oldest_age_s is None else f"{s.oldest_age_s:,.1f} s"
        table.add_row(
            str(s.shard),
            f"{s.depth:,}",
            f"{s.pending:,}",
            oldest,
            _rate(s.rate_per_s),
            s.state or "-",
            s.owner or "-",
        )
    ages = [s.oldest_age_s for s in o.shards if s.oldest_age_s is not None]
    rates = [s.rate_per_s for s in o.shards if s.rate_per_s]
    table.add_row(
        "all",
        f"{sum(s.depth for s in o.shards):,}",
        f"{sum(s.pending for s in o.shards):,}",
        f"{max(ages):,.1f} s" if ages else "-",
        _rate(sum(rates)) if rates else "-",
        "",
        f"{len({s.owner for s in o.shards if s.owner})} workers",
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

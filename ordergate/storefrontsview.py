"""``ordergate storefronts list`` and ``status --storefront``: each storefront's share of the
buffer, its drain rate and its 429s, as a table or JSON."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table

from ordergate.buffer.keys import Keys
from ordergate.buffer.overview import Storefront, storefront_figures
from ordergate.buffer.storefronts import REASONS, StorefrontCounts, read_counts
from ordergate.settings import Settings


class StorefrontListing(msgspec.Struct, frozen=True):
    interval_s: float
    storefronts: list[Storefront]


async def measure(redis: Any, keys: Keys, interval_s: float, shards: int) -> StorefrontListing:
    """Two reads of the counts ``interval_s`` apart; the rates are their differences."""
    first = {c.storefront_id: c for c in await read_counts(redis, keys, shards)}
    started = time.monotonic()
    if interval_s > 0:
        await asyncio.sleep(interval_s)
    counts = await read_counts(redis, keys, shards)
    span = time.monotonic() - started
    total = sum(c.buffered for c in counts) or 1
    return StorefrontListing(
        round(span, 3), [_row(c, first.get(c.storefront_id), span, total) for c in counts]
    )


def _row(c: StorefrontCounts, before: StorefrontCounts | None, span: float, total: int) -> Any:
    def rate(now: int, then: int | None) -> float | None:
        return None if then is None or span <= 0 else (now - then) / span

    return storefront_figures(
        c,
        total,
        rate(c.admitted, before.admitted if before else None),
        rate(c.settled, before.settled if before else None),
    )


def render_counts(listing: StorefrontListing, settings: Settings) -> Any:
    if not listing.storefronts:
        return "no storefront has sent orders yet"
    table = Table(title=f"storefronts (rates over {listing.interval_s:g} s)")
    for name in ("storefront", "buffered", "share", "in/s", "drain/s", "429 rate/share/full"):
        table.add_column(name, justify="left" if name == "storefront" else "right")
    table.add_column("limit")
    table.add_column("weight", justify="right")
    default = f"{settings.storefront_rate:g}/s (default)" if settings.storefront_rate else "none"
    for row in listing.storefronts:
        if row.rate_limit is None:
            limit = default
        elif row.rate_limit:
            limit = f"{row.rate_limit:g}/s burst {row.burst}"
        else:
            limit = "none (own)"
        table.add_row(
            row.storefront_id,
            f"{row.buffered:,}",
            f"{row.share:.0%}",
            "-" if row.ingest_rate is None else f"{row.ingest_rate:,.1f}",
            "-" if row.drain_rate is None else f"{row.drain_rate:,.1f}",
            "/".join(str(row.refused[r]) for r in REASONS),
            limit,
            str(row.weight),
        )
    out = io.StringIO()
    Console(width=200, file=out).print(table)
    return out.getvalue().rstrip()

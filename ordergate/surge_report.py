"""The surge audit as text: the figures first, then the storefronts' table, then each check and
the verdict."""

from __future__ import annotations

from typing import Any

from ordergate.surge_audit import (
    ETA_MIN_WAIT_S,
    TOO_MANY,
    Audit,
    EtaError,
    StorefrontFigures,
    percent,
)

NEW_ORDERS = "POST /v1/orders [new]"
# The storefronts' table's heads for the 429 problem types (TOO_MANY), explained under it.
TOO_MANY_HEADS = {
    "rate-limited": "429 rate",
    "storefront-share-full": "429 share",
    "buffer-full": "429 full",
}
POLLS = "GET /v1/queue/{ticket}"


def render(a: Audit) -> str:
    c, d = a.committed, a.drain
    lines = [
        _row(
            "accepted orders",
            f"{a.accepted:,}",
            f"distinct order ids with a receipt (202: {a.answers_202:,}; "
            f"200 to a retry: {a.receipts_on_retry:,})",
        ),
        _row(
            "duplicates answered",
            f"{a.duplicates_answered:,} of {a.duplicates_sent:,}",
            "200 with the original order id",
        ),
        _row("rejected", f"{sum(a.rejected.values()):,}", _counts(a.rejected)),
        _row("429 too many", f"{a.too_many:,}", _counts(a.too_many_by_problem)),
        _row("503 unavailable", f"{a.unavailable:,}", ""),
        _row("other answers", f"{sum(a.unexpected.values()):,}", _counts(a.unexpected)),
        _row("no receipt", f"{sum(a.no_receipt.values()):,}", _counts(a.no_receipt)),
        _row("latency, new orders", *_latency(a.latency.get(NEW_ORDERS))),
        _row("latency, queue polls", *_latency(a.latency.get(POLLS))),
        _row(
            "customers",
            f"{sum(n for k, n in a.customers.items() if k != 'position_increases'):,}",
            "tickets followed to the end: "
            + (_counts({k: n for k, n in a.customers.items() if k != "position_increases"})),
        ),
        *_eta(a.eta),
        _row("peak buffer depth", f"{d.peak_depth:,}", "sampled about twice a second"),
        _row(
            "time to drain",
            f"{d.seconds:.1f} s" if d.drained else "not drained",
            "from the end of the load to an empty buffer",
        ),
        _row(
            "committed rows",
            "?" if c.error else f"{c.rows:,}",
            "not checked"
            if c.error
            else f"= {c.of_accepted:,} of accepted orders + "
            f"{c.without_receipt:,} of orders without a receipt",
        ),
    ]
    if a.knee is not None:
        lines.append(_row("ramp knee", *_knee(a.knee)))
    if a.storefronts:
        lines += ["", *_storefronts(a.storefronts, a.hot_share)]
    lines.append("")
    for check in a.checks:
        mark = {True: "ok  ", False: "FAIL", None: "??  "}[check.ok] if check.judged else "--  "
        lines.append(f"  {mark}  {check.name}: {check.detail}")
    lines += ["", a.verdict]
    return "\n".join(lines)


def _row(name: str, value: str, detail: str) -> str:
    return f"{name:<22}{value:>14}   {detail}".rstrip()


def _counts(counts: dict[str, int]) -> str:
    return "; ".join(f"{k}: {n:,}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _latency(lat: dict[str, Any] | None) -> tuple[str, str]:
    if not lat or not lat["requests"]:
        return "-", "no requests"
    p = [("-" if lat[k] is None else f"{lat[k]:.0f}") for k in ("p50", "p95", "p99")]
    return (
        f"p50 {p[0]} ms",
        f"p95 {p[1]} ms, p99 {p[2]} ms ({lat['requests']:,} requests, {lat['rps']:,.0f}/s)",
    )


def _eta(e: EtaError) -> list[str]:
    """Two rows: the first ETAs' error, and what it was measured on."""
    lean = ""
    if e.signed_median is not None and round(100 * e.signed_median) > 0:
        lean = " (the ETA ran long: orders came sooner than told)"
    elif e.signed_median is not None and round(100 * e.signed_median) < 0:
        lean = " (the ETA ran short: orders came later than told)"
    wait = "-" if e.median_wait_s is None else f"{e.median_wait_s:.1f} s"
    within = f", known within {e.median_gap_s / 2:.1f} s" if e.median_gap_s else ""
    return [
        _row(
            "ETA error",
            f"p50 {percent(e.p50)}",
            f"p90 {percent(e.p90)}, signed median {percent(e.signed_median, signed=True)}{lean};"
            f" |first eta_seconds - wait| / wait of {e.tickets:,} measured tickets",
        ),
        _row(
            "ETA waits",
            f"median {wait}",
            f"of the measured tickets, first answer to commit{within}"
            + (" (half the last poll interval)" if within else "")
            + "; not measured: "
            f"{e.short:,} under {ETA_MIN_WAIT_S:g} s (too short for a relative error), "
            f"{e.without_eta:,} without a first ETA, {e.unfinished:,} still waiting at the end",
        ),
    ]


def _storefronts(rows: list[StorefrontFigures], hot_share: float) -> list[str]:
    """A row per storefront, the hot one marked ``*``; 429s by problem type, in TOO_MANY's
    order (a 429 of another type would show in "other answers" too)."""
    width = max(len("storefront"), *(len(r.storefront) for r in rows))
    heads = ["users", "orders", "receipts", *(TOO_MANY_HEADS[p] for p in TOO_MANY)]
    heads += ["wait p50", "wait p99", "waits"]
    widths = [max(8, len(h)) for h in heads]
    lines = ["  " + f"{'storefront':<{width}}" + _cells(heads, widths)]
    for r in rows:
        cells = [f"{r.users:,}", f"{r.orders:,}", f"{r.receipts:,}"]
        cells += [f"{r.too_many.get(p, 0):,}" for p in TOO_MANY]
        cells += [_seconds(r.wait_p50_s), _seconds(r.wait_p99_s), f"{r.waits:,}"]
        lines.append(("* " if r.hot else "  ") + f"{r.storefront:<{width}}" + _cells(cells, widths))
    hot = (
        f"* hot, asked for {percent(hot_share)} of the users; " if any(r.hot for r in rows) else ""
    )
    return [
        *lines,
        f"  ({hot}users: the most it had at once; waits: from receipt to commit, of the "
        "tickets customers followed;",
        "   429 rate: rate-limited, share: storefront-share-full, full: buffer-full)",
    ]


def _cells(cells: list[str], widths: list[int]) -> str:
    return "".join(f"  {c:>{w}}" for c, w in zip(cells, widths, strict=True))


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _knee(report: dict[str, Any]) -> tuple[str, str]:
    knee, stop = report["knee"], report["stopped_by"]
    limits = report["limits"]
    why = (
        f"the next step, {stop['users']} users, had p95 {stop['p95_ms']} ms and "
        f"{100 * stop['error_share']:.2f} % errors"
        if stop
        else "no step passed a limit"
    )
    rule = f"limits p95 {limits['max_p95_ms']:.0f} ms, errors {100 * limits['max_error_share']:g} %"
    if knee is None:
        return "below the first step", f"{why} ({rule})"
    return (
        f"{knee['users']} users",
        f"{knee['rps']:,.0f} req/s, p95 {knee['p95_ms']} ms; {why} ({rule})",
    )

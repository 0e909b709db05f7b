"""The benchmark's figures: ratios, targets, a printed summary, JSON and a PNG chart."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

P99_BOUND_MS = 25.0
TARGETS = {  # ratio name -> the least it should be (on a 2-core machine)
    "c/a": 0.75,
    "c/b": 2.5,
    "c/f": 3.0,
    "d/COPY": 0.6,
    "e/a": 0.8,
}
LABELS = {
    "a": "(a) plain Starlette + msgspec",
    "b": "(b) naive INSERT per order",
    "f": "(f) Starlette + arq enqueue_job",
    "c": "(c) ordergate POST /v1/orders",
    "g": "(g) (c) with storefront limits on",
    "h": "(h) (c) on a 3-master Valkey Cluster",
}


def _div(x: float | None, y: float | None) -> float:
    return x / y if x is not None and y else math.nan


def ratios(report: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    post = report.get("post", {}).get("median_rps", {})
    if post:
        for other in ("a", "b", "f"):
            out[f"c/{other}"] = _div(post.get("c"), post.get(other))
        if "g" in post:
            out["g/c (limits on / off)"] = _div(post.get("g"), post.get("c"))
            out["g/a"] = _div(post.get("g"), post.get("a"))
        if "h" in post:
            out["h/c (cluster / one primary)"] = _div(post.get("h"), post.get("c"))
    two = report.get("drain_two_postgres")
    if two:
        out["d2 two Postgres / one"] = two["ratio"]
    drain = report.get("drain")
    if drain:
        out["d/COPY"] = _div(drain["drain"]["rate"], drain["copy"]["batched_rate"])
        out["d/COPY (one COPY)"] = _div(drain["drain"]["rate"], drain["copy"]["single_rate"])
        delayed = drain.get("delayed")
        if delayed:
            out[f"d/COPY loop, Postgres +{delayed['delay_ms']:g} ms"] = delayed["ratio"]
    static = report.get("queue", {}).get("static")
    if static:
        out["e/a"] = static["ratio_e_a"]
        if "ratio_e304_a" in static:
            out["e304/a"] = static["ratio_e304_a"]
    return out


def flat(run: Mapping[str, Any]) -> bool:
    """No error or timeout, p99 within the bound, and no upward drift (last third vs first)."""
    thirds = run["p99_thirds_ms"]
    return (
        run["error_share"] == 0
        and run["p99_ms"] <= P99_BOUND_MS
        and thirds[2] <= 1.5 * thirds[0] + 1.0
    )


def targets(report: Mapping[str, Any], r: Mapping[str, float]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for every target the run has figures for."""
    out = [
        (f"{name} >= {least}", f"{r[name]:.2f}", r[name] >= least)
        for name, least in TARGETS.items()
        if name in r and not math.isnan(r[name])
    ]
    open_loop = report.get("open_loop", {})
    at80 = open_loop.get("c_at_80")
    if at80:
        out.append(
            (
                f"p99 of (c) at 80 % of its peak <= {P99_BOUND_MS:g} ms",
                f"{_ms(at80['p99_ms'])} ms",
                at80["p99_ms"] <= P99_BOUND_MS and at80["error_share"] == 0,
            )
        )
    over = open_loop.get("c_overload")
    if over:
        thirds = "/".join(_ms(t) for t in over["p99_thirds_ms"])
        out.append(
            (
                "(c) flat in the overload run",
                f"p99 {_ms(over['p99_ms'])} ms (by third {thirds}), {over['error_share']:.1%} bad",
                flat(over),
            )
        )
    return out


def _ms(v: float) -> str:
    return "timeout" if v == math.inf else f"{v:.1f}"


def print_summary(report: Mapping[str, Any]) -> None:
    print("\n== results")
    print(f"command: {report['command']}")
    print(
        f"cpus: {report['cpus']}; server under test on {report['server_cpus'] or 'any'}, "
        f"generator/Valkey/Postgres/workers on {report['other_cpus'] or 'any'}; "
        f"{report.get('processes', 1)} uvicorn process(es) per server; (c) with durability"
        f" {report.get('durability', 'fsync')}"
    )
    post = report.get("post")
    if post:
        print(
            f"\n{'POST /v1/orders, closed loop':<36}{'req/s':>10}{'spread':>8}{'p50 ms':>9}"
            f"{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}{'srv cpu':>9}{'gen cpu':>9}"
        )
        for kind, rps in post["median_rps"].items():
            r = post["median_run"][kind]
            print(
                f"{LABELS[kind]:<36}{rps:>10,.0f}{post['spread'][kind]:>8.1%}{r['p50_ms']:>9.2f}"
                f"{r['p95_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['error_share']:>8.2%}"
                f"{r['watched_cpu'].get('server', math.nan):>9.0%}{r['generator_cpu']:>9.0%}"
            )
    for variant, q in report.get("queue", {}).items():
        print(
            f"\nGET /v1/queue ({variant}){'':<16}{'req/s':>10}{'spread':>8}{'p50 ms':>9}"
            f"{'p95 ms':>9}{'p99 ms':>9}{'errors':>8}{'srv cpu':>9}{'gen cpu':>9}"
        )
        for kind, rps in q["median_rps"].items():
            r = q["median_run"][kind]
            names = {"a": "(a) plain GET", "e": "(e) queue", "e304": "(e304) If-None-Match"}
            print(
                f"{names[kind]:<36}{rps:>10,.0f}{q['spread'][kind]:>8.1%}{r['p50_ms']:>9.2f}"
                f"{r['p95_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['error_share']:>8.2%}"
                f"{r['watched_cpu'].get('server', math.nan):>9.0%}{r['generator_cpu']:>9.0%}"
            )
    drain = report.get("drain")
    if drain:
        d, c = drain["drain"], drain["copy"]
        print(
            f"\n(d) drain of {d['committed']:,} orders by {d.get('workers', 1)} workers:"
            f" {d['rate']:,.0f}/s; COPY of the same rows: {c['batched_rate']:,.0f}/s in"
            f" transactions of {c['batch_size']}, {c['single_rate']:,.0f}/s as one COPY"
            f" (d/COPY {_div(d['rate'], c['batched_rate']):.2f}, target >= 0.6)"
        )
        delayed = drain.get("delayed")
        if delayed:
            print(
                f"    through a {delayed['delay_ms']:g} ms delay proxy:"
                f" {delayed['drain']['rate']:,.0f}/s against one loop of COPY transactions"
                f" {delayed['copy']['batched_rate']:,.0f}/s = {delayed['ratio']:.2f} x"
                " (target >= 4)"
            )
        v = drain.get("valkey")
        if v:
            print(
                f"    Valkey per order: CPU {v['admit_cpu_us']:.1f} us admitting +"
                f" {v['drain_cpu_us']:.1f} us draining = {v['cpu_us']:.1f} us (target <= 10),"
                f" {v.get('cpu_per_xadd', math.nan):.1f} x a bare XADD of the same body; inside"
                f" scripts {v.get('admit_commands_us', math.nan):.1f} +"
                f" {v.get('drain_commands_us', math.nan):.1f} us;"
                f" memory body + {v['buffered_overhead_bytes']:.0f} B buffered (target <= 250),"
                f" {v['settled_bytes']:.0f} B settled (target <= 150)"
            )
    two = report.get("drain_two_postgres")
    if two:
        print(
            f"\n(d2) drain into two Postgres servers: {two['two']['drain']['rate']:,.0f}/s"
            f" ({two['two']['drain']['committed']:,} orders) against one:"
            f" {two['one']['drain']['rate']:,.0f}/s ({two['one']['drain']['committed']:,}"
            f" orders) = {two['ratio']:.2f} x"
        )
    open_loop = report.get("open_loop", {})
    if open_loop:
        print(
            f"\n{'open loop (latency from due time)':<36}{'offered':>9}{'ok/s':>9}{'p50 ms':>9}"
            f"{'p99 ms':>9}{'bad':>8}{'timeouts':>10}{'conns':>7}"
        )
        for name, label in (
            ("c_at_80", "(c) at 80 % of its peak"),
            ("b_overload", "(b) overload"),
            ("c_overload", "(c) overload"),
        ):
            r = open_loop.get(name)
            if r:
                print(
                    f"{label:<36}{r['offered_rps']:>9,.0f}{r['ok'] / r['seconds']:>9,.0f}"
                    f"{_ms(r['p50_ms']):>9}{_ms(r['p99_ms']):>9}{r['error_share']:>8.1%}"
                    f"{r['timeouts']:>10,}{r['max_connections_used']:>7}"
                )
    _print_profile(report.get("profile", {}))
    r = report["ratios"]
    print("\nratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in r.items()))
    for target, measured, met in report["targets"]:
        print(f"{'MET   ' if met else 'MISSED'} {target}: {measured}")


def _print_profile(profiles: Mapping[str, Any]) -> None:
    """CPU per request by layer (py-spy), side by side for the profiled servers."""
    if not profiles:
        return
    kinds = list(profiles)
    layers: list[str] = []
    for p in profiles.values():
        layers += [k for k in p["layers_us"] if k not in layers]
    print(f"\nCPU per request by layer (py-spy){'':<18}" + "".join(f"{k:>12}" for k in kinds))
    for layer in layers:
        cells = "".join(f"{profiles[k]['layers_us'].get(layer, 0.0):>9.1f} us" for k in kinds)
        print(f"  {layer:<48}{cells}")
    total = "".join(f"{profiles[k]['cpu_us_per_request']:>9.1f} us" for k in kinds)
    print(f"  {'total (server cpu / req/s)':<48}{total}")


def _finite(value: Any) -> Any:
    """JSON without Infinity/NaN: non-finite floats become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def chart(report: Mapping[str, Any], path: Path) -> None:
    """Throughput bars, drain vs COPY, and p99 over time in the overload runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    ax = axes[0]
    names, values, colors = [], [], []
    for kind, rps in report.get("post", {}).get("median_rps", {}).items():
        names.append(
            {
                "a": "(a) plain",
                "b": "(b) naive",
                "f": "(f) arq",
                "c": "(c) ordergate",
                "g": "(g) limits on",
                "h": "(h) cluster",
            }[kind]
        )
        values.append(rps)
        colors.append("tab:green" if kind == "c" else "tab:gray")
    for kind, rps in report.get("queue", {}).get("static", {}).get("median_rps", {}).items():
        names.append({"a": "GET plain", "e": "(e) queue", "e304": "(e) 304"}[kind])
        values.append(rps)
        colors.append("tab:blue" if kind != "a" else "tab:gray")
    ax.bar(names, values, color=colors)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v / 1000:.1f}k", ha="center", va="bottom", fontsize=8)
    ax.set_title("closed loop, req/s (median)")
    ax.tick_params(axis="x", labelrotation=35, labelsize=8)

    ax = axes[1]
    drain = report.get("drain")
    if drain:
        labels = ["(d) drain", f"COPY x{drain['copy']['batch_size']}", "one COPY"]
        vals = [
            drain["drain"]["rate"],
            drain["copy"]["batched_rate"],
            drain["copy"]["single_rate"],
        ]
        ax.bar(labels, vals, color=["tab:green", "tab:gray", "tab:gray"])
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v / 1000:.1f}k", ha="center", va="bottom", fontsize=8)
    ax.set_title("orders/s into partitioned Postgres")

    ax = axes[2]
    open_loop = report.get("open_loop", {})
    for name, color in (("b_overload", "tab:red"), ("c_overload", "tab:green")):
        r = open_loop.get(name)
        if not r:
            continue
        cap = r["timeout_s"] * 1000
        ys = [cap if p["p99_ms"] is None else min(p["p99_ms"], cap) for p in r["per_second"]]
        ax.plot(
            range(1, len(ys) + 1),
            ys,
            color=color,
            marker=".",
            label=f"{name[0]} at {r['offered_rps']:,.0f}/s ({r['error_share']:.0%} bad)",
        )
    at80 = open_loop.get("c_at_80")
    if at80:
        cap = at80["timeout_s"] * 1000
        ys = [cap if p["p99_ms"] is None else min(p["p99_ms"], cap) for p in at80["per_second"]]
        ax.plot(
            range(1, len(ys) + 1),
            ys,
            color="tab:green",
            ls=":",
            marker=".",
            label=f"c at 80 % ({at80['offered_rps']:,.0f}/s)",
        )
    ax.axhline(P99_BOUND_MS, color="black", ls="--", lw=0.8, label=f"{P99_BOUND_MS:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("second of the run")
    ax.set_title("open loop: p99 latency per second (ms; timeouts at the cap)")
    ax.legend(fontsize=8)
    fig.suptitle(report["command"], fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finish(report: dict[str, Any], json_path: Path, png_path: Path) -> None:
    """Ratios and targets into ``report``; print it; write JSON and the chart."""
    report["ratios"] = ratios(report)
    report["targets"] = targets(report, report["ratios"])
    print_summary(report)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(_finite(report), indent=2, default=str))
    chart(report, png_path)
    print(f"\nwrote {json_path} and {png_path} ({report['seconds']:.0f} s in all)")

"""A capacity model from one run of ``loadtests/bench.py``: how many gateway cores, Valkey
masters, worker processes, Postgres servers and shards a target order rate needs.

    python -m loadtests.capacity BENCH_JSON [--rate 100000 --rate 870000] [--markdown]

It reads four figures a run with ``--only d post`` measures (see docs/capacity.md):

* (c)'s closed-loop orders/s, by one gateway pinned alone to one core (``post``);
* (d)'s drain orders/s, by ``--drain-workers`` burst worker processes over the run's shards;
* (d)'s Valkey CPU per order, admitting and draining (``drain.valkey``);
* (d)'s COPY rows/s into one Postgres server, in transactions as the drain commits.

Each count is the target rate over what one unit did here, rounded up, and scaling is assumed
linear: the model says where that stops holding. Every figure printed is labelled:

* measured: read from the JSON as it is;
* derived: arithmetic on this run's figures only (a rate per worker, a sum, a ratio);
* assumed: a stated choice of the model (a utilisation target) or a limit of the software;
* extrapolated: a count for a target rate, which no machine here has run.

Optional rows are scaling checks measured on this machine, with their ratio to the one-server
figure: (h), (c) with the buffer on a 3-master Valkey Cluster, and (d2), the drain into two
Postgres servers. A JSON without a required figure exits with status 2 and names the field.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import msgspec
from redis.crc import key_slot

from ordergate.settings import Settings

Kind = Literal["measured", "derived", "assumed", "extrapolated"]

CLUSTER_SLOTS = 16384  # Redis/Valkey Cluster hash slots: a lane's keys share one
MAX_SHARDS = 1024  # ordergate's settings refuse more (ordergate/settings.py)
DEFAULT_RATES = (100_000.0, 870_000.0)  # a large sale; the seed's Double 11 peak
DEFAULT_UTILISATION = 0.6  # of one Valkey master's single command thread


class MissingFigure(Exception):
    """The bench JSON lacks a figure the model needs (or holds no usable value for it)."""

    def __init__(self, path: str, why: str = "missing") -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


@dataclass(frozen=True)
class Figure:
    """One number of the model, with what it is and where it came from."""

    label: str
    value: float
    unit: str
    kind: Kind
    source: str


def _get(report: Mapping[str, Any], path: str) -> Any:
    node: Any = report
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            raise MissingFigure(path)
        node = node[part]
    return node


def required(report: Mapping[str, Any], path: str) -> float:
    """A positive number at ``path`` (dotted) in ``report``, or MissingFigure naming it."""
    value = _get(report, path)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MissingFigure(path, f"not a number ({value!r})")
    if not math.isfinite(value) or value <= 0:
        raise MissingFigure(path, f"not a positive number ({value!r})")
    return float(value)


def optional(report: Mapping[str, Any], path: str) -> float | None:
    try:
        return required(report, path)
    except MissingFigure:
        return None


def _default_shards() -> int:
    for f in msgspec.structs.fields(Settings):
        if f.name == "shards":
            return int(f.default)
    raise RuntimeError("Settings has no shards field")


@dataclass(frozen=True)
class Inputs:
    """The measured inputs, and the per-unit rates derived from them."""

    gateway: Figure  # orders/s of one gateway core
    valkey_admit: Figure
    valkey_drain: Figure
    valkey: Figure  # us of Valkey CPU per order, end to end
    worker: Figure  # orders/s per worker process
    lane: Figure  # orders/s per lane
    lanes_per_worker: Figure
    copy: Figure  # COPY rows/s into one Postgres server
    d_over_copy: Figure
    shown: list[Figure]  # everything read or derived, in the order to print
    checks: list[Figure] = field(default_factory=list)  # optional scaling checks
    cluster_gateway: Figure | None = None  # (h): orders/s of one gateway core on the cluster
    cluster_admit: Figure | None = None  # (h): us of Valkey CPU per order admitting, derived


def read_inputs(report: Mapping[str, Any]) -> Inputs:
    """The model's inputs from a bench.py report; MissingFigure for what it lacks."""
    shown: list[Figure] = []

    def add(label: str, value: float, unit: str, kind: Kind, source: str) -> Figure:
        fig = Figure(label, value, unit, kind, source)
        shown.append(fig)
        return fig

    c_rps = required(report, "post.median_rps.c")
    pinned = report.get("server_cpus")
    if not isinstance(pinned, list) or not pinned:
        raise MissingFigure("server_cpus", "empty: the gateway was not pinned (--no-pin)")
    processes = report.get("processes", 1)
    add("(c) POST /v1/orders, closed loop", c_rps, "orders/s", "measured", "post.median_rps.c")
    cores = add(
        "CPUs the gateway was pinned to",
        len(pinned),
        "CPU(s)",
        "measured",
        f"server_cpus ({processes} uvicorn process(es) on them: processes)",
    )
    share = optional(report, "post.median_run.c.watched_cpu.server")
    if share is not None:
        add(
            "gateway CPU busy meanwhile",
            share * 100,
            "% of its core(s)",
            "measured",
            "post.median_run.c.watched_cpu.server",
        )
    gateway = add(
        "gateway orders/s per core",
        c_rps / cores.value,
        "orders/s",
        "derived",
        "post.median_rps.c / len(server_cpus)",
    )

    admit = add(
        "Valkey CPU per order, admitting",
        required(report, "drain.valkey.admit_cpu_us"),
        "us",
        "measured",
        "drain.valkey.admit_cpu_us",
    )
    drain_us = add(
        "Valkey CPU per order, draining",
        required(report, "drain.valkey.drain_cpu_us"),
        "us",
        "measured",
        "drain.valkey.drain_cpu_us",
    )
    valkey = add(
        "Valkey CPU per order, end to end",
        admit.value + drain_us.value,
        "us",
        "derived",
        "admit_cpu_us + drain_cpu_us",
    )

    d_rate = add(
        "(d) drain, all workers",
        required(report, "drain.drain.rate"),
        "orders/s",
        "measured",
        "drain.drain.rate (first take to last settle)",
    )
    add(
        "(d) orders drained",
        required(report, "drain.drain.committed"),
        "orders",
        "measured",
        "drain.drain.committed",
    )
    add(
        "(d) drain's duration",
        required(report, "drain.drain.seconds"),
        "s",
        "measured",
        "drain.drain.seconds",
    )
    workers = add(
        "(d) worker processes",
        required(report, "drain.drain.workers"),
        "processes",
        "measured",
        "drain.drain.workers",
    )
    shards = _shards(report)
    shown.append(shards)
    worker = add(
        "drain orders/s per worker process",
        d_rate.value / workers.value,
        "orders/s",
        "derived",
        "drain.drain.rate / drain.drain.workers",
    )
    lane = add(
        "drain orders/s per lane",
        d_rate.value / shards.value,
        "orders/s",
        "derived",
        "drain.drain.rate / shards",
    )
    lanes_per_worker = add(
        "lanes per worker process",
        shards.value / workers.value,
        "lanes",
        "derived",
        "shards / drain.drain.workers",
    )
    copy = add(
        "COPY into one Postgres server",
        required(report, "drain.copy.batched_rate"),
        "rows/s",
        "measured",
        "drain.copy.batched_rate (transactions of drain.copy.batch_size rows)",
    )
    d_over_copy = add(
        "d/COPY",
        d_rate.value / copy.value,
        "",
        "derived",
        "drain.drain.rate / drain.copy.batched_rate",
    )
    inputs = Inputs(
        gateway,
        admit,
        drain_us,
        valkey,
        worker,
        lane,
        lanes_per_worker,
        copy,
        d_over_copy,
        shown,
    )
    return _with_checks(report, inputs)


def _shards(report: Mapping[str, Any]) -> Figure:
    """The run's shard count: its ``--set shards=N``, else ordergate's default."""
    options = report.get("options")
    sets = options.get("set", []) if isinstance(options, Mapping) else []
    for item in reversed(sets if isinstance(sets, list) else []):
        name, _, value = str(item).partition("=")
        if name.strip() == "shards":
            try:
                n = int(value)
            except ValueError:
                raise MissingFigure("options.set", f"shards={value!r} is not a number") from None
            if n < 1:
                raise MissingFigure("options.set", f"shards={n} is not positive")
            return Figure("(d) shards (lanes)", n, "lanes", "measured", "options.set shards=N")
    return Figure(
        "(d) shards (lanes)",
        _default_shards(),
        "lanes",
        "assumed",
        "ordergate's default: no --set shards=N in options.set",
    )


def _with_checks(report: Mapping[str, Any], inputs: Inputs) -> Inputs:
    """The optional rows, (h) and (d2), as scaling checks measured on this machine."""
    checks: list[Figure] = []
    c_rps = required(report, "post.median_rps.c")
    h_rps = optional(report, "post.median_rps.h")
    cluster_gateway = cluster_admit = None
    if h_rps is not None:
        checks.append(
            Figure(
                "(h) (c) on a 3-master Valkey Cluster",
                h_rps,
                "orders/s",
                "measured",
                "post.median_rps.h",
            )
        )
        checks.append(Figure("h/c, cluster / one primary", h_rps / c_rps, "", "derived", "h / c"))
        cluster_gateway = Figure(
            "gateway orders/s per core, on a cluster",
            inputs.gateway.value * h_rps / c_rps,
            "orders/s",
            "derived",
            "gateway orders/s per core x h/c",
        )
        checks.append(cluster_gateway)
        c_us = _valkey_us_per_order(report, "c", c_rps)
        h_us = _valkey_us_per_order(report, "h", h_rps)
        if c_us is not None and h_us is not None:
            checks.append(
                Figure(
                    "Valkey CPU per admitted order, (c), one primary",
                    c_us,
                    "us",
                    "derived",
                    "post.median_run.c.watched_cpu.valkey / c",
                )
            )
            checks.append(
                Figure(
                    "Valkey CPU per admitted order, (h), masters summed",
                    h_us,
                    "us",
                    "derived",
                    "sum of post.median_run.h.watched_cpu['valkey *'] / h",
                )
            )
            checks.append(
                Figure("(h)/(c), Valkey CPU per order", h_us / c_us, "", "derived", "(h) / (c)")
            )
            cluster_admit = Figure(
                "Valkey CPU per order admitting, on a cluster",
                inputs.valkey_admit.value * h_us / c_us,
                "us",
                "derived",
                "drain.valkey.admit_cpu_us x (h)/(c)",
            )
            checks.append(cluster_admit)
    two = report.get("drain_two_postgres")
    if isinstance(two, Mapping):
        one_rate = optional(two, "one.drain.rate")
        two_rate = optional(two, "two.drain.rate")
        if one_rate is not None and two_rate is not None:
            checks += [
                Figure(
                    "(d2) drain into one Postgres server",
                    one_rate,
                    "orders/s",
                    "measured",
                    "drain_two_postgres.one.drain.rate",
                ),
                Figure(
                    "(d2) drain into two Postgres servers",
                    two_rate,
                    "orders/s",
                    "measured",
                    "drain_two_postgres.two.drain.rate",
                ),
                Figure("(d2) two / one", two_rate / one_rate, "", "derived", "two / one"),
            ]
    delayed = report.get("drain")
    ratio = optional(delayed, "delayed.ratio") if isinstance(delayed, Mapping) else None
    if ratio is not None:
        checks.append(
            Figure(
                "drain / one loop of COPY transactions, Postgres +"
                f"{optional(report, 'drain.delayed.delay_ms') or 0:g} ms",
                ratio,
                "x",
                "measured",
                "drain.delayed.ratio",
            )
        )
    return replace(
        inputs, checks=checks, cluster_gateway=cluster_gateway, cluster_admit=cluster_admit
    )


def _valkey_us_per_order(report: Mapping[str, Any], kind: str, rps: float) -> float | None:
    """Valkey CPU per admitted order in (kind)'s closed-loop run: its Valkey processes' CPU
    (a share of one core; each master's on a cluster) over its orders/s."""
    watched = report.get("post", {}).get("median_run", {}).get(kind, {}).get("watched_cpu", {})
    if not isinstance(watched, Mapping):
        return None
    shares = [float(v) for k, v in watched.items() if k.startswith("valkey") and v is not None]
    if not shares or sum(shares) <= 0:
        return None
    return sum(shares) * 1e6 / rps


@dataclass(frozen=True)
class Plan:
    """What one target rate needs."""

    rate: float
    rows: list[Figure]
    gateway_cores: int
    masters: int
    cluster_gateway_cores: int | None  # at (h)'s rate per core, when the plan needs a cluster
    cluster_masters: int | None  # at (h)'s Valkey CPU per admitted order
    workers: int
    postgres_low: int
    postgres_high: int
    shards: int
    notes: list[str]


def plan(inputs: Inputs, rate: float, utilisation: float, prefix: str = "og") -> Plan:
    """The counts for ``rate`` orders/s, each the rate over one unit's measured rate."""
    rows: list[Figure] = []
    notes: list[str] = []

    def count(label: str, n: float, how: str) -> int:
        k = max(1, math.ceil(n - 1e-9))
        rows.append(Figure(label, k, "", "extrapolated", how))
        return k

    g = inputs.gateway.value
    cores = count("gateway cores", rate / g, f"{rate:,.0f} / {g:,.0f} per core")
    per_master = utilisation * 1e6 / inputs.valkey.value
    masters = count(
        "Valkey masters",
        rate / per_master,
        f"{rate:,.0f} x {inputs.valkey.value:.1f} us / ({utilisation:.0%} of 1 s)"
        f" = {rate / per_master:,.1f}",
    )
    cluster_cores = cluster_masters = None
    if masters > 1 and inputs.cluster_gateway is not None:
        cg = inputs.cluster_gateway.value
        cluster_cores = count(
            "gateway cores, at (h)'s cluster rate per core", rate / cg, f"{rate:,.0f} / {cg:,.0f}"
        )
    if masters > 1 and inputs.cluster_admit is not None:
        us = inputs.cluster_admit.value + inputs.valkey_drain.value
        cluster_masters = count(
            "Valkey masters, at (h)'s cluster cost per admitted order",
            rate * us / (utilisation * 1e6),
            f"{rate:,.0f} x {us:.1f} us / ({utilisation:.0%} of 1 s)",
        )
    w = inputs.worker.value
    workers = count("worker processes", rate / w, f"{rate:,.0f} / {w:,.0f} per process")
    copy = inputs.copy.value
    low = count(
        "Postgres servers, at COPY's rate",
        rate / copy,
        f"{rate:,.0f} / {copy:,.0f} rows/s",
    )
    d = inputs.d_over_copy.value
    high = count(
        "Postgres servers, at the drain's d/COPY",
        rate / (copy * d),
        f"{rate:,.0f} / ({copy:,.0f} x {d:.2f})",
    )
    lpw = max(1, math.ceil(inputs.lanes_per_worker.value - 1e-9))
    most_masters = max(masters, cluster_masters or 0)
    shards = count(
        "shards (lanes)",
        max(workers * lpw, most_masters, high),
        f"max({workers} workers x {lpw} lanes each, {most_masters} masters,"
        f" {high} Postgres servers)",
    )
    per_lane = rate / shards
    rows.append(
        Figure(
            "orders/s per lane",
            per_lane,
            "orders/s",
            "extrapolated",
            f"{rate:,.0f} / {shards} (measured per lane: {inputs.lane.value:,.0f})",
        )
    )
    if shards > MAX_SHARDS:
        notes.append(
            f"{shards} shards is more than ordergate allows ({MAX_SHARDS}): at this rate run"
            " several deployments (storefronts split between them) or raise the limit"
        )
    if shards > CLUSTER_SLOTS:
        notes.append(f"{shards} lanes is more than a cluster's {CLUSTER_SLOTS} hash slots")
    if most_masters > 1:
        busiest = busiest_master(min(shards, CLUSTER_SLOTS), most_masters, prefix)
        share = busiest / shards
        us = inputs.valkey.value
        if cluster_masters is not None and inputs.cluster_admit is not None:
            us = inputs.cluster_admit.value + inputs.valkey_drain.value
        busy = rate * share * us / 1e6
        rows.append(
            Figure(
                "lanes on the busiest master, even slot ranges",
                busiest,
                "lanes",
                "extrapolated",
                f"{shards} lanes' hash slots over {most_masters} even ranges"
                f" (even: {shards / most_masters:.1f}); it runs at {busy:.0%} of a core",
            )
        )
        if busy > utilisation:
            notes.append(
                f"with even slot ranges the busiest master carries {busiest} of {shards} lanes"
                f" ({busy:.0%} of a core): move slots so the lanes spread evenly"
                " (CLUSTER SETSLOT, valkey-cli --cluster reshard)"
            )
    return Plan(
        rate,
        rows,
        cores,
        masters,
        cluster_cores,
        cluster_masters,
        workers,
        low,
        high,
        shards,
        notes,
    )


def busiest_master(shards: int, masters: int, prefix: str = "og") -> int:
    """The most lanes any master serves when the cluster's slots are split into ``masters``
    even ranges (as ``valkey-cli --cluster create`` does): each lane is one hash slot, the
    slot of its tag ``{k}`` (``Keys.tag``)."""
    per = [0] * masters
    for k in range(shards):
        slot = key_slot(f"{prefix}:{{{k}}}".encode())
        per[min(slot * masters // CLUSTER_SLOTS, masters - 1)] += 1
    return max(per)


# -- output ------------------------------------------------------------------------------------


def _num(fig: Figure) -> str:
    v = fig.value
    if fig.kind == "extrapolated" and fig.unit == "":
        return f"{v:,.0f}"
    if fig.unit in ("", "x"):
        return f"{v:.2f}{' x' if fig.unit == 'x' else ''}"
    text = f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:,.1f}"
    return f"{text} {fig.unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return out + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip()] + [fmt.format(*r).rstrip() for r in rows]


def _fig_rows(figs: Sequence[Figure]) -> list[list[str]]:
    return [[f.label, _num(f), f.kind, f.source] for f in figs]


def _span(low: int, high: int | None) -> str:
    return str(low) if high is None or high == low else f"{low}-{high}"


def render(
    inputs: Inputs,
    plans: Sequence[Plan],
    utilisation: float,
    report: Mapping[str, Any],
    markdown: bool = False,
) -> str:
    h = "### " if markdown else "== "
    out = [
        f"{h}Capacity model from: {report.get('command', '?')}",
        f"machine: {report.get('cpus', '?')} CPUs; gateway on {report.get('server_cpus')},"
        f" the rest on {report.get('other_cpus')}; durability {report.get('durability', '?')}",
        "",
        f"{h}Measured inputs",
        "",
        *_table(["figure", "value", "kind", "from the JSON"], _fig_rows(inputs.shown), markdown),
        "",
        f"{h}Assumed",
        "",
        *_table(
            ["figure", "value", "kind", "why"],
            [
                [
                    "Valkey utilisation target",
                    f"{utilisation:.0%}",
                    "assumed",
                    "of one master's single command thread: headroom for fsync stalls, "
                    "replication, AOF rewrites and uneven lanes",
                ],
                ["cluster hash slots", f"{CLUSTER_SLOTS:,}", "assumed", "Redis/Valkey Cluster"],
                ["most shards", f"{MAX_SHARDS:,}", "assumed", "ordergate/settings.py"],
                ["scaling", "linear", "assumed", "see docs/capacity.md, Caveats"],
            ],
            markdown,
        ),
    ]
    if inputs.checks:
        out += [
            "",
            f"{h}Scaling checks measured on this machine",
            "",
            *_table(["figure", "value", "kind", "from"], _fig_rows(inputs.checks), markdown),
        ]
    else:
        out += ["", "(no cluster (h) or two-Postgres (d2) row in this JSON: no scaling checks)"]
    out += [
        "",
        f"{h}Summary",
        "",
        *_table(
            [
                "orders/s",
                "gateway cores",
                "Valkey masters",
                "worker processes",
                "Postgres servers",
                "shards",
            ],
            [
                [
                    f"{p.rate:,.0f}",
                    _span(p.gateway_cores, p.cluster_gateway_cores),
                    _span(p.masters, p.cluster_masters),
                    str(p.workers),
                    _span(p.postgres_low, p.postgres_high),
                    str(p.shards),
                ]
                for p in plans
            ],
            markdown,
        ),
        "",
        "A range a-b: gateway cores and Valkey masters at (c)'s one-primary figures, then at"
        " (h)'s cluster figures; Postgres servers at COPY's rate, then at the drain's d/COPY of"
        " it. Every count is extrapolated (linear).",
    ]
    for p in plans:
        out += [
            "",
            f"{h}{p.rate:,.0f} orders/s (extrapolated)",
            "",
            *_table(["what", "count", "kind", "how"], _fig_rows(p.rows), markdown),
        ]
        if p.notes:
            out.append("")  # Markdown: a table goes on until a blank line
        out += [f"note: {n}" for n in p.notes]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.capacity", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("bench_json", type=Path, help="a loadtests/bench.py --json file")
    p.add_argument("--rate", type=float, action="append", help="target orders/s (repeatable)")
    p.add_argument(
        "--utilisation",
        type=float,
        default=DEFAULT_UTILISATION,
        help="the share of a Valkey master's core to plan for (0-1)",
    )
    p.add_argument("--markdown", action="store_true", help="tables in Markdown")
    args = p.parse_args(argv)
    if not 0 < args.utilisation <= 1:
        p.error("--utilisation must be in (0, 1]")
    rates: list[float] = args.rate or list(DEFAULT_RATES)
    if any(r <= 0 for r in rates):
        p.error("--rate must be positive")
    try:
        report = json.loads(args.bench_json.read_text())
    except (OSError, ValueError) as e:
        print(f"capacity: cannot read {args.bench_json}: {e}", file=sys.stderr)
        return 2
    if not isinstance(report, dict):
        print(f"capacity: {args.bench_json} is not a bench.py report", file=sys.stderr)
        return 2
    try:
        inputs = read_inputs(report)
    except MissingFigure as e:
        print(
            f"capacity: {args.bench_json} has no usable {e.path} ({e.why}); the model needs a"
            " bench.py run with --only d post",
            file=sys.stderr,
        )
        return 2
    plans = [plan(inputs, r, args.utilisation) for r in rates]
    sys.stdout.write(render(inputs, plans, args.utilisation, report, args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

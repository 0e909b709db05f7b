"""The audit at the end of a surge: what storefronts were told against what Postgres holds.

Every order that got a receipt must be in Postgres exactly once, under the receipt's order id:
committed rows == accepted orders. An order that got no receipt (a 503 after its write, a user
stopped mid-request) may be committed too; such rows are counted, not faulted. Then the buffer
must have drained, nothing may be dead-lettered, duplicates must have been answered with the
original order, customers' positions must never have grown, and no answer may be outside the
API's table (a 500, a 401, no answer at all). 429 and 503 are the gateway's designed answers to
overload (429 ``buffer-full``, and per storefront ``rate-limited`` and ``storefront-share-full``):
they are reported, and their orders retried by the load test, but not faulted.

Customers' ETAs are measured too (``eta_error``): each followed ticket's first ``eta_seconds``
against the wait it really had. That check is judged only after a real backlog; after a run
whose drain kept up there is nothing to predict, and it is reported as not judged.

Per storefront (``storefront_figures``) the audit reports what each one sent and was told and
how long its followed tickets waited: with ``--hot-share``, how one storefront's flash sale
fared among the others. Fairness has no single right answer (it depends on the limits
configured), so these figures are reported, not judged.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ordergate.surge_results import EtaSample, Latency, Ledger

# 429's problem types: the buffer's bound, and the per-storefront fairness limits.
TOO_MANY = ("rate-limited", "storefront-share-full", "buffer-full")
# (kind, status, problem type) the API may answer each kind of request with under load.
_OVERLOAD = {
    *(("429", f"/problems/{problem}") for problem in TOO_MANY),
    ("503", "/problems/buffer-unavailable"),
}
_IN_FLIGHT = ("409", "/problems/order-in-flight")
EXPECTED: dict[str, set[tuple[str, str]]] = {
    "new": {("202", ""), *_OVERLOAD},
    "retry": {("202", ""), ("200", ""), _IN_FLIGHT, *_OVERLOAD},
    "resubmit": {("200", ""), _IN_FLIGHT, *_OVERLOAD},
    "invalid": {("422", "/problems/invalid-order")},
    "poll": {("200", ""), ("304", "")},
}

# Customers' first ETAs: the relative error |eta - wait| / wait must stay within these (p50,
# p90), judged when enough tickets were measured and their median wait shows a real backlog.
ETA_MAX_P50 = 0.20
ETA_MAX_P90 = 0.35
ETA_BACKLOG_S = 5.0
ETA_MIN_TICKETS = 10
# Shorter waits are not measured: the ETA is whole seconds and customers poll every second or
# more, so at a 1 s wait a relative error says nothing about the ETA.
ETA_MIN_WAIT_S = 2.0


@dataclass(frozen=True)
class Committed:
    """Postgres rows of the orders this run sent."""

    rows: int = 0
    of_accepted: int = 0  # rows of receipted orders under the receipt's order id
    missing: int = 0  # receipted orders without a row
    doubled: int = 0  # a storefront order with two rows, or a row under another order id
    without_receipt: int = 0  # rows of orders that got no receipt
    error: str = ""  # why Postgres could not be checked ("" when it was)


async def count_committed(database_url: str, ledger: Ledger) -> Committed:
    """Compare the receipts with the rows of the run's storefront order ids, over every
    database of ``database_url`` (a list of several: sharding.databases). Each database is
    searched for every id, not only for its own shards': a row in the wrong database would
    be missed by the gateway's status reads, and two rows in two databases are doubles."""
    import asyncpg

    rows: dict[str, list[str]] = {}
    sent = [(s,) for s in (*ledger.receipts, *ledger.unanswered)]
    for url in database_url.split():
        conn = await asyncpg.connect(url)
        try:
            # One join over a temporary table of the run's ids: a soak sends millions of them.
            async with conn.transaction():
                await conn.execute("CREATE TEMPORARY TABLE surge_sent (sfo text) ON COMMIT DROP")
                await conn.copy_records_to_table("surge_sent", records=sent)
                await conn.execute("ANALYZE surge_sent")
                for r in await conn.fetch(
                    "SELECT o.storefront_order_id, o.order_id FROM orders o "
                    "JOIN surge_sent s ON s.sfo = o.storefront_order_id"
                ):
                    rows.setdefault(r["storefront_order_id"], []).append(r["order_id"])
        finally:
            await conn.close()
    of_accepted = missing = doubled = 0
    for sfo, order_id in ledger.receipts.items():
        found = rows.get(sfo, [])
        of_accepted += found.count(order_id)
        missing += order_id not in found
        doubled += len(found) > 1 or (bool(found) and order_id not in found)
    without = [rows[s] for s in ledger.unanswered if s in rows]
    doubled += sum(len(found) > 1 for found in without)
    return Committed(
        rows=sum(len(found) for found in rows.values()),
        of_accepted=of_accepted,
        missing=missing,
        doubled=doubled,
        without_receipt=len(without),
    )


def check_committed(database_url: str | None, ledger: Ledger) -> Committed:
    if not database_url:
        return Committed(
            error="no Postgres URL for this gateway: set ORDERGATE_DATABASE_URL, or pass the "
            "--data-dir of the `ordergate up` serving it"
        )
    try:
        return asyncio.run(count_committed(database_url, ledger))
    except (OSError, ConnectionError) as exc:
        return Committed(error=f"Postgres unreachable: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - asyncpg's errors have no common base but this
        return Committed(error=f"Postgres query failed: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Drain:
    """How the buffer emptied after the load stopped."""

    drained: bool
    seconds: float  # from the end of the load until the buffer was empty (or the deadline)
    peak_depth: int  # deepest buffer seen, sampled about twice a second
    dead_letters: int  # new dead letters during the run
    error: str = ""  # why the depth could not be read


@dataclass(frozen=True)
class EtaError:
    """How far customers' first ETAs were from the waits they had, over followed tickets.

    A ticket's real wait runs from its customer's first answer to its commit. The customer
    sees the commit only at its next poll, up to one ``poll_after_seconds`` later, so the wait
    is taken as the middle of that last poll interval (``EtaSample.real_wait_s``): it is known
    to within half of it, ``median_gap_s / 2`` for the median ticket. The error of a ticket is
    ``|eta - wait| / wait``; percentiles are nearest-rank (each one a ticket's own figure).
    """

    followed: int = 0  # followed tickets that reached committed
    without_eta: int = 0  # their first answer had no eta_seconds
    short: int = 0  # not measured: real wait under ETA_MIN_WAIT_S
    tickets: int = 0  # measured
    unfinished: int = 0  # followed tickets still waiting when their customer stopped
    median_wait_s: float | None = None  # of the measured tickets
    median_gap_s: float | None = None  # the last poll interval of the measured tickets
    p50: float | None = None  # relative error, a fraction
    p90: float | None = None
    signed_median: float | None = None  # of (eta - wait) / wait: > 0 the ETA was too long

    @property
    def judged(self) -> bool:
        """Only a real backlog, measured on enough tickets, says anything about the ETA (the
        tickets of a run's quiet phases wait a second or less, and are not measured)."""
        return (
            self.tickets >= ETA_MIN_TICKETS
            and self.median_wait_s is not None
            and self.median_wait_s >= ETA_BACKLOG_S
        )


def eta_error(samples: list[EtaSample], unfinished: int = 0) -> EtaError:
    """The ETA figures of a run's followed tickets (``Ledger.eta_samples``)."""
    # (eta, real wait, last poll interval) of the tickets whose first answer had an ETA
    with_eta = [
        (s.first_eta_s, s.real_wait_s, s.gap_s) for s in samples if s.first_eta_s is not None
    ]
    measured = [m for m in with_eta if m[1] >= ETA_MIN_WAIT_S]
    signed = [(eta - wait) / wait for eta, wait, _ in measured]
    errors = [abs(e) for e in signed]
    return EtaError(
        followed=len(samples),
        without_eta=len(samples) - len(with_eta),
        short=len(with_eta) - len(measured),
        tickets=len(measured),
        unfinished=unfinished,
        median_wait_s=_round(quantile([wait for _, wait, _ in measured], 0.5), 2),
        median_gap_s=_round(quantile([gap for _, _, gap in measured], 0.5), 2),
        p50=_round(quantile(errors, 0.5), 4),
        p90=_round(quantile(errors, 0.9), 4),
        signed_median=_round(quantile(signed, 0.5), 4),
    )


@dataclass(frozen=True)
class StorefrontFigures:
    """One storefront's part in the run: what its users sent and were told, and how long the
    tickets customers followed waited, from the order's receipt to its commit (the middle of
    the last poll interval, as for the ETAs). Waits exist only for followed tickets: customers
    take the newest tickets of all storefronts, so each storefront's sample is the share of
    its tickets they happened to follow."""

    storefront: str  # its id, or "key N" for the N-th key given
    hot: bool  # the flash sale's storefront (--hot-share)
    users: int  # the most storefront users it had at once
    orders: int  # new orders sent (each once, however often it was retried)
    receipts: int  # distinct orders with a receipt (202, or 200 to a retry)
    too_many: dict[str, int]  # 429s to its requests by problem type (TOO_MANY first)
    waits: int  # its followed tickets that reached committed
    wait_p50_s: float | None
    wait_p99_s: float | None


def storefront_figures(
    ledger: Ledger, storefronts: Sequence[str] = (), hot_share: float = 0.0
) -> list[StorefrontFigures]:
    """A row per storefront, in key order: those named (the run's) and any other the ledger
    holds (a key given without a name)."""
    seen = {*ledger.storefront_answers, *ledger.storefront_users, *ledger.storefront_receipts}
    count = max(len(storefronts), max(seen, default=-1) + 1)
    waits: dict[int, list[float]] = {}
    for sample in ledger.eta_samples:
        if sample.storefront is not None and sample.receipt_wait_s is not None:
            waits.setdefault(sample.storefront, []).append(sample.receipt_wait_s)
    return [
        _storefront(
            storefronts[k] if k < len(storefronts) else f"key {k + 1}",
            hot_share > 0 and k == 0,
            ledger.storefront_answers.get(k, Counter()),
            ledger.storefront_users[k],
            ledger.storefront_receipts[k],
            waits.get(k, []),
        )
        for k in range(count)
    ]


def _storefront(
    name: str, hot: bool, answers: Counter[str], users: int, receipts: int, waits: list[float]
) -> StorefrontFigures:
    too_many: Counter[str] = Counter(dict.fromkeys(TOO_MANY, 0))
    for label, n in answers.items():
        _, status, problem = (label.split(" ", 2) + [""])[:3]
        if status == "429":
            too_many[problem.removeprefix("/problems/") or "?"] += n
    return StorefrontFigures(
        storefront=name,
        hot=hot,
        users=users,
        orders=sum(n for label, n in answers.items() if label.split(" ")[0] == "new"),
        receipts=receipts,
        too_many=dict(too_many),
        waits=len(waits),
        wait_p50_s=_round(quantile(waits, 0.5), 2),
        wait_p99_s=_round(quantile(waits, 0.99), 2),
    )


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile: the smallest value with at least ``q`` of them at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: could not be checked
    detail: str = ""
    judged: bool = True  # False: not a question this run can answer; ignored by the verdict


@dataclass
class Audit:
    shape: str
    accepted: int
    answers_202: int
    receipts_on_retry: int
    duplicates_sent: int
    duplicates_answered: int
    invalid_sent: int
    rejected: dict[str, int]
    too_many: int  # 429
    too_many_by_problem: dict[str, int]  # 429s by problem type (rate-limited, ...)
    unavailable: int  # 503
    unexpected: dict[str, int]
    no_receipt: dict[str, int]
    customers: dict[str, int]
    latency: dict[str, dict[str, Any]]
    drain: Drain
    committed: Committed
    knee: dict[str, Any] | None
    locust_exit: int
    eta: EtaError = field(default_factory=EtaError)
    hot_share: float = 0.0  # of the users, for the first storefront (0: spread evenly)
    storefronts: list[StorefrontFigures] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """PASS, FAIL (a check failed) or INCOMPLETE (one could not be made)."""
        judged = [c for c in self.checks if c.judged]
        if any(c.ok is False for c in judged):
            return "FAIL"
        return "INCOMPLETE" if any(c.ok is None for c in judged) else "PASS"

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["verdict"] = self.verdict
        return doc


def audit(
    shape: str,
    ledger: Ledger,
    latencies: dict[str, Latency],
    drain: Drain,
    committed: Committed,
    knee: dict[str, Any] | None,
    locust_exit: int,
    storefronts: Sequence[str] = (),
    hot_share: float = 0.0,
) -> Audit:
    """The audit of a run; ``storefronts`` names the run's storefronts in key order, the first
    one hot when ``hot_share`` > 0."""
    rejected: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    too_many: Counter[str] = Counter()
    for label, n in ledger.answers.items():
        kind, status, problem = (label.split(" ", 2) + [""])[:3]
        if status == "429":
            too_many[problem.removeprefix("/problems/") or "?"] += n
        if (status, problem) not in EXPECTED.get(kind, set()):
            unexpected[label] += n
        elif status.startswith("4") and status != "429":
            rejected[f"{status} {problem}"] += n
    a = Audit(
        shape=shape,
        accepted=len(ledger.receipts),
        answers_202=ledger.count(status="202"),
        receipts_on_retry=ledger.answers.get("retry 200", 0),
        duplicates_sent=ledger.count("resubmit"),
        duplicates_answered=ledger.answers.get("resubmit 200", 0),
        invalid_sent=ledger.count("invalid"),
        rejected=dict(rejected),
        too_many=ledger.count(status="429"),
        too_many_by_problem=dict(too_many),
        unavailable=ledger.count(status="503"),
        unexpected=dict(unexpected),
        no_receipt=dict(Counter(ledger.unanswered.values())),
        customers={**ledger.followed, "position_increases": ledger.position_increases},
        latency={name: asdict(lat) for name, lat in latencies.items()},
        drain=drain,
        committed=committed,
        knee=knee,
        locust_exit=locust_exit,
        eta=eta_error(ledger.eta_samples, ledger.eta_unfinished),
        hot_share=hot_share,
        storefronts=storefront_figures(ledger, storefronts, hot_share),
    )
    a.checks = _checks(a, ledger)
    return a


def _positions_check(a: Audit, ledger: Ledger) -> Check:
    """Positions never grow while one storefront sends; with several, a lane drains by turns,
    and a storefront that starts a backlog later rightly gets its share ahead of orders already
    waiting (README Fairness): then the increases are reported, not judged."""
    name, n = "customers' positions never grew", ledger.position_increases
    senders = sum(1 for f in a.storefronts if f.orders)
    if senders > 1:
        detail = f"{n} increases; not judged with {senders} storefronts sending"
        return Check(name, n == 0, detail, judged=False)
    return Check(name, n == 0, f"{n} increases")


def _checks(a: Audit, ledger: Ledger) -> list[Check]:
    c = a.committed
    checks = [
        Check("Locust ran to the end", a.locust_exit == 0, f"exit code {a.locust_exit}"),
        Check("orders were accepted", a.accepted > 0, f"{a.accepted:,} receipts"),
    ]
    if c.error:
        checks.append(Check("committed rows == accepted orders", None, c.error))
    else:
        checks.append(
            Check(
                "committed rows == accepted orders",
                c.of_accepted == a.accepted and c.missing == 0 and c.doubled == 0,
                f"{c.of_accepted:,} rows of {a.accepted:,} accepted orders; missing {c.missing}, "
                f"doubled {c.doubled}",
            )
        )
    checks += [
        Check(
            "one order id per receipted storefront order",
            ledger.conflicting_receipts == 0,
            f"{ledger.conflicting_receipts} storefront orders receipted under two ids",
        ),
        Check(
            "duplicates answered with the original order",
            ledger.wrong_receipts == 0,
            f"{ledger.wrong_receipts} answered with another order id",
        ),
        Check(
            "the buffer drained",
            None if a.drain.error else a.drain.drained,
            a.drain.error or f"{a.drain.seconds:.1f} s after the load stopped",
        ),
        Check("nothing dead-lettered", a.drain.dead_letters == 0, f"{a.drain.dead_letters} new"),
        _positions_check(a, ledger),
        Check(
            "every answer in the API's table",
            not a.unexpected,
            ", ".join(f"{k}: {n}" for k, n in a.unexpected.items()) or "none outside it",
        ),
        eta_check(a.eta),
    ]
    return checks


def eta_check(e: EtaError) -> Check:
    """p50 and p90 of the ETA error within their limits, judged only after a real backlog."""
    name = (
        f"customers' first ETAs within {percent(ETA_MAX_P50)} / {percent(ETA_MAX_P90)} of "
        "their wait (p50 / p90)"
    )
    if e.tickets < ETA_MIN_TICKETS:
        why = f"{e.tickets} tickets measured, fewer than {ETA_MIN_TICKETS}"
        return Check(name, None, f"not judged: {why}", judged=False)
    if not e.judged:
        why = f"median wait {e.median_wait_s:.1f} s, under {ETA_BACKLOG_S:g} s: no real backlog"
        return Check(name, None, f"not judged: {why}", judged=False)
    assert e.p50 is not None and e.p90 is not None
    return Check(
        name,
        e.p50 <= ETA_MAX_P50 and e.p90 <= ETA_MAX_P90,
        f"p50 {percent(e.p50)}, p90 {percent(e.p90)} over {e.tickets:,} tickets, "
        f"median wait {e.median_wait_s:.1f} s",
    )


def percent(share: float | None, signed: bool = False) -> str:
    """0.123 -> ``12 %`` (``+12 %`` when ``signed``); None -> ``-``."""
    if share is None:
        return "-"
    whole = round(100 * share)
    return f"{whole:{'+' if signed and whole else ''}d} %"

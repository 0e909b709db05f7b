"""Locust load test of the order API: storefronts POSTing orders, customers following their tickets.

Each simulated storefront (``StorefrontUser``) takes one API key from ``ORDERGATE_API_KEY`` (a
comma-separated list is allowed, so several keys mean several storefronts): any one, or, when
``ORDERGATE_SURGE_STOREFRONTS`` is set (``ordergate surge --storefronts K --hot-share P``), the
one that list names for it: the storefront (index into the keys) of each storefront user, in
the order this process starts them. By task weight, each user:

* ~97 %: POSTs a new valid order (unique ``storefront_order_id``, 1-5 items, correct
  ``total_minor``, EUR) and expects 202 with a receipt;
* ~2 %: resubmits one of its earlier orders unchanged and expects 200 with the original
  ``order_id`` (a deliberate duplicate);
* ~1 %: POSTs a deliberately invalid order and expects 422 ``/problems/invalid-order``.

A new order answered 409, 429 or 503 (or not answered at all) got no receipt; like a real
storefront, the user retries it with the same ``storefront_order_id`` after ``Retry-After``
until it gets one (202, or 200 when the first attempt had been written after all).

Each receipt's ``queue_url`` goes to a shared pool of tickets. A ``CustomerUser`` takes the
newest ticket and polls ``GET /v1/queue/{ticket}`` (with ``If-None-Match``) every
``poll_after_seconds``, as the waiting page does, until its order is final; it checks that its
position never grows, and keeps its first answer's ETA against the wait it really had (see
``Ledger.eta``).

Anything else (503 ``buffer-unavailable`` included) is recorded as a failure. With
``--record-dir DIR`` each Locust process writes what its users were told, for
``ordergate surge``'s audit: ``receipts-<pid>.txt`` (one ``order_id storefront_order_id storefront``
line per accepted order) and ``ledger-<pid>.json`` (answers counted by kind, status and problem
type, in all and per storefront; the orders left without a receipt; what customers saw, their
ETAs and waits included). See ``loadtests/README.md``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import random
import time
import uuid
from collections import Counter, deque
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from locust import between, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment
from locust.runners import MasterRunner

ORDERS = "/v1/orders"
SKUS = [f"SKU-{n:04d}" for n in range(200)]
# A receipt's in-flight lease is lifted with the gateway's next admission batch; resubmitting
# only orders acknowledged a little while ago keeps a legitimate 409 order-in-flight out of the
# resubmission figures.
RESUBMIT_MIN_AGE_S = 1.0
# Answers that gave no receipt but ask to retry with the same storefront_order_id.
RETRYABLE = (409, 429, 503)
RETRY_MAX_S = 5.0
FINAL = frozenset({"committed", "rejected", "dead_lettered"})
# Tickets waiting for a customer: the newest are the interesting ones (a long way to go). Each
# is (queue path, storefront, when its receipt arrived).
TICKETS: deque[tuple[str, int, float]] = deque(maxlen=1000)
ORDER_ENV = "ORDERGATE_SURGE_STOREFRONTS"

log = logging.getLogger(__name__)


class Ledger:
    """What this process's users were told, written for ``ordergate surge``'s audit.

    One per Locust process. Receipts are streamed to a file (a soak test gives millions); the
    counts, the orders still without a receipt and the customers' findings are written when the
    test stops.
    """

    def __init__(self) -> None:
        self.directory: Path | None = None
        self._receipts: IO[str] | None = None
        self.answers: Counter[str] = Counter()
        # storefront_order_id of each valid order still without a receipt -> its last answer
        self.unanswered: dict[str, str] = {}
        self.wrong_receipts = 0  # a duplicate answered with another order's id
        self.followed: Counter[str] = Counter()  # final status a customer saw
        self.position_increases = 0
        # One [first_eta_s, wait_s, first_position, last_gap_s, storefront, since_receipt_s]
        # per followed ticket that reached committed (see ``eta``).
        self.eta_samples: list[list[float | int | None]] = []
        self.eta_unfinished = 0  # followed tickets still waiting when their customer stopped
        # Per storefront (index into the keys): its users' answers, and the most users it had
        # at once in this process.
        self.storefront_answers: dict[int, Counter[str]] = {}
        self.storefront_users: Counter[int] = Counter()
        self.storefront_peak: Counter[int] = Counter()

    def open(self, directory: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._receipts = open(self.directory / f"receipts-{os.getpid()}.txt", "a")

    def answer(self, kind: str, resp: Any, storefront: int | None = None) -> str:
        """Count an answer, also under its storefront when it was a storefront's; returns its
        label, e.g. ``new 503 /problems/buffer-unavailable``."""
        problem = _json(resp).get("type", "") if resp.status_code >= 400 else ""
        label = f"{kind} {resp.status_code} {problem}".rstrip()
        self.answers[label] += 1
        if storefront is not None:
            self.storefront_answers.setdefault(storefront, Counter())[label] += 1
        return label

    def receipt(self, order_id: str, storefront_order_id: str, storefront: int) -> None:
        self.unanswered.pop(storefront_order_id, None)
        if self._receipts is not None:
            self._receipts.write(f"{order_id} {storefront_order_id} {storefront}\n")

    def user_started(self, storefront: int) -> None:
        self.storefront_users[storefront] += 1
        self.storefront_peak[storefront] = max(
            self.storefront_peak[storefront], self.storefront_users[storefront]
        )

    def user_stopped(self, storefront: int) -> None:
        self.storefront_users[storefront] -= 1

    def eta(
        self,
        first_eta: int | None,
        first_position: int | None,
        wait_s: float,
        gap_s: float,
        storefront: int,
        since_receipt_s: float,
    ) -> None:
        """A followed ticket seen committed: what its first answer promised, what it got.

        ``wait_s`` runs from the customer's first answer (its ``eta_seconds`` and ``position``)
        to the first answer that said ``committed``, both taken when the answer arrived. That
        overshoots the commit by up to one poll interval, since the customer only looks every
        ``poll_after_seconds``: ``gap_s`` is that last interval (from the last answer that was
        not final to the committed one), so the commit happened within ``gap_s`` before the
        end of ``wait_s``. Nothing is subtracted here; the audit
        (``ordergate/surge_audit.py``) takes the middle of that interval, ``wait_s - gap_s/2``,
        as the real wait. ``since_receipt_s`` runs to the same end from the receipt of the
        ticket's order (the storefront's whole wait, per ``storefront``).
        """
        self.eta_samples.append(
            [
                first_eta,
                round(wait_s, 3),
                first_position,
                round(gap_s, 3),
                storefront,
                round(since_receipt_s, 3),
            ]
        )

    def write(self) -> None:
        if self.directory is None or self._receipts is None:
            return
        self._receipts.flush()
        doc = {
            "answers": dict(self.answers),
            "unanswered": self.unanswered,
            "wrong_receipts": self.wrong_receipts,
            "followed": dict(self.followed),
            "position_increases": self.position_increases,
            "eta_samples": self.eta_samples,
            "eta_unfinished": self.eta_unfinished,
            "storefronts": {
                str(k): {
                    "answers": dict(self.storefront_answers.get(k, {})),
                    "peak_users": self.storefront_peak[k],
                }
                for k in sorted({*self.storefront_answers, *self.storefront_peak})
            },
        }
        tmp = self.directory / f"ledger-{os.getpid()}.json.tmp"
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.directory / f"ledger-{os.getpid()}.json")


LEDGER = Ledger()


def api_keys() -> list[str]:
    """The API keys from ORDERGATE_API_KEY (comma-separated)."""
    return [k.strip() for k in os.environ.get("ORDERGATE_API_KEY", "").split(",") if k.strip()]


def storefront_order() -> list[int]:
    """ORDERGATE_SURGE_STOREFRONTS: the storefront of each storefront user, by start order."""
    return [int(s) for s in os.environ.get(ORDER_ENV, "").split(",") if s.strip()]


def storefront_of(user: int, keys: int) -> int:
    """The storefront (index into the keys) of this process's ``user``-th storefront user: as
    ``ordergate surge`` laid them out (see ``user_order`` in ``ordergate/surge_target.py``),
    starting over past the list's end, else any."""
    order = storefront_order()
    return order[user % len(order)] if order else random.randrange(keys)


def new_order() -> dict[str, Any]:
    """A valid order with a fresh storefront_order_id."""
    items: list[dict[str, Any]] = [
        {
            "sku": random.choice(SKUS),
            "quantity": random.randint(1, 3),
            "unit_price_minor": random.randint(99, 25000),
        }
        for _ in range(random.randint(1, 5))
    ]
    customer: dict[str, Any] = {"id": f"cust-{random.randint(1, 100_000)}"}
    if random.random() < 0.5:
        customer["email"] = f"{customer['id']}@example.com"
    return {
        "storefront_order_id": str(uuid.uuid4()),
        "customer": customer,
        "items": items,
        "currency": "EUR",
        "total_minor": sum(i["quantity"] * i["unit_price_minor"] for i in items),
    }


def invalid_order() -> dict[str, Any]:
    """An order the gateway must refuse with 422 invalid-order, broken in one of several ways."""
    order = new_order()
    flaw = random.choice(("total", "quantity", "currency", "customer", "items"))
    if flaw == "total":
        order["total_minor"] += 1
    elif flaw == "quantity":
        order["items"][0]["quantity"] = 0
    elif flaw == "currency":
        order["currency"] = "EURO"
    elif flaw == "customer":
        del order["customer"]
    else:
        order["items"] = []
    return order


@events.init_command_line_parser.add_listener
def add_record_dir(parser: Any, **_kwargs: Any) -> None:
    parser.add_argument(
        "--record-dir",
        default="",
        help="write receipts-<pid>.txt and ledger-<pid>.json here (ordergate surge's audit)",
    )


@events.init.add_listener
def require_api_key(environment: Environment, **_kwargs: Any) -> None:
    """Refuse to start without a key (a distributed master sends no orders and needs none)."""
    if isinstance(environment.runner, MasterRunner):
        return
    if not api_keys():
        log.error("set ORDERGATE_API_KEY, e.g. ORDERGATE_API_KEY=$(ordergate keys create loadtest)")
        raise SystemExit(1)
    if any(not 0 <= k < len(api_keys()) for k in storefront_order()):
        log.error("%s names a storefront beyond ORDERGATE_API_KEY's keys", ORDER_ENV)
        raise SystemExit(1)
    record_dir = getattr(environment.parsed_options, "record_dir", "")
    if record_dir:
        LEDGER.open(record_dir)


@events.test_stop.add_listener
def write_ledger(environment: Environment, **_kwargs: Any) -> None:
    if not isinstance(environment.runner, MasterRunner):
        LEDGER.write()


class StorefrontUser(FastHttpUser):
    """One storefront sending orders (and retrying those that got no receipt)."""

    weight = 4
    wait_time = between(0.0, 0.1)
    started = itertools.count()  # numbers this process's storefront users as they start

    def on_start(self) -> None:
        keys = api_keys()
        self.storefront = storefront_of(next(StorefrontUser.started), len(keys))
        LEDGER.user_started(self.storefront)
        self.headers = {
            "Authorization": f"Bearer {keys[self.storefront]}",
            "Content-Type": "application/json",
        }
        # (time acknowledged, body as sent, order_id) of this user's recent admitted orders
        self.admitted: deque[tuple[float, str, str]] = deque(maxlen=200)
        # (when due, storefront_order_id, body) of orders that got no receipt yet
        self.retries: list[tuple[float, str, str]] = []

    def on_stop(self) -> None:
        LEDGER.user_stopped(self.storefront)

    def _post(self, body: str, name: str) -> Any:
        return self.client.post(
            ORDERS, data=body, headers=self.headers, name=name, catch_response=True
        )

    @task(97)
    def submit_order(self) -> None:
        if self.retries and self.retries[0][0] <= time.monotonic():
            _, sfo, body = heapq.heappop(self.retries)
            self._submit(sfo, body, "retry", (202, 200))
            return
        order = new_order()
        sfo = order["storefront_order_id"]
        LEDGER.unanswered[sfo] = "no answer (its user stopped mid-request)"
        self._submit(sfo, json.dumps(order), "new", (202,))

    def _submit(self, sfo: str, body: str, kind: str, expected: tuple[int, ...]) -> None:
        with self._post(body, f"POST /v1/orders [{kind}]") as resp:
            label = LEDGER.answer(kind, resp, self.storefront)
            if resp.status_code not in expected:
                LEDGER.unanswered[sfo] = label
                resp.failure(_unexpected(resp, expected[0]))
                if resp.status_code in RETRYABLE or resp.status_code == 0:
                    delay = min(RETRY_MAX_S, _retry_after(resp))
                    heapq.heappush(self.retries, (time.monotonic() + delay, sfo, body))
                return
            receipt = _json(resp)
            order_id = receipt.get("order_id")
            if not order_id:
                LEDGER.unanswered[sfo] = f"{label} without an order_id"
                resp.failure(f"{resp.status_code} without an order_id")
                return
            resp.success()
            LEDGER.receipt(order_id, sfo, self.storefront)
            now = time.monotonic()
            self.admitted.append((now, body, order_id))
            queue_url = receipt.get("queue_url")
            if queue_url:
                TICKETS.append((urlsplit(queue_url).path, self.storefront, now))

    @task(2)
    def resubmit_order(self) -> None:
        cutoff = time.monotonic() - RESUBMIT_MIN_AGE_S
        earlier = [a for a in self.admitted if a[0] <= cutoff]
        if not earlier:
            self.submit_order()
            return
        _, body, order_id = random.choice(earlier)
        with self._post(body, "POST /v1/orders [resubmit]") as resp:
            LEDGER.answer("resubmit", resp, self.storefront)
            if resp.status_code != 200:
                resp.failure(_unexpected(resp, 200))
            elif _json(resp).get("order_id") != order_id:
                LEDGER.wrong_receipts += 1
                resp.failure(
                    f"resubmission answered order {_json(resp).get('order_id')!r}, "
                    f"expected the original {order_id!r}"
                )
            else:
                resp.success()

    @task(1)
    def submit_invalid_order(self) -> None:
        with self._post(json.dumps(invalid_order()), "POST /v1/orders [invalid]") as resp:
            LEDGER.answer("invalid", resp, self.storefront)
            if resp.status_code != 422:
                resp.failure(_unexpected(resp, 422))
            elif _json(resp).get("type") != "/problems/invalid-order":
                resp.failure(f"422 of type {_json(resp).get('type')!r}, expected invalid-order")
            else:
                resp.success()


class CustomerUser(FastHttpUser):
    """A customer on the waiting page: polls one ticket at the advised interval until final."""

    weight = 1
    IDLE_S = 0.5  # no ticket to follow yet

    def on_start(self) -> None:
        self.ticket: str | None = None
        self.storefront = 0  # the ticket's storefront, and when its receipt arrived
        self.receipted_at = 0.0
        self.etag = ""
        self.position: int | None = None
        self.pause = self.IDLE_S
        # (when, eta_seconds, position) of the ticket's first answer; when the last answer
        # that was not final arrived
        self.first: tuple[float, int | None, int | None] | None = None
        self.last_pending = 0.0

    def on_stop(self) -> None:
        if self.ticket is not None and self.first is not None:
            LEDGER.eta_unfinished += 1

    def wait_time(self) -> float:
        return self.pause

    def _take_ticket(self) -> bool:
        if not TICKETS:
            self.pause = self.IDLE_S
            return False
        self.ticket, self.storefront, self.receipted_at = TICKETS.pop()
        self.etag = ""
        self.position = None
        self.first = None
        return True

    @task
    def follow_ticket(self) -> None:
        if self.ticket is None and not self._take_ticket():
            return
        assert self.ticket is not None
        headers = {"If-None-Match": self.etag} if self.etag else {}
        with self.client.get(
            self.ticket, headers=headers, name="GET /v1/queue/{ticket}", catch_response=True
        ) as resp:
            LEDGER.answer("poll", resp)
            now = time.monotonic()
            if resp.status_code == 304:
                self.last_pending = now
                resp.success()
                return
            if resp.status_code != 200:
                resp.failure(_unexpected(resp, 200))
                self.ticket = None
                return
            doc = _json(resp)
            self.etag = (resp.headers or {}).get("etag", "")
            position = doc.get("position")
            if isinstance(position, int) and self.position is not None and position > self.position:
                LEDGER.position_increases += 1
                resp.failure(f"position grew from {self.position} to {position}")
            else:
                resp.success()
            self.position = position if isinstance(position, int) else self.position
            if self.first is None:
                eta = doc.get("eta_seconds")
                self.first = (now, eta if isinstance(eta, int) else None, self.position)
                self.last_pending = now
            status = doc.get("status")
            if status in FINAL:
                LEDGER.followed[str(status)] += 1
                if status == "committed":
                    at, eta, first_position = self.first
                    LEDGER.eta(
                        eta,
                        first_position,
                        now - at,
                        now - self.last_pending,
                        self.storefront,
                        now - self.receipted_at,
                    )
                self.ticket = None
                self.pause = 0.0
            else:
                self.last_pending = now
                self.pause = float(doc.get("poll_after_seconds") or 1)


def _json(resp: Any) -> dict[str, Any]:
    try:
        doc = resp.json()
    except Exception:  # noqa: BLE001 - any undecodable body is just "not what we expected"
        return {}
    return doc if isinstance(doc, dict) else {}


def _retry_after(resp: Any) -> float:
    try:
        return max(0.1, float((resp.headers or {}).get("retry-after") or 1))
    except ValueError:
        return 1.0


def _unexpected(resp: Any, expected: int) -> str:
    problem = _json(resp)
    what = problem.get("type") or (resp.text or "")[:200]
    return f"HTTP {resp.status_code} (expected {expected}): {what}"

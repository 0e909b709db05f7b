"""Locust load test of the order API: storefronts POSTing orders to one ordergate gateway.

Each simulated storefront user takes one API key from ``ORDERGATE_API_KEY`` (a comma-separated
list is allowed; one key is picked per user) and, by task weight:

* ~97 %: POSTs a new valid order (unique ``storefront_order_id``, 1-5 items, correct
  ``total_minor``, EUR) and expects 202 with a receipt;
* ~2 %: resubmits one of its earlier orders unchanged and expects 200 with the original
  ``order_id``;
* ~1 %: POSTs a deliberately invalid order and expects 422 ``/problems/invalid-order``.

Anything else (503 ``buffer-unavailable`` included) is recorded as a failure.
See ``loadtests/README.md`` for how to run it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import uuid
from collections import deque
from typing import Any

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

log = logging.getLogger(__name__)


def api_keys() -> list[str]:
    """The API keys from ORDERGATE_API_KEY (comma-separated)."""
    return [k.strip() for k in os.environ.get("ORDERGATE_API_KEY", "").split(",") if k.strip()]


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


@events.init.add_listener
def require_api_key(environment: Environment, **_kwargs: Any) -> None:
    """Refuse to start without a key (a distributed master sends no orders and needs none)."""
    if not isinstance(environment.runner, MasterRunner) and not api_keys():
        log.error("set ORDERGATE_API_KEY, e.g. ORDERGATE_API_KEY=$(ordergate keys create loadtest)")
        raise SystemExit(1)


class StorefrontUser(FastHttpUser):
    """One storefront sending orders."""

    wait_time = between(0.0, 0.1)

    def on_start(self) -> None:
        self.headers = {
            "Authorization": f"Bearer {random.choice(api_keys())}",
            "Content-Type": "application/json",
        }
        # (time acknowledged, body as sent, order_id) of this user's recent admitted orders
        self.admitted: deque[tuple[float, str, str]] = deque(maxlen=200)

    def _post(self, body: str, name: str) -> Any:
        return self.client.post(
            ORDERS, data=body, headers=self.headers, name=name, catch_response=True
        )

    @task(97)
    def submit_order(self) -> None:
        body = json.dumps(new_order())
        with self._post(body, "POST /v1/orders [new]") as resp:
            if resp.status_code != 202:
                resp.failure(_unexpected(resp, 202))
                return
            order_id = _json(resp).get("order_id")
            if not order_id:
                resp.failure("202 without an order_id")
                return
            resp.success()
            self.admitted.append((time.monotonic(), body, order_id))

    @task(2)
    def resubmit_order(self) -> None:
        cutoff = time.monotonic() - RESUBMIT_MIN_AGE_S
        earlier = [a for a in self.admitted if a[0] <= cutoff]
        if not earlier:
            self.submit_order()
            return
        _, body, order_id = random.choice(earlier)
        with self._post(body, "POST /v1/orders [resubmit]") as resp:
            if resp.status_code != 200:
                resp.failure(_unexpected(resp, 200))
            elif _json(resp).get("order_id") != order_id:
                resp.failure(
                    f"resubmission answered order {_json(resp).get('order_id')!r}, "
                    f"expected the original {order_id!r}"
                )
            else:
                resp.success()

    @task(1)
    def submit_invalid_order(self) -> None:
        with self._post(json.dumps(invalid_order()), "POST /v1/orders [invalid]") as resp:
            if resp.status_code != 422:
                resp.failure(_unexpected(resp, 422))
            elif _json(resp).get("type") != "/problems/invalid-order":
                resp.failure(f"422 of type {_json(resp).get('type')!r}, expected invalid-order")
            else:
                resp.success()


def _json(resp: Any) -> dict[str, Any]:
    try:
        doc = resp.json()
    except Exception:  # noqa: BLE001 - any undecodable body is just "not what we expected"
        return {}
    return doc if isinstance(doc, dict) else {}


def _unexpected(resp: Any, expected: int) -> str:
    problem = _json(resp)
    what = problem.get("type") or (resp.text or "")[:200]
    return f"HTTP {resp.status_code} (expected {expected}): {what}"

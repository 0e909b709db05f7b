"""The operators' dashboard over plain HTTP: the page is self-contained under a strict CSP, and
its JSON endpoint wants the admin token, answers with the overview, the history, the rates and
the admission buckets, and says 503 when Redis is down. (The page in a real Chromium under load:
tests/browser/test_dashboard.py.)"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ordergate.buffer import history
from ordergate.buffer.keys import Keys
from ordergate.settings import Settings
from tests.conftest import admit, auth, drain

TOKEN = "admin-secret-for-the-dashboard"


async def test_page_is_self_contained_under_a_strict_csp(
    app_factory: Callable[..., Any], settings: Settings
) -> None:
    client = await app_factory(settings.replace(admin_token=TOKEN))
    r = await client.get("/dashboard")  # no token: the page holds no data
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'$", csp.split(";")[1].strip())
    assert "unsafe-inline" not in csp
    page = r.text
    assert not re.search(r"https?://", page), "the page loads nothing from elsewhere"
    assert "<script src" not in page and '<link rel="stylesheet"' not in page
    for figure in ("issued", "settled", "ingest", "drain", "p50", "p99", "dead-orders"):
        assert f'data-figure="{figure}"' in page
    again = await client.get("/dashboard", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304


async def test_data_wants_the_admin_token(
    app_factory: Callable[..., Any], settings: Settings
) -> None:
    client = await app_factory(settings.replace(admin_token=TOKEN))
    for headers in ({}, auth("wrong")):
        r = await client.get("/v1/ops/dashboard", headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"] == "/problems/unauthorized"
    r = await client.get("/v1/ops/dashboard", headers=auth(TOKEN))
    assert r.status_code == 200, r.text


async def test_data_has_the_overview_history_and_rates(
    app_factory: Callable[..., Any], settings: Settings, api_key: str, redis: Any
) -> None:
    settings = settings.replace(admin_token=TOKEN)
    client = await app_factory(settings)
    keys = Keys(settings.key_prefix)
    r = await client.get("/v1/ops/dashboard", headers=auth(TOKEN))
    body = r.json()
    assert body["history"] == [] and body["rates"] == {"ingest": None, "drain": None}

    await history.record(redis, keys, settings.shards)
    await admit(client, api_key, 30)
    await history.record(redis, keys, settings.shards)
    await drain(settings)
    await history.record(redis, keys, settings.shards)

    r = await client.get("/v1/ops/dashboard", headers=auth(TOKEN))
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert set(body) >= {"at", "overview", "history", "rates", "admission_buckets"}
    overview = body["overview"]
    assert overview["issued"] == 30 and overview["settled"] == 30 and overview["buffered"] == 0
    assert {"drain", "notifications", "breakers", "dead_letters"} <= set(overview)
    samples = body["history"]
    assert samples[0]["issued"] == 0 and samples[-1]["settled"] == 30
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)  # oldest first
    full = next(s for s in samples if s["issued"] == 30 and s["settled"] == 0)
    assert sum(full["depth"]) == 30 and len(full["depth"]) == settings.shards
    assert body["rates"]["ingest"] > 0 and body["rates"]["drain"] > 0
    buckets = body["admission_buckets"]
    assert buckets[-1][0] is None and buckets[-1][1] >= 30  # +Inf, as JSON has no infinity


async def test_data_is_503_while_redis_is_down(
    app_factory: Callable[..., Any], settings: Settings
) -> None:
    down = settings.replace(admin_token=TOKEN, redis_url="redis://127.0.0.1:1/0")
    client = await app_factory(down)
    r = await client.get("/v1/ops/dashboard", headers=auth(TOKEN))
    assert r.status_code == 503
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "1"
    assert "Redis unavailable" in r.json()["detail"]


async def test_data_carries_the_admission_buckets(
    app_factory: Callable[..., Any], settings: Settings, api_key: str
) -> None:
    """The admission histogram's cumulative buckets, +Inf as null, grow with the orders taken."""
    client = await app_factory(settings.replace(admin_token=TOKEN))
    before = (await client.get("/v1/ops/dashboard", headers=auth(TOKEN))).json()
    await admit(client, api_key, 7)
    after = (await client.get("/v1/ops/dashboard", headers=auth(TOKEN))).json()
    old, new = before["admission_buckets"], after["admission_buckets"]
    assert [b[0] for b in new][-1] is None and [b[0] for b in new] == [b[0] for b in old]
    assert new[-1][1] - old[-1][1] == 7  # every receipt observed once
    assert [b[1] for b in new] == sorted(b[1] for b in new)  # cumulative

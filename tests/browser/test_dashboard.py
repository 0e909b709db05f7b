"""The operators' dashboard in a real headless Chromium, against a real gateway process, real
Valkey and PostgreSQL and a worker draining under a steady load: the figures are non-zero and
move, the charts draw, Pause really stops the drain and Resume restarts it, a wrong token is
said so, and the page logs no error (a CSP violation would be one)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page

from ordergate.components import worker_config
from ordergate.settings import Settings
from ordergate.workers.runner import run_worker
from tests.browser.conftest import Gateway
from tests.browser.test_waiting_page import Console
from tests.conftest import auth, eventually, order_body

pytestmark = pytest.mark.timeout(900)  # the first browser test of a session may install Chromium

TOKEN = "dashboard-admin-token-0123456789"
POSTERS = 4
PAUSE_BETWEEN_POSTS_S = 0.02  # each poster's pace: up to ~200 orders/s in all
DRAIN_RATE = 80  # below the ingest, so the buffer has depth to show


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The session's settings with an admin token (the gateway fixture serves with them)."""
    return settings.replace(admin_token=TOKEN)


@contextlib.asynccontextmanager
async def storefront_load(gateway: Gateway, api_key: str) -> AsyncIterator[list[int]]:
    """Orders posted continuously until the block ends; yields the count of receipts so far."""
    receipts = [0]
    stop = asyncio.Event()

    async def poster(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await http.post("/v1/orders", json=order_body(), headers=auth(api_key))
            assert r.status_code == 202, r.text
            receipts[0] += 1
            await asyncio.sleep(PAUSE_BETWEEN_POSTS_S)

    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        tasks = [asyncio.create_task(poster(http)) for _ in range(POSTERS)]
        try:
            yield receipts
        finally:
            stop.set()
            await asyncio.gather(*tasks)


@contextlib.asynccontextmanager
async def draining(settings: Settings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_worker(worker_config(settings), stop=stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def value(page: Page, figure: str) -> str | None:
    return await page.locator(f'[data-figure="{figure}"]').first.get_attribute("data-value")


async def number(page: Page, figure: str) -> float:
    raw = await value(page, figure)
    return float(raw) if raw is not None else 0.0


async def test_dashboard_shows_a_live_load_and_pauses_the_drain(
    browser: Browser, gateway: Gateway, api_key: str, shots: Path
) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    page = await context.new_page()
    console = Console(page)
    settings = gateway.settings.replace(drain_rate=DRAIN_RATE, batch_size=20)
    try:
        async with draining(settings), storefront_load(gateway, api_key) as receipts:
            await eventually(lambda: receipts[0] > 0, timeout=15)
            response = await page.goto(f"{gateway.url}/dashboard#token={TOKEN}")
            assert response is not None and response.status == 200
            assert "token=" not in page.url  # the page takes the token out of sight

            async def busy() -> bool:
                return all(
                    [
                        await number(page, "issued") > 0,
                        await number(page, "settled") > 0,
                        await number(page, "buffered") > 0,
                        await number(page, "ingest") > 0,
                        await number(page, "drain") > 0,
                        await value(page, "drain-state") == "draining",
                    ]
                )

            await eventually(busy, timeout=30)
            assert await page.get_attribute("body", "data-connection") == "live"
            workers = await page.locator('[data-figure="leader"]').inner_text()
            assert workers != "none"
            owners = await page.locator("#lanes tbody tr").evaluate_all(
                "rows => rows.map(r => r.getAttribute('data-owner'))"
            )
            assert len(owners) == settings.shards and set(owners) == {workers}, owners
            bars = await page.locator("#shards-chart").get_attribute("data-value") or ""
            depths = [int(d) for d in bars.split(",")]
            assert len(depths) == settings.shards and sum(depths) > 0, bars
            issued = await number(page, "issued")
            chart = await page.locator("#rates-chart").screenshot()

            async def moved() -> bool:
                return await number(page, "issued") > issued + 20

            await eventually(moved, timeout=20)

            async def redrawn() -> bool:  # the chart moves with the next history sample
                return await page.locator("#rates-chart").screenshot() != chart

            await eventually(redrawn, timeout=10, interval=0.2)
            p50 = await page.locator('[data-figure="p50"]').inner_text()
            # the admission histogram's median over the last polls, e.g. "3.2 ms"
            assert p50.endswith(" ms") and await number(page, "p50") > 0, p50
            shot = shots / "dashboard-live.png"
            await page.screenshot(path=shot, full_page=True, animations="disabled")
            png = shot.read_bytes()
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000, len(png)

            await pause_and_resume(page, shots)
        assert console.messages == []
    finally:
        await context.close()


async def pause_and_resume(page: Page, shots: Path) -> None:
    """Pause stops the settled figure while orders keep arriving; Resume restarts it."""
    await page.click("#pause")
    await eventually(
        lambda: page.locator("#control-result").get_attribute("data-result"), timeout=10
    )
    assert await page.locator("#control-result").get_attribute("data-result") == "paused"
    await eventually(lambda: _shows(page, "drain-state", "paused"), timeout=15)
    await eventually(lambda: _shows(page, "control", "paused"), timeout=15)
    settled, issued = await number(page, "settled"), await number(page, "issued")

    async def arrived() -> bool:  # orders keep coming in while the drain stands still
        return await number(page, "issued") > issued + 50

    await eventually(arrived, timeout=20)
    assert await number(page, "settled") == settled
    await page.screenshot(path=shots / "dashboard-paused.png", full_page=True)

    await page.click("#resume")

    async def resumed() -> bool:
        return await number(page, "settled") > settled

    await eventually(resumed, timeout=20)
    assert await page.locator("#control-result").get_attribute("data-result") == "running"

    for rate, shown in (("50", "cap 50 orders/s"), ("0", "no cap")):
        await page.fill("#rate-input", rate)
        await page.click("#set-rate")
        await eventually(functools.partial(_confirmed, page, shown), timeout=10)


async def _confirmed(page: Page, text: str) -> bool:
    """The control's answer says ``text``, and so does the next poll of the overview."""
    result = await page.locator("#control-result").inner_text()
    return text in result and text in await page.locator('[data-figure="control"]').inner_text()


async def _shows(page: Page, figure: str, expected: str) -> bool:
    return await value(page, figure) == expected


async def test_dashboard_asks_for_the_token(browser: Browser, gateway: Gateway) -> None:
    context = await browser.new_context(locale="en-US")
    page = await context.new_page()
    messages: list[Any] = []
    page.on("pageerror", lambda exc: messages.append(exc))
    try:
        await page.goto(f"{gateway.url}/dashboard#token=wrong")

        async def refused() -> bool:
            return await page.get_attribute("body", "data-connection") == "unauthorized"

        await eventually(refused, timeout=15)
        assert await page.locator("#login").is_visible()
        assert "refused" in await page.locator("#notice").inner_text()

        await page.fill("#token", TOKEN)
        await page.click("#login button")

        async def live() -> bool:
            return await page.get_attribute("body", "data-connection") == "live"

        await eventually(live, timeout=15)
        assert not await page.locator("#login").is_visible()
        assert await value(page, "issued") == "0"
        assert await page.locator('[data-figure="p50"]').inner_text() in ("…", "– (idle)")
        assert messages == []
    finally:
        await context.close()

"""The customer waiting page in a real headless Chromium, against a real gateway process, real
Valkey and real PostgreSQL: it shows the customer's place, follows a throttled drain down to the
confirmation, fits a phone, loads in a storefront's iframe and says when a ticket is unknown."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Frame, Page, Route, ViewportSize

from ordergate.components import worker_config
from ordergate.workers.runner import run_worker
from tests.browser.conftest import Gateway
from tests.conftest import auth, eventually, order_body

# The first test of a session may install Chromium with apt-get (see conftest); the test itself
# runs in well under a minute.
pytestmark = pytest.mark.timeout(900)

PHONE: ViewportSize = {"width": 375, "height": 667}


async def admit(gateway: Gateway, api_key: str, before: int, after: int) -> dict[str, Any]:
    """Admit ``before`` orders, then ours, then ``after`` more; return our receipt."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:

        async def post() -> dict[str, Any]:
            r = await http.post("/v1/orders", json=order_body(), headers=auth(api_key))
            assert r.status_code == 202, r.text
            body: dict[str, Any] = r.json()
            return body

        await asyncio.gather(*(post() for _ in range(before)))
        receipt = await post()
        await asyncio.gather(*(post() for _ in range(after)))
    assert receipt["ticket"] and receipt["wait_url"] and receipt["queue_url"], receipt
    assert receipt["wait_url"].startswith(("http://", "https://")), receipt
    return receipt


async def queue_state(gateway: Gateway, receipt: dict[str, Any]) -> dict[str, Any]:
    """The JSON the page polls, as a plain client sees it."""
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(urljoin(gateway.url, receipt["queue_url"]))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def shown_position(page: Page | Frame) -> int | None:
    """The number in #position (thousands separators and words stripped)."""
    digits = re.sub(r"\D", "", await page.locator("#position").inner_text())
    return int(digits) if digits else None


async def shown_status(page: Page | Frame) -> str | None:
    return await page.locator("body").get_attribute("data-status")


class Console:
    """Everything the page says on the console, and every uncaught error."""

    def __init__(self, page: Page) -> None:
        self.messages: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.messages.append(f"pageerror: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.messages.append(f"{message.type}: {message.text}")


async def test_page_follows_the_drain_to_the_confirmation(
    browser: Browser, gateway: Gateway, api_key: str, shots: Path
) -> None:
    receipt = await admit(gateway, api_key, before=290, after=10)
    ahead = (await queue_state(gateway, receipt))["position"]
    assert ahead > 0

    context = await browser.new_context(viewport={"width": 1000, "height": 700}, locale="en-US")
    page = await context.new_page()
    console = Console(page)
    stop = asyncio.Event()
    task: asyncio.Task[Any] | None = None
    try:
        response = await page.goto(receipt["wait_url"])
        assert response is not None and response.status == 200
        await eventually(lambda: shown_position(page), timeout=15)
        assert await shown_position(page) == (await queue_state(gateway, receipt))["position"]
        assert await shown_status(page) == "queued"
        assert f"{ahead:,}" in await page.locator("#position").inner_text()  # en-US grouping
        await page.screenshot(path=shots / "1-queued.png", full_page=True, animations="disabled")
        before = await page.locator("#position").screenshot()
        progress_before = int(await page.locator("#progress").get_attribute("aria-valuenow") or 0)

        settings = gateway.settings.replace(drain_rate=60, batch_size=10)
        task = asyncio.create_task(run_worker(worker_config(settings), 0, stop=stop))

        async def moved() -> bool:
            shown = await shown_position(page)
            return shown is not None and 0 < shown < ahead

        await eventually(moved, timeout=20)
        await page.screenshot(path=shots / "2-moving.png", full_page=True, animations="disabled")
        assert await page.locator("#position").screenshot() != before
        progress = int(await page.locator("#progress").get_attribute("aria-valuenow") or 0)
        assert progress > progress_before

        async def committed() -> bool:
            return await shown_status(page) == "committed"

        await eventually(committed, timeout=30)
        await page.screenshot(path=shots / "3-committed.png", full_page=True, animations="disabled")
        assert "confirmed" in (await page.locator("#status").inner_text()).lower()
        assert await page.locator("#progress").get_attribute("aria-valuenow") == "100"
        assert (await queue_state(gateway, receipt))["status"] == "committed"
        assert console.messages == []  # no script errors, no CSP refusals
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait_for(task, 30)
        await context.close()


async def test_page_fits_a_phone_and_a_storefront_iframe(
    browser: Browser,
    gateway: Gateway,
    api_key: str,
    storefront: Callable[[str], str],
    shots: Path,
) -> None:
    receipt = await admit(gateway, api_key, before=25, after=0)
    ahead = (await queue_state(gateway, receipt))["position"]
    assert ahead > 0

    phone = await browser.new_context(
        viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2, locale="en-US"
    )
    try:
        page = await phone.new_page()
        console = Console(page)
        await page.goto(receipt["wait_url"])
        await eventually(lambda: shown_position(page), timeout=15)
        assert await shown_position(page) == ahead
        overflow = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert overflow[0] <= overflow[1], f"horizontal overflow on a phone: {overflow}"
        await page.screenshot(path=shots / "phone.png", full_page=True, animations="disabled")
        assert console.messages == []
    finally:
        await phone.close()

    # A storefront on another origin embeds the page; the gateway's CSP allows any framer.
    checkout = storefront(
        '<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><h1>Checkout</h1>'
        f'<iframe src="{receipt["wait_url"]}" width="360" height="420"'
        ' title="Your place in the queue"></iframe>'
    )
    desktop = await browser.new_context(locale="en-US")
    try:
        page = await desktop.new_page()
        console = Console(page)
        await page.goto(checkout)
        frame = await eventually(lambda: _child_frame(page), timeout=10)
        await eventually(lambda: shown_position(frame), timeout=15)
        assert await shown_position(frame) == ahead
        await page.screenshot(path=shots / "iframe.png", animations="disabled")
        assert console.messages == []
    finally:
        await desktop.close()

    # Behind a reverse proxy under a sub-path, the page polls through the proxy.
    proxy = "http://proxy.test/shop"
    proxied = await browser.new_context(locale="en-US")
    seen: list[str] = []

    async def forward(route: Route) -> None:
        path = urlsplit(route.request.url).path.removeprefix("/shop")
        seen.append(path)
        await route.fulfill(response=await route.fetch(url=f"{gateway.url}{path}"))

    try:
        await proxied.route(f"{proxy}/**", forward)
        page = await proxied.new_page()
        await page.goto(f"{proxy}/wait/{receipt['ticket']}")
        await eventually(lambda: shown_position(page), timeout=15)
        assert await shown_position(page) == ahead
        assert any(p.startswith("/v1/queue/") for p in seen), seen
    finally:
        await proxied.close()


def _child_frame(page: Page) -> Frame | None:
    frames = [f for f in page.frames if f is not page.main_frame and f.url.startswith("http")]
    return frames[0] if frames else None


async def test_unknown_ticket_says_so(browser: Browser, gateway: Gateway, shots: Path) -> None:
    context = await browser.new_context(viewport=PHONE, locale="en-US")
    try:
        page = await context.new_page()
        console = Console(page)
        response = await page.goto(f"{gateway.url}/wait/tk_no-such-ticket")
        assert response is not None and response.status == 200
        headers = await response.all_headers()
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-cache"
        csp = headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors *" in csp
        assert "unsafe-inline" not in csp
        async with httpx.AsyncClient(timeout=10) as http:  # the page itself revalidates cheaply
            again = await http.get(response.url, headers={"If-None-Match": headers["etag"]})
        assert again.status_code == 304

        async def unknown() -> bool:
            return await shown_status(page) == "unknown"

        await eventually(unknown, timeout=15)
        assert "unknown or expired" in (await page.locator("#status").inner_text()).lower()
        assert await page.locator("#position").is_hidden()
        await page.screenshot(path=shots / "unknown.png", full_page=True, animations="disabled")
        # Chromium logs the 404 of the poll itself as a network error; nothing else may appear.
        assert [m for m in console.messages if "status of 404" not in m] == []
    finally:
        await context.close()

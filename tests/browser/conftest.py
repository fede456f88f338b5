"""Real headless Chromium (Debian's `chromium`, driven by Playwright without its own browser
download) against a real node: the dashboard as a user's browser runs it."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, WebSocket, async_playwright

from tests.conftest import missing
from tests.integration.conftest import make_node as make_node  # the same node factory
from tests.integration.harness import Node

CHROMIUM = os.environ.get("FLEETWIRE_TEST_CHROMIUM", "/usr/bin/chromium")
HAVE_CHROMIUM = Path(CHROMIUM).exists()  # looked up once, at import
WAIT_MS = 10_000  # every wait in a page is bounded


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        missing(f"Chromium not found at {CHROMIUM}", "apt-get install chromium")
    async with async_playwright() as playwright:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        browser = await asyncio.wait_for(
            playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"]), 30
        )
        try:
            yield browser
        finally:
            await asyncio.wait_for(browser.close(), 30)


class Dashboard:
    """One signed-in page; page errors and failed requests are collected for the test to check."""

    def __init__(self, page: Page, node: Node) -> None:
        self.page = page
        self.node = node
        self.errors: list[str] = []
        self.received: list[dict[str, Any]] = []  # every frame the page's /ws/client socket got
        page.on("websocket", self._watch)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.set_default_timeout(WAIT_MS)

    def _watch(self, socket: WebSocket) -> None:
        if "/ws/client" in socket.url:
            socket.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    async def open(self, token: str) -> Dashboard:
        await self.page.goto(f"{self.node.http_url}/#token={token}")
        await self.page.wait_for_selector("#h-live.ok")
        return self

    async def cell(self, device_id: str, column: int) -> str:
        text: str = await self.page.locator(f'.row[data-id="{device_id}"] span').nth(column).inner_text()
        return text

    async def wait_cell(self, device_id: str, column: int, text: str) -> None:
        await self.page.wait_for_function(
            "([id, column, text]) => {"
            " const row = document.querySelector(`.row[data-id=\"${id}\"]`);"
            " return row !== null && !row.hidden && row.children[column].textContent === text; }",
            arg=[device_id, column, text],
        )


@pytest.fixture
async def dashboard(browser: Browser) -> AsyncIterator[Callable[..., Any]]:
    pages: list[Page] = []

    async def make(node: Node, token: str, **context: Any) -> Dashboard:
        page = await browser.new_page(viewport={"width": 1400, "height": 1000}, **context)
        pages.append(page)
        return await Dashboard(page, node).open(token)

    yield make
    for page in pages:
        await asyncio.wait_for(page.close(), 10)

"""The monitor's dashboard in a real headless Chromium (Debian's package, driven by
Playwright), fed by a real broker and real consumers: rows and coloured check cells
appear, change without a reload, alerts show, and names from the bus stay text."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from heartbeat_consumer.monitor.rules import WatchConfig

from .broker import Bus, new_monitor, running
from .helpers import envelope, free_port, until, write
from .requires import need_tool

MIN = 60_000
COLOURS = {"success": "rgb(31, 157, 85)", "failed": "rgb(214, 69, 69)"}


def chromium() -> str:
    """Debian's Chromium (Playwright drives it; no `playwright install`), or $CHROMIUM."""
    return need_tool(
        os.environ.get("CHROMIUM") or "chromium",
        "the dashboard's browser test",
        "apt-get install chromium (or set CHROMIUM to a Chromium or Chrome binary)",
    )


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium()  # before Playwright starts: a missing browser skips cleanly
    async with async_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        launched = await p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


def cell(agent: str, check: str, status: str | None = None) -> str:
    where = f'tr[data-agent="{agent}"] .check[data-check="{check}"]'
    return where + (f'[data-status="{status}"]' if status else "")


async def background(page: Page, selector: str) -> str:
    colour: str = await page.eval_on_selector(selector, "e => getComputedStyle(e).backgroundColor")
    return colour


async def test_dashboard_shows_the_fleet_live(bus: Bus, tmp_path: Path, browser: Browser) -> None:
    good, bad, late = bus.agent("good"), bus.agent("bad"), bus.agent("late")
    good_config = write(tmp_path, good, {"inbox": {"cadenceMs": 15 * MIN, "handler": "default"}})
    bad_config = write(
        tmp_path,
        bad,
        {"deploy": {"cadenceMs": 15 * MIN, "handler": "command", "meta": {"argv": ["false"]}}},
    )
    late_config = write(tmp_path, late, {"sync": {"cadenceMs": 5 * MIN, "handler": "default"}})
    port = free_port()
    monitor = new_monitor(
        bus, tmp_path / "m.json", check_every_ms=200, config=WatchConfig(timeout_grace_ms=0)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop, port=port))
    page = await browser.new_page(viewport={"width": 1200, "height": 700})
    try:
        await until(lambda: monitor.running)
        async with running(bus, good, good_config), running(bus, bad, bad_config):
            await page.goto(f"http://127.0.0.1:{port}/?refresh=0.3")
            await page.wait_for_selector(cell(good, "inbox", "success"), timeout=15_000)
            await page.wait_for_selector(cell(bad, "deploy", "failed"), timeout=15_000)
            assert await background(page, cell(good, "inbox")) == COLOURS["success"]
            assert await background(page, cell(bad, "deploy")) == COLOURS["failed"]
            text = await page.inner_text(cell(good, "inbox"))
            # Due again one cadence after its slot (the minute the run fell in).
            assert "success" in text, text
            assert re.search(r"due in 1[45] min", text), text
            assert await page.inner_text("#monitor-status") == "online"

            # Live: an agent that starts now appears without a reload.
            async with running(bus, late, late_config):
                await page.wait_for_selector(cell(late, "sync", "success"), timeout=15_000)
            await page.wait_for_selector(f'tr[data-agent="{late}"][data-state="offline"]')

            # A wedged run (started, never finished) turns into a timeout alert.
            wedged = f"wedged{uuid.uuid4().hex[:6]}"
            await bus.publish(
                f"heartbeat.{wedged}.build.started",
                envelope(
                    "heartbeat.started",
                    {"agent": wedged, "check": "build", "timeout_ms": 500, "cadence_ms": MIN},
                ),
            )
            row = f'tr[data-agent="{wedged}"]'
            await page.wait_for_selector(cell(wedged, "build", "running"), timeout=15_000)
            await page.wait_for_selector(f"{row} .alerts li.error", timeout=15_000)
            assert "timeout build" in await page.inner_text(f"{row} .alerts")
            assert await page.inner_text(f"{row} .agent") == wedged
            # Words from the bus are text, never markup (a status word can hold anything
            # a routing key can, names cannot).
            odd = "<b>odd</b>"
            await bus.publish(
                f"heartbeat.{wedged}.lint.{odd}",
                envelope("heartbeat.result", {"agent": wedged, "check": "lint", "status": odd}),
            )
            await page.wait_for_selector(cell(wedged, "lint"), timeout=15_000)
            assert await page.locator(f"{row} b").count() == 0
            assert odd in await page.inner_text(cell(wedged, "lint"))
            assert int(await page.inner_text("#n-incidents")) >= 1

            shot = tmp_path / "dashboard.png"
            await page.screenshot(path=str(shot), full_page=True)
            png = shot.read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            assert len(png) > 20_000
            if os.environ.get("DASHBOARD_SCREENSHOT"):  # to refresh docs/dashboard.png
                shutil.copyfile(shot, os.environ["DASHBOARD_SCREENSHOT"])

        # The monitor going away shows on the page, which keeps the last answer.
        stop.set()
        await task
        await page.wait_for_selector("#error", state="visible", timeout=10_000)
        assert await page.inner_text("#monitor-status") == "unreachable"
        assert await page.locator(f'tr[data-agent="{good}"]').count() == 1
    finally:
        stop.set()
        await task
        await page.close()


async def test_an_agent_with_an_unusable_config_is_red_with_its_reason(
    bus: Bus, tmp_path: Path, browser: Browser
) -> None:
    """An agent whose heartbeat.json was never valid (it only says online, then
    config_invalid) is red on the dashboard with the reason as text, not green idle;
    once alive, it is idle again."""
    agent = bus.agent("broken")
    reason = "heartbeat.json: Expecting value <b>here</b> <img src=x onerror=alert(1)>"
    port = free_port()
    monitor = new_monitor(bus, tmp_path / "m.json", check_every_ms=200)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop, port=port))
    page = await browser.new_page(viewport={"width": 1200, "height": 500})
    try:
        await until(lambda: monitor.running)
        for word, extra in (("online", {}), ("config_invalid", {"error": reason})):
            await bus.publish(
                f"heartbeat.{agent}._status.{word}",
                envelope("heartbeat.status", {"agent": agent, "status": word, **extra}),
            )
        await page.goto(f"http://127.0.0.1:{port}/?refresh=0.3")
        row = f'tr[data-agent="{agent}"]'
        await page.wait_for_selector(f'{row}[data-state="config_invalid"]', timeout=15_000)
        assert await background(page, f"{row} .state") == COLOURS["failed"]
        assert await page.inner_text(f"{row} .state") == "config_invalid"
        assert reason in await page.inner_text(f"{row} .config-error")
        await page.wait_for_selector(f"{row} .alerts li.error", timeout=15_000)
        assert f"config_invalid: {reason}" in await page.inner_text(f"{row} .alerts")
        assert await page.locator(f"{row} b, {row} img").count() == 0  # text, never markup
        assert await page.inner_text("#n-config-invalid") == "1"

        await bus.publish(
            f"heartbeat.{agent}._status.alive",
            envelope("heartbeat.status", {"agent": agent, "status": "alive"}),
        )
        await page.wait_for_selector(f'{row}[data-state="idle"]', timeout=15_000)
        await page.wait_for_selector(f"{row} .alerts li", state="detached", timeout=15_000)
        assert await page.locator(f"{row} .config-error").count() == 0
    finally:
        stop.set()
        await task
        await page.close()

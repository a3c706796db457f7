"""A real browser for the console's tests: Playwright for Python driving the system's
chromium (Playwright's own browser download cannot work here).

Playwright's sync API runs its own event loop, and the daemon under test runs
in this process on trio: so every browser call runs on one dedicated thread
(`BrowserThread.run`), and the trio side awaits it without blocking the
daemon. One browser per test session; each test opens its own context.

Without chromium or Playwright the tests skip, saying why; in CI (env CI
set) they fail instead, since there they must run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

T = TypeVar("T")

# Debian's chromium; CONSOLE_CHROMIUM names another binary (and only that one).
CHROMIUM = "/usr/bin/chromium"
# Headless as root in a container: no sandbox, no GPU (RESEARCH.md).
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
# Each Playwright wait gives up after this long (ms); the test's own deadline is longer.
STEP_TIMEOUT_MS = 10_000
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "console-screenshots"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[test]')"
    if chromium_path() is None:
        wanted = os.environ.get("CONSOLE_CHROMIUM", CHROMIUM)
        return f"no chromium at {wanted} (apt-get install chromium)"
    return None


def chromium_path() -> str | None:
    chosen = os.environ.get("CONSOLE_CHROMIUM")
    if chosen is not None:
        return chosen if Path(chosen).exists() else None
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def require_browser() -> None:
    """Skip (outside CI, printing why) or fail (in CI) when the browser is missing."""
    reason = browser_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"the console's browser tests must run in CI: {reason}")
    print(f"skipping the console's browser tests: {reason}")
    pytest.skip(reason)


class BrowserThread:
    """A headless chromium driven from one thread; `await run(fn, *args)` calls fn there."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="browser")
        self._playwright: Any = None
        self.browser: Any = None

    def start(self) -> None:
        self._thread.submit(self._launch).result()

    def _launch(self) -> None:
        from playwright.sync_api import expect, sync_playwright

        # The same patience for assertions as for actions (on a loaded CI machine).
        expect.set_options(timeout=STEP_TIMEOUT_MS)
        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=LAUNCH_ARGS)

    def close(self) -> None:
        def shut() -> None:
            if self.browser is not None:
                self.browser.close()
            if self._playwright is not None:
                self._playwright.stop()

        self._thread.submit(shut).result()
        self._thread.shutdown()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the browser's thread; the trio loop keeps serving meanwhile."""
        future = self._thread.submit(fn, *args)
        return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    async def new_page(self, width: int = 1280, height: int = 800) -> Any:
        def make() -> Any:
            context = self.browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.set_default_timeout(STEP_TIMEOUT_MS)
            page.errors = []
            page.on("pageerror", lambda error: page.errors.append(str(error)))
            return page

        return await self.run(make)

    async def close_page(self, page: Any) -> None:
        await self.run(page.context.close)


def screenshot(page: Any, name: str) -> Path:
    """Save the page as build/console-screenshots/NAME.png (on the browser's thread)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path

"""Browser tests: Debian's Chromium, driven by Playwright, against the real server (scripts/start.sh)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.server import ROOT, serving

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "artifacts" / "screenshots"  # kept by CI (README: "Demo page")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Chromium logs every failed load; failed loads are checked by status instead (the API's 4xx are expected).
FAILED_LOAD = re.compile(r"^Failed to load resource: the server responded with a status of")


@pytest.fixture(scope="package")
def demo_server(tmp_path_factory, tiny_model_dir):
    """gunicorn with DJANGO_DEBUG off and whitenoise, serving the tiny test model."""
    with serving(tmp_path_factory.mktemp("demo-server"), tiny_model_dir) as server:
        yield server


@pytest.fixture(scope="package")
def browser():
    if not CHROMIUM.exists():
        message = "Debian's chromium is not at /usr/bin/chromium (./scripts/setup.sh --dev installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a missing browser there is a broken set-up, not a skip
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class Pages:
    """Opens browser contexts for one test and fails the test on any script error they log."""

    def __init__(self, browser):
        self.browser = browser
        self.contexts = []
        self.script_errors: list[str] = []

    def new(self, **context_args):
        context = self.browser.new_context(**{"viewport": DESKTOP, **context_args})
        context.set_default_timeout(30_000)
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: self.script_errors.append(str(exc)))
        page.on("console", self._on_console)
        page.on("response", self._on_response)
        return page

    def _on_console(self, message):
        if message.type == "error" and not FAILED_LOAD.search(message.text):
            self.script_errors.append(message.text)

    def _on_response(self, response):
        if response.status == 404 or response.status >= 500 and response.status != 503:
            self.script_errors.append(f"{response.status} {response.url}")

    def close(self):
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser):
    opened = Pages(browser)
    yield opened
    opened.close()
    assert opened.script_errors == [], "the page logged script errors or failed to load something"


@pytest.fixture
def page(pages):
    return pages.new()


@pytest.fixture
def screenshot(request):
    """``screenshot(page)`` saves artifacts/screenshots/<test-name>.png; ``screenshot(page, "state")`` adds -state."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    def save(page, state: str | None = None) -> Path:
        name = request.node.name + (f"-{state}" if state else "")
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return save

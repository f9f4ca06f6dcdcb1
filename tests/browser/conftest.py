"""Browser fixtures: Debian's Chromium driven by Playwright, with every request kept on loopback."""
from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support import CI, ROOT

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

VENDOR = ROOT / "examples" / "vendor"
# FastHTML pages load htmx from a CDN, which the tests cannot reach: they get the copy `make demo` serves instead
# (the htmx.org npm package, version 2.0.7 as FastHTML pins it; Zero-Clause BSD licence).
HTMX = VENDOR / "htmx-2.0.7.min.js"
HTMX_URL = re.compile(r"/htmx\.org@[^/]+/dist/htmx(\.min)?\.js$")
# FastHTML pages also link Pico CSS from a CDN: the tests serve the @picocss/pico 2.1.1 npm package's pico.min.css
# (MIT licence, its header kept), so screenshots look as the pages do.
PICO = VENDOR / "pico-2.1.1.min.css"
PICO_URL = re.compile(r"/pico@[^/]+/css/pico(\.[a-z]+)*\.min\.css$")
LOOPBACK = re.compile(r"^https?://(127\.0\.0\.1|localhost|\[::1\])(:\d+)?/")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _missing(what: str) -> None:
    if CI: pytest.fail(f"{what} is required under CI")
    pytest.skip(f"{what} is not available")


@pytest.fixture(scope="session")
def chromium() -> str:
    "Path of Debian's chromium (fails under CI, skips locally, when absent)."
    path = shutil.which("chromium")
    if path is None: _missing("Debian's chromium (apt-get install chromium)")
    assert path is not None
    return path


def _offline(route: Route) -> None:
    "Serve htmx from the local copy, let loopback through, refuse everything else."
    url = route.request.url
    if LOOPBACK.match(url): route.continue_()
    elif HTMX_URL.search(url): route.fulfill(path=HTMX, content_type="text/javascript")
    elif PICO_URL.search(url): route.fulfill(path=PICO, content_type="text/css")
    else: route.abort()


@pytest.fixture
def page(chromium: str) -> Iterator[Page]:
    "A fresh Chromium page whose requests never leave the machine."
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright (pip install playwright)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
        try:
            p: Any = browser.new_page(viewport={"width": 1000, "height": 700})
            p.route("**/*", _offline)
            yield p
        finally:
            browser.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    "Where a test saves its screenshots: docs/ when asked for (UPDATE_SCREENSHOTS=1; the README shows some), else tmp."
    import os
    return ROOT / "docs" if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path

"""The web page in a real headless Chromium against the running service (tiny weights)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.servers import Service

DATA = Path(__file__).parent / "data"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, service: Service):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"{service.url}/")
    page.fill("#key", service.keys["alice"])
    page.dispatch_event("#key", "change")
    yield page
    page.close()


def test_restore_a_photo_and_compare(page, tmp_path: Path) -> None:
    page.set_input_files("#file", str(DATA / "chelsea_degraded.jpg"))
    page.fill("#min_size", "64")
    page.fill("#steps", "12")
    page.fill("#seed", "5")
    page.click("#submit")
    page.wait_for_function("document.querySelector('#status').textContent.includes('sampling step')", timeout=60_000)
    page.wait_for_function("document.querySelector('#status').textContent.includes('succeeded')", timeout=60_000)
    page.wait_for_function("document.querySelector('#after').naturalWidth > 0", timeout=30_000)
    assert page.eval_on_selector("#before", "img => img.naturalWidth") == 150
    assert page.eval_on_selector("#after", "img => img.naturalWidth") == 150
    page.fill("#slider", "20")
    page.dispatch_event("#slider", "input")
    assert "20%" in page.eval_on_selector("#compare .after", "el => el.style.clipPath")
    details = page.inner_text("#details")
    assert "seed" in details and "5" in details and "sampling (s)" in details
    page.wait_for_function("document.querySelectorAll('#jobs li').length > 0")
    assert "succeeded" in page.inner_text("#jobs")
    shot = Path(os.environ.get("SUPIR_UI_SCREENSHOT", tmp_path / "page.png"))  # docs/ui.png was made this way
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_an_invalid_file_shows_the_api_message(page, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    page.set_input_files("#file", str(bad))
    page.click("#submit")
    page.wait_for_function("document.querySelector('#error').textContent.length > 0", timeout=30_000)
    error = page.inner_text("#error")
    assert "not a PNG, JPEG" in error and "unsupported_media_type" in error


def test_api_docs_render_offline(browser, service: Service, tmp_path: Path) -> None:
    """/docs (Swagger UI) and /redoc render with every request refused that leaves the service (no CDN)."""
    outside: list[str] = []
    page = browser.new_page(viewport={"width": 1200, "height": 900})

    def only_the_service(route) -> None:  # type: ignore[no-untyped-def]
        if route.request.url.startswith(service.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_service)
    page.goto(f"{service.url}/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=60_000)
    assert page.locator(".swagger-ui .opblock").count() >= 5
    shot = Path(os.environ.get("SUPIR_DOCS_SCREENSHOT", tmp_path / "docs.png"))  # docs/api-docs.png
    page.screenshot(path=str(shot), full_page=False)
    assert outside == []
    page.goto(f"{service.url}/redoc")
    page.wait_for_selector("text=supir-serve", timeout=60_000)
    page.close()
    # ReDoc's bundle asks for its vendor's logo (its "API docs by" footer); refused, nothing else is missing
    assert all(url.endswith("/logo-mini.svg") for url in outside), outside
    assert shot.stat().st_size > 10_000

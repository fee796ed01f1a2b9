"""A real browser drives the app: Debian's chromium through Playwright, fully offline.

Moves the budget slider, clicks Quantize & generate, waits for both images, checks they are
real results that differ from the empty placeholders, and saves a screenshot
(to $MIXDQ_SCREENSHOT when set, e.g. assets/app-screenshot.png, else the test's tmp folder).
Never downloads a browser: without /usr/bin/chromium or the playwright package it skips.
"""
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

import mixdq

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                               "(pip install -r requirements-dev.txt; never `playwright install`)")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from conftest import build_tiny_sdxl
    from test_app import launch_app

    folder = build_tiny_sdxl(tmp_path_factory.mktemp("browser-model"))
    demo, url = launch_app(mixdq.load_pipeline(folder, device="cpu"), tmp_path_factory.mktemp("browser-app"))
    yield demo, url
    demo.close()


def test_slider_button_images_screenshot(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    demo, url = app_url
    session = demo.mixdq_session
    spec = session.slider_spec()
    target = round(spec["minimum"] + 0.35 * (spec["maximum"] - spec["minimum"]), 3)
    shot = Path(os.environ.get("MIXDQ_SCREENSHOT") or tmp_path / "app.png")
    outside = []

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})

            def only_local(route):      # the UI must work with nothing but this server
                host = urlparse(route.request.url).hostname
                if host in ("127.0.0.1", "localhost") or route.request.url.startswith(("data:", "blob:")):
                    return route.continue_()
                outside.append(route.request.url)
                return route.abort()

            page.route("**/*", only_local)
            page.goto(url)
            number = page.locator("#budget input[data-testid='number-input']")
            expect(number).to_be_visible(timeout=60_000)          # hydrated
            info = page.locator("#budget-info")
            before = info.inner_text()
            # move the slider itself (the range input), as a user drags it
            page.locator("#budget input[data-testid='range-input']").fill(str(target))
            expect(number).to_have_value(str(target), timeout=10_000)
            expect(info).not_to_have_text(before, timeout=10_000)
            assert "average bits" in info.inner_text()
            # no image before a result: the placeholders
            assert page.locator("#float-img img").count() == 0 and page.locator("#quant-img img").count() == 0

            page.locator("#run-btn").click()
            for elem in ("#float-img img", "#quant-img img"):
                img = page.locator(elem)
                expect(img).to_be_visible(timeout=120_000)
                page.wait_for_function(
                    "sel => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0 "
                    "&& i.src.includes('/gradio_api/file='); }", arg=elem, timeout=60_000)
            srcs = [page.locator(e).get_attribute("src") for e in ("#float-img img", "#quant-img img")]
            assert srcs[0] != srcs[1]
            widths = page.evaluate("[...document.querySelectorAll('#float-img img, #quant-img img')]"
                                   ".map(i => i.naturalWidth)")
            assert widths == [256, 256]
            expect(page.locator("#stats")).to_contain_text("SSIM", timeout=30_000)
            expect(page.locator("#stats")).to_contain_text("UNet latency per step")
            expect(page.locator("#plan-chart svg")).to_be_visible()
            expect(page.locator("#pareto-chart svg")).to_be_visible()
            expect(page.locator("#status")).to_contain_text("Done")
            # the run used the slider's budget
            assert session.last is not None
            assert session.costs.total_mb(session.quant_plan) <= target + 1e-6
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert not outside, f"the page tried to reach the network: {outside[:3]}"


def test_export_download_and_load_back_in_the_browser(app_url, tmp_path):
    """Export offers a real download; uploading that zip and pressing Load generates with it."""
    from playwright.sync_api import expect, sync_playwright

    demo, url = app_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300}, accept_downloads=True)
            page.goto(url)
            expect(page.locator("#budget input[data-testid='number-input']")).to_be_visible(timeout=60_000)
            page.locator("#run-btn").click()
            expect(page.locator("#status")).to_contain_text("Done", timeout=120_000)
            page.get_by_text("Export / load a quantized model").click()
            page.locator("#export-btn").click()
            link = page.locator("#export-file a[download]").first
            expect(link).to_be_visible(timeout=60_000)
            with page.expect_download() as dl:
                link.click()
            saved = tmp_path / dl.value.suggested_filename
            dl.value.save_as(saved)
            assert saved.suffix == ".zip" and saved.stat().st_size > 10_000
            page.locator("#upload input[type='file']").set_input_files(str(saved))
            # Gradio renders the name as stem and extension in separate elements; depending
            # on the layout their text joins with or without a space between them
            shown = re.compile(re.escape(saved.stem) + r"\s*" + re.escape(saved.suffix))
            expect(page.locator("#upload")).to_contain_text(shown, timeout=30_000)
            page.locator("#load-btn").click()
            expect(page.locator("#status")).to_contain_text("loaded from", timeout=120_000)
            expect(page.locator("#stats")).to_contain_text("SSIM")
        finally:
            browser.close()


def test_bad_input_shows_a_message_in_the_page(app_url):
    from playwright.sync_api import expect, sync_playwright

    _, url = app_url
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.goto(url)
            expect(page.locator("#budget input[data-testid='number-input']")).to_be_visible(timeout=60_000)
            page.locator("#prompt textarea").fill("")
            page.locator("#run-btn").click()
            expect(page.get_by_text("the prompt is empty")).to_be_visible(timeout=30_000)
            page.locator("#prompt textarea").fill("a red circle")
            page.locator("#steps input").fill("100000")
            page.locator("#run-btn").click()
            expect(page.get_by_text("steps must be a whole number from 1 to 50").first).to_be_visible(timeout=30_000)
        finally:
            browser.close()

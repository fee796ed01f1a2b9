"""A real browser drives the app: Debian's chromium through Playwright, fully offline.

Moves the budget slider, clicks Quantize & generate, waits for both images, checks they are
real results that differ from the empty placeholders, and saves a screenshot
(to $MIXDQ_SCREENSHOT when set, e.g. assets/app-screenshot.png, else the test's tmp folder).
Most tests run a tiny random SDXL with a synthetic sensitivity table; one runs the app as a
fresh clone starts it: the embedded model, the shipped presets/sensitivity.json, no cache.
Never downloads a browser: without /usr/bin/chromium or the playwright package it skips.
"""
import math
import os
import re
import shutil
import time
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
            assert session.costs.total_mb(session.current.plan) <= target + 1e-6
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


@pytest.fixture(scope="module")
def embedded_app(tmp_path_factory):
    """`python app.py` on a fresh clone: the embedded model and what ships in presets/, with an
    empty MIXDQ_CACHE.  Any sensitivity analysis the app would start is recorded and refused
    (it takes minutes; it must not be needed)."""
    from mixdq import app, tables
    from mixdq.loading import EMBEDDED
    from test_app import free_port

    if not (EMBEDDED / "model_index.json").is_file():
        pytest.skip("the embedded model is not in assets/")
    cache = tmp_path_factory.mktemp("fresh-cache")
    analyses = []

    def no_analysis(*args, **kwargs):
        analyses.append(kwargs)
        raise AssertionError("the app started the sensitivity analysis although a table ships for this model")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIXDQ_CACHE", str(cache))
        mp.setattr(tables, "sensitivity", no_analysis)   # where the app starts an analysis
        demo = app.build_app(None, workdir=tmp_path_factory.mktemp("embedded-app") / "work")
        port = free_port()
        app.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
        try:
            yield demo, f"http://127.0.0.1:{port}/", cache, analyses
        finally:
            demo.close()


def test_fresh_clone_embedded_model_any_budget_without_analysis(embedded_app):
    """Header says the sensitivity is known, the Pareto chart is there from the start, and a
    budget no preset has is allocated, quantized and generated in seconds."""
    from mixdq.app.text import fmt_mb
    from playwright.sync_api import expect, sync_playwright

    demo, url, cache, analyses = embedded_app
    session = demo.mixdq_session
    assert session.embedded and session.presets and session.allocator is not None
    spec = session.slider_spec()
    step = spec["step"]
    decimals = max(0, -int(round(math.log10(step))))
    target = next(v for v in (round(round((spec["minimum"] + f * (spec["maximum"] - spec["minimum"])) / step) * step,
                                    decimals) for f in (0.3, 0.45, 0.6))
                  if session.matching_preset(v) is None)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.goto(url)
            number = page.locator("#budget input[data-testid='number-input']")
            expect(number).to_be_visible(timeout=60_000)
            expect(page.locator("#mixdq-title")).to_contain_text("tiny-sdxl (embedded)")
            expect(page.locator("#mixdq-title")).to_contain_text("sensitivity shipped ✓")
            # drawn at start from the shipped table: the front, and the presets on it
            expect(page.locator("#pareto-chart svg")).to_be_visible(timeout=60_000)
            expect(page.locator("#pareto-chart svg polyline")).to_have_count(1)
            expect(page.locator("#pareto-chart svg title", has_text="preset")).to_have_count(len(session.presets))

            info = page.locator("#budget-info")
            page.locator("#budget input[data-testid='range-input']").fill(str(target))
            expect(number).to_have_value(str(target), timeout=10_000)
            expect(info).to_contain_text(fmt_mb(target), timeout=10_000)
            assert "matches preset" not in info.inner_text() and "sensitivity analysis" not in info.inner_text()

            t0 = time.perf_counter()
            page.locator("#run-btn").click()
            expect(page.locator("#status")).to_contain_text("Done", timeout=120_000)
            seconds = time.perf_counter() - t0
            for elem in ("#float-img img", "#quant-img img"):
                page.wait_for_function(
                    "sel => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0 "
                    "&& i.src.includes('/gradio_api/file='); }", arg=elem, timeout=60_000)
            widths = page.evaluate("[...document.querySelectorAll('#float-img img, #quant-img img')]"
                                   ".map(i => i.naturalWidth)")
            assert widths == [256, 256]
            expect(page.locator("#status")).to_contain_text("allocated for")      # the ILP, not a preset
            stats = page.locator("#stats")
            for needle in ("SSIM", "UNet weight memory", "UNet latency per step"):
                expect(stats).to_contain_text(needle, timeout=30_000)
            expect(page.locator("#pareto-chart svg")).to_contain_text("this plan")
        finally:
            browser.close()
    assert session.current.how.startswith("allocated for")
    assert session.costs.total_mb(session.current.plan) <= target + 1e-6
    assert not analyses and not (cache / "sensitivity").exists()
    # allocation + quantization (32 calibration prompts) + both generations: seconds; the
    # analysis it replaces takes minutes on these CPUs
    assert seconds < 60, f"quantize & generate took {seconds:.0f} s"

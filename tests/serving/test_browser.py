"""End to end in headless Chromium: upload a real photo, move the depth slider, see reconstructions, token maps,
per-depth quality, code usage, chat and generation. Leaves a screenshot in test-artifacts/serving/."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from dualtoken.serving import create_app

from .conftest import REPO, FakeMLLM

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="no system Chromium (Debian: apt-get install -y chromium)"),
]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = REPO / "test-artifacts" / "serving"


@pytest.fixture
def server_url(tiny_tokenizer):
    """The app on uvicorn, in a thread, on 127.0.0.1 and a free port chosen by the OS."""
    import uvicorn

    app = create_app(tiny_tokenizer, mllm=FakeMLLM(tiny_tokenizer.image_size))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


@pytest.fixture
def page():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1200, "height": 900})
        yield context.new_page()
        browser.close()


def loaded_width(page, selector: str) -> int:
    """naturalWidth of an <img> once it has loaded (0 while loading or broken)."""
    return page.eval_on_selector(selector, "img => (img.complete ? img.naturalWidth : 0)")


def test_upload_slide_and_look(page, server_url, photo_path, tmp_path):
    expect = playwright_api.expect
    page.goto(server_url)
    expect(page.locator("#model-info")).to_contain_text("dualtoken-tiny")
    expect(page.locator("#mllm")).to_be_visible()

    page.set_input_files("#file-input", str(photo_path))
    expect(page.locator("#results")).to_be_visible(timeout=30_000)
    expect(page.locator("#depth-label")).to_have_text("k = 4 of 4")
    assert page.get_attribute("#depth-slider", "max") == "4"
    full_depth = page.get_attribute("#recon-image", "src")
    full_pixel_map = page.get_attribute("#pixel-map", "src")
    assert full_depth.startswith("data:image/png;base64,")
    page.wait_for_function("document.getElementById('recon-image').naturalWidth === 64")

    slider = page.locator("#depth-slider")
    slider.focus()
    page.keyboard.press("Home")
    expect(page.locator("#depth-label")).to_have_text("k = 1 of 4")
    assert page.get_attribute("#recon-image", "src") != full_depth
    assert page.get_attribute("#pixel-map", "src") != full_pixel_map
    page.keyboard.press("ArrowRight")
    expect(page.locator("#depth-label")).to_have_text("k = 2 of 4")
    expect(page.locator("#recon-caption")).to_have_text("reconstruction, k = 2")
    expect(page.locator("#depth-metrics")).to_contain_text("PSNR")
    expect(page.locator("#depth-strip figure.active figcaption")).to_have_text("k = 2")

    for selector in ("#recon-image", "#original-image"):
        assert loaded_width(page, selector) == 64
    for selector in ("#pixel-map", "#semantic-map", "#pixel-codes", "#semantic-codes"):
        assert loaded_width(page, selector) == 8, f"{selector} did not render an 8x8 token map"
    expect(page.locator("#depth-table tbody tr")).to_have_count(4)
    expect(page.locator("#psnr-chart circle")).to_have_count(4)
    expect(page.locator("#pixel-usage")).to_contain_text("distinct codes of 256")
    expect(page.locator("#semantic-usage .chip").first).to_be_visible()

    page.fill("#chat-question", "What is in this image?")
    page.click("#chat-send")
    expect(page.locator("#chat-answer")).to_contain_text("What is in this image? -> mean")
    page.fill("#gen-prompt", "Draw a parrot.")
    page.click("#gen-send")
    expect(page.locator("#gen-image")).to_be_visible()
    page.wait_for_function("document.getElementById('gen-image').naturalWidth === 64")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"plain text pretending to be a PNG")
    page.set_input_files("#file-input", str(not_an_image))
    expect(page.locator("#status")).to_contain_text(
        "Could not tokenize notes.png: the upload is not a readable image"
    )
    expect(page.locator("#status")).to_have_class("status error")
    assert Path(ARTIFACTS / "page.png").stat().st_size > 10_000

"""End to end in headless Chromium: upload a real photo, move the depth slider, see reconstructions, what the
semantic codes say, labelled token maps, per-depth quality, code usage, chat and generation, and errors beside the
control that caused them. Leaves screenshots in test-artifacts/serving/ (ignored by git)."""

from __future__ import annotations

import re
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
API_KEY = "page-key-0123456789"


def serve(app):
    """The app on uvicorn, in a thread, on 127.0.0.1 and a free port chosen by the OS; yields its URL."""
    import uvicorn

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
def server_url(tiny_tokenizer):
    yield from serve(create_app(tiny_tokenizer, mllm=FakeMLLM(tiny_tokenizer.image_size)))


@pytest.fixture
def keyed_server_url(tiny_tokenizer):
    yield from serve(create_app(tiny_tokenizer, mllm=FakeMLLM(tiny_tokenizer.image_size), api_key=API_KEY))


@pytest.fixture
def efflite0_url():
    """What `dualtoken serve` serves by default: the embedded tokenizer and the embedded MLLM."""
    from dualtoken import DualTokenizer
    from dualtoken.serving.mllm import load_mllm

    mllm = load_mllm("dualtoken-mllm-cifar10")
    yield from serve(create_app(DualTokenizer.from_pretrained("dualtoken-efflite0"), mllm=mllm))


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
    requests = []
    page.on("request", lambda request: requests.append(request.url))
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
    # the maps are labelled as laid out: a column per kind of map, a row per vocabulary with its depth
    expect(page.locator("#maps-sum-header")).to_have_text("sum of depths 1..k")
    expect(page.locator("#maps-ids-header")).to_have_text("code ids of depth k")
    # each vocabulary has its own depth: the semantic row stays at all its depths while the pixel slider moves
    expect(page.locator(".maps [role=rowheader]")).to_have_text(["pixeldepth 2 of 4", "semanticdepth 4 of 4"])
    page.locator("#semantic-slider").focus()
    page.keyboard.press("Home")
    expect(page.locator(".maps [role=rowheader]")).to_have_text(["pixeldepth 2 of 4", "semanticdepth 1 of 4"])
    expect(page.locator("#depth-label")).to_have_text("k = 2 of 4")
    row_of = "el => Math.round(el.getBoundingClientRect().top)"
    assert page.eval_on_selector("#pixel-map", row_of) == page.eval_on_selector("#pixel-codes", row_of)
    assert page.eval_on_selector("#pixel-map", row_of) < page.eval_on_selector("#semantic-map", row_of)
    # the tiny model has no classifier: the meaning card says why instead of showing classes
    expect(page.locator("#meaning-note")).to_contain_text("cannot be read as classes here: no zero-shot classifier")
    expect(page.locator("#meaning-columns")).to_be_hidden()
    expect(page.locator("#depth-table tbody tr")).to_have_count(4)
    expect(page.locator("#psnr-chart circle")).to_have_count(4)
    expect(page.locator("#pixel-usage")).to_contain_text("distinct codes of 256")
    expect(page.locator("#pixel-usage .depth-usage meter")).to_have_count(4)  # one per depth
    expect(page.locator("#pixel-usage .depth-usage")).to_contain_text("depth 1:")
    expect(page.locator("#semantic-usage .chip").first).to_be_visible()

    page.fill("#chat-question", "What is in this image?")
    page.click("#chat-send")
    expect(page.locator("#chat-answer")).to_contain_text("What is in this image? -> mean")
    page.fill("#gen-prompt", "Draw a parrot.")
    page.click("#gen-send")
    expect(page.locator("#gen-image")).to_be_visible()
    page.wait_for_function("document.getElementById('gen-image').naturalWidth === 64")

    # limits are in the form, and a value beyond them is reported beside the control, not sent
    expect(page.locator("#gen-cfg-limits")).to_have_text("0 to 50; 1 = off")
    expect(page.locator("#chat-limits")).to_have_text("at most 2000 characters")
    expect(page.locator("#upload-limits")).to_contain_text("at most 16 MiB and 40 megapixels")
    page.fill("#gen-cfg", "80")
    page.click("#gen-send")
    expect(page.locator("#gen-error")).to_contain_text("guidance: ")
    # what the server refuses lands there too (the form's own limit taken away)
    page.eval_on_selector("#gen-cfg", "input => input.removeAttribute('max')")
    page.click("#gen-send")
    expect(page.locator("#gen-error")).to_contain_text("Could not generate: cfg_scale: ")
    expect(page.locator("#gen-error")).to_contain_text("less than or equal to 50")
    expect(page.locator("#status")).not_to_have_class("status error")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page_mllm.png"), full_page=True)

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"plain text pretending to be a PNG")
    page.set_input_files("#file-input", str(not_an_image))
    expect(page.locator("#status")).to_contain_text(
        "Could not tokenize notes.png: the upload is not a readable image"
    )
    expect(page.locator("#status")).to_have_class("status error")
    expect(page.locator("#results")).to_be_hidden()  # the previous image's results are gone
    page.click("#chat-send")
    expect(page.locator("#chat-error")).to_have_text("Upload an image first: the question is about it.")
    assert Path(ARTIFACTS / "page_mllm.png").stat().st_size > 10_000

    # everything the page loaded came from this server (it works offline), and it has an icon
    fetched = [url for url in requests if not url.startswith(("data:", "blob:"))]
    assert fetched and all(url.startswith(server_url) for url in fetched), fetched
    assert page.eval_on_selector("link[rel=icon]", "link => link.href") == f"{server_url}/static/favicon.svg"
    assert page.request.get(f"{server_url}/static/favicon.svg").headers["content-type"] == "image/svg+xml"
    assert page.request.get(f"{server_url}/docs").status == 200  # the API reference, rendered by the server


def test_page_shows_what_the_semantic_codes_say(page, efflite0_url, photo_path):
    """The shipped model's semantic codes read as ImageNet classes, beside the unquantized tower's."""
    expect = playwright_api.expect
    page.goto(efflite0_url)
    expect(page.locator("#model-info")).to_contain_text("dualtoken-efflite0")
    page.set_input_files("#file-input", str(photo_path))
    expect(page.locator("#results")).to_be_visible(timeout=60_000)
    expect(page.locator("#meaning-codes li")).to_have_count(5)
    expect(page.locator("#meaning-unquantized li")).to_have_count(5)
    expect(page.locator("#meaning-reference-title")).to_have_text("the pretrained tower, unquantized")
    expect(page.locator("#meaning-note")).to_contain_text("backbone classifier head (ImageNet-1k)")
    expect(page.locator("#meaning-agreement")).to_contain_text("top classes are shared")
    if photo_path.name == "kodim23.png":  # two parrots: both readings name the macaw first
        expect(page.locator("#meaning-codes li .guess-name").first).to_have_text("macaw")
        expect(page.locator("#meaning-unquantized li .guess-name").first).to_have_text("macaw")
        expect(page.locator("#meaning-agreement")).to_contain_text("Top-1 agrees: macaw.")
    # the meaning panel reads all 8 semantic depths by default, whatever the pixel slider says
    expect(page.locator("#meaning-card h3.semantic-title")).to_have_text("from the semantic codes, depths 1..8")
    expect(page.locator("#semantic-depth-label")).to_have_text("k = 8 of 8")
    full = page.locator("#meaning-codes").inner_text()
    page.locator("#depth-slider").focus()
    page.keyboard.press("Home")
    assert page.locator("#meaning-codes").inner_text() == full
    page.locator("#semantic-slider").focus()
    page.keyboard.press("Home")  # one semantic depth: a coarser reading
    expect(page.locator("#meaning-card h3.semantic-title")).to_have_text("from the semantic codes, depths 1..1")
    assert page.locator("#meaning-codes").inner_text() != full
    page.keyboard.press("End")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
    assert Path(ARTIFACTS / "page.png").stat().st_size > 10_000


def test_a_sample_photo_shows_both_vocabularies_in_one_click(page, efflite0_url):
    """Before any upload the page offers the photos that ship; one click reads both vocabularies of one."""
    expect = playwright_api.expect
    page.goto(efflite0_url)
    expect(page.locator("#model-info")).to_contain_text("dualtoken-efflite0")
    expect(page.locator("#results")).to_be_hidden()
    expect(page.locator("button[data-sample]")).to_have_text(["astronaut", "coffee", "chelsea"])
    for name, width in (("astronaut", 512), ("coffee", 600), ("chelsea", 451)):  # thumbnails of the real photos
        page.wait_for_function(f"document.querySelector('[data-sample={name}] img').naturalWidth === {width}")
    page.click("button[data-sample=coffee]")
    expect(page.locator("#results")).to_be_visible(timeout=60_000)
    expect(page.locator("#status")).to_contain_text("coffee.png: 256 positions")
    expect(page.locator("#status")).not_to_have_class("status error")
    page.wait_for_function("document.getElementById('recon-image').naturalWidth === 256")  # the pixel vocabulary
    expect(page.locator("#depth-metrics")).to_contain_text("PSNR")
    expect(page.locator("#meaning-codes li")).to_have_count(5)  # the semantic vocabulary, read as classes
    assert loaded_width(page, "#semantic-map") == 16


def test_the_default_page_asks_and_draws_with_the_shipped_mllm(page, efflite0_url, photo_path):
    expect = playwright_api.expect
    page.goto(efflite0_url)
    expect(page.locator("#mllm")).to_be_visible()
    page.set_input_files("#file-input", str(photo_path))
    expect(page.locator("#results")).to_be_visible(timeout=60_000)
    page.fill("#chat-question", "What is in this image?")
    page.click("#chat-send")
    classes = "airplane|automobile|bird|cat|deer|dog|frog|horse|ship|truck"
    expect(page.locator("#chat-answer")).to_have_text(re.compile(rf"^It is an? ({classes})\.$"), timeout=60_000)
    page.fill("#gen-prompt", "Draw a horse.")
    page.click("#gen-send")
    page.wait_for_function("document.getElementById('gen-image').naturalWidth === 128", timeout=60_000)
    expect(page.locator("#gen-error")).to_be_empty()


def test_the_page_asks_for_the_api_key_once(page, keyed_server_url, photo_path):
    expect = playwright_api.expect
    sent = []  # (url, authorization header) of every request to the API
    page.on("request", lambda request: sent.append((request.url, request.headers.get("authorization"))))
    page.goto(keyed_server_url)  # the page itself loads without a key; its first API call meets the 401
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#key-note")).to_have_text("This server requires an API key.")
    assert page.get_attribute("#key-input", "type") == "password"
    page.fill("#key-input", "not-the-key")
    page.click("#key-send")
    expect(page.locator("#key-note")).to_have_text("The server refused that API key; enter it again.")
    page.fill("#key-input", API_KEY)
    page.click("#key-send")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("#model-info")).to_contain_text("dualtoken-tiny")
    assert page.input_value("#key-input") == ""

    # every later call sends the kept key: an upload, chat, and the page reloaded in the same tab, never asking
    page.set_input_files("#file-input", str(photo_path))
    expect(page.locator("#results")).to_be_visible(timeout=30_000)
    page.fill("#chat-question", "What is in this image?")
    page.click("#chat-send")
    expect(page.locator("#chat-answer")).to_contain_text("What is in this image? -> mean")
    page.reload()
    expect(page.locator("#model-info")).to_contain_text("dualtoken-tiny")
    expect(page.locator("#key-form")).to_be_hidden()
    api = [(url[len(keyed_server_url):], auth) for url, auth in sent if url.startswith(f"{keyed_server_url}/v1/")]
    first_right = api.index(("/v1/models", f"Bearer {API_KEY}"))
    assert api[:first_right] == [("/v1/models", None), ("/v1/models", "Bearer not-the-key")]
    assert [path for path, _ in api[first_right:]] == ["/v1/models", "/v1/reconstruct", "/v1/chat", "/v1/models"]
    assert all(auth == f"Bearer {API_KEY}" for _, auth in api[first_right:])
    assert API_KEY not in page.locator("body").inner_text()

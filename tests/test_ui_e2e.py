"""The web UI end to end: headless Chromium (Playwright, the system's Chromium) against a live
`zturbo serve --model tiny-random`. Takes the screenshots ui-generate.png, ui-inpaint.png and
ui-history.png into the test's tmp dir, or into docs/ when ZTURBO_SCREENSHOTS=docs is set.

Skipped only when no Chromium is installed (CI installs it; set ZTURBO_E2E=require to fail instead).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from serving import Server
from zturbo.imageio import png_info, read_metadata

pytestmark = pytest.mark.e2e

DOCS = Path(__file__).resolve().parents[1] / "docs"
CHROMIUM = os.environ.get("ZTURBO_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def _screenshot(page: Any, name: str, tmp_path: Path) -> None:
    """docs/ gets the screenshot only on request, so a test run leaves the tree clean."""
    folder = DOCS if os.environ.get("ZTURBO_SCREENSHOTS") == "docs" else tmp_path
    folder.mkdir(exist_ok=True)
    page.screenshot(path=folder / name, full_page=True)


if CHROMIUM is None and os.environ.get("ZTURBO_E2E") != "require":
    pytest.skip("no chromium on PATH (apt-get install chromium); web UI e2e tests skipped", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server("tiny-random", tmp_path_factory.mktemp("serve") / "data", key=None)
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url)  # `/` redirects to the UI
    assert page.url == f"{server.url}/ui/"
    expect(page.locator("#status-line")).to_contain_text("tiny-random")
    yield page
    context.close()


def _set_slider(page: Any, elem_id: str, value: str) -> None:
    """Type `value` into a Gradio slider's number box until the slider shows it. The slider commits
    a typed number on its own time, and on a loaded machine a commit can be lost; generating before
    it lands would send the old value."""
    box = page.locator(f"#{elem_id} input[type=number]")
    slider = page.locator(f"#{elem_id} input[type=range]")
    expect(box).to_be_visible()
    for _ in range(3):
        box.fill(value)
        box.press("Tab")
        try:
            expect(slider).to_have_value(value, timeout=5000)
            return
        except AssertionError:
            continue
    expect(slider).to_have_value(value)


def _fill_form(page: Any, prompt: str, *, size: int = 64, steps: int = 2, seed: int | None = None) -> None:
    page.locator("#prompt textarea").fill(prompt)
    page.locator("#width input").fill(str(size))
    page.locator("#height input").fill(str(size))
    page.locator("#steps input[type=number]").fill(str(steps))
    page.locator("#steps input[type=number]").press("Enter")
    if seed is not None:
        page.locator("#seed input").fill(str(seed))


def _record_progress(page: Any) -> None:
    """Keep every text #progress shows (steps can pass faster than a poll would see)."""
    page.evaluate(
        """() => {
            window.__progress = [];
            const el = document.querySelector('#progress');
            new MutationObserver(() => window.__progress.push(el.innerText.trim()))
                .observe(el, {childList: true, subtree: true, characterData: true});
        }"""
    )


def _drop_file(page: Any, selector: str, path: Path) -> None:
    """A real drag-and-drop of a file onto an element: dragenter, dragover, drop with a DataTransfer."""
    page.evaluate(
        """([selector, name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, {type: 'image/png'}));
            const target = document.querySelector(selector);
            for (const type of ['dragenter', 'dragover', 'drop']) {
                target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
            }
        }""",
        [selector, path.name, base64.b64encode(path.read_bytes()).decode()],
    )


def _settled_box(page: Any, element: Any, tries: int = 25) -> dict[str, float]:
    """The element's bounding box once two readings 200 ms apart agree: the editor resizes its
    canvas to the image after the background lands, later on a loaded machine."""
    box = element.bounding_box()
    for _ in range(tries):
        page.wait_for_timeout(200)
        again = element.bounding_box()
        if again == box:
            return box
        box = again
    return box


def _paint_stroke(page: Any, editor: Any) -> None:
    """Drag the editor's brush (its starting tool) across the middle of the image, where it is drawn
    (the mouse acts only within the viewport, so the canvas is scrolled into it first)."""
    expect(editor.locator("button[aria-label='Brush'].highlight")).to_be_visible()
    canvas = editor.locator("canvas").first
    canvas.scroll_into_view_if_needed()
    box = _settled_box(page, canvas)
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.45, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.55, y, steps=2)
    page.mouse.up()


def test_form_presets_bad_width_and_status_line(page: Any, server: Server) -> None:
    status = page.locator("#status-line")
    parts = ("(turbo profile, built-in random checkpoint) on cpu", "transformer float32", "vae float32")
    for part in (*parts, "plan resident", "GPU memory: n/a", "queue 0"):
        expect(status).to_contain_text(part)

    page.locator("#preset input").click()
    page.get_by_role("option", name="16:9 · 1360×768 (1 MP)").click()
    expect(page.locator("#width input")).to_have_value("1360")
    expect(page.locator("#height input")).to_have_value("768")
    page.locator("#width input").fill("1024")
    page.locator("#width input").press("Tab")
    expect(page.locator("#preset input")).to_have_value("Custom")

    page.locator("#advanced").get_by_text("Advanced").click()
    expect(page.locator("#guidance")).to_contain_text("0 turns classifier-free guidance (CFG) off")

    _fill_form(page, "a fox e2e-bad-width")
    page.locator("#width input").fill("100")
    page.locator("#generate").click()
    expect(page.locator("#progress")).to_contain_text(
        "width 100 is not a multiple of 16 (the model's spatial unit); nearest valid: 96 or 112"
    )
    assert server.history("e2e-bad-width") == []  # nothing was queued

    # A fraction is named as typed, never rounded (7.5 had run as seed 8, 1000.4 been called 1000).
    page.locator("#width input").fill("1000.4")
    page.locator("#generate").click()
    expect(page.locator("#progress")).to_contain_text("width must be a whole number, got 1000.4")
    page.locator("#width input").fill("64")
    page.locator("#seed input").fill("7.5")
    page.locator("#generate").click()
    expect(page.locator("#progress")).to_contain_text("seed must be a whole number (-1 = random), got 7.5")
    assert server.history("e2e-bad-width") == []


def test_a_seed_above_2_to_the_53_runs_exactly_as_typed(page: Any, server: Server) -> None:
    """A browser's number field holds a float: 2**53 + 1 would be sent as 2**53. The seed field is text."""
    _fill_form(page, "a fox e2e-big-seed", seed=2**53 + 1)
    page.locator("#generate").click()
    expect(page.locator("#progress")).to_contain_text(f"Done: 1 image(s), seed {2**53 + 1}")
    (job,) = server.history("e2e-big-seed")
    assert job["params"]["seed"] == 2**53 + 1


def test_generate_shows_progress_image_parameters_and_download(page: Any, server: Server, tmp_path: Path) -> None:
    prompt = "a red fox in fresh snow, 一只狐狸 e2e-generate"
    _fill_form(page, prompt, steps=6)  # seed -1: the server picks one
    page.locator("#advanced").get_by_text("Advanced").click()
    _set_slider(page, "variety", "0.2")
    _set_slider(page, "cfg-truncation", "0.5")  # recorded as sent, though guidance 0 leaves it no work
    _record_progress(page)
    page.locator("#generate").click()
    expect(page.locator("#progress")).to_contain_text("Done: 1 image(s)")
    seen = page.evaluate("window.__progress")
    assert any(re.search(r"Generating: step \d/6", text) for text in seen), seen
    seed = int(re.search(r"seed (\d+)", page.locator("#progress").inner_text()).group(1))
    page.locator("#seed-reuse").click()
    expect(page.locator("#seed input")).to_have_value(str(seed))
    page.locator("#seed-random").click()
    expect(page.locator("#seed input")).to_have_value("-1")
    page.locator("#seed-reuse").click()

    page.locator("#results img").first.click()
    params = page.locator("#image-params")
    expect(params).to_contain_text(prompt)
    expect(params).to_contain_text(f"Seed: {seed}")
    expect(params).to_contain_text("Size: 64×64")
    with page.expect_download() as download:
        page.locator("#download").click()
    saved = tmp_path / "download.png"
    download.value.save_as(saved)
    meta = read_metadata(saved)  # the PNG keeps zturbo's metadata through the UI
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["variety"]) == (prompt, seed, 6, 0.2)
    assert (meta["cfg_normalization"], meta["cfg_truncation"]) == (0.0, 0.5)

    # One path to the engine: the UI's generation is an ordinary job in the server's history.
    [job] = server.history("e2e-generate")
    assert job["status"] == "succeeded" and job["params"]["seed"] == seed and job["params"]["variety"] == 0.2
    _screenshot(page, "ui-generate.png", tmp_path)


def test_inpaint_from_an_uploaded_image_with_a_painted_mask(page: Any, server: Server, tmp_path: Path) -> None:
    """Upload an image, paint a stroke over it in the mask editor, generate: the image is an inpaint
    of the file as uploaded, with the stroke as its mask (History's view of it: test_ui_files)."""
    source = tmp_path / "start.jpg"  # not a PNG: the editor's own canvas uploads are other files
    Image.new("RGB", (64, 48), (30, 90, 160)).save(source, quality=90)
    page.locator("#inputs").get_by_text("Start from an image").click()
    page.locator("#init-image input[type=file]").set_input_files(source)
    expect(page.locator("#inputs-msg")).to_contain_text("Width and height follow the input image: 64×48")
    expect(page.locator("#height input")).to_have_value("48")

    page.locator("#steps input[type=number]").fill("2")
    page.locator("#steps input[type=number]").press("Enter")
    # Gradio's editor draws the new background asynchronously and uploads its layers after each
    # stroke; on a loaded machine a stroke can land before the background (which then clears it)
    # or Generate can run before the upload. So each try waits for the stroke's upload, and a
    # second try is allowed; a stroke that never registers still fails.
    params = page.locator("#image-params")
    for attempt in range(2):
        prompt = f"e2e-inpaint a boat, try {attempt}"
        page.locator("#prompt textarea").fill(prompt)
        with page.expect_response(lambda r: "upload" in r.url and r.request.method == "POST"):
            _paint_stroke(page, page.locator("#mask-editor"))
        page.wait_for_timeout(500)  # the stroke's later uploads, if any
        page.locator("#generate").click()
        page.locator("#results img").first.click()
        expect(params).to_contain_text(prompt)
        if "Mode: inpaint" in params.inner_text():
            break
    expect(params).to_contain_text("Mode: inpaint")
    _screenshot(page, "ui-inpaint.png", tmp_path)
    with page.expect_download() as download:
        page.locator("#download").click()
    saved = tmp_path / "inpainted.png"
    download.value.save_as(saved)
    meta = read_metadata(saved)
    assert (meta["inputs"]["mode"], meta["width"], meta["height"]) == ("inpaint", 64, 48)
    assert meta["inputs"]["images"]["image"] == hashlib.sha256(source.read_bytes()).hexdigest()  # the file itself

    [job] = server.history(prompt)
    mask = Image.open(io.BytesIO(server.client.get(f"/v1/jobs/{job['id']}/inputs/mask").content))
    assert mask.mode == "L" and mask.size == (64, 48)
    assert mask.getpixel((32, 24)) == 255 and mask.getpixel((0, 0)) == mask.getpixel((63, 47)) == 0  # the stroke only


def test_history_search_reuse_and_delete(page: Any, server: Server, tmp_path: Path) -> None:
    explore = {"variation_seed": 12, "variation_strength": 0.15, "variety": 0.4}
    alpha = server.wait_job(server.submit(prompt="history alpha lighthouse", seed=77, steps=3, **explore)["id"])
    server.wait_job(server.submit(prompt="history beta harbour", seed=78)["id"])
    assert alpha["status"] == "succeeded"

    page.get_by_role("tab", name="History").click()
    expect(page.locator("#history-info")).to_contain_text("finished job(s)")
    page.locator("#search textarea, #search input").first.fill("ALPHA")
    page.locator("#search-btn").click()
    expect(page.locator("#history-info")).to_contain_text("1 finished job(s) matching “ALPHA”")
    expect(page.locator("#history-gallery img")).to_have_count(1)
    page.locator("#history-gallery img").first.click()
    expect(page.locator("#history-params")).to_contain_text("history alpha lighthouse")
    expect(page.locator("#history-params")).to_contain_text(alpha["id"])

    page.locator("#search textarea, #search input").first.fill("history")
    page.locator("#search-btn").click()
    expect(page.locator("#history-gallery img")).to_have_count(2)
    page.locator("#history-gallery img").nth(1).click()  # newest first: alpha is second
    expect(page.locator("#history-params")).to_contain_text("history alpha lighthouse")
    expect(page.locator("#history-params")).to_contain_text("Seed variety: 0.4")
    _screenshot(page, "ui-history.png", tmp_path)

    page.locator("#history-reuse").click()
    expect(page.locator("#prompt textarea")).to_have_value("history alpha lighthouse")
    expect(page.locator("#seed input")).to_have_value("77")
    expect(page.locator("#steps input[type=number]")).to_have_value("3")
    expect(page.locator("#width input")).to_have_value("64")
    expect(page.locator("#variation-seed input")).to_have_value("12")  # Advanced opens to show them
    expect(page.locator("#variation-strength input[type=number]")).to_have_value("0.15")
    expect(page.locator("#variety input[type=number]")).to_have_value("0.4")

    page.get_by_role("tab", name="History").click()
    page.locator("#history-gallery img").nth(1).click()
    expect(page.locator("#history-params")).to_contain_text(alpha["id"])
    page.locator("#history-delete").click()
    expect(page.locator("#history-gallery img")).to_have_count(1)
    assert [j["id"] for j in server.history("alpha")] == []


def test_cancel_a_queued_job(page: Any, server: Server) -> None:
    blocker = server.submit(prompt="slow blocker", width=1024, height=1024, steps=50)
    _fill_form(page, "e2e-cancel me")
    page.locator("#generate").click()
    expect(page.locator("#progress")).to_contain_text("Queued")
    page.locator("#cancel").click()
    expect(page.locator("#progress")).to_have_text("Cancelled")
    [job] = server.history("e2e-cancel")
    assert job["status"] == "cancelled" and job["images"] == []
    server.client.delete(f"/v1/jobs/{blocker['id']}")
    server.wait_job(blocker["id"])


def test_dropped_png_fills_the_form(page: Any, tmp_path: Path) -> None:
    meta = {
        "prompt": "一只橘猫在窗台上晒太阳",
        "negative_prompt": "blurry",
        "seed": 31337,
        "steps": 5,
        "guidance_scale": 1.5,
        "cfg_normalization": 1.5,
        "cfg_truncation": 0.4,
        "width": 832,
        "height": 1248,
        "model": "tiny-random",
        "model_fingerprint": "f" * 16,
        "zturbo_version": "0",
    }
    zturbo_png = tmp_path / "zturbo.png"
    Image.new("RGB", (32, 32)).save(zturbo_png, pnginfo=png_info(meta))
    _drop_file(page, "#png-drop button[aria-label*=drop]", zturbo_png)
    expect(page.locator("#png-msg")).to_contain_text("Filled the form from the PNG's zturbo metadata")
    expect(page.locator("#prompt textarea")).to_have_value(meta["prompt"])
    expect(page.locator("#seed input")).to_have_value("31337")
    expect(page.locator("#steps input[type=number]")).to_have_value("5")
    expect(page.locator("#preset input")).to_have_value("2:3 · 832×1248 (1 MP)")
    expect(page.locator("#negative textarea")).to_have_value("blurry")
    expect(page.locator("#cfg-normalization input[type=number]")).to_have_value("1.5")
    expect(page.locator("#cfg-truncation input[type=number]")).to_have_value("0.4")

    info = PngInfo()
    info.add_text("parameters", "a lighthouse at dusk\nSteps: 12, Sampler: Euler, CFG scale: 0, Seed: 5, Size: 768x512")
    a1111_png = tmp_path / "a1111.png"
    Image.new("RGB", (32, 32)).save(a1111_png, pnginfo=info)
    page.locator("#png-drop button[aria-label]").first.click()  # clear the previous file
    _drop_file(page, "#png-drop button[aria-label*=drop]", a1111_png)
    expect(page.locator("#png-msg")).to_contain_text("A1111 'parameters' text")
    expect(page.locator("#prompt textarea")).to_have_value("a lighthouse at dusk")
    expect(page.locator("#width input")).to_have_value("768")
    expect(page.locator("#height input")).to_have_value("512")
    expect(page.locator("#seed input")).to_have_value("5")


def test_api_key_is_asked_for_and_never_in_the_page(browser: Any, tmp_path: Path) -> None:
    key = "e2e-secret-key-123"
    srv = Server("tiny-random", tmp_path / "data", "--api-key", key, key=key)  # the flag, as users pass it
    srv.wait_ready()
    try:
        assert httpx.get(f"{srv.url}/v1/status").status_code == 401
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{srv.url}/ui/")
        expect(page.locator("#status-line")).to_contain_text("needs an API key")
        page.locator("#api-key input").fill("wrong")
        page.locator("#use-key").click()
        expect(page.locator("#status-line")).to_contain_text("That key was refused")
        page.locator("#api-key input").fill(key)
        page.locator("#use-key").click()
        expect(page.locator("#status-line")).to_contain_text("tiny-random")
        expect(page.locator("#key-row")).to_be_hidden()

        _fill_form(page, "e2e-keyed fox")
        page.locator("#generate").click()
        expect(page.locator("#progress")).to_contain_text("Done: 1 image(s)")
        assert len(srv.history("e2e-keyed")) == 1
        # The image reaches the page through the session's pass; the same URL without it is refused.
        image = page.locator("#results img").first
        expect(image).to_have_js_property("complete", True)
        assert image.evaluate("img => img.naturalWidth") == 64
        assert httpx.get(image.evaluate("img => img.src")).status_code == 401
        assert key not in page.content()  # the key lives in server-side session state only
        assert key not in httpx.get(f"{srv.url}/ui/").text
        context.close()
    finally:
        srv.stop()

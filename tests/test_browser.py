"""The real app in headless Chromium: log in with the API token, upload a GeoTIFF, ask a [refer] question,
watch the answer stream.

Starts `app.py` as a subprocess (tiny model saved to a temporary directory, a free loopback port)
and drives Debian's `/usr/bin/chromium` through Playwright; no browser is downloaded. Screenshots go
to tests/artifacts/ (git-ignored) for a person to look at.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from geochat import GeoChat
from tests.processes import stop
from tests.tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STARTUP_S = 120
TOKEN = "browser-test-token"
# Where the picture is drawn inside the <img> element (it is letterboxed with object-fit: contain).
SHOWN_IMAGE_RECT = """() => {
  const img = document.querySelector('#image-view img');
  const r = img.getBoundingClientRect();
  const k = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
  const w = img.naturalWidth * k, h = img.naturalHeight * k;
  return [r.x + (r.width - w) / 2, r.y + (r.height - h) / 2, w, h];
}"""
# A new image has replaced `src` and finished loading (a click on a loading image has no coordinates).
NEW_IMAGE_SHOWN = """src => {
  const img = document.querySelector('#image-view img');
  return img.src !== src && img.complete && img.naturalWidth > 0;
}"""

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium "
                                                     "(run `make browser` or apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def app_url(tiny_llm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model_dir = tmp_path_factory.mktemp("app-model")
    GeoChat.from_config(tiny_config(tiny_llm_dir)).save_pretrained(model_dir)
    port = _free_port()
    log = (tmp_path_factory.mktemp("app-log") / "app.log").open("w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "app.py", "--model", str(model_dir), "--port", str(port), "--max-new-tokens", "16",
         "--no-retrieval", "--api-token", TOKEN],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_S
        while True:
            assert proc.poll() is None, f"app.py exited with {proc.returncode}; see {log.name}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"app.py did not answer /health within {STARTUP_S} s; see {log.name}"
            time.sleep(0.5)
        yield url
    finally:
        stop(proc, timeout=15)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def log_in(page: object, url: str) -> None:
    """A server with an API token shows Gradio's login page first; the token is the password."""
    page.goto(url)  # type: ignore[attr-defined]
    page.get_by_label("password").fill("not the token")  # type: ignore[attr-defined]
    page.get_by_label("username").fill("analyst")  # type: ignore[attr-defined]
    page.get_by_role("button", name="Login").click()  # type: ignore[attr-defined]
    page.get_by_text("Incorrect Credentials").wait_for()  # type: ignore[attr-defined]
    assert page.locator("#upload").count() == 0  # type: ignore[attr-defined]
    page.get_by_label("username").fill("analyst")  # type: ignore[attr-defined]  # a failed login empties it
    page.get_by_label("password").fill(TOKEN)  # type: ignore[attr-defined]
    page.get_by_role("button", name="Login").click()  # type: ignore[attr-defined]
    page.wait_for_selector("#upload input[type=file]", state="attached")  # type: ignore[attr-defined]


def test_upload_refer_stream_and_region(app_url: str, browser: object, geotiffs: dict[str, Path]) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1200})  # type: ignore[attr-defined]
    page.set_default_timeout(60_000)
    log_in(page, app_url)
    page.locator("#upload input[type=file]").set_input_files(str(geotiffs["rect_600x300_utm.tif"]))
    page.wait_for_selector("#image-view img")
    info = page.locator("#image-info")
    page.wait_for_function("() => document.querySelector('#image-info').innerText.includes('600 × 300')")
    assert "EPSG:32618" in info.inner_text()

    page.get_by_label("Refer: locate a phrase").check()
    page.locator("#message textarea").fill("the bright field")
    page.locator("#send").click()
    page.wait_for_selector('#chat [data-testid="user"]')
    assert "the bright field" in page.locator('#chat [data-testid="user"]').first.inner_text()
    # The status line is written when the answer is complete.
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('first token')")
    bot = page.locator('#chat [data-testid="bot"]').last.inner_text().strip()
    assert bot and bot != "…"

    # Choose a region by clicking two corners: it is drawn on the image (a new image is served).
    img = page.locator("#image-view img").first
    before = img.get_attribute("src")
    x, y, w, h = page.evaluate(SHOWN_IMAGE_RECT)
    assert w > 100 and h > 50
    page.mouse.click(x + w * 0.2, y + h * 0.3)
    page.wait_for_function(NEW_IMAGE_SHOWN, arg=before)
    after_corner = img.get_attribute("src")
    page.mouse.click(x + w * 0.6, y + h * 0.8)
    page.wait_for_function(NEW_IMAGE_SHOWN, arg=after_corner)
    page.get_by_label("Identify a region").check()
    x1 = page.locator("#region-x1 input").input_value()
    assert 100 < float(x1) < 140, f"x1 should be ~20% of 600 px, got {x1}"
    page.screenshot(path=str(ARTIFACTS / "browser_refer.png"), full_page=True)

    # A second tab is a second session: its own image and an empty conversation.
    other = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
    other.set_default_timeout(60_000)
    log_in(other, app_url)
    other.locator("#upload input[type=file]").set_input_files(str(geotiffs["s2_13band_uint16_utm33.tif"]))
    other.wait_for_function("() => document.querySelector('#image-info').innerText.includes('13 bands')")
    other.get_by_text("Bands (multispectral images)").click()
    other.locator("#bands textarea, #bands input").first.fill("4,3,2")
    other.get_by_role("button", name="Apply bands").click()
    other.wait_for_function("() => document.querySelector('#image-info').innerText.includes('bands 4, 3, 2')")
    assert other.locator('#chat [data-testid="user"]').count() == 0
    other.screenshot(path=str(ARTIFACTS / "browser_multispectral.png"), full_page=True)
    assert page.locator('#chat [data-testid="user"]').count() == 1

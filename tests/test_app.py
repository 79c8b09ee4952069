"""The browser viewer (``sinder_hub.app``), driven in headless Chromium through Selenium.

The page is served on 127.0.0.1; the test uploads a photo and reads what the browser shows:
both token-norm maps (non-blank, one 14-px square per token), the defect counts (equal to
``defect_report`` for the same file), and the message for a non-image upload. The second
model is the demo's repaired run when ``demo-output/run`` exists, else the planted backbone
with its planted trigger (the top singular triplet of block 4's fc2) removed by hand.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the viewer needs the app extra: pip install -e '.[app]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the test extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sinder_hub.app import Viewer, build_app, load_model  # noqa: E402
from sinder_hub.convert import export  # noqa: E402
from sinder_hub.data import load_rgb, sample_images, sinder_transform  # noqa: E402
from sinder_hub.diagnostics import defect_report  # noqa: E402
from sinder_hub.planted import PLANTED_BLOCK, planted_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = ROOT / "demo-output" / "run"


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> list[str]:
    """``planted-swiglu`` and a repaired version of it (the demo's run, or the hand repair)."""
    if (DEMO_RUN / "model.safetensors").is_file():
        return ["planted-swiglu", os.path.relpath(DEMO_RUN)]
    model = planted_backbone("planted-swiglu")
    fc2 = model.blocks[PLANTED_BLOCK].mlp.fc2
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(fc2.weight, full_matrices=False)
        fc2.weight -= s[0] * torch.outer(u[:, 0], vh[0])
    return ["planted-swiglu", str(export(model, tmp_path_factory.mktemp("hand-repaired"), format="timm")["timm"])]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "astronaut.jpg"
    sample_images(["astronaut"])["astronaut"].resize((320, 300)).save(path, quality=92)
    return path


def test_bad_inputs_get_a_message_and_the_viewer_still_answers(specs, photo, tmp_path):
    viewer = Viewer([specs[0], str(tmp_path / "no-such-run")], max_pixels=320 * 300)
    assert "no-such-run` could not be loaded" in viewer.failures["repaired"]
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (400, 300)).save(tmp_path / "large.png")
    assert viewer.answer(tmp_path / "empty.png").message == "**Error:** empty.png is empty (0 bytes)"
    assert viewer.answer(tmp_path / "notes.png").message.startswith("**Error:** notes.png: cannot read image")
    assert "over the limit of 96,000" in viewer.answer(tmp_path / "large.png").message
    answer = viewer.answer(photo, resolution=112, block=PLANTED_BLOCK)
    assert list(answer.views) == ["original"] and answer.views["original"].norm_picture.shape == (112, 112, 3)
    assert "block 4;" in answer.message and "centre crop at 112 px (8×8 tokens)" in answer.message


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chromium_driver():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip(
            "chromium and chromedriver are not on PATH (Debian: apt-get install chromium chromium-driver; .ci/run does)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1500",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def upload(browser, path: Path) -> None:
    browser.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(path))


def message(browser) -> str:
    return browser.find_element(By.ID, "message").text


def fetch_png(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def test_browser_shows_both_models_and_the_defect_counts_of_defect_report(specs, photo, tmp_path):
    app = build_app(models=specs)
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    browser = chromium_driver()
    try:
        browser.get(app.local_url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))

        bad = tmp_path / "notes.png"
        bad.write_text("these are notes, not a picture")
        upload(browser, bad)
        wait.until(lambda b: "notes.png: cannot read image" in message(b))

        browser.find_element(By.CSS_SELECTOR, "#input-image button[aria-label='Remove Image']").click()
        started = time.perf_counter()
        upload(browser, photo)
        wait.until(lambda b: "astronaut.jpg" in message(b) and b.find_elements(By.CSS_SELECTOR, "#numbers table"))
        wait.until(
            lambda b: all(
                b.execute_script(
                    "const i = document.querySelector(arguments[0]); return i && i.complete && i.naturalWidth",
                    f"#norm-{k} img",
                )
                for k in (0, 1)
            )
        )
        print(f"first answer in the browser: {time.perf_counter() - started:.2f} s; page: {message(browser)}")
        browser.save_screenshot(str(tmp_path / "viewer.png"))

        rows = browser.find_elements(By.CSS_SELECTOR, "#numbers table tbody tr")
        shown = {
            row.find_elements(By.TAG_NAME, "td")[0].text.split(":")[0]: row.find_elements(By.TAG_NAME, "td")
            for row in rows
        }
        assert list(shown) == ["original", "repaired"]
        image = sinder_transform(224)(load_rgb(photo))
        for index, (label, spec) in enumerate(zip(("original", "repaired"), specs)):
            loaded = load_model(spec)
            report = defect_report(loaded.model, {"astronaut": image}, loaded.directions)
            expected = [block["defects"]["astronaut"] for block in report["blocks"]]
            assert int(shown[label][1].text) == expected[-1]
            assert [int(n) for n in shown[label][2].text.split()] == expected

            element = browser.find_element(By.CSS_SELECTOR, f"#norm-{index} img")
            assert browser.execute_script(
                "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", element
            ) == [224, 224]
            pixels = fetch_png(element.get_attribute("src")).astype(int)
            assert pixels.shape == (224, 224, 3) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
            outline = (pixels == (255, 0, 0)).all(axis=-1)  # viridis has no pure red: 2-px frames of 14-px squares
            assert outline.sum() == (14 * 14 - 10 * 10) * expected[-1]
        assert int(shown["original"][1].text) > 0
    finally:
        browser.quit()
        app.close()

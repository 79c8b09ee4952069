"""The browser viewer (``sinder_hub.app``): its ``Viewer`` directly, and the page in headless Chromium.

The page is served on 127.0.0.1; the test uploads a photo and reads what the browser shows:
the token-norm maps and PCA pictures of three models (non-blank, one 14-px square per token),
the defect counts (equal to ``defect_report`` for the same file), the message for a non-image
upload, and that the page requested nothing from any other host. The second model is the
demo's repaired run when ``demo-output/run`` exists, else the planted backbone with its
planted trigger (the top singular triplet of block 4's fc2) removed by hand; the third is a
test-time-registers folder of ``planted-swiglu`` (the training-free rival, searched on four training
photos). The raw HTTP API is tested in ``test_app_api.py``.
"""

from __future__ import annotations

import gc
import io
import json
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

gradio = pytest.importorskip("gradio", reason="the viewer needs the app extra: pip install -e '.[app]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the test extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sinder_hub.app import NOT_AN_UPLOAD, Viewer, build_app, load_model  # noqa: E402
from sinder_hub.convert import export  # noqa: E402
from sinder_hub.data import load_rgb, sample_images, sinder_transform  # noqa: E402
from sinder_hub.diagnostics import defect_report  # noqa: E402
from sinder_hub.errors import InputError  # noqa: E402
from sinder_hub.planted import PLANTED_BLOCK, planted_backbone  # noqa: E402
from sinder_hub.plots import token_norms  # noqa: E402
from sinder_hub.variants import parse_variants  # noqa: E402

pytestmark = pytest.mark.slow  # models end to end, subprocesses or a browser: make test-fast skips this file

ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = ROOT / "demo-output" / "run"


def registers_folder(folder: Path) -> str:
    """Test-time registers of ``planted-swiglu``, found on four training photos."""
    from sinder_hub.data import TRAIN_SAMPLES
    from sinder_hub.registers_folder import RegistersConfig, find_registers

    photos = folder / "photos"
    photos.mkdir()
    for name, image in list(sample_images(TRAIN_SAMPLES).items())[:4]:
        image.resize((224, 224)).save(photos / f"{name}.png")
    config = RegistersConfig(
        model="planted-swiglu", images=str(photos), output=str(folder / "ttr"), held_out=("astronaut",)
    )
    find_registers(config)
    return f"registers={config.output}"


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> list[str]:
    """``planted-swiglu``, a repaired version of it (the demo's run, or the hand repair) and its test-time registers."""
    registers = registers_folder(tmp_path_factory.mktemp("registers"))
    if (DEMO_RUN / "model.safetensors").is_file():
        return ["planted-swiglu", os.path.relpath(DEMO_RUN), registers]
    model = planted_backbone("planted-swiglu")
    fc2 = model.blocks[PLANTED_BLOCK].mlp.fc2
    with torch.no_grad():
        u, s, vh = torch.linalg.svd(fc2.weight, full_matrices=False)
        fc2.weight -= s[0] * torch.outer(u[:, 0], vh[0])
    folder = export(model, tmp_path_factory.mktemp("hand-repaired"), format="timm")["timm"]
    return ["planted-swiglu", f"repaired={folder}", registers]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "astronaut.jpg"
    sample_images(["astronaut"])["astronaut"].resize((320, 300)).save(path, quality=92)
    return path


@pytest.mark.slow
def test_bad_uploads_get_their_message_other_paths_one_message_and_the_viewer_still_answers(photo, tmp_path):
    uploads, private = tmp_path / "uploads", tmp_path / "private"
    uploads.mkdir(), private.mkdir()
    viewer = Viewer(["planted-swiglu", str(tmp_path / "no-such-run")], max_pixels=320 * 300, upload_folders=[uploads])
    assert "no-such-run` could not be loaded" in viewer.failures["no-such-run"]
    (uploads / "empty.png").write_bytes(b"")
    (uploads / "notes.png").write_text("not an image")
    Image.new("RGB", (400, 300)).save(uploads / "large.png")
    assert viewer.answer(uploads / "empty.png").message == "**Error:** empty.png is empty (0 bytes)"
    assert viewer.answer(uploads / "notes.png").message.startswith("**Error:** notes.png: cannot read image")
    assert "over the limit of 96,000" in viewer.answer(uploads / "large.png").message

    shutil.copy(photo, private / "secret.jpg")
    (private / "empty.png").write_bytes(b"")
    (uploads / "link.jpg").symlink_to(private / "secret.jpg")
    strangers = [private / "secret.jpg", uploads / ".." / "private" / "secret.jpg", uploads / "link.jpg"]
    for path in [*strangers, private / "missing.png", private, private / "empty.png"]:  # more: test_app_api.py
        answer = viewer.answer(path)
        assert (answer.message, answer.views) == (NOT_AN_UPLOAD, {}), path
    assert viewer.sample_path("../private/secret") is None
    sample = viewer.answer(viewer.sample_path("coins")).message  # read: the viewer wrote it
    assert sample.startswith("**Error:** coins.png: image of 384x303 px (116,352 pixels) is over the limit")

    shutil.copy(photo, uploads / "astronaut.jpg")
    answer = viewer.answer(uploads / "astronaut.jpg", resolution=112, block=PLANTED_BLOCK)
    assert list(answer.views) == ["original"] and answer.views["original"].norm_picture.shape == (112, 112, 3)
    assert "block 4;" in answer.message and "centre crop at 112 px (8×8 tokens)" in answer.message


def test_the_samples_folder_goes_with_the_viewer():
    viewer = Viewer(["planted-swiglu"])
    sample = Path(viewer.sample_path("coins"))
    assert sample.is_file()
    del viewer
    gc.collect()
    assert not sample.parent.exists()


@pytest.mark.slow
def test_up_to_six_models_share_one_colour_scale_and_the_table(specs, photo):
    with pytest.raises(InputError, match="one to 6 models side by side, got 7"):
        Viewer([specs[0]] * 7)
    viewer = Viewer([*specs, "broken=no-such-model"], upload_folders=[photo.parent])
    labels = [variant.label for variant in parse_variants(specs[0], specs[1:])]
    assert list(viewer.specs) == [*labels, "broken"] and list(viewer.models) == labels
    assert "`no-such-model` could not be loaded" in viewer.failures["broken"]
    answer = viewer.answer(photo, resolution=112)
    assert list(answer.views) == labels
    assert answer.vmax == max(float(token_norms(view.grid).max()) for view in answer.views.values())
    viridis = matplotlib.colormaps["viridis"]
    for view in answer.views.values():  # each map's hottest token, coloured on the shared [0, vmax]
        norms = token_norms(view.grid)
        row, col = np.unravel_index(norms.argmax(), norms.shape)
        expected = np.round(np.array(viridis(norms[row, col] / answer.vmax)[:3]) * 255)
        assert (view.norm_picture[row * 14 + 7, col * 14 + 7] == expected).all()
    rows = answer.table.splitlines()[2:]
    assert [row.split(":")[0].strip("| ") for row in rows] == labels
    assert rows[0].endswith("| 1.00000 |") and not rows[2].endswith("| 1.00000 |")
    assert answer.chart.shape[-1] == 3


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
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def requested_hosts(browser) -> set[str]:
    """Hosts of every http(s)/ws(s) request the page made since the last call (Chrome's network log)."""
    hosts = set()
    for entry in browser.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        if event["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            url = urlparse(event["params"].get("request", event["params"]).get("url", ""))
            if url.scheme in ("http", "https", "ws", "wss"):
                hosts.add(url.hostname)
    return hosts


def upload(browser, path: Path) -> None:
    browser.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(path))


def message(browser) -> str:
    return browser.find_element(By.ID, "message").text


def fetch_png(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=10) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def drawn(browser, selector: str) -> bool:
    return bool(
        browser.execute_script(
            "const i = document.querySelector(arguments[0]); return i && i.complete && i.naturalWidth", selector
        )
    )


@pytest.mark.slow
def test_browser_shows_three_models_and_the_defect_counts_of_defect_report(specs, photo, tmp_path):
    labels = [variant.label for variant in parse_variants(specs[0], specs[1:])]
    app = build_app(models=specs)
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    browser = chromium_driver()
    try:
        browser.get(app.local_url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))
        titles = [browser.find_element(By.ID, f"column-{k}").text for k in range(3)]
        assert [title.split(":")[0] for title in titles] == labels

        bad = tmp_path / "notes.png"
        bad.write_text("these are notes, not a picture")
        upload(browser, bad)
        wait.until(lambda b: "notes.png: cannot read image" in message(b))

        browser.find_element(By.CSS_SELECTOR, "#input-image button[aria-label='Remove Image']").click()
        started = time.perf_counter()
        upload(browser, photo)
        wait.until(lambda b: "astronaut.jpg" in message(b) and b.find_elements(By.CSS_SELECTOR, "#numbers table"))
        wait.until(lambda b: all(drawn(b, f"#{kind}-{k} img") for kind in ("norm", "pca") for k in range(3)))
        print(f"first answer in the browser: {time.perf_counter() - started:.2f} s; page: {message(browser)}")
        browser.save_screenshot(str(tmp_path / "viewer.png"))
        assert requested_hosts(browser) == {"127.0.0.1"}  # no fonts, analytics or anything else from elsewhere

        rows = browser.find_elements(By.CSS_SELECTOR, "#numbers table tbody tr")
        shown = {
            row.find_elements(By.TAG_NAME, "td")[0].text.split(":")[0]: row.find_elements(By.TAG_NAME, "td")
            for row in rows
        }
        assert list(shown) == labels
        image = sinder_transform(224)(load_rgb(photo))
        for index, (label, variant) in enumerate(zip(labels, parse_variants(specs[0], specs[1:]))):
            loaded = load_model(variant.spec)
            report = defect_report(loaded.model, {"astronaut": image}, loaded.directions)
            expected = [block["defects"]["astronaut"] for block in report["blocks"]]
            assert int(shown[label][1].text) == expected[-1]
            assert [int(n) for n in shown[label][2].text.split()] == expected

            for kind in ("norm", "pca"):
                element = browser.find_element(By.CSS_SELECTOR, f"#{kind}-{index} img")
                assert browser.execute_script(
                    "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", element
                ) == [224, 224]
                pixels = fetch_png(element.get_attribute("src")).astype(int)
                assert pixels.shape == (224, 224, 3) and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10
                if kind == "norm":  # viridis has no pure red: 2-px frames of 14-px squares
                    outline = (pixels == (255, 0, 0)).all(axis=-1)
                    assert outline.sum() == (14 * 14 - 10 * 10) * expected[-1]
        assert int(shown[labels[0]][1].text) > 0
    finally:
        browser.quit()
        app.close()


@pytest.fixture(scope="module")
def six_specs(specs, tmp_path_factory) -> list[str]:
    """The three of ``specs``, DVT's denoiser and distilled layouts built on planted-swiglu (random denoiser,
    perturbed copy) and the original once more: six variants of one architecture."""
    from test_dvt import OPTIMIZER, denoiser_checkpoint

    root = tmp_path_factory.mktemp("dvt")
    base = planted_backbone("planted-swiglu")
    paths = {kind: root / kind / "planted-swiglu.pth" for kind in ("voc_denoised", "voc_distilled")}
    for path in paths.values():
        path.parent.mkdir()
    torch.save(denoiser_checkpoint(base.embed_dim, 37)[0], paths["voc_denoised"])
    generator = torch.Generator().manual_seed(3)
    distilled = {
        f"model.{k}": v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.state_dict().items()
    }
    torch.save({"model": distilled, "optimizer": OPTIMIZER, "step": 1}, paths["voc_distilled"])
    return [
        *specs,
        f"dvt-denoised={paths['voc_denoised']}",
        f"dvt-distilled={paths['voc_distilled']}",
        "again=planted-swiglu",
    ]


@pytest.mark.slow
def test_browser_shows_six_models_with_their_pictures_and_counts(six_specs, photo, tmp_path):
    labels = [variant.label for variant in parse_variants(six_specs[0], six_specs[1:])]
    app = build_app(models=six_specs)
    app.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    browser = chromium_driver()
    try:
        browser.set_window_size(1400, 1600)
        browser.get(app.local_url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#input-image input[type=file]"))
        titles = [browser.find_element(By.ID, f"column-{k}").text for k in range(6)]
        assert [title.split(":")[0] for title in titles] == labels
        upload(browser, photo)
        wait.until(lambda b: "astronaut.jpg" in message(b) and b.find_elements(By.CSS_SELECTOR, "#numbers table"))
        wait.until(lambda b: all(drawn(b, f"#{kind}-{k} img") for kind in ("norm", "pca") for k in range(6)))
        browser.save_screenshot(str(tmp_path / "viewer-six.png"))
        rows = browser.find_elements(By.CSS_SELECTOR, "#numbers table tbody tr")
        assert [row.find_elements(By.TAG_NAME, "td")[0].text.split(":")[0] for row in rows] == labels
        tops = [browser.find_element(By.ID, f"column-{k}").location["y"] for k in range(6)]
        assert tops[0] == tops[1] == tops[2] < tops[3] == tops[4] == tops[5]  # two rows of three, none squeezed
    finally:
        browser.quit()
        app.close()

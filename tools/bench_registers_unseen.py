#!/usr/bin/env python
"""Test-time registers on a planted fixture, measured on photo sets that neither the search nor the tests use.

    python tools/bench_registers_unseen.py                        # planted-dinov3, every set
    python tools/bench_registers_unseen.py --variant planted-swiglu --sets vflip skimage-other --tokens

The search reads the 12 ``TRAIN_SAMPLES`` at 224 px with the default settings, as
``tests/test_registers.py`` does. The photo sets (224 px, ``sinder_transform``) are disjoint from each other,
from the search's and the held-out images, and from what any test feeds a model:

- ``skimage-other``: the images ``skimage.data`` ships without a download outside ``SAMPLE_IMAGE_NAMES``
  (``cat`` is ``chelsea`` under another name and ``lfw_subset`` 25-px faces: both left out);
- ``vflip`` / ``rot270``: the 17 sample photos upside down / turned 90° clockwise;
- ``hflip-held-out``: the 5 held-out photos mirrored (the mirrored training photos are a test's folder).

Per set: eq.-5 defects at the last block before -> after the edit and the share cleared; the fixture's
floor, what eq. 5 flags with the planted trigger switched off (its two ``fc2`` columns zeroed: the
defect is then gone from the weights), and the share of the clearable defects (before - floor) cleared;
the images whose edited mask is the floor's, token for token, at every block; the patch tokens above
the search's threshold at the last block before -> after; the normal patch tokens' cosine to the original
and to the trigger-free model. ``--tokens`` prints each token left after the edit: its grid position,
norm over the grid's median, its pre-edit activation of the planted units, and its image's defects per
block with the trigger off and after the edit.
"""

import argparse
import sys
import time

import numpy as np
import torch
from PIL import Image

from sinder_hub.data import HELD_OUT_SAMPLES, SAMPLE_IMAGE_NAMES, TRAIN_SAMPLES, sample_images, sinder_transform
from sinder_hub.planted import PLANTED_BLOCK, PLANTED_VARIANTS, planted_backbone
from sinder_hub.registers import apply_test_time_registers, defect_directions, remove_test_time_registers
from sinder_hub.registers_search import find_register_neurons
from sinder_hub.report import compare_held_out, held_out_outputs

RESOLUTION = 224
SKIMAGE_OTHER = ("colorwheel", "logo", "page", "text", "microaneurysms", "checkerboard", "shepp_logan_phantom", "horse")


def _rgb(array: np.ndarray) -> Image.Image:
    """An 8-bit RGB picture of a ``skimage.data`` array (bool, float or uint8; gray, RGB or RGBA)."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = (255 * (array - array.min()) / max(float(array.max() - array.min()), 1e-12)).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def photo_sets() -> dict[str, dict[str, Image.Image]]:
    """``{set: {image name: PIL image}}``, the disjoint sets of the module docstring."""
    import skimage.data

    photos = sample_images(SAMPLE_IMAGE_NAMES)
    return {
        "skimage-other": {name: _rgb(getattr(skimage.data, name)()) for name in SKIMAGE_OTHER},
        "vflip": {f"{name}/vflip": image.transpose(Image.Transpose.FLIP_TOP_BOTTOM) for name, image in photos.items()},
        "rot270": {f"{name}/rot270": image.transpose(Image.Transpose.ROTATE_270) for name, image in photos.items()},
        "hflip-held-out": {
            f"{name}/hflip": photos[name].transpose(Image.Transpose.FLIP_LEFT_RIGHT) for name in HELD_OUT_SAMPLES
        },
    }


def trigger_off_outputs(model, images: dict, directions: torch.Tensor) -> dict:
    """``held_out_outputs`` of ``model`` with the planted trigger's two ``fc2`` columns zeroed (restored after)."""
    weight = model.blocks[PLANTED_BLOCK].mlp.fc2.weight
    saved = weight[:, -2:].clone()
    try:
        with torch.no_grad():
            weight[:, -2:] = 0.0
        return held_out_outputs(model, images, directions)
    finally:
        with torch.no_grad():
            weight[:, -2:] = saved


def _trigger_activations(model, images: dict) -> dict:
    """The planted units' pre-edit activations per image: ``{name: [T, 2]}``."""
    captured = {}
    fc2 = model.blocks[PLANTED_BLOCK].mlp.fc2
    handle = fc2.register_forward_pre_hook(lambda module, args: captured.__setitem__("h", args[0][0, :, -2:]))
    try:
        activations = {}
        for name, image in images.items():
            model(image)
            activations[name] = captured["h"].clone()
        return activations
    finally:
        handle.remove()


def measure(model, registers, directions: torch.Tensor, images: dict) -> dict:
    """Before / after / trigger-off outputs of ``{name: [1, 3, R, R]}`` images, and the figures of the docstring."""
    with torch.inference_mode():
        before = held_out_outputs(model, images, directions)
        apply_test_time_registers(model, registers)
        try:
            after = held_out_outputs(model, images, directions)
        finally:
            remove_test_time_registers(model)
        floor = trigger_off_outputs(model, images, directions)
    threshold = registers.settings.threshold
    totals = {
        side: sum(out["defects"][-1] for out in outputs.values())
        for side, outputs in (("before", before), ("after", after), ("floor", floor))
    }
    high = {
        side: sum(int((out["grid"].norm(dim=-1) > threshold).sum()) for out in outputs.values())
        for side, outputs in (("before", before), ("after", after))
    }
    return {
        "outputs": (before, after, floor),
        **totals,
        "same_as_floor": sum(
            after[n]["defects"] == floor[n]["defects"] and bool((after[n]["mask"] == floor[n]["mask"]).all())
            for n in images
        ),
        "high_before": high["before"],
        "high_after": high["after"],
        "cosine_original": compare_held_out(model, before, after, RESOLUTION).normal_token_cosine,
        "cosine_trigger_off": compare_held_out(model, floor, after, RESOLUTION).normal_token_cosine,
    }


def _share(cleared: int, total: int) -> str:
    return f"{100 * cleared / total:.1f} %" if total else "n/a"


def print_figures(name: str, count: int, figures: dict) -> None:
    before, after, floor = figures["before"], figures["after"], figures["floor"]
    print(
        f"{name:15s} {count:2d} images: defects {before:3d} -> {after:2d} ({_share(before - after, before)} cleared); "
        f"trigger off {floor:2d}, clearable {before - floor:3d}, {_share(before - after, before - floor)} of them cleared; "
        f"mask = trigger-off mask on {figures['same_as_floor']}/{count}; above the threshold "
        f"{figures['high_before']} -> {figures['high_after']}; normal-token cosine {figures['cosine_original']:.5f} "
        f"to the original, {figures['cosine_trigger_off']:.5f} to the trigger-off model"
    )


def print_tokens(model, images: dict, figures: dict) -> None:
    """Each token left after the edit (module docstring, ``--tokens``)."""
    _, after, floor = figures["outputs"]
    with torch.inference_mode():
        activations = _trigger_activations(model, images)
    prefix, width = model.num_prefix_tokens, after[next(iter(after))]["mask"].shape[1]
    for name in images:
        norms = after[name]["grid"].norm(dim=-1)
        for row, col in after[name]["mask"].nonzero().tolist():
            units = activations[name][prefix + row * width + col].tolist()
            print(
                f"    {name} ({row}, {col}): norm {float(norms[row, col] / norms.median()):.2f}x the median; "
                f"planted units before the edit {units[0]:.4g}, {units[1]:.4g}; the image's defects per block "
                f"with the trigger off {floor[name]['defects']}, after the edit {after[name]['defects']}"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="planted-dinov3", choices=list(PLANTED_VARIANTS))
    parser.add_argument("--sets", nargs="+", default=None, help="photo sets to measure (default: all)")
    parser.add_argument("--tokens", action="store_true", help="print each token left after the edit")
    args = parser.parse_args(argv)
    sets = photo_sets()
    unknown = sorted(set(args.sets or ()) - set(sets))
    if unknown:
        print(f"error: --sets: unknown {', '.join(unknown)} (known: {', '.join(sets)})", file=sys.stderr)
        return 2
    transform = sinder_transform(RESOLUTION)
    model = planted_backbone(args.variant)
    directions = defect_directions(model)
    start = time.perf_counter()
    train = [transform(image) for image in sample_images(TRAIN_SAMPLES).values()]
    registers = find_register_neurons(model, train, base_model=args.variant, directions=directions)
    neurons = ", ".join(f"{n.layer}:{n.unit}" for n in registers.neurons)
    print(f"{args.variant}: register neurons {neurons}, threshold {registers.settings.threshold:.4g} "
          f"({time.perf_counter() - start:.1f} s search on {len(train)} images)")  # fmt: skip
    for name in args.sets or sets:
        images = {label: transform(image)[None] for label, image in sets[name].items()}
        figures = measure(model, registers, directions, images)
        print_figures(name, len(images), figures)
        if args.tokens:
            print_tokens(model, images, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())

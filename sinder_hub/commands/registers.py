"""Find the register neurons of a backbone (test-time registers, Jiang et al. 2025) and write a registers folder.

    sinder-hub registers --model vit_large_patch14_dinov2.lvd142m --images /data/imagenet/train --output ttr
    sinder-hub diagnose --model vit_large_patch14_dinov2.lvd142m --compare registers=ttr

OUT/test_time_registers.json holds the base model spec and its sha256, the neurons with their scores, every
setting and where it came from, and the images searched; OUT/registers_report.json the held-out defects
before and after and the cosines to the original. The folder is a model spec: `load_backbone(OUT)`,
`diagnose`, `evaluate` and `view` take it. Settings left out come from the model (see docs/registers.md).
Exit codes: 0 done, 1 the search failed, 2 bad input, 130 interrupted (SIGINT/SIGTERM: nothing is kept;
there is nothing to resume, run the command again).
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from sinder_hub.backbones import MAX_RESOLUTION
from sinder_hub.cli import ArgumentParser
from sinder_hub.registers_folder import MAX_TOP_K, RegistersConfig, find_registers
from sinder_hub.registers_search import TOP_K_CAP

HELP = {
    "model": "any spec load_backbone takes (timm name, hf-hub:id, folder, planted-swiglu...)",
    "images": "folder of images (searched recursively) or a text file listing paths (required)",
    "output": "the registers folder: test_time_registers.json, registers_report.json, pictures",
    "num_images": "images drawn (seeded) from --images for the search",
    "seed": "seed of the image draw",
    "resolution": f"input size, a multiple of the patch size up to {MAX_RESOLUTION} px (0: the model's own)",
    "detection_block": "block whose output norms find the outlier tokens (default: the family's; negative counts from the end)",
    "threshold": "token norm above which a token is an outlier (default: derived from eq. 5's defects)",
    "highest_layer": "the last block whose MLP neurons may be chosen (default: where the outliers appear)",
    "top_k": f"number of neurons, 1 to {MAX_TOP_K} (default: those whose score stands out, at most {TOP_K_CAP})",
    "no_sparsity_filter": "count a neuron's score even when it is active on most tokens",
    "held_out": "skimage sample images measured before and after",
    "max_pixels": "larger images are skipped (PIL's decompression-bomb limit by default)",
    "overwrite": "replace the files of an earlier registers run in --output (only those)",
}
OPTIONAL = {"detection_block": int, "threshold": float, "highest_layer": int, "top_k": int}


def parse_args(argv=None) -> RegistersConfig:
    parser = ArgumentParser(prog="sinder-hub registers", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    for f in fields(RegistersConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=HELP[f.name])
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, nargs="+", default=f.default, help=HELP[f.name])
        else:
            shown = "" if f.name in OPTIONAL else f" (default: {f.default})"  # their help says where they come from
            parser.add_argument(
                flag, type=OPTIONAL.get(f.name, type(f.default)), default=f.default, help=HELP[f.name] + shown
            )
    args = parser.parse_args(argv)
    return RegistersConfig(**{**vars(args), "held_out": tuple(args.held_out)})


def main(argv=None) -> int:
    config = parse_args(argv)
    result = find_registers(config)
    held_out = result.held_out
    neurons = ", ".join(f"{layer}:{unit}" for layer, unit, _ in result.neurons)
    print(f"wrote {config.output}: {len(result.neurons)} register neurons (block:unit) {neurons}")
    print(f"search: {result.images['used']} images with outliers of {result.images['seen']} seen, "
          f"{result.search_seconds:.1f} s; settings: detection block {result.settings.get('detection_block')}, "
          f"threshold {result.settings.get('threshold'):.1f}, highest layer {result.settings.get('highest_layer')}")  # fmt: skip
    print(
        f"held-out defects at the last block ({held_out.resolution} px): {held_out.before.total} -> "
        f"{held_out.after.total}; cosine to the original: normal tokens {held_out.normal_token_cosine:.4f}, "
        f"{held_out.class_token} {held_out.class_token_cosine:.4f}"
    )
    return 0

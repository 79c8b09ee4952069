#!/usr/bin/env python
"""Repair a DINOv2 backbone with SINDER (Algorithm 1) and write the repaired weights.

    python tools/repair.py --model vit_giant_patch14_dinov2.lvd142m --data /path/to/imagenet/train --output run
    accelerate launch --multi_gpu --num_processes 4 tools/repair.py --data ... --output run
    python tools/repair.py --output run --resume     # continue after Ctrl-C / SIGTERM
"""

import argparse
import json
import sys
from dataclasses import fields

from sinder_hub.trainer import PRECISIONS, RepairConfig, repair

HELP = {
    "model": "any spec load_backbone takes: timm name, hf-hub:id, folder, .safetensors, authors' .pth, planted-swiglu",
    "data": "folder of images (searched recursively for jpg/jpeg/png/webp) or a text file listing paths",
    "output": "run folder: model.safetensors, config.json, repair_report.json, pictures, checkpoint/",
    "num_images": "images taken at an even stride over the listing",
    "window": "stopping rule: number of recent images whose clear flags are kept",
    "stop_clear": "stopping rule: stop once this fraction of the window is clear",
    "limit_layers": "blocks i-limit_layers+1 .. i receive the update for a loss at block i",
    "skip_less_than": "a block needs at least this many defects to give the loss",
    "images_per_step": "images per process per optimiser step (gradients summed, divided by images with a loss)",
    "precision": "fp32, tf32 (the authors') or bf16 autocast",
    "checkpoint_blocks": "keep only each block's input and run it again in the backward: less GPU memory, same result, slower steps",
    "directions_method": "sampled (the authors' least squares) or expected (its noise-free limit)",
    "held_out": "skimage sample images evaluated before and after",
    "save_every": "checkpoint every N steps (and on SIGINT/SIGTERM); 0 = only on signals and at the end",
    "resume": "continue the run in --output from its checkpoint",
    "quiet": "no progress bar",
}


def parse_args(argv=None) -> RepairConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(RepairConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=HELP.get(f.name))
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, nargs="+", default=f.default, help=HELP.get(f.name))
        else:
            choices = PRECISIONS if f.name == "precision" else ("sampled", "expected") if f.name == "directions_method" else None
            parser.add_argument(flag, type=type(f.default), default=f.default, choices=choices,
                                help=f"{HELP.get(f.name, '')} (default: {f.default})".strip())
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data is required (a folder of images or a text file of paths)")
    return RepairConfig(**{**vars(args), "held_out": tuple(args.held_out)})


def main(argv=None) -> int:
    config = parse_args(argv)
    result = repair(config)
    if result.interrupted_by:
        print(f"interrupted by {result.interrupted_by}: checkpoint written to {result.output}/checkpoint; "
              f"continue with the same command plus --resume", file=sys.stderr)
        return 130
    if result.report is None:  # not the main process
        return 0
    report, held_out = result.report, result.report["held_out"]
    print(f"wrote {result.output}: {report['steps']} steps, {report['updates']} updates, "
          f"stopped by {report['stopped_because']}, {report['wall_time_s']:.1f} s on {report['hardware']['device']}")
    print(f"held-out defects at the last block ({held_out['resolution']} px): "
          f"{held_out['before']['total']} -> {held_out['after']['total']}; cosine to the original: "
          f"normal tokens {held_out['normal_token_cosine']:.4f}, class token {held_out['class_token_cosine']:.4f}")
    if not config.quiet:
        print(json.dumps({"loss_layer_histogram": report["loss_layer_histogram"], "images": report["images"]}))
    return 0


"""Repair a backbone with SINDER (Algorithm 1) and write the repaired weights.

    sinder-hub repair --model vit_giant_patch14_dinov2.lvd142m --data /path/to/imagenet/train --output run
    accelerate launch --multi_gpu --num_processes 4 -m sinder_hub.cli repair --data ... --output run
    sinder-hub repair --data ... --output run --resume     # continue after Ctrl-C / SIGTERM

(`python tools/repair.py ...` and `accelerate launch tools/repair.py ...` are the same.)
Exit codes: 0 done, 1 the run failed or degraded the model (the report says why),
2 bad input, 130 interrupted (a checkpoint was written; add --resume to continue).
"""

import argparse
import json
import sys
from dataclasses import fields

from sinder_hub.cli import ArgumentParser
from sinder_hub.training import COMPILE_BACKENDS, DIRECTIONS_METHODS, PRECISIONS, RepairConfig, repair

HELP = {
    "model": "any spec load_backbone takes: timm name, hf-hub:id, folder, .safetensors, authors' .pth, planted-swiglu",
    "data": "folder of images (searched recursively for jpg/jpeg/png/webp) or a text file listing paths (required)",
    "output": "run folder: model.safetensors, config.json, repair_report.json, pictures, checkpoint/",
    "num_images": "images taken at an even stride over the listing; the run cycles through them",
    "max_steps": "iterations; step t takes image t mod N (N selected images), as in the authors' loop",
    "window": "stopping rule: number of recent images whose clear flags are kept",
    "stop_clear": "stopping rule: stop once this fraction of the window is clear (above 1: never)",
    "limit_layers": "blocks i-limit_layers+1 .. i receive the update for a loss at block i; 0 = all blocks 0 .. i",
    "skip_less_than": "a block needs at least this many defects (and at least 1) to give the loss",
    "kernel": "neighbourhood of the loss: 3 (3x3) or 5 (5x5 Gaussian table, centre 41/273)",
    "images_per_step": "images per process per optimiser step (gradients summed, divided by images with a loss)",
    "precision": "fp32, tf32 (the authors') or bf16 autocast",
    "checkpoint_blocks": "keep only each block's input and run it again in the backward: less GPU memory, same result, slower steps",
    "compile": "detect with a torch.compile'd no-grad scan (blocks fused with their defect counts); an image with a "
    "loss runs its window again with autograd: faster clear images, limit_layers more block forwards per loss",
    "compile_backend": "with --compile: torch.compile's backend; aot_eager traces the same graphs without "
    "generating kernels (seconds to compile, no speed-up: for debugging)",
    "count_batch": "with --compile: read the defect counts from the device every K blocks (the scan may run K-1 blocks "
    "past the loss block)",
    "num_workers": "data-loader processes decoding images (pinned memory on a GPU)",
    "directions_method": "sampled (the authors' least squares) or expected (its noise-free limit)",
    "held_out": "skimage sample images evaluated before and after",
    "save_every": "checkpoint every N steps (and on SIGINT/SIGTERM); 0 = only on signals and at the end",
    "resume": "continue the run in --output from its checkpoint",
    "overwrite": "replace the run in --output (removes only the files a run writes)",
    "allow_degraded": "keep the model of a run that made no update or moved the features far from the original (exit 0)",
    "allow_no_outliers": "train even when the held-out images show no high-norm outliers at the last block "
    "(a model without singular defects: by default the run stops before training, exit 1)",
    "max_pixels": "larger images are skipped as bad files (PIL's decompression-bomb limit by default)",
    "quiet": "no progress bar",
}
CHOICES = {"precision": PRECISIONS, "directions_method": DIRECTIONS_METHODS, "compile_backend": COMPILE_BACKENDS}


def parse_args(argv=None) -> RepairConfig:
    parser = ArgumentParser(
        prog="sinder-hub repair", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for f in fields(RepairConfig):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=HELP.get(f.name))
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, nargs="+", default=f.default, help=HELP.get(f.name))
        else:
            parser.add_argument(
                flag,
                type=type(f.default),
                default=f.default,
                choices=CHOICES.get(f.name),
                help=f"{HELP.get(f.name, '')} (default: {f.default})".strip(),
            )
    args = parser.parse_args(argv)
    return RepairConfig(**{**vars(args), "held_out": tuple(args.held_out)})


def main(argv=None) -> int:
    config = parse_args(argv)
    result = repair(config)
    if result.interrupted_by:
        print(
            f"interrupted by {result.interrupted_by}: checkpoint written to {result.output}/checkpoint; "
            f"continue with the same command plus --resume",
            file=sys.stderr,
        )
        return 130
    if result.report is None:  # not the main process
        return 0
    report, held_out = result.report, result.report.held_out
    print(
        f"wrote {result.output}: {report.steps} steps ({report.data_passes:.2f} passes over "
        f"{report.images.selected} images), {report.updates} updates, stopped by "
        f"{report.stopped_because}, {report.wall_time_s:.1f} s on {report.hardware.device}"
    )
    print(
        f"held-out defects at the last block ({held_out.resolution} px): "
        f"{held_out.before.total} -> {held_out.after.total}; cosine to the original: "
        f"normal tokens {held_out.normal_token_cosine:.4f}, {held_out.class_token} "
        f"{held_out.class_token_cosine:.4f}"
    )
    for reason in report.outcome.reasons:
        print(f"warning: {report.outcome.status}: {reason} (kept by --allow-degraded)", file=sys.stderr)
    if not config.quiet:
        summary = {"loss_layer_histogram": report.loss_layer_histogram, "images": report.images.to_json()}
        print(json.dumps(summary))
        print(format_timings(report.timings))
    return 0


def format_timings(timings) -> str:
    """One line: where the run's time went and its peak memory."""
    return (
        f"time: set-up {timings.setup_s:.1f} s, directions {timings.directions_s:.1f} s, held-out "
        f"{timings.held_out_s:.1f} s, loop {timings.loop_s:.1f} s (loader waits {timings.loader_wait_s:.1f} s, "
        f"images with a loss {timings.loss_images_s:.1f} s, clear images {timings.clear_images_s:.1f} s), "
        f"merge and writes {timings.merge_s + timings.write_s:.1f} s; peak memory {timings.peak_memory_gib:.2f} GiB "
        f"({timings.peak_memory_kind})"
    )

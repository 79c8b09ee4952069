"""Export a repaired backbone as stock timm and/or transformers folders.

    python tools/export.py RUN_DIR --to out/ --format both
    python tools/export.py --from-authors dinov2g_sinder.pth --to out/ --format both

RUN_DIR_OR_CHECKPOINT is any load_backbone spec (a repair run folder, a checkpoint, a folder, a name).
The output folder must be new or empty; --overwrite replaces an earlier export's files there (only those).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinder_hub.backbones import load_backbone
from sinder_hub.cli import ArgumentParser
from sinder_hub.convert import FORMATS, check_export_target, export
from sinder_hub.errors import InputError

AUTHORS_ARCHITECTURE = "vit_giant_patch14_dinov2_sinder"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="repair run folder or any load_backbone spec")
    parser.add_argument("--to", required=True, help="output folder (with format both: OUT/timm and OUT/transformers)")
    parser.add_argument("--format", choices=FORMATS, default="both")
    parser.add_argument(
        "--from-authors",
        metavar="FILE",
        help=f"the SINDER authors' repaired checkpoint (e.g. dinov2g_sinder.pth, as {AUTHORS_ARCHITECTURE})",
    )
    parser.add_argument("--card", action="store_true", help="also write README.md model cards (sinder_hub.hub)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier export in --to (config.json, model.safetensors, README.md, "
        "report, pictures...); nothing else is removed",
    )
    args = parser.parse_args(argv)
    if (args.source is None) == (args.from_authors is None):
        parser.error("give exactly one of RUN_DIR_OR_CHECKPOINT and --from-authors FILE")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_authors:
        path = Path(args.from_authors).expanduser()
        if not path.is_file():
            raise InputError(f"--from-authors {path} is not a file; expected the authors' .pth checkpoint")
        check_export_target(path, args.to, args.format, args.overwrite)  # before the 4.5 GB load
        source = load_backbone(path, architecture=AUTHORS_ARCHITECTURE)
    else:
        source = args.source
    for kind, folder in export(source, args.to, format=args.format, card=args.card, overwrite=args.overwrite).items():
        print(f"{kind}: {folder}")
    return 0

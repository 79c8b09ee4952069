"""Export a repaired backbone as stock timm and/or transformers folders.

    python tools/export.py RUN_DIR --to out/ --format both
    python tools/export.py --from-authors dinov2g_sinder.pth --to out/ --format both

RUN_DIR_OR_CHECKPOINT is any load_backbone spec (a repair run folder, a checkpoint, a folder, a name).
"""

from __future__ import annotations

import argparse

from sinder_hub.backbones import load_backbone
from sinder_hub.convert import FORMATS, export

AUTHORS_ARCHITECTURE = "vit_giant_patch14_dinov2_sinder"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", nargs="?", help="repair run folder or any load_backbone spec")
    parser.add_argument("--to", required=True, help="output folder (with format both: OUT/timm and OUT/transformers)")
    parser.add_argument("--format", choices=FORMATS, default="both")
    parser.add_argument("--from-authors", metavar="FILE",
                        help=f"the SINDER authors' repaired checkpoint (e.g. dinov2g_sinder.pth, as {AUTHORS_ARCHITECTURE})")
    parser.add_argument("--card", action="store_true", help="also write README.md model cards (sinder_hub.hub)")
    args = parser.parse_args(argv)
    if (args.source is None) == (args.from_authors is None):
        parser.error("give exactly one of RUN_DIR_OR_CHECKPOINT and --from-authors FILE")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    source = load_backbone(args.from_authors, architecture=AUTHORS_ARCHITECTURE) if args.from_authors else args.source
    for kind, folder in export(source, args.to, format=args.format, card=args.card).items():
        print(f"{kind}: {folder}")


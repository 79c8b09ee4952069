"""Open the browser viewer: token norms, PCA and per-block defects of your images, up to six models side by side.

    sinder-hub view                                    # planted-swiglu vs demo-output/run (once the demo has run)
    sinder-hub view --model vit_base_patch14_dinov2 --compare runs/base --port 7860
    sinder-hub view --model planted-swiglu --compare sinder=demo-output/run planted-gelu

Loads the models and their singular defect directions, then serves the page until Ctrl-C.
The page reads only images uploaded to it (and its own samples), sends no analytics and
loads no web fonts; --host 0.0.0.0 and --share still expose it to anyone who can reach it.
"""

from __future__ import annotations

import argparse

from sinder_hub.analysis import METHODS
from sinder_hub.cli import ArgumentParser
from sinder_hub.data import MAX_PIXELS
from sinder_hub.errors import SinderError
from sinder_hub.variants import MAX_VARIANTS, parse_variants

DEFAULT_MODEL = "planted-swiglu"
LARGEST_PORT = 65535


def positive_int(text: str) -> int:
    """argparse type: an integer above zero."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= LARGEST_PORT:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to {LARGEST_PORT}, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="sinder-hub view", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        help=f"backbone spec for load_backbone, optionally LABEL=SPEC (default {DEFAULT_MODEL}, and with no "
        "--compare the demo's repaired run demo-output/run beside it when that folder exists)",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="[LABEL=]SPEC",
        help=f"up to {MAX_VARIANTS - 1} more backbones (e.g. a repair run), shown beside the first; "
        "the table's cosine is to the first model",
    )
    parser.add_argument(
        "--resolution",
        type=positive_int,
        help="default input size, a multiple of the patch size "
        "(default: the first model's native one; 224 for planted-* models and runs repaired at 224)",
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="expected",
        help="MLP linearisation for the singular directions (expected: ~1 s per model on a CPU)",
    )
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=MAX_PIXELS,
        help=f"larger uploads are refused (default {MAX_PIXELS:,}, PIL's decompression-bomb limit)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=port_number, help="port (default: gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)
    args.specs = (
        None if args.model is None and args.compare is None else [args.model or DEFAULT_MODEL, *(args.compare or [])]
    )
    if args.specs:
        parse_variants(args.specs[0], args.specs[1:])  # too many specs, a label given twice: before anything loads
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from sinder_hub.app import build_app
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise SinderError("the viewer needs gradio: pip install 'sinder-hub[app]'") from error
    app = build_app(models=args.specs, resolution=args.resolution, method=args.method, max_pixels=args.max_pixels)
    app.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0

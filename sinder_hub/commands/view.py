"""Open the browser viewer: token norms, PCA and per-block defects of your images, original vs repaired.

    sinder-hub view                                    # planted-swiglu vs demo-output/run (once the demo has run)
    sinder-hub view --model vit_base_patch14_dinov2 --compare runs/base --port 7860

Loads the models and their singular defect directions, then serves the page until Ctrl-C.
"""

from __future__ import annotations

import argparse

from sinder_hub.analysis import METHODS
from sinder_hub.data import MAX_PIXELS
from sinder_hub.errors import SinderError


def positive_int(text: str, largest: int | None = None) -> int:
    value = int(text)
    if value <= 0 or (largest is not None and value > largest):
        raise argparse.ArgumentTypeError(
            f"expected a positive integer{f' up to {largest}' if largest else ''}, got {text}"
        )
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sinder-hub view", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        help="backbone spec for load_backbone (default planted-swiglu, and with no "
        "--compare the demo's repaired run demo-output/run beside it when that folder exists)",
    )
    parser.add_argument("--compare", help="a second backbone (e.g. the repaired one), shown beside the first")
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
        help="larger uploads are refused (default: PIL's decompression-bomb limit)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument(
        "--port",
        type=lambda text: positive_int(text, 65535),
        help="port (default: gradio's, 7860 or the next free one)",
    )
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from sinder_hub.app import build_app, default_models
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        raise SinderError("the viewer needs gradio: pip install 'sinder-hub[app]'") from error
    if args.model is None and args.compare is None:
        models = default_models()
    else:
        models = [args.model or "planted-swiglu", *([args.compare] if args.compare else [])]
    app = build_app(models=models, resolution=args.resolution, method=args.method, max_pixels=args.max_pixels)
    app.launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0

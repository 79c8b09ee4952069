"""Memory stays flat as the dataset grows: peak RSS and wall time of each protocol at two dataset sizes.

Not a test (pytest collects nothing here): a measurement, run as a script, each run in a fresh process::

    OMP_NUM_THREADS=1 python tests/test_evaluation_memory.py 50 500

For each protocol and each size N it writes tiny synthetic datasets with N training and N
validation images (ImageNet, VOC2012, NYU layouts, 64 px), runs ``sinder-hub evaluate`` on a tiny
random ViT (4 blocks, width 32) with 20 head iterations, and prints the process's peak RSS
(``ru_maxrss``, which includes the ~0.5 GB of imported libraries) and the evaluation's wall time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROTOCOLS = {
    "knn": ("imagenet", []),
    "linear": ("imagenet", []),
    "linseg": ("voc2012", ["--layers", "1"]),
    "kmeans": ("voc2012", []),
    "depth": ("nyu", ["--layers", "1"]),
}
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {tests!r})
from tiny import tiny_vit
import sinder_hub.backbones
from sinder_hub.cli import main
sinder_hub.backbones.load_backbone = lambda spec: tiny_vit(depth=4, img_size=56)
start = time.perf_counter()
assert main({argv!r}) == 0
seconds = time.perf_counter() - start
print(json.dumps({{"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": seconds}}))
"""


def make_data(root: Path, images: int) -> dict[str, Path]:
    from sinder_hub.synthetic import make_imagenet, make_nyu, make_voc2012

    per_class = images // 5
    return {
        "imagenet": make_imagenet(root / "imagenet", n_train=per_class, n_val=per_class, size=64),
        "voc2012": make_voc2012(root / "voc", n_train=images, n_val=images),
        "nyu": make_nyu(root / "nyu", n_train=images, n_test=images),
    }


def measure(protocol: str, data: dict[str, Path], out: Path) -> dict:
    """Peak RSS (MB) and seconds of one ``evaluate`` run of ``protocol``, in a fresh process."""
    layout, extra = PROTOCOLS[protocol]
    argv = ["evaluate", "--model", "tiny", "--task", protocol, "--data", str(data[layout]), *extra]
    argv += ["--resolution", "56", "--iterations", "20", "--workers", "0", "--out", str(out), "--overwrite"]
    code = CHILD.format(tests=str(Path(__file__).parent), argv=argv)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = {size: make_data(folder / f"data-{size}", size) for size in sizes}
        print("| protocol | " + " | ".join(f"{size} images: peak RSS, time" for size in sizes) + " |")
        print("|---|" + "---:|" * len(sizes))
        for protocol in PROTOCOLS:
            figures = [measure(protocol, data[size], folder / "out") for size in sizes]
            cells = [f"{f['peak_rss_mb']:.0f} MB, {f['seconds']:.1f} s" for f in figures]
            print(f"| {protocol} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main([int(size) for size in sys.argv[1:]] or [50, 500])

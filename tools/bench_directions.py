#!/usr/bin/env python
"""Time singular_defect_directions and measure the sampling noise of the authors' method.

    python tools/bench_directions.py --model vit_small_patch14_dinov2 --no-pretrained
    python tools/bench_directions.py --model planted-swiglu --seeds 4

Prints the time of method="expected" and of method="sampled" (per seed), then per block the
largest angle between the sampled directions of different seeds and the largest angle
between a sampled direction and the expected one.
"""

import argparse
import itertools
import sys
import time

import torch

from sinder_hub import load_backbone, singular_defect_directions


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Acute angle in degrees between matching rows: ``[n, D] x [n, D] -> [n]``."""
    return torch.rad2deg(torch.acos(torch.nn.functional.cosine_similarity(a, b, dim=-1).abs().clamp(max=1)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="planted-swiglu")
    parser.add_argument("--no-pretrained", action="store_true")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=100_000)
    args = parser.parse_args(argv)
    model = load_backbone(args.model, **({"pretrained": False} if args.no_pretrained else {}))
    start = time.perf_counter()
    expected = singular_defect_directions(model, method="expected")
    print(f"{args.model}: expected {time.perf_counter() - start:.2f} s")
    sampled = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        sampled.append(singular_defect_directions(model, samples=args.samples, generator=torch.Generator().manual_seed(seed)))
        print(f"{args.model}: sampled ({args.samples} samples, seed {seed}) {time.perf_counter() - start:.2f} s")
    spread = torch.stack([angle(a, b) for a, b in itertools.combinations(sampled, 2)]).amax(0)
    to_expected = torch.stack([angle(s, expected) for s in sampled]).amax(0)
    print("block  max angle between seeds (deg)  max angle sampled vs expected (deg)")
    for block, (s, e) in enumerate(zip(spread.tolist(), to_expected.tolist())):
        print(f"{block:5d}  {s:30.3f}  {e:35.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

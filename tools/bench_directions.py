#!/usr/bin/env python
"""Time singular_defect_directions and measure the sampling noise of the authors' method.

    python tools/bench_directions.py --model vit_small_patch14_dinov2 --no-pretrained
    python tools/bench_directions.py --model planted-swiglu --seeds 4
    python tools/bench_directions.py --model vit_giant_patch14_dinov2 --no-pretrained --chain-only \\
        --method expected --maps /tmp/vitg-maps.pt --repeats 3

Prints the time of method="expected" and of method="sampled" (per seed), then per block the
largest angle between the sampled directions of different seeds and the largest angle
between a sampled direction and the expected one.

With --chain-only it linearises the blocks once (method --method; with --maps, E_i are read
from that file when it exists and written to it otherwise) and times only the leading singular
vectors of G_i = E_i ⋯ E_0 (eq. 4), --repeats times, then prints per block the Lanczos steps
and whether the dense fallback ran.
"""

import argparse
import itertools
import os
import sys
import time

import torch

from sinder_hub import load_backbone, singular_defect_directions
from sinder_hub.analysis import METHODS, block_linear_maps, chain_singular_vectors


def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Acute angle in degrees between matching rows: ``[n, D] x [n, D] -> [n]``."""
    return torch.rad2deg(torch.acos(torch.nn.functional.cosine_similarity(a, b, dim=-1).abs().clamp(max=1)))


def chain_only(args, device: torch.device) -> None:
    """Time ``chain_singular_vectors`` alone and print its per-block steps and fallbacks."""
    if args.maps and os.path.exists(args.maps):
        E = list(torch.load(args.maps, weights_only=True).to(device))
    else:
        model = load_backbone(args.model, **({"pretrained": False} if args.no_pretrained else {})).to(device)
        start = time.perf_counter()
        E = [m.E for m in block_linear_maps(model, method=args.method, samples=args.samples)]
        print(f"{args.model}: linearising ({args.method}) {time.perf_counter() - start:.2f} s")
        if args.maps:
            torch.save(torch.stack(E).cpu(), args.maps)
    for _ in range(args.repeats):
        start = time.perf_counter()
        found = chain_singular_vectors(E)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        print(
            f"{args.model}: singular vectors of {len(E)} blocks (D = {E[0].shape[0]}) {seconds:.3f} s, "
            f"{sum(f.steps for f in found)} Lanczos steps, {sum(f.fallback for f in found)} fallbacks"
        )
    print("block  Lanczos steps  fallback")
    for block, f in enumerate(found):
        print(f"{block:5d}  {f.steps:13d}  {'yes' if f.fallback else 'no':>8}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="planted-swiglu")
    parser.add_argument("--no-pretrained", action="store_true")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chain-only", action="store_true", help="time the leading singular vectors alone")
    parser.add_argument("--method", choices=METHODS, default="sampled", help="--chain-only: how to linearise")
    parser.add_argument("--maps", help="--chain-only: file of the E_i [depth, D, D] (read if it exists, else written)")
    parser.add_argument("--repeats", type=int, default=1, help="--chain-only: timed runs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.chain_only:
        chain_only(args, device)
        return 0
    model = load_backbone(args.model, **({"pretrained": False} if args.no_pretrained else {})).to(device)
    start = time.perf_counter()
    expected = singular_defect_directions(model, method="expected")
    print(f"{args.model}: expected {time.perf_counter() - start:.2f} s")
    sampled = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        generator = torch.Generator(device=device).manual_seed(seed)
        sampled.append(singular_defect_directions(model, samples=args.samples, generator=generator))
        print(f"{args.model}: sampled ({args.samples} samples, seed {seed}) {time.perf_counter() - start:.2f} s")
    spread = torch.stack([angle(a, b) for a, b in itertools.combinations(sampled, 2)]).amax(0)
    to_expected = torch.stack([angle(s, expected) for s in sampled]).amax(0)
    print("block  max angle between seeds (deg)  max angle sampled vs expected (deg)")
    for block, (s, e) in enumerate(zip(spread.tolist(), to_expected.tolist())):
        print(f"{block:5d}  {s:30.3f}  {e:35.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

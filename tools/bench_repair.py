#!/usr/bin/env python
"""Time one repair step the fast way and the authors' naive way, in the same run.

    python tools/bench_repair.py --model vit_small_patch14_dinov2 --no-pretrained --resolution 518 --loss-block 10
    python tools/bench_repair.py --model vit_giant_patch14_dinov2 --no-pretrained --loss-block 25 --precision bf16 --json

The loss block is forced (random weights have no defects); a low --mask-thr makes sure it
has defective tokens, so both steps do a full backward. Peak memory is CUDA's
max_memory_allocated on a GPU, the process's peak RSS (sampled) on a CPU.
"""

import argparse
import json
import statistics
import sys
import threading
import time

import torch

from sinder_hub import load_backbone, parametrize_singular_values, singular_defect_directions
from sinder_hub.singular_values import SingularValueLinear
from sinder_hub.trainer import RepairConfig, fast_image_loss, naive_image_loss, set_precision


class PeakMemory:
    """Peak GPU memory (allocated) or process RSS while the block runs, in GiB."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            import psutil
            process = psutil.Process()
            self.peak = process.memory_info().rss

            def sample():
                while not self._stop.wait(0.002):
                    self.peak = max(self.peak, process.memory_info().rss)
            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def timed(fn, repeats: int, device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--no-pretrained", action="store_true", help="random init (no download)")
    parser.add_argument("--resolution", type=int, default=518)
    parser.add_argument("--loss-block", type=int, default=25, help="forced loss block (clamped to depth - 1)")
    parser.add_argument("--limit-layers", type=int, default=10)
    parser.add_argument("--mask-thr", type=float, default=1.0, help="low, so the forced block has defects")
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="tf32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=100_000, help="least-squares samples of the directions (the authors': 100k)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    autocast = set_precision(args.precision)
    model = load_backbone(args.model, pretrained=not args.no_pretrained).to(device)
    depth = len(model.blocks)
    block = min(args.loss_block, depth - 1)
    config = RepairConfig(mask_thr=args.mask_thr, limit_layers=args.limit_layers, skip_less_than=10**9)
    image = torch.randn(1, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    directions = singular_defect_directions(model, samples=args.samples).to(device)
    sync()
    directions_s = time.perf_counter() - start
    start = time.perf_counter()
    singular_defect_directions(model, method="expected")
    sync()
    directions_expected_s = time.perf_counter() - start

    # set-up: parametrise every block and factorise the window the step trains
    start = time.perf_counter()
    eps = parametrize_singular_values(model)
    optimizer = torch.optim.SGD(eps.values(), lr=0.005, momentum=0.9)
    for layer in model.blocks[max(0, block - args.limit_layers + 1):block + 1].modules():
        if isinstance(layer, SingularValueLinear):
            layer.factorize()
    sync()
    setup_s = time.perf_counter() - start

    def step(image_loss, force_block):
        def run():
            optimizer.zero_grad(set_to_none=True)
            result = image_loss(model, image, directions, config, autocast, force_block=force_block)
            assert force_block is None or result.block == force_block, "the forced block had no defect"
            optimizer.step()
        return run

    clear_image_s = timed(step(fast_image_loss, None), args.repeats, device)
    with PeakMemory(device) as fast_memory:
        fast_step_s = timed(step(fast_image_loss, block), args.repeats, device)
    with PeakMemory(device) as naive_memory:
        naive_step_s = timed(step(naive_image_loss, block), args.repeats, device)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    result = {
        "model": args.model, "resolution": args.resolution, "loss_block": block, "precision": args.precision,
        "fast_step_s": fast_step_s, "naive_step_s": naive_step_s, "clear_image_s": clear_image_s,
        "directions_s": directions_s, "directions_expected_s": directions_expected_s, "setup_s": setup_s,
        "fast_peak_gib": fast_memory.gib, "naive_peak_gib": naive_memory.gib,
        "speedup": naive_step_s / fast_step_s, "device": device_name,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model} at {args.resolution}px, loss at block {block}/{depth}, window {args.limit_layers}, "
          f"{args.precision} on {device_name}")
    print(f"  fast step    {fast_step_s:8.3f} s   peak {fast_memory.gib:6.2f} GiB")
    print(f"  naive step   {naive_step_s:8.3f} s   peak {naive_memory.gib:6.2f} GiB")
    print(f"  clear image  {clear_image_s:8.3f} s")
    print(f"  naive / fast {naive_step_s / fast_step_s:8.2f} x   (clear image vs naive: {naive_step_s / clear_image_s:.2f} x)")
    print(f"  directions   {directions_s:8.3f} s (sampled, {args.samples})   {directions_expected_s:.3f} s (expected)")
    print(f"  set-up       {setup_s:8.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

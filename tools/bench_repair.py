#!/usr/bin/env python
"""Time one repair step the fast way and the authors' naive way, in the same run.

    python tools/bench_repair.py --model vit_small_patch14_dinov2 --no-pretrained --resolution 518 --loss-block 10
    python tools/bench_repair.py --model vit_giant_patch14_dinov2 --no-pretrained --loss-block 25 --precision tf32 bf16 --json

The loss block is forced (random weights have no defects); a low --mask-thr makes sure it
has defective tokens, so both steps do a full backward. Peak memory is CUDA's
max_memory_allocated on a GPU, the process's peak RSS (sampled) on a CPU. The fast step
is also timed with --checkpoint-blocks (gradient checkpointing of the window), and the step
and the clear image with --compile (a compiled no-grad detection scan, counts read every
--count-batch blocks, the window run again with autograd). The ε gradients of one fast, one
compiled and one naive step are compared as a check (relative difference of the flattened
gradients; the steps see the same weights and image). The memory ledger splits the fast
step's peak into the weights, the window's singular-value factors and the rest (autograd
graphs, temporaries), counted from the tensors.
"""

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch

from sinder_hub import load_backbone, parametrize_singular_values, singular_defect_directions
from sinder_hub.analysis import block_linear_maps
from sinder_hub.singular_values import SingularValueLinear, factorize_blocks
from sinder_hub.training import (
    COMPILE_BACKENDS,
    RepairConfig,
    compiled_image_loss,
    fast_image_loss,
    naive_image_loss,
    set_precision,
)


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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU), so that wall times count it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def warm_up(device: torch.device) -> None:
    """Create the BLAS/LAPACK handles (cuBLAS, cuSOLVER) before anything is timed."""
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(64, 64, dtype=dtype, device=device)
        torch.linalg.eigh(a @ a.T)
        torch.linalg.qr(a)
    synchronize(device)


def memory_ledger(model) -> dict:
    """Bytes held by the model's own tensors, in GiB: its weights (parameters and buffers,
    factors excluded) and the singular-value factors ``U, S, Vh`` of the factorised layers."""
    factors, seen, weights = 0, set(), 0
    for module in model.modules():
        if isinstance(module, SingularValueLinear):
            for tensor in (module.U, module.S, module.Vh):
                if tensor is not None:
                    factors += tensor.untyped_storage().nbytes()
                    seen.add(tensor.untyped_storage().data_ptr())
    for tensor in list(model.parameters()) + list(model.buffers()):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            weights += tensor.untyped_storage().nbytes()
    return {"weights_gib": weights / 2**30, "factors_gib": factors / 2**30}


def attention_kernel(run, device) -> str:
    """Which fused attention a step can use on a GPU: run it allowing flash attention only."""
    if device.type != "cuda":
        return "sdpa (cpu)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            run()
        return "flash"
    except RuntimeError:
        return "not flash (flash attention refused these inputs)"


def epsilon_gradients(eps: list, model, image_loss, image, directions, config, autocast, block) -> torch.Tensor:
    """All ε gradients of one step (no update), flattened; zeros where a layer got none."""
    for p in eps:
        p.grad = None
    image_loss(model, image, directions, config, autocast, force_block=block)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float() for p in eps])


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch14_dinov2")
    parser.add_argument("--no-pretrained", action="store_true", help="random init (no download)")
    parser.add_argument("--resolution", type=int, default=518)
    parser.add_argument("--loss-block", type=int, default=25, help="forced loss block (clamped to depth - 1)")
    parser.add_argument("--limit-layers", type=int, default=10)
    parser.add_argument("--mask-thr", type=float, default=1.0, help="low, so the forced block has defects")
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16"), nargs="+", default=["tf32"],
                        help="one or more; the model, directions and set-up are shared")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--count-batch", type=int, default=4, help="--compile: defect counts read every K blocks")
    parser.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default=RepairConfig.compile_backend,
                        help="torch.compile backend of the compiled step (aot_eager: no kernels generated)")  # fmt: skip
    parser.add_argument(
        "--samples", type=int, default=100_000, help="least-squares samples of the directions (the authors': 100k)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object per precision")
    parser.add_argument(
        "--profile", action="store_true", help="also print where one fast step spends its time (torch.profiler)"
    )
    return parser.parse_args(argv)


def timed_once(function, device) -> tuple[object, float]:
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


@dataclass
class Bench:
    """The shared set-up: the model, its directions, the forced loss block, one image, ε and the optimiser."""

    args: argparse.Namespace
    device: torch.device
    model: torch.nn.Module
    block: int
    config: RepairConfig
    image: torch.Tensor
    directions: torch.Tensor
    eps: dict
    optimizer: torch.optim.Optimizer
    figures: dict

    def step(self, image_loss, force_block, autocast):
        def run():
            self.optimizer.zero_grad(set_to_none=True)
            result = image_loss(self.model, self.image, self.directions, self.config, autocast, force_block=force_block)
            assert force_block is None or result.block == force_block, "the forced block had no defect"
            self.optimizer.step()

        return run


def set_up(args) -> Bench:
    """Model, directions (timed three ways) and the singular-value set-up (timed against a general SVD)."""
    device = torch.device(args.device)
    set_precision(args.precision[0])
    torch.manual_seed(0)  # the random initialisation of --no-pretrained: the same model every run
    model = load_backbone(args.model, pretrained=not args.no_pretrained).to(device)
    block = min(args.loss_block, len(model.blocks) - 1)
    window = range(max(0, block - args.limit_layers + 1), block + 1)
    config = RepairConfig(mask_thr=args.mask_thr, limit_layers=args.limit_layers, skip_less_than=10**9,
                          count_batch=args.count_batch, compile_backend=args.compile_backend)  # fmt: skip
    image = torch.randn(1, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)).to(device)
    warm_up(device)
    figures = {}
    directions, figures["directions_s"] = timed_once(
        lambda: singular_defect_directions(model, samples=args.samples), device
    )
    # the linearisation alone; the rest is the singular vectors
    _, figures["directions_maps_s"] = timed_once(lambda: block_linear_maps(model, samples=args.samples), device)
    _, figures["directions_expected_s"] = timed_once(
        lambda: singular_defect_directions(model, method="expected"), device
    )
    start = time.perf_counter()  # parametrise every block and factorise the window the step trains
    eps = parametrize_singular_values(model)
    optimizer = torch.optim.SGD(eps.values(), lr=0.005, momentum=0.9)
    window_layers = factorize_blocks(model, window)
    synchronize(device)
    figures["setup_s"] = time.perf_counter() - start

    # the straightforward set-up for comparison: a general SVD of the same layers, float64
    def svd():
        return [torch.linalg.svd(layer.weight[layer.rows[0] : layer.rows[1]].double(), full_matrices=False)
                for layer in window_layers]  # fmt: skip

    _, figures["setup_svd_s"] = timed_once(svd, device)
    return Bench(args, device, model, block, config, image, directions.to(device), eps, optimizer, figures)


def measure_fast(bench: Bench, precision: str) -> dict:
    """Fast, --checkpoint-blocks and --compile steps, clear images and a plain forward at one precision."""
    args, device = bench.args, bench.device
    autocast = set_precision(precision)
    figures = {"clear_image_s": timed(bench.step(fast_image_loss, None, autocast), args.repeats, device)}
    with torch.no_grad(), autocast():
        figures["forward_s"] = timed(lambda: bench.model.forward_features(bench.image), args.repeats, device)
    with PeakMemory(device) as fast_memory:
        figures["fast_step_s"] = timed(bench.step(fast_image_loss, bench.block, autocast), args.repeats, device)
    bench.config.checkpoint_blocks = True
    with PeakMemory(device) as checkpointed_memory:
        figures["checkpointed_step_s"] = timed(bench.step(fast_image_loss, bench.block, autocast), args.repeats, device)
    bench.config.checkpoint_blocks = False
    figures["attention"] = attention_kernel(bench.step(fast_image_loss, bench.block, autocast), device)
    _, figures["compile_s"] = timed_once(bench.step(compiled_image_loss, None, autocast), device)  # compiles
    figures["compiled_clear_image_s"] = timed(bench.step(compiled_image_loss, None, autocast), args.repeats, device)
    with PeakMemory(device) as compiled_memory:
        figures["compiled_step_s"] = timed(bench.step(compiled_image_loss, bench.block, autocast), args.repeats, device)
    figures.update(fast_peak_gib=fast_memory.gib, checkpointed_peak_gib=checkpointed_memory.gib,
                   compiled_peak_gib=compiled_memory.gib, **memory_ledger(bench.model))  # fmt: skip
    return figures


def measure_naive(bench: Bench, precision: str) -> dict:
    """The authors' naive step, and the fast and compiled ε gradients relative to its."""
    autocast = set_precision(precision)
    with PeakMemory(bench.device) as naive_memory:
        naive_step_s = timed(bench.step(naive_image_loss, bench.block, autocast), bench.args.repeats, bench.device)
    parameters = list(bench.eps.values())
    grads = {
        loss.__name__: epsilon_gradients(
            parameters, bench.model, loss, bench.image, bench.directions, bench.config, autocast, bench.block
        )  # fmt: skip
        for loss in (fast_image_loss, compiled_image_loss, naive_image_loss)
    }
    naive = grads["naive_image_loss"]
    return {
        "naive_step_s": naive_step_s,
        "naive_peak_gib": naive_memory.gib,
        "grad_rel_diff": float((grads["fast_image_loss"] - naive).norm() / naive.norm()),
        "compiled_grad_rel_diff": float((grads["compiled_image_loss"] - naive).norm() / naive.norm()),
    }


def profile_fast_step(bench: Bench, precision: str) -> None:
    autocast = set_precision(precision)
    run = bench.step(fast_image_loss, bench.block, autocast)
    run()
    cuda = bench.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        run()
        synchronize(bench.device)
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"-- one fast step, {precision}: top operators by device time", file=sys.stderr)
    print(profile.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=40), file=sys.stderr)


def result_of(bench: Bench, precision: str, figures: dict) -> dict:
    device = bench.device
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    return {
        "model": bench.args.model,
        "resolution": bench.args.resolution,
        "loss_block": bench.block,
        "precision": precision,
        **bench.figures,
        **figures,
        "speedup": figures["naive_step_s"] / figures["fast_step_s"],
        "compiled_speedup": figures["naive_step_s"] / figures["compiled_step_s"],
        "device": device_name,
        "count_batch": bench.args.count_batch,
        "compile_backend": bench.args.compile_backend,
    }


def describe(bench: Bench, r: dict) -> str:
    args = bench.args
    return "\n".join([
        f"{args.model} at {args.resolution}px, loss at block {bench.block}/{len(bench.model.blocks)}, window "
        f"{args.limit_layers}, {r['precision']} on {r['device']}, attention: {r['attention']}",
        f"  fast step    {r['fast_step_s']:8.3f} s   peak {r['fast_peak_gib']:6.2f} GiB",
        f"  fast step, --checkpoint-blocks {r['checkpointed_step_s']:8.3f} s   peak {r['checkpointed_peak_gib']:6.2f} GiB",
        f"  compiled step (--compile, counts every {args.count_batch}) {r['compiled_step_s']:8.3f} s   "
        f"peak {r['compiled_peak_gib']:6.2f} GiB   (compiling: {r['compile_s']:.1f} s)",
        f"  naive step   {r['naive_step_s']:8.3f} s   peak {r['naive_peak_gib']:6.2f} GiB",
        f"  clear image  {r['clear_image_s']:8.3f} s   (a plain no-grad forward: {r['forward_s']:.3f} s)",
        f"  clear image, --compile {r['compiled_clear_image_s']:8.3f} s   "
        f"({r['compiled_clear_image_s'] / r['forward_s']:.2f} x the plain forward)",
        f"  naive / fast {r['speedup']:8.2f} x   (clear image vs naive: {r['naive_step_s'] / r['clear_image_s']:.2f} x)",
        f"  naive / compiled {r['compiled_speedup']:8.2f} x",
        f"  ε gradient vs naive: fast {r['grad_rel_diff']:.2e}, compiled {r['compiled_grad_rel_diff']:.2e} (relative)",
        f"  memory ledger after the steps: weights {r['weights_gib']:.2f} GiB, window factors {r['factors_gib']:.2f} GiB "
        f"(the rest of the fast peak: graphs and temporaries)",
        f"  directions   {r['directions_s']:8.3f} s (sampled, {args.samples}; of which linearising the blocks "
        f"{r['directions_maps_s']:.3f} s)   {r['directions_expected_s']:.3f} s (expected)",
        f"  set-up       {r['setup_s']:8.3f} s   (general float64 SVD of the same layers: {r['setup_svd_s']:.3f} s)",
    ])  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = set_up(args)
    # every fast measurement before any naive one: the naive step factorises all blocks it
    # runs through, and those factors would otherwise count in the fast step's peak memory
    figures = {precision: measure_fast(bench, precision) for precision in args.precision}
    for precision in args.precision:
        figures[precision].update(measure_naive(bench, precision))
    if args.profile:
        for precision in args.precision:
            profile_fast_step(bench, precision)
    for precision in args.precision:
        result = result_of(bench, precision, figures[precision])
        print(json.dumps(result) if args.json else describe(bench, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Planted-defect backbones: small ViTs of several families whose singular defect we plant ourselves.

Real weights cannot be downloaded in tests, so ``planted_backbone`` builds a 12-block,
width-384 stock timm architecture with random weights (std 0.04, layer scale 0.5, folded into
the output projections where the family has none) and plants one defect at block ``PLANTED_BLOCK`` (k), following
FIXTURE-NOTES. Variants (``PLANTED_VARIANTS``):

- ``planted-gelu`` / ``planted-swiglu``: DINOv2 (patch 14, layer scale, GELU / packed SwiGLU);
- ``planted-deit3``: DeiT-III (patch 16, layer scale, GELU, no class position embedding);
- ``planted-clip``: CLIP (patch 16, no layer scale, a pre-norm ``norm_pre`` before block 0, QuickGELU);
- ``planted-dinov3``: DINOv3 ViT-S+ (Eva: RoPE, 4 storage tokens, split SwiGLU, layer scale).
  DINOv3 has no absolute position embedding; the fixture adds one (``use_abs_pos_emb=True``)
  because the trigger below is positional. RoPE stays and acts as in DINOv3.

Every family's block anatomy is read through ``sinder_hub.families``. The planting:

1. defect direction ν: a random unit vector (⟂ 1 and ρ);
2. trigger: two hidden units of block k's MLP form a soft step ``h ≈ H · 1[s > 0]`` of the
   read-out ``s = ρ · (x - mean x)`` (the sign of the centred raw residual, so a token's
   layer-norm scale never moves it across the threshold); their output columns write
   ``±M·ν`` so that a firing token receives ``Δ = DEFECT_TO_MEDIAN ×`` the median token
   norm along ν. The other hidden units do not write along ν, so the trigger is exactly
   the top singular triplet of fc2, the one a singular-value repair has to switch off;
3. which tokens fire: ρ pairs the two quietest channels at block k; only ``pos_embed``
   writes them and nothing reads them before the trigger. ``pos_embed`` adds a smooth
   random positional field and a constant offset along ρ, the offset halfway across the
   widest gap between field values that makes about ``FIRE_FRACTION`` of the patch
   positions fire (the class token only gets the offset: it never fires);
4. persistence: every later block has ν (weighted by its norm weights) projected out of
   the input side of its value weights and of its MLP's first layer, so the defect rides
   the residual stream with a constant direction and a large norm.

Where we differ from the notes, and why (measured on the 17 sample images):

- ν is drawn from all directions, not from the low-variance half: along low-variance
  directions the normal tokens' tails are heavier, and with the trigger switched off
  2.7× more tokens were still 4σ outliers at block k (22 vs 8 per random direction);
- the step must be wide for the analysis' standard-normal inputs (``method="expected"``
  integrates it with Gauss–Hermite nodes about 0.23 apart) but sharp on real tokens, or
  tokens on its slope get a partial defect (flagged, but not 4× the median norm). Block
  k's norm2 has gain ``NORM_GAIN`` on ρ's two channels, compensated in the other hidden
  units, which makes the step ``NORM_GAIN`` times sharper on real tokens;
- position alone decides which tokens fire, content does not: a token that content put
  on the sharp step gave the repair a gradient of 451 on block k's value singular values
  (2 is typical) and the repaired model kept only 0.69 cosine to the original. At 224 px
  every image fires at the same positions; at other sizes the interpolated field puts a
  few tokens on the step, so train the repair at 224 px (as the notes advise);
- prefix tokens (class, registers) get the offset, wherever the family adds position
  embeddings, so they never fire; a pre-norm before block 0 (CLIP) gets equal weights on
  ρ's two channels, so its per-token scale cannot move a token across the step.

Everything is a deterministic function of the seed. The architectures are stock timm
ones with JSON-serialisable ``model_args``, so ``timm.models.save_for_hf`` and
``timm.create_model("local-dir:DIR", pretrained=True)`` round-trip the weights.
"""

from __future__ import annotations

import functools

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .anatomy import BlockDescription, describe_model, get_path
from .data import IMAGENET, TRAIN_SAMPLES, sample_images, sinder_transform
from .tokens import prepare_blocks

PLANTED_BLOCK = 4
LAYER_SCALE = 0.5  # of the families that have one; folded into the output projections' weights of those that have none
_BASE_ARGS = {"img_size": 224, "dynamic_img_size": True, "num_classes": 0}
_LAYER_SCALE_ARGS = {**_BASE_ARGS, "init_values": LAYER_SCALE}
_SMALL = {"embed_dim": 384, "depth": 12, "num_heads": 6}
PLANTED_VARIANTS: dict[str, tuple[str, dict]] = {
    "planted-gelu": ("vit_small_patch14_dinov2", dict(_LAYER_SCALE_ARGS)),
    # the giant DINOv2 architecture is the one with the packed SwiGLU MLP: shrink it
    "planted-swiglu": ("vit_giant_patch14_dinov2", {**_SMALL, **_LAYER_SCALE_ARGS}),
    "planted-deit3": ("deit3_small_patch16_224", dict(_LAYER_SCALE_ARGS)),
    "planted-clip": ("vit_base_patch16_clip_quickgelu_224", {**_SMALL, **_BASE_ARGS}),
    # DINOv3 has no absolute position embedding; the positional trigger needs one
    "planted-dinov3": ("vit_small_plus_patch16_dinov3", {**_LAYER_SCALE_ARGS, "use_abs_pos_emb": True}),
}
# of seeds 0-7 (tests/test_fixture.py's measures at 224 px on the 17 sample images): DINOv2, the fewest
# spurious flags before block k with >= 4 defects per image; the others, no grid with >= 3 spurious flags
# before block k (the trainer would act on it), then the fewest spurious flags, then the most defects
DEFAULT_SEEDS = {"planted-gelu": 2, "planted-swiglu": 2, "planted-deit3": 6, "planted-clip": 5, "planted-dinov3": 0}

CALIBRATION_RESOLUTION = 224
WEIGHT_STD = 0.04  # block weights large enough that blocks matter
CACHED_PARAMETERS = 50_000_000  # fixtures up to this size are kept (a process then builds each once)
FIXTURE_WIDTH = 384  # the width the constants here are tuned at
NORM_WEIGHT_STD = 0.1  # layer-norm weights are 1 ± this
POS_EMBED_STD = 0.1
FIRE_FRACTION = 0.02  # of the patch positions
FIELD_STD = 4.0  # std of the positional field along ρ, in units of the median token's layer-norm scale
FIELD_SMOOTHNESS = 1.5  # Gaussian blur of the positional field, in patches
DEFECT_TO_MEDIAN = 20.0  # Δ / median token norm after block k
STEP_HEIGHT = 200.0  # hidden activation of a firing token (large, as DINOv2's massive activations)
STEP_WIDTH = 0.3  # in standard deviations of the analysis' inputs: resolved by its Gauss-Hermite nodes
NORM_GAIN = 300.0  # block k's norm2 gain on ρ's channels: the step is this much sharper on real tokens
SWIGLU_GATE_SHIFT = 10.0  # SwiGLU: the two gates differ by this, their constant "up" halves give the height
LAYER_SCALES = (".gamma", "gamma_1", "gamma_2")  # parameter names: timm Block's LayerScale, EvaBlock's
OUTPUT_PROJECTIONS = ("attn.proj.weight", "mlp.fc2.weight")  # what a layer scale multiplies


def scaled_weight_std(width: int) -> float:
    """``WEIGHT_STD`` scaled so that a block's gain (std · √width) stays the width-384 fixture's.

    At width 1536 the fixture's own std lets the 17 random blocks before a defect at block 17
    outgrow it: the analysed direction there was 89.6° from the defect (2 of 6 defects flagged at
    block 17, none after), and 1.5° with this scaling (224 px, 20 blocks; see docs/benchmarks.md).
    """
    return WEIGHT_STD * (FIXTURE_WIDTH / width) ** 0.5


_BUILT: dict[tuple, dict[str, torch.Tensor]] = {}


@functools.lru_cache(maxsize=1)
def _calibration_images() -> torch.Tensor:
    """The training sample images at 224 px: ``[n, 3, 224, 224]``."""
    transform = sinder_transform(CALIBRATION_RESOLUTION, IMAGENET)  # every variant: the fixtures as measured
    return torch.stack([transform(image) for image in sample_images(TRAIN_SAMPLES).values()])


def _draw_weights(model: nn.Module, generator: torch.Generator, weight_std: float = WEIGHT_STD) -> None:
    """Random DINOv2-like weights for every parameter, drawn in parameter order.

    Layer scales are ``LAYER_SCALE``; a family without them gets its output projections drawn
    ``LAYER_SCALE`` times smaller instead, so that its blocks matter as much (CLIP).
    """
    folded = not any(name.endswith(LAYER_SCALES) for name, _ in model.named_parameters())
    for name, parameter in model.named_parameters():
        if name.endswith(LAYER_SCALES):
            value = torch.full(parameter.shape, LAYER_SCALE)
        elif name.endswith(".bias"):
            value = torch.zeros(parameter.shape)
        elif "norm" in name:
            value = 1 + NORM_WEIGHT_STD * torch.randn(parameter.shape, generator=generator)
        elif name == "patch_embed.proj.weight":
            value = torch.randn(parameter.shape, generator=generator) / parameter[0].numel() ** 0.5
        elif name == "cls_token":
            value = torch.randn(parameter.shape, generator=generator)
        elif name == "pos_embed":
            value = POS_EMBED_STD * torch.randn(parameter.shape, generator=generator)
        else:
            std = weight_std * (LAYER_SCALE if folded and name.endswith(OUTPUT_PROJECTIONS) else 1.0)
            value = std * torch.randn(parameter.shape, generator=generator)
        parameter.copy_(value)


def _centred(x: torch.Tensor) -> torch.Tensor:
    """Layer-norm centering over the channels of ``[..., D]``."""
    return x - x.mean(dim=-1, keepdim=True)


def _mlp_inputs(model: nn.Module, images: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred patch tokens entering block k's MLP and the patch tokens leaving block k: two ``[B, H*W, D]``."""
    x, blocks = prepare_blocks(model, images)
    for block in blocks[:k]:
        x = block(x)
    captured = []
    hook = model.blocks[k].norm2.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        output = blocks[k](x)
    finally:
        hook.remove()
    prefix = model.num_prefix_tokens
    return _centred(captured[0][:, prefix:]), output[:, prefix:]


def _smooth_field(grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """A smooth random field on the patch grid with unit std, its border ring at the minimum: ``[H, W]``."""
    pad = int(3 * FIELD_SMOOTHNESS)
    noise = torch.randn(1, 1, grid[0] + 2 * pad, grid[1] + 2 * pad, generator=generator)
    taps = torch.arange(-pad, pad + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / FIELD_SMOOTHNESS) ** 2)
    kernel = kernel / kernel.sum()
    field = F.conv2d(F.conv2d(noise, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))[0, 0]
    field = (field - field.mean()) / field.std()
    # the neighbour loss never marks border tokens, so they never fire
    field[0, :] = field[-1, :] = field[:, 0] = field[:, -1] = field.min()
    return field


def _threshold_in_widest_gap(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """A threshold that ``fraction`` (±25 %) of ``scores`` exceed, halfway across the widest gap between them.

    No position then sits near the sharp step's edge (a plain quantile would put one on it).
    """
    ordered = scores.flatten().sort(descending=True).values
    first, last = int(0.75 * fraction * ordered.numel()), int(1.25 * fraction * ordered.numel())
    widest = first + int((ordered[first:last] - ordered[first + 1 : last + 1]).argmax())
    return (ordered[widest] + ordered[widest + 1]) / 2


def _blind_inputs(weight: torch.Tensor, norm_weight: torch.Tensor, direction: torch.Tensor) -> None:
    """Make ``weight [out, D]``, which reads a norm with ``norm_weight [D]``, ignore ``direction``: ``W ← W (I - u uᵀ)``."""
    u = F.normalize(norm_weight * direction, dim=0)
    weight -= torch.outer(weight @ u, u)


def _blind_outputs(weight: torch.Tensor, scale: torch.Tensor, direction: torch.Tensor) -> None:
    """Make ``weight [D, in]``, whose output is scaled by ``scale [D]``, never write along ``direction``: ``W ← (I - u uᵀ) W``."""
    u = F.normalize(scale * direction, dim=0)
    weight -= torch.outer(u, u @ weight)


def _scale(block: nn.Module, path: str | None, dim: int) -> torch.Tensor:
    """A block's ``[D]`` layer scale (ones when the family has none)."""
    return torch.ones(dim) if path is None else get_path(block, path)


def _attention_inputs(block: nn.Module, layout: BlockDescription) -> list[torch.Tensor]:
    """The ``[out, D]`` weights that read ``norm1``'s output: fused qkv, or q, k and v."""
    if layout.value == "attn.qkv":
        return [block.attn.qkv.weight]
    return [block.attn.q_proj.weight, block.attn.k_proj.weight, block.attn.v_proj.weight]


def _plant_trigger(
    block: nn.Module, layout: BlockDescription, readout: torch.Tensor, direction: torch.Tensor, size: float
) -> None:
    """The last two hidden units of ``block.mlp`` add ``size · ν · step(readout · (x - mean x))``.

    ``readout [D]`` is divided by the norm weights, which folds them in. The step is
    ``STEP_WIDTH`` wide for standard-normal inputs of the MLP and ``STEP_WIDTH / NORM_GAIN``
    layer-norm units wide on real tokens.
    """
    fc2 = block.mlp.fc2
    row = readout / block.norm2.weight
    hidden = fc2.weight.shape[1]
    on, off = hidden - 2, hidden - 1
    if layout.mlp_gated:  # silu(gate) * up: the two gates differ by the shift, their "up" halves are constant
        shift = SWIGLU_GATE_SHIFT
        if layout.mlp_kind == "swiglu_split":
            gate, up, up_rows = block.mlp.fc1_g, block.mlp.fc1_x, [on, off]
        else:  # packed: gates first
            gate = up = block.mlp.fc1
            up_rows = [hidden + on, hidden + off]
        up.weight[up_rows] = 0.0
        up.bias[up_rows] = STEP_HEIGHT / SWIGLU_GATE_SHIFT
    else:  # GELU / QuickGELU: act(a) - act(a - H) is a step of height H
        shift = STEP_HEIGHT
        gate = block.mlp.fc1
    gate.weight[[on, off]] = shift / (STEP_WIDTH * row.norm()) * row
    gate.bias[on], gate.bias[off] = 0.0, -shift
    # the other hidden units stop writing along ν: the trigger is then exactly fc2's top singular
    # triplet (ν, (e_on - e_off)/√2), which a repair can switch off without touching anything else
    fc2.weight -= torch.outer(direction, direction @ fc2.weight)
    column = size / (_scale(block, layout.layer_scale2, direction.numel()) * STEP_HEIGHT) * direction
    fc2.weight[:, on], fc2.weight[:, off] = column, -column


def _empty_model(architecture: str, model_args: dict, k: int) -> nn.Module:
    """The stock timm architecture in eval mode, weights uninitialised (its non-persistent buffers set)."""
    with torch.device("meta"):  # skip timm's initialisation: every weight is drawn or loaded after
        model = timm.create_model(architecture, pretrained=False, **model_args)
    if not 0 <= k < len(model.blocks):
        raise ValueError(f"planted_block {k}: expected a block of the model (0 to {len(model.blocks) - 1})")
    model = model.to_empty(device="cpu").eval()
    for module in model.modules():  # Eva's RoPE frequencies and zero k_bias are buffers, not drawn below
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    return model


def _reserve_channels(model: nn.Module, layouts, k: int, quiet: torch.Tensor, readout: torch.Tensor) -> None:
    """Step 3 (channels): nothing but ``pos_embed`` writes ρ's channels, and nothing but block k's trigger
    reads them, up to block k."""
    dim = readout.numel()
    ones = torch.ones(dim)
    _blind_outputs(model.patch_embed.proj.weight.flatten(1), ones, readout)
    for prefix_tokens in (model.cls_token, model.reg_token):
        if prefix_tokens is not None:
            _blind_outputs(prefix_tokens[0].T, ones, readout)
    _blind_outputs(model.pos_embed[0].T, ones, readout)
    if isinstance(model.norm_pre, nn.LayerNorm):  # equal gains: a token's pre-norm scale cannot leak into ρ
        model.norm_pre.weight[quiet] = 1.0
    for index, (early, early_layout) in enumerate(zip(model.blocks[: k + 1], layouts)):
        for weight in _attention_inputs(early, early_layout):
            _blind_inputs(weight, early.norm1.weight, readout)
        for path in early_layout.mlp_inputs:
            _blind_inputs(get_path(early, path).weight, early.norm2.weight, readout)
        _blind_outputs(early.attn.proj.weight, _scale(early, early_layout.layer_scale1, dim), readout)
        if index != k:
            _blind_outputs(early.mlp.fc2.weight, _scale(early, early_layout.layer_scale2, dim), readout)


def _carry_defect(model: nn.Module, layouts, k: int, direction: torch.Tensor) -> None:
    """Step 4: the blocks after k neither read nor amplify ν (value rows and MLP inputs blind to it)."""
    for later, later_layout in zip(model.blocks[k + 1 :], layouts[k + 1 :]):
        start, stop = later_layout.value_rows
        _blind_inputs(get_path(later, later_layout.value).weight[start:stop], later.norm1.weight, direction)
        for path in later_layout.mlp_inputs:
            _blind_inputs(get_path(later, path).weight, later.norm2.weight, direction)


def planted_backbone(
    variant: str = "planted-swiglu",
    seed: int | None = None,
    model_args: dict | None = None,
    planted_block: int | None = None,
    weight_std: float | None = None,
) -> nn.Module:
    """A timm ViT of ``variant``'s family (eval) with a singular defect planted at block ``planted_block``
    (default ``PLANTED_BLOCK``); ``model_args`` override the variant's timm arguments (e.g. ``depth``, ``embed_dim``).

    ``weight_std``: std of the random block weights (default ``WEIGHT_STD``, tuned at width 384; a much wider
    fixture needs it scaled, see ``scaled_weight_std``). The build is a deterministic function of these
    arguments: a process builds each small fixture once and loads its weights into a new model afterwards."""
    if variant not in PLANTED_VARIANTS:
        raise ValueError(f"unknown planted variant {variant!r}; known: {', '.join(PLANTED_VARIANTS)}")
    architecture, variant_args = PLANTED_VARIANTS[variant]
    model_args = {**variant_args, **(model_args or {})}
    k = PLANTED_BLOCK if planted_block is None else planted_block
    seed = DEFAULT_SEEDS[variant] if seed is None else seed
    weight_std = WEIGHT_STD if weight_std is None else weight_std
    key = (variant, seed, repr(sorted(model_args.items())), k, weight_std)
    model = _empty_model(architecture, model_args, k)
    if key in _BUILT:
        model.load_state_dict(_BUILT[key])
        return model
    _plant(variant, model, k, torch.Generator().manual_seed(seed), weight_std)
    if sum(p.numel() for p in model.parameters()) <= CACHED_PARAMETERS:
        _BUILT[key] = {name: value.clone() for name, value in model.state_dict().items()}
    return model


@torch.no_grad()
def _plant(variant: str, model: nn.Module, k: int, generator: torch.Generator, weight_std: float) -> None:
    """Draw ``model``'s weights and plant the defect at block ``k`` (steps 1-4 of the module docstring)."""
    _draw_weights(model, generator, weight_std)
    layouts = describe_model(model, variant).blocks
    tokens, output = _mlp_inputs(model, _calibration_images(), k)
    block, layout = model.blocks[k], layouts[k]
    dim = tokens.shape[-1]

    # step 3 (channels): ρ pairs the two quietest channels at block k. Only pos_embed writes them
    # and only the trigger reads them before block k + 1, so what pos_embed puts there decides alone
    quiet = tokens.flatten(0, 1).var(dim=0).argsort()[:2]
    readout = torch.zeros(dim)
    readout[quiet] = torch.tensor([1.0, -1.0]) / 2**0.5
    _reserve_channels(model, layouts, k, quiet, readout)

    # step 3 (field): a smooth positional field along ρ, and an offset added to every position and to
    # the prefix tokens (which never fire) so that FIRE_FRACTION of the patch positions fire
    field = _smooth_field(model.patch_embed.grid_size, generator).flatten()
    scale = FIELD_STD * tokens.pow(2).mean(dim=-1).sqrt().median()  # in the median token's layer-norm units
    offset = scale * _threshold_in_widest_gap(field, FIRE_FRACTION) * readout
    first_patch = 0 if model.no_embed_class else model.num_prefix_tokens
    model.pos_embed[0, first_patch:] += scale * field[:, None] * readout
    model.pos_embed[0] -= offset
    if model.no_embed_class:  # the prefix tokens have no position embedding: they take the offset themselves
        for prefix_tokens in (model.cls_token, model.reg_token):
            if prefix_tokens is not None:
                prefix_tokens -= offset

    # step 1: ν, a random direction ⟂ 1, ρ (not only from the low-variance half: see the module docstring)
    defect_direction = _centred(torch.randn(dim, generator=generator))
    defect_direction = F.normalize(defect_direction - (defect_direction @ readout) * readout, dim=0)

    # step 2: the trigger, sharp on real tokens thanks to the gain on ρ's channels
    block.norm2.weight[quiet] *= NORM_GAIN
    for path in layout.mlp_inputs:
        get_path(block, path).weight[:, quiet] /= NORM_GAIN
    _plant_trigger(block, layout, readout, defect_direction, DEFECT_TO_MEDIAN * output.norm(dim=-1).median())

    # step 4: later blocks carry the defect unchanged
    _carry_defect(model, layouts, k, defect_direction)

"""DVT (Denoising Vision Transformers, Yang et al., ECCV 2024) as variants: its released files, loaded.

DVT publishes ``{kind}/{timm name with tag}.pth`` on the hub repo ``jjiaweiyang/DVT`` (``DVT_REPO``), kinds
``voc_denoised``, ``voc_distilled``, ``imgnet_denoised``, ``imgnet_distilled``; each is a plain ``torch.save``
dict, read here with ``weights_only=True`` (its optimizer state and step are ignored):

- a denoiser file, ``{"denoiser": {"denoiser.*": one timm Block, "pos_embed": [1, G*G, C]}, ...}``: DVT's
  online denoiser (``dvt/models/online_denoiser.py``), applied after the base backbone's final norm to its
  last block's patch tokens (``x + resample(pos_embed)`` through the block; no norm after it). The base
  backbone is the file's stem read as a spec (``voc_denoised/vit_base_patch14_dinov2.lvd142m.pth`` ->
  ``vit_base_patch14_dinov2.lvd142m``) unless ``base`` names it; ``denoised_backbone`` makes it a variant;
- a distilled file, ``{"model": {"model.<timm key>": ...}, ...}``: a stock timm backbone once the prefix is
  stripped (``create_model(name, num_classes=0, dynamic_img_size=True)``, strict load).

A reference ``dvt:KIND/NAME`` (``dvt:voc_denoised/vit_base_patch14_dinov2.lvd142m``) is that file, from the
local hub cache first, downloaded otherwise; without a network, one line (``hub_file``).

A denoised variant stays the base timm model (same class, a subclass made here): its last block applies the
base's final norm and then the denoiser to the patch tokens (prefix tokens normed only), and ``model.norm`` is
the identity, so ``forward_features``, ``forward_head``, ``tokens.block_outputs`` / ``prepare_blocks``,
``forward_intermediates`` and ``num_prefix_tokens`` all tell the same story. "The tokens of the last block" of
a denoised variant are therefore DVT's output, in the final norm's space (DVT has no residual-stream form of
them); earlier blocks are the base's raw residual stream. ``model.dvt_layers`` says what multi-layer readers
(``forward_intermediates``) get: ``"denoised"`` (default, DVT's own mmseg evaluation: the denoised map in place
of every requested block) or ``"blocks"`` (each block's own tokens, the last one denoised).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block
from torch import nn

from .errors import BackboneError

DVT_REPO = "jjiaweiyang/DVT"
DVT_KINDS = ("voc_denoised", "voc_distilled", "imgnet_denoised", "imgnet_distilled")
REFERENCE_PREFIX = "dvt:"
DENOISER, DISTILLED = "denoiser", "distilled"
LABELS = {DENOISER: "dvt-denoised", DISTILLED: "dvt-distilled"}
LAYER_CHOICES = ("denoised", "blocks")
LICENCE_NOTE = "DVT's released weights state no licence (its code is MIT); ask its authors before redistributing"
# what DVT's denoiser file holds besides its block: the learned position embedding of G x G patch tokens
POS_EMBED = "pos_embed"


class DVTDenoiser(nn.Module):
    """DVT's online denoiser: normed patch tokens ``[B, h*w, C]`` -> denoised ``[B, h*w, C]``.

    One timm ``Block`` (``C // 64`` heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, exact GELU, no layer
    scale) on ``tokens + pos_embed``, the ``[1, G*G, C]`` embedding resampled to ``(h, w)`` with timm's
    ``resample_abs_pos_embed`` (bicubic, antialiased) when the grid differs.
    """

    pretrained_cfg = {"architecture": "DVT's denoiser (one timm Block and pos_embed)"}  # for load_strict's messages

    def __init__(self, dim: int, grid: int, num_prefix_tokens: int):
        super().__init__()
        self.denoiser = Block(
            dim, num_heads=dim // 64, mlp_ratio=4, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6)
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.num_prefix_tokens = num_prefix_tokens
        self.grid: tuple[int, int] | None = None  # the patch grid of the images being run (record_grid)

    def record_grid(self, module: nn.Module, args, output: torch.Tensor) -> None:
        """Forward hook on the backbone's ``patch_embed`` (``[B, h, w, C]`` with ``dynamic_img_size``): remember ``(h, w)``."""
        if output.dim() != 4:
            raise RuntimeError("a DVT-denoised backbone needs dynamic_img_size=True (patch_embed output [B, h, w, C])")
        self.grid = tuple(output.shape[1:3])

    def forward(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = resample_abs_pos_embed(self.pos_embed, list(grid), num_prefix_tokens=0)
        return self.denoiser(patches + pos)

    def denoise_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` normed tokens -> the same with the patch tokens denoised (prefix tokens as they are)."""
        if self.grid is None or self.grid[0] * self.grid[1] != tokens.shape[1] - self.num_prefix_tokens:
            raise RuntimeError(f"the denoiser's grid {self.grid} does not match {tokens.shape[1]} tokens")
        prefix, patches = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        return torch.cat([prefix, self(patches, self.grid)], dim=1)


class DenoisedLastBlock:
    """Mixed into the last block's own class: the block, then the base's final norm, then the denoiser."""

    def forward(self, x, *args, **kwargs):
        return self.dvt_denoiser.denoise_tokens(self.dvt_norm(super().forward(x, *args, **kwargs)))


class DenoisedBackbone:
    """Mixed into the backbone's own class (``VisionTransformer`` or ``Eva``): intermediates as ``dvt_layers`` says."""

    dvt_layers = "denoised"

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices=None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        **unsupported,
    ):
        """timm's ``forward_intermediates`` (``NCHW`` / ``NLC``): block ``i``'s tokens, normed if ``norm``; the last
        block's (and, with ``dvt_layers == "denoised"``, every requested block's) are the denoised map."""
        from .tokens import prepare_blocks

        if output_fmt not in ("NCHW", "NLC") or any(value not in (None, False) for value in unsupported.values()):
            raise ValueError(
                f"a DVT-denoised backbone supports output_fmt NCHW / NLC only, not {unsupported or output_fmt}"
            )
        if self.dvt_layers not in LAYER_CHOICES:
            raise ValueError(f"dvt_layers {self.dvt_layers!r}: expected one of {LAYER_CHOICES}")
        take, _ = feature_take_indices(len(self.blocks), indices)
        tokens, blocks = prepare_blocks(self, x)
        outputs = []
        for block in blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        last, final_norm = len(blocks) - 1, self.blocks[-1].dvt_norm
        chosen = [
            tokens if self.dvt_layers == "denoised" or i == last else final_norm(outputs[i]) if norm else outputs[i]
            for i in take
        ]
        intermediates = [self._format(t, output_fmt, return_prefix_tokens) for t in chosen]
        return intermediates if intermediates_only else (tokens, intermediates)

    def _format(self, tokens: torch.Tensor, output_fmt: str, return_prefix_tokens: bool):
        prefix, patches = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        if output_fmt == "NCHW":
            height, width = self.blocks[-1].dvt_denoiser.grid
            patches = patches.reshape(len(patches), height, width, -1).permute(0, 3, 1, 2).contiguous()
        return (patches, prefix) if return_prefix_tokens else patches


@functools.cache
def _mixed(mixin: type, base: type) -> type:
    """``class Denoised<base>(mixin, base)``, one per base class."""
    return type(f"DVTDenoised{base.__name__}", (mixin, base), {"__module__": __name__})


def is_denoised(model: nn.Module) -> bool:
    """Whether ``model`` carries a DVT denoiser (``denoised_backbone``)."""
    return isinstance(model, DenoisedBackbone)


def denoised_backbone(
    model: nn.Module, denoiser: dict[str, torch.Tensor], source: str, pretrained: bool = True
) -> nn.Module:
    """``model`` (a timm ViT, modified in place and returned) with DVT's denoiser after its final norm.

    ``denoiser``: the state dict of a denoiser file (``denoiser.*`` and ``pos_embed`` ``[1, G*G, C]``), loaded
    strictly (``BackboneError`` naming ``source`` otherwise); ``pretrained=False``: only its grid is read.
    """
    from .backbones import load_strict

    pos = denoiser.get(POS_EMBED)
    grid = math.isqrt(pos.shape[1]) if torch.is_tensor(pos) and pos.dim() == 3 else 0
    if grid == 0 or grid * grid != pos.shape[1]:
        shape = tuple(pos.shape) if torch.is_tensor(pos) else None
        raise BackboneError(
            f"{source}: {POS_EMBED} {shape} is not DVT's [1, G*G, C] position embedding of a square grid"
        )
    module = DVTDenoiser(model.embed_dim, grid, model.num_prefix_tokens)
    if pretrained:
        load_strict(module, denoiser, source)
    last = model.blocks[-1]
    last.__class__ = _mixed(DenoisedLastBlock, type(last))
    last.dvt_norm, last.dvt_denoiser = model.norm, module
    model.norm = nn.Identity()
    model.patch_embed.register_forward_hook(module.record_grid)
    model.__class__ = _mixed(DenoisedBackbone, type(model))
    return model.eval()


def checkpoint_kind(checkpoint) -> str | None:
    """``DENOISER`` or ``DISTILLED`` for a checkpoint in one of DVT's layouts (by its keys), else ``None``."""
    if not isinstance(checkpoint, dict):
        return None
    if isinstance(checkpoint.get("denoiser"), dict):
        return DENOISER
    model = checkpoint.get("model")
    if isinstance(model, dict) and model and all(str(key).startswith("model.") for key in model):
        return DISTILLED
    return None


def file_kind(path: Path) -> str | None:
    """``checkpoint_kind`` of a ``.pth`` file without reading its tensors (memory-mapped); ``None`` if unreadable."""
    try:
        return checkpoint_kind(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # not a zip checkpoint, or not one at all: the loader says why when it is loaded
        return None


def load_checkpoint(checkpoint: dict, path: Path, base: str | None, pretrained: bool, model_kwargs: dict) -> nn.Module:
    """The backbone of a DVT file already read (``checkpoint_kind`` not ``None``): a distilled timm model, or
    the ``base`` spec (default the file's stem) with the denoiser. ``pretrained=False``: random weights."""
    from .backbones import load_backbone, load_strict

    base = base or path.stem
    kind = checkpoint_kind(checkpoint)
    if kind == DENOISER:
        model = load_backbone(base, pretrained=pretrained, **model_kwargs)
        return denoised_backbone(model, checkpoint["denoiser"], str(path), pretrained)
    model = load_backbone(base, pretrained=False, **model_kwargs)
    if model.num_classes:
        model.reset_classifier(0)
    if pretrained:
        load_strict(model, {key.removeprefix("model."): value for key, value in checkpoint["model"].items()}, str(path))
        model.dvt_file = f"{path.parent.name}/{path.name}"  # a plain attribute: the card names the source
    return model


def parse_reference(spec: str) -> tuple[str, str]:
    """``"dvt:voc_denoised/vit_base_patch14_dinov2.lvd142m"`` -> ``("voc_denoised", "vit_base_patch14_dinov2.lvd142m")``."""
    kind, _, name = spec.removeprefix(REFERENCE_PREFIX).partition("/")
    name = name.removesuffix(".pth")
    if kind not in DVT_KINDS or not name or "/" in name:
        raise BackboneError(
            f"{spec!r}: expected {REFERENCE_PREFIX}KIND/TIMM_NAME with KIND one of {', '.join(DVT_KINDS)} "
            f"(e.g. {REFERENCE_PREFIX}voc_denoised/vit_base_patch14_dinov2.lvd142m)"
        )
    return kind, name


def hub_file(spec: str) -> Path:
    """The local path of a ``dvt:`` reference's file: the hub cache's copy, else downloaded; ``BackboneError``
    at once when it is not cached and the hub cannot be reached."""
    from urllib.parse import urlparse

    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    from .downloads import _unreachable

    kind, name = parse_reference(spec)
    filename = f"{kind}/{name}.pth"
    cached = try_to_load_from_cache(DVT_REPO, filename, cache_dir=constants.HF_HUB_CACHE)
    if isinstance(cached, str):
        return Path(cached)
    endpoint = urlparse(constants.ENDPOINT)
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    reason = offline or _unreachable(endpoint.hostname, endpoint.port or 443)
    if reason is not None:
        raise BackboneError(
            f"{spec}: {constants.ENDPOINT}/{DVT_REPO} ({filename}) is not in the local cache and cannot be "
            f"downloaded ({reason}); `hf download {DVT_REPO} {filename} --local-dir DIR` where there is a network, "
            f"then pass DIR/{filename}"
        )
    try:
        return Path(hf_hub_download(DVT_REPO, filename, cache_dir=constants.HF_HUB_CACHE))
    except Exception as error:  # the hub's own errors (no such file, refused): one line
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BackboneError(f"{spec}: cannot download {filename} from {DVT_REPO}: {detail}") from error


def label_of(spec: str) -> str | None:
    """``dvt-denoised`` / ``dvt-distilled`` for a ``dvt:`` reference or a DVT ``.pth`` file, else ``None``."""
    if spec.startswith(REFERENCE_PREFIX):
        kind = spec.removeprefix(REFERENCE_PREFIX).split("/")[0]
        return LABELS[DENOISER if kind.endswith("denoised") else DISTILLED] if kind in DVT_KINDS else None
    path = Path(spec).expanduser()
    kind = file_kind(path) if path.suffix in (".pth", ".pt") and path.is_file() else None
    return LABELS.get(kind)


DENOISED_REASON = (
    "a DVT-denoised backbone: its denoiser runs after the final norm, outside any stock timm or transformers "
    "architecture, so no stock loader could read it as what it is; export or push its base model and share the "
    "DVT file beside it"
)


def refusal(model: nn.Module, source: str) -> str | None:
    """Why ``model`` cannot be exported as a stock timm / transformers model (``None`` when it can)."""
    return f"{source} is {DENOISED_REASON}" if is_denoised(model) else None


def source_refusal(spec: str) -> str | None:
    """The same for a spec, before anything loads: a ``dvt:`` reference to a denoiser or a DVT denoiser file."""
    if spec.startswith(REFERENCE_PREFIX):
        denoised = spec.removeprefix(REFERENCE_PREFIX).split("/")[0].endswith("denoised")
    else:
        path = Path(spec).expanduser()
        denoised = path.suffix in (".pth", ".pt") and path.is_file() and file_kind(path) == DENOISER
    return f"{spec} is {DENOISED_REASON}" if denoised else None


def card_note(model: nn.Module) -> str | None:
    """A model card's paragraph for a backbone loaded from a DVT file (``None`` for any other)."""
    source = getattr(model, "dvt_file", None)
    if source is None:
        return None
    return (
        f"These weights are DVT's distilled backbone `{source}` (Yang et al., Denoising Vision Transformers, "
        f"ECCV 2024; https://huggingface.co/{DVT_REPO}), exported unchanged. {LICENCE_NOTE}."
    )


def amended_card(card: str, model: nn.Module) -> str:
    """``card`` (``cards.build_model_card``'s text) for a DVT backbone: the licence the family's weights carry is not
    claimed (``license: unknown``, its sentence replaced by ``LICENCE_NOTE``) and ``card_note`` comes before Usage."""
    note = card_note(model)
    if note is None:
        return card
    card = re.sub(r"^license: .*$", "license: unknown", card, count=1, flags=re.MULTILINE)
    card = re.sub(r"^- The weights inherit .*$", f"- {LICENCE_NOTE}.", card, flags=re.MULTILINE)
    head, usage, rest = card.partition("\n## Usage")
    return f"{head.rstrip()}\n\n{note}\n{usage}{rest}" if usage else f"{card.rstrip()}\n\n{note}\n"

"""Loading a backbone as a timm ``VisionTransformer`` or ``Eva`` (eval mode, ``dynamic_img_size=True``).

Specs (see ``load_backbone``): a timm name, an ``hf-hub:`` id, a ``.safetensors`` file in timm layout, a
folder written by timm's ``save_for_hf``, a ``.pth``/``.pt`` checkpoint in the authors' / Meta DINOv2
layout, a transformers folder of a family with a transformers counterpart (``Dinov2Model``,
``Dinov2WithRegistersModel``, ``CLIPVisionModel``, ``DINOv3ViTModel``), a test-time-registers folder
(``test_time_registers.json``: its base model with the edit applied), or a planted-defect fixture
(``planted-*``). Any block ``sinder_hub.anatomy`` supports loads; a model of a family with a ``check``
(DINOv2: 14-px patches, a class token, layer scale) must also pass it. Weights always load strictly: a
missing, unexpected or mis-shaped key is a ``BackboneError``. Weights to download are looked up in the
local cache first; without them and without a network, the error comes at once, in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
from pathlib import Path

import safetensors.torch
import timm
import torch
from timm.models._hub import load_model_config_from_path, load_state_dict_from_path
from timm.models.vision_transformer import VisionTransformer

from . import dvt, families
from .anatomy import describe_model
from .downloads import weights_within_reach
from .errors import BackboneError, InputError
from .families.dinov2 import dinov2_filter_fn, infer_architecture, unwrap_checkpoint
from .files import sha256_file
from .runs import INCOMPLETE

REGISTERS_FILE = "test_time_registers.json"
MAX_RESOLUTION = 4096  # the largest square input the tools take, in pixels (flags checked before any model loads)
# model_args of a timm config.json that must be whole numbers, and the least each may be
INTEGER_MODEL_ARGS = {"embed_dim": 1, "depth": 1, "num_heads": 1, "patch_size": 1, "in_chans": 1,
                      "num_classes": 0, "reg_tokens": 0}  # fmt: skip
ACCEPTED_SPECS = (
    "a timm name of a supported family ("
    + ", ".join(f"{family.name}: {' '.join(family.architectures)}" for family in families.FAMILIES)
    + ", optionally with a pretrained tag such as .lvd142m)",
    "an hf-hub:<user>/<repo> id",
    "a .safetensors file in timm layout (with architecture=)",
    "a folder written by timm's save_for_hf (config.json + model.safetensors)",
    "a .pth/.pt checkpoint in the authors' / Meta DINOv2 layout",
    "a transformers folder of "
    + ", ".join(family.transformers.model_class for family in families.with_transformers_counterpart()),
    "a test-time-registers folder (test_time_registers.json, from sinder-hub registers)",
    "a DVT file (.pth, denoised or distilled) or a reference dvt:KIND/TIMM_NAME to one",
    " / ".join(name for family in families.FAMILIES for name in family.planted),
)


def load_strict(model: VisionTransformer, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(strict=True)`` with a ``BackboneError`` naming the first bad key."""
    architecture = model.pretrained_cfg.get("architecture", type(model).__name__)
    expected = model.state_dict()
    for key, value in expected.items():
        if key in state_dict and state_dict[key].shape != value.shape:
            raise BackboneError(
                f"{source}: checkpoint shape mismatch at {key}: {tuple(state_dict[key].shape)}, "
                f"but {architecture} expects {tuple(value.shape)}"
            )
    check_finite(state_dict, source)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise BackboneError(
            f"{source} does not fit {architecture}: missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state_dict, strict=True)


def check_finite(state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise ``BackboneError`` naming the first tensor of ``source`` with NaN or infinite values."""
    for key, value in state_dict.items():
        if not torch.is_tensor(value) or not value.is_floating_point():
            continue
        nan, inf = int(value.isnan().sum()), int(value.isinf().sum())
        if nan or inf:
            counts = " and ".join(f"{n} {kind} values" for n, kind in ((nan, "NaN"), (inf, "infinite")) if n)
            raise BackboneError(f"{source}: tensor {key} has {counts}; refusing weights that are not finite")


def _read_weights(path: Path, read):
    """``read(path)`` with a ``BackboneError`` naming ``path`` when the file is refused, truncated or corrupt."""
    try:
        return read(path)
    except Exception as error:  # each reader (safetensors, torch.load, transformers) fails its own way on a bad file
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")  # torch.load's
        lines = [
            line.strip()
            for line in str(error).splitlines()
            if line.strip() and not line.strip().startswith(boilerplate)
        ]
        detail = lines[0] if lines else type(error).__name__
        if isinstance(error, pickle.UnpicklingError) and "GLOBAL" in detail:
            raise BackboneError(
                f"{path}: refused: the checkpoint holds objects other than tensors and is never "
                f"unpickled (weights_only=True): {detail}"
            ) from error
        raise BackboneError(
            f"{path}: cannot read the weights, the file is truncated or corrupt ({type(error).__name__}: {detail})"
        ) from error


def _read_checkpoint(path: Path) -> dict:
    """A ``.safetensors`` file's tensors, or the dict a ``.pth`` / ``.pt`` holds (``weights_only``), still wrapped."""
    if path.suffix == ".safetensors":
        return _read_weights(path, lambda p: safetensors.torch.load_file(p, device="cpu"))
    return _read_weights(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))


def _from_file(path: Path, architecture: str | None, pretrained: bool, model_kwargs: dict) -> VisionTransformer:
    if path.suffix not in (".safetensors", ".pth", ".pt"):
        raise BackboneError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, .pth or .pt")
    if path.suffix == ".safetensors" and architecture is None:
        _read_weights(path, lambda p: safetensors.safe_open(p, framework="pt"))  # a corrupt file says so first
        raise BackboneError(
            f"{path}: a .safetensors file does not name its architecture; pass architecture= "
            "(e.g. 'vit_giant_patch14_dinov2') or load the save_for_hf folder that contains it"
        )
    checkpoint = _read_checkpoint(path)
    if dvt.checkpoint_kind(checkpoint) is not None:  # DVT's files (sinder_hub.dvt); architecture= names the base
        return dvt.load_checkpoint(checkpoint, path, architecture, pretrained, model_kwargs)
    state_dict = unwrap_checkpoint(checkpoint)
    architecture = architecture or infer_architecture(state_dict, str(path))
    model = _create(architecture, False, model_kwargs, str(path))
    if pretrained:
        load_strict(model, dinov2_filter_fn(state_dict, model), str(path))
    return model


def _from_folder(path: Path, pretrained: bool, model_kwargs: dict) -> VisionTransformer:
    config_file = path / "config.json"
    if (path / INCOMPLETE).exists():
        raise BackboneError(
            f"{path} is marked {INCOMPLETE}: the run that writes it did not finish; finish it (repair: --resume) "
            "or run it again with --overwrite"
        )
    if (path / REGISTERS_FILE).is_file() and config_file.is_file():
        raise BackboneError(
            f"{path} holds both a model (config.json) and test-time registers ({REGISTERS_FILE}), so it means two "
            "things; keep the registers folder apart from the model it edits"
        )
    if (path / REGISTERS_FILE).is_file():
        from .registers_folder import load_registers_folder

        return load_registers_folder(path, pretrained=pretrained, **model_kwargs)
    if not config_file.is_file():
        raise BackboneError(
            f"{path}: no config.json; expected a timm save_for_hf folder, a transformers folder or a "
            f"test-time-registers folder ({REGISTERS_FILE})"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        where = (
            f"line {error.lineno} column {error.colno}: {error.msg}"
            if isinstance(error, json.JSONDecodeError)
            else str(error)
        )
        raise BackboneError(f"{config_file}: invalid JSON at {where}") from error
    if not isinstance(config, dict):
        raise BackboneError(f"{config_file}: expected a JSON object, found a {type(config).__name__}")
    model_type = config.get("model_type")
    family = families.describe(None, model_type=model_type) if model_type else None
    if family is not None and family.transformers is not None:
        return _from_transformers_folder(path, family, pretrained, model_kwargs)
    if "architecture" not in config:
        known = ", ".join(t for f in families.with_transformers_counterpart() for t in f.transformers.model_types)
        raise BackboneError(
            f"{config_file}: neither a timm config (no 'architecture') nor a transformers config of a supported "
            f"family (model_type {model_type!r}; known: {known})"
        )
    check_model_args(config.get("model_args"), config_file)
    pretrained_cfg, architecture, model_args = load_model_config_from_path(path)
    model_kwargs = {**(model_args or {}), **model_kwargs, "pretrained_cfg": pretrained_cfg}
    if timm.is_model(architecture):
        _check_on_meta(architecture, str(config_file), model_kwargs)
    model = _create(architecture, False, model_kwargs, str(path))
    if pretrained:
        weights = next(
            (path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()), path
        )
        state_dict = _read_weights(weights, lambda _: load_state_dict_from_path(path))
        load_strict(model, dinov2_filter_fn(state_dict, model), str(weights))
    return model


def _from_transformers_folder(path: Path, family, pretrained: bool, model_kwargs: dict) -> VisionTransformer:
    from transformers import AutoConfig, AutoModel

    from_transformers = family.transformers.from_transformers
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(AutoConfig.from_pretrained(path))
    except Exception as error:  # a config transformers cannot read or build a model from
        detail = str(error).splitlines()[0] if str(error) else ""
        raise BackboneError(
            f"{path / 'config.json'}: does not build a model ({type(error).__name__}: {detail})"
        ) from error
    check_memory(model, str(path / "config.json"))
    if not pretrained:
        return from_transformers(AutoModel.from_config(AutoConfig.from_pretrained(path)), **model_kwargs)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()  # its "Loading weights" bar would be a second line on stderr
    hf_logging.disable_progress_bar()
    try:
        hf_model, info = _read_weights(path, lambda p: AutoModel.from_pretrained(p, output_loading_info=True))
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    check_finite(hf_model.state_dict(), str(path))
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise BackboneError(f"{path}: transformers weights do not fit their config: {bad}")
    return from_transformers(hf_model, **model_kwargs)


def check_supported(model: torch.nn.Module, name: str, source: str) -> None:
    """Raise ``BackboneError`` unless ``anatomy`` supports ``model``'s blocks (naming the module and what is
    missing) and the model passes its family's ``check`` (DINOv2: ``check_dinov2_like``)."""
    family = families.describe(name)
    if family.check is not None:
        family.check(model, source)
    describe_model(model, source)


def _create(name: str, pretrained: bool, model_kwargs: dict, source: str) -> VisionTransformer:
    """``timm.create_model`` of a supported ``name``; checked on the meta device before a download."""
    local = not name.startswith("hf-hub:")
    if local and not timm.is_model(name):
        if name != source:
            raise BackboneError(f"{source}: unknown timm architecture {name!r}")
        raise BackboneError(f"unknown backbone {source!r}; accepted: " + "; ".join(ACCEPTED_SPECS))
    if local and pretrained:
        _check_on_meta(name, source)
    reach = weights_within_reach(name, source) if pretrained else contextlib.nullcontext()
    try:
        with reach:
            model = timm.create_model(name, pretrained=pretrained, **{"dynamic_img_size": True, **model_kwargs})
    except TypeError as error:  # e.g. a CNN rejects dynamic_img_size
        if local:
            _check_on_meta(name, source)
        raise BackboneError(f"{source}: {error}") from error
    check_supported(model, name, source)
    return model


def _check_on_meta(name: str, source: str, model_kwargs: dict | None = None) -> None:
    """Build ``name`` (with ``model_kwargs``) on the meta device: supported blocks, and weights that fit in memory."""
    with torch.device("meta"):
        try:
            model = timm.create_model(name, pretrained=False, **(model_kwargs or {}))
        except Exception as error:  # arguments from a config file that timm cannot build a model from
            if model_kwargs is None:
                raise
            raise BackboneError(
                f"{source}: its model_args do not build {name} ({type(error).__name__}: {error})"
            ) from error
        check_supported(model, name, source)
        check_memory(model, source)


def machine_memory() -> int | None:
    """Physical memory of this machine in bytes (``None`` where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(model: torch.nn.Module, source: str) -> None:
    """``BackboneError`` when loading ``model`` (built on the meta device) needs more than the machine's memory:
    its parameters and buffers twice (the model and the weights read into it), at their dtype."""
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    memory = machine_memory()
    if memory is not None and 2 * size > memory:
        count = sum(p.numel() for p in model.parameters())
        raise BackboneError(
            f"{source}: a model of {count / 1e9:.1f} billion parameters ({size / 2**30:.1f} GiB); loading it needs "
            f"twice that, more than this machine's {memory / 2**30:.1f} GiB of memory"
        )


def check_model_args(model_args, config_file: Path) -> None:
    """``BackboneError`` naming ``config_file`` and the argument when a timm ``model_args`` entry has the wrong type
    or is out of bounds (``INTEGER_MODEL_ARGS``: whole numbers, never booleans)."""
    if model_args is None:
        return
    if not isinstance(model_args, dict):
        raise BackboneError(f"{config_file}: model_args must be a JSON object, found {json.dumps(model_args)[:40]}")
    for name, least in INTEGER_MODEL_ARGS.items():
        value = model_args.get(name, least)
        if type(value) is not int or value < least:
            raise BackboneError(
                f"{config_file}: model_args.{name} is {json.dumps(value)[:40]}; expected a whole number of at least {least}"
            )
    size = model_args.get("img_size", 1)
    sizes = size if isinstance(size, list) and len(size) == 2 else [size]
    if not all(type(side) is int and 1 <= side <= MAX_RESOLUTION for side in sizes):
        raise BackboneError(
            f"{config_file}: model_args.img_size is {json.dumps(size)[:40]}; expected a size from 1 to "
            f"{MAX_RESOLUTION} px or a [height, width] pair of them"
        )


def _planted(spec: str, model_kwargs: dict) -> VisionTransformer:
    from .planted import PLANTED_VARIANTS, planted_backbone

    if spec not in PLANTED_VARIANTS:
        raise BackboneError(f"unknown planted backbone {spec!r}; known: {', '.join(PLANTED_VARIANTS)}")
    return planted_backbone(spec, **model_kwargs)


def load_backbone(
    spec: str | Path, architecture: str | None = None, pretrained: bool = True, **model_kwargs
) -> VisionTransformer:
    """A DINOv2-like timm ``VisionTransformer`` in eval mode, created with ``dynamic_img_size=True``.

    ``spec``: one of ``ACCEPTED_SPECS``. ``architecture``: timm name for a checkpoint file (required for
    ``.safetensors``, inferred from shapes for ``.pth``/``.pt``; for a DVT file the base spec, default its
    stem). ``pretrained=False`` builds the same architecture with random weights. ``model_kwargs`` go to ``timm.create_model`` (they override
    ``dynamic_img_size`` and a folder's saved ``model_args``). Raises ``BackboneError``.
    """
    spec = str(spec)
    if not spec.strip():
        raise BackboneError("an empty model spec; expected " + "; ".join(ACCEPTED_SPECS))
    if spec.startswith("hf-hub:"):
        check_hub_id(spec)
    if spec.startswith(dvt.REFERENCE_PREFIX):  # a DVT file on the hub: its local copy
        spec = str(dvt.hub_file(spec))
    path = Path(spec).expanduser()
    if spec.startswith("~"):
        spec = str(path)
    is_path = not spec.startswith(("planted-", "hf-hub:")) and (
        path.suffix in (".safetensors", ".pth", ".pt") or "/" in spec or spec.startswith(".") or path.exists()
    )
    if architecture is not None and (not is_path or path.is_dir()):
        raise BackboneError(f"architecture= applies to checkpoint files only; {spec!r} names its own architecture")
    if spec.startswith("planted-"):
        model = _planted(spec, model_kwargs)
    elif not is_path:
        model = _create(spec, pretrained, model_kwargs, spec)
        if pretrained:  # timm name or hf-hub: id, downloaded by timm
            check_finite(model.state_dict(), spec)
    elif not path.exists():
        raise BackboneError(f"{path} does not exist (expected a checkpoint file or a model folder)")
    elif path.is_dir():
        model = _from_folder(path, pretrained, model_kwargs)
    else:
        model = _from_file(path, architecture, pretrained, model_kwargs)
    return model.eval()


def check_hub_id(spec: str) -> None:
    """``BackboneError`` unless ``hf-hub:<repo id>[@revision]`` holds a repo id the hub client accepts."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo, *revision = spec.removeprefix("hf-hub:").split("@")
    try:
        if len(revision) > 1:
            raise HFValidationError("more than one '@' (hf-hub:<user>/<repo>@<revision>)")
        validate_repo_id(repo)
    except HFValidationError as error:
        detail = str(error).splitlines()[0]
        raise BackboneError(f"{spec}: not a valid hub repo id ({detail}); expected hf-hub:<user>/<repo>") from error


def check_resolution(model: torch.nn.Module, spec: str, resolution: int, kernel: int = 3) -> None:
    """``InputError`` unless ``resolution`` is a whole number of ``model``'s patches and gives eq. 5 a grid of at
    least ``kernel`` patches a side (a token on the grid's border is never a defect)."""
    patch = model.patch_embed.patch_size[0]
    if resolution % patch:
        below, above = resolution // patch * patch, (resolution // patch + 1) * patch
        raise InputError(
            f"--resolution {resolution} is not a multiple of the {patch}-px patches of {spec}; "
            f"expected e.g. {below or above} or {above}"
        )
    if resolution < kernel * patch:
        raise InputError(
            f"--resolution {resolution} gives a grid of {resolution // patch}x{resolution // patch} patches of {spec}; "
            f"expected at least {kernel * patch} px ({kernel}x{kernel} patches: eq. 5 never flags a border token)"
        )


def native_resolution(spec: str, model: torch.nn.Module) -> int:
    """The input size a backbone is meant for: a repair run's training resolution (its report), else the
    size its position embeddings were made for (``patch_embed.img_size``; 224 for the planted fixtures,
    518 for DINOv2), rounded down to a multiple of the patch."""
    from .report import REPORT_FILE, RepairReport

    report = Path(str(spec)).expanduser() / REPORT_FILE
    size = RepairReport.read(report).hyperparameters.get("resolution") if report.is_file() else None
    if size is None:
        size = model.patch_embed.img_size[0]
    patch = model.patch_embed.patch_size[0]
    return max(patch, int(size) // patch * patch)


def weights_sha256(spec: str, model: torch.nn.Module) -> str:
    """sha256 of the source weights file, or of the state dict (keys and bytes) when the source is a name."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = next((p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.exists()), path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

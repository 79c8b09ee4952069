"""Test-time registers (Jiang et al., "Vision Transformers Don't Need Trained Registers", NeurIPS 2025):
the training-free rival of SINDER, applied to a timm ViT as hooks on the instance.

A few "register neurons" of the MLPs (found by ``registers_search.find_register_neurons``) write the
high-norm outlier tokens. At test time one extra token, the register, starts as zeros after the
position embeddings were added (it gets none; a pre-norm ``norm_pre``, as CLIP's, then acts on it like
on every token). At each chosen layer, the input of the MLP's second linear layer ``mlp.fc2`` (the
hidden activation after the non-linearity; SwiGLU's gated product; after an inner norm where the MLP
has one) is edited per image:

- the register's activation of the chosen neurons becomes the single largest-magnitude value over all
  tokens (register included) and all chosen neurons of that layer for that image, sign kept, scale 1;
- the patch tokens' activations of those neurons become 0; the class token and any trained register /
  storage tokens are left alone.

The released code edits batch index 0 only; here every image of a batch gets its own peak.

How the edit sits on the model (the model stays the same timm object, with the same class, blocks,
``pretrained_cfg`` and a truthful ``num_prefix_tokens``, so the rest of the package works unchanged):

- the instance's ``_pos_embed`` is replaced by one that inserts the zero register right after the prefix
  tokens, at position ``p = num_prefix_tokens``, before ``patch_drop`` / ``norm_pre``;
- a forward hook on every block takes position ``p`` out of the block's output and stashes it; a forward
  pre-hook on the next block puts it back. Every block output seen outside a block therefore has the base
  model's token layout: ``forward_features``, ``forward_intermediates``, ``forward_head`` and the package's
  own block-by-block scans (``tokens.prepare_blocks``, ``block_outputs``, ``diagnostics.defect_report``)
  need no change. The stash lives in a ``threading.local``, reset by ``_pos_embed``, so concurrent
  forwards in several threads do not mix; a block called on a tensor that does not carry the register
  (wrong token count, or not fed by the previous block) is left alone;
- Eva models (DINOv3, EVA02) rotate the tokens after ``attn.num_prefix_tokens`` with RoPE; that count is
  raised by one while the edit is applied, so the register gets no rotation and every patch keeps its own;
- a forward pre-hook on ``mlp.fc2`` of each chosen layer edits a copy of its ``[B, N + 1, hidden]`` input.

The authors append the register at the end of the sequence. Putting it right after the prefix changes
nothing for a model without RoPE (attention is permutation-equivariant once the position embeddings are
added) and nothing with RoPE either, since the register is excluded from the rotation;
``tests/test_registers.py`` checks both against a reference that appends it at the end. The edit is for
inference (eval mode): patch dropout would treat the register as a patch, attention masks sized for the
base sequence do not fit, and gradient checkpointing would replay the hooks.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .analysis import singular_defect_directions
from .anatomy import describe_block, describe_model, get_path
from .errors import BackboneError, InputError
from .report import HeldOut, compare_held_out, held_out_outputs

SCHEMA_VERSION = 1
EDIT_ATTRIBUTE = "test_time_registers"  # on an edited model: the TestTimeRegisters it carries


@dataclass(frozen=True)
class RegisterNeuron:
    """Hidden unit ``unit`` of block ``layer``'s MLP (an input feature of its ``mlp.fc2``) and its search score."""

    layer: int
    unit: int
    score: float | None = None  # mean |activation| at the outlier tokens; None for neurons given by hand


@dataclass(frozen=True)
class SearchSettings:
    """Every hyperparameter of a search and where it came from (``*_source``: ``given``, ``published (...)``
    or ``derived: ...`` with the figures it was derived from)."""

    num_images: int
    seed: int | None
    detection_block: int
    detection_block_source: str
    threshold: float
    threshold_source: str
    highest_layer: int
    highest_layer_source: str
    top_k: int
    top_k_source: str
    sparsity_filter: bool
    sparsity_activation: float  # a token is quiet on a neuron when |activation| is below this
    sparsity_fraction: float  # a neuron counts for an image when at least this fraction of its tokens are quiet
    calibration_images: int  # images the derived defaults were computed on (the first ones searched)


@dataclass(frozen=True)
class SearchImages:
    """What the search saw: ``used`` images had outliers, ``skipped`` had none, ``unreadable`` were ``None``."""

    seen: int
    used: int
    skipped: int
    unreadable: int
    outliers_per_image: tuple[int, ...]  # tokens above the threshold at the detection block, in search order
    sizes: tuple[tuple[int, int], ...]  # distinct image sizes (pixels)
    sample_indices: tuple[int, ...] | None  # items drawn from a sized input, in search order (None: a stream)


@dataclass(frozen=True)
class TestTimeRegisters:
    """The register neurons of one base model, and how they were found (``settings`` / ``images`` are
    ``None`` for neurons given by hand). ``to_json`` / ``from_json`` round-trip it."""

    base_model: str
    base_sha256: str | None
    neurons: tuple[RegisterNeuron, ...]
    settings: SearchSettings | None = None
    images: SearchImages | None = None
    next_scores: tuple[float, ...] = ()  # the best scores left out (how far the chosen ones stand out)
    search_seconds: float | None = None
    schema_version: int = SCHEMA_VERSION

    __test__ = False  # not a pytest class, despite its name

    def units_by_layer(self) -> dict[int, list[int]]:
        """``{layer: [units]}``, layers ascending, units in neuron order."""
        chosen: dict[int, list[int]] = {}
        for neuron in sorted(self.neurons, key=lambda neuron: neuron.layer):
            chosen.setdefault(neuron.layer, []).append(neuron.unit)
        return chosen

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: str = "test-time registers") -> TestTimeRegisters:
        """Parse ``to_json``'s text; ``InputError`` naming ``source`` (e.g. the file) when it is not one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{source}: not valid JSON ({error})") from error
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a JSON object, found a {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"{source}: schema version {version!r}, this sinder-hub reads {SCHEMA_VERSION}")
        try:
            settings, images = data.get("settings"), data.get("images")
            if images is not None:
                images = {
                    **images,
                    "outliers_per_image": tuple(images["outliers_per_image"]),
                    "sizes": tuple(tuple(size) for size in images["sizes"]),
                    "sample_indices": None if images["sample_indices"] is None else tuple(images["sample_indices"]),
                }
            return cls(
                base_model=data["base_model"],
                base_sha256=data["base_sha256"],
                neurons=tuple(RegisterNeuron(**neuron) for neuron in data["neurons"]),
                settings=None if settings is None else SearchSettings(**settings),
                images=None if images is None else SearchImages(**images),
                next_scores=tuple(data.get("next_scores", ())),
                search_seconds=data.get("search_seconds"),
            )
        except (KeyError, TypeError) as error:
            raise InputError(f"{source}: missing or unexpected field ({error})") from error


def registers_of(model: nn.Module) -> TestTimeRegisters | None:
    """The test-time registers an edited model carries, ``None`` for a model without the edit."""
    return getattr(model, EDIT_ATTRIBUTE, None)


def mlp_output(model: nn.Module, layer: int) -> nn.Module:
    """Block ``layer``'s last MLP layer (``mlp.fc2`` in every supported family), whose input the edit acts on."""
    block = model.blocks[layer]
    return get_path(block, describe_block(block, f"blocks.{layer}").mlp_output)


def registered_hidden(hidden: torch.Tensor, units: torch.Tensor, position: int) -> torch.Tensor:
    """Step 2 on a copy of one layer's fc2 input ``[B, T, M]`` with the register at ``position``, per image.

    ``units`` ``[k]`` long: the chosen neurons. The register's activations of them become the image's
    largest-magnitude value over all ``T`` tokens and the ``k`` neurons (sign kept); tokens after the
    register (the patches) get 0 there; tokens before it (class, trained registers) are unchanged.
    """
    chosen = hidden[:, :, units].flatten(1)  # [B, T * k]
    peak = chosen.gather(1, chosen.abs().argmax(dim=1, keepdim=True))  # [B, 1]
    edited = hidden.clone()
    edited[:, position + 1 :, units] = 0
    edited[:, position, units] = peak.to(edited.dtype)
    return edited


class _RegisterStream:
    """Carries the register token from block to block of one model, per thread (see the module docstring).

    Per-thread state: ``carrier`` ``(block index, batch, tokens)`` of the block input that holds the
    register, set by ``insert`` (block 0) or by a block's output (the next block); ``stash`` the register
    taken out of the last block output; ``inside`` the index of the block now running with it.
    """

    def __init__(self, position: int):
        self.position = position
        self._local = threading.local()

    def __getstate__(self) -> dict:  # copy.deepcopy / pickle: a fresh thread-local state
        return {"position": self.position}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["position"])

    def _state(self) -> threading.local:
        state = self._local
        if not hasattr(state, "inside"):
            state.carrier, state.stash, state.inside = None, None, None
        return state

    def insert(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` embedded tokens -> ``[B, N + 1, D]`` with the zero register at ``position``."""
        p = self.position
        register = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])
        tokens = torch.cat([tokens[:, :p], register, tokens[:, p:]], dim=1)
        state = self._state()
        state.carrier, state.stash, state.inside = (0, tokens.shape[0], tokens.shape[1]), None, None
        return tokens

    def before_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict):
        state = self._state()
        x = args[0] if args else kwargs["x"]
        carrier, stash = state.carrier, state.stash
        state.carrier, state.stash, state.inside = None, None, None
        if carrier != (index, x.shape[0], x.shape[1]):  # not the tensor that carries the register
            return None
        if stash is not None:  # blocks after the first: put back what the previous block's output gave up
            p = self.position
            x = torch.cat([x[:, :p], stash.to(x.dtype), x[:, p:]], dim=1)
            args, kwargs = ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "x": x})
        state.inside = index
        return args, kwargs

    def after_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        state = self._state()
        if state.inside != index:
            return None
        p = self.position
        state.inside, state.stash = None, output[:, p : p + 1]
        output = torch.cat([output[:, :p], output[:, p + 1 :]], dim=1)
        state.carrier = (index + 1, output.shape[0], output.shape[1])
        return output

    def edit_hidden(self, layer: int, units: torch.Tensor, fc2: nn.Module, args: tuple):
        if self._state().inside != layer:
            return None
        hidden = args[0]
        return (registered_hidden(hidden, units.to(hidden.device), self.position), *args[1:])


class _EmbeddingWithRegister:
    """The edited model's ``_pos_embed``: the class's own, then the zero register (Eva: ``(tokens, rope)``)."""

    def __init__(self, model: nn.Module, stream: _RegisterStream):
        self.model = model
        self.stream = stream

    def __call__(self, x: torch.Tensor):
        embedded = type(self.model)._pos_embed(self.model, x)
        if isinstance(embedded, tuple):
            tokens, rope = embedded
            return self.stream.insert(tokens), rope
        return self.stream.insert(embedded)


def _is_ours(hook) -> bool:
    return isinstance(getattr(getattr(hook, "func", None), "__self__", None), _RegisterStream)


def _check_units(model: nn.Module, registers: TestTimeRegisters) -> dict[int, torch.Tensor]:
    """``{layer: units [k] long}``; ``InputError`` naming the layer or unit that the model does not have."""
    depth = len(model.blocks)
    if not registers.neurons:
        raise InputError(f"test-time registers of {registers.base_model}: no register neurons to apply")
    chosen = {}
    for layer, units in registers.units_by_layer().items():
        if not 0 <= layer < depth:
            raise InputError(f"register neuron layer {layer}: the model has blocks 0 to {depth - 1}")
        hidden = mlp_output(model, layer).weight.shape[1]
        bad = [unit for unit in units if not 0 <= unit < hidden]
        if bad:
            raise InputError(f"register neuron {layer}:{bad[0]}: blocks.{layer}.mlp.fc2 has {hidden} input units")
        if len(set(units)) != len(units):
            raise InputError(f"register neurons of layer {layer}: unit listed twice in {units}")
        chosen[layer] = torch.tensor(units, dtype=torch.long)
    return chosen


def apply_test_time_registers(model: nn.Module, registers: TestTimeRegisters) -> nn.Module:
    """Give ``model`` one test-time register with ``registers``' neurons, in place; returns the model.

    The model is marked (``registers_of(model)``); ``remove_test_time_registers`` undoes it.
    ``BackboneError`` for an unsupported or already edited model, ``InputError`` for neurons it lacks.
    """
    source = registers.base_model or "the model"
    describe_model(model, source)
    if registers_of(model) is not None or "_pos_embed" in vars(model):
        raise BackboneError(f"{source}: the model already carries test-time registers (remove them first)")
    chosen = _check_units(model, registers)
    stream = _RegisterStream(model.num_prefix_tokens)
    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(partial(stream.before_block, index), with_kwargs=True)
        block.register_forward_hook(partial(stream.after_block, index), with_kwargs=True)
        if hasattr(block.attn, "num_prefix_tokens"):  # Eva: no RoPE for the register
            block.attn.num_prefix_tokens += 1
    for layer, units in chosen.items():
        mlp_output(model, layer).register_forward_pre_hook(partial(stream.edit_hidden, layer, units))
    model._pos_embed = _EmbeddingWithRegister(model, stream)
    setattr(model, EDIT_ATTRIBUTE, registers)
    return model


def remove_test_time_registers(model: nn.Module) -> nn.Module:
    """Undo ``apply_test_time_registers`` in place (the original behaviour exactly); returns the model.

    ``BackboneError`` when the model carries no test-time registers.
    """
    if registers_of(model) is None:
        raise BackboneError("the model carries no test-time registers to remove")
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [key for key, hook in hooks.items() if _is_ours(hook)]:
                del hooks[key]
                for flags in (module._forward_hooks_with_kwargs, module._forward_pre_hooks_with_kwargs):
                    flags.pop(key, None)
    for block in model.blocks:
        if hasattr(block.attn, "num_prefix_tokens"):
            block.attn.num_prefix_tokens -= 1
    del model._pos_embed
    delattr(model, EDIT_ATTRIBUTE)
    return model


def defect_directions(model: nn.Module) -> torch.Tensor:
    """Singular defect directions ``[depth, D]`` for detection: the noise-free ``expected`` method (seconds on a
    CPU), or the authors' ``sampled`` one where an MLP with an inner norm has no expected form."""
    try:
        return singular_defect_directions(model, method="expected")
    except BackboneError:
        return singular_defect_directions(model, method="sampled")


def held_out_comparison(
    model: nn.Module,
    registers: TestTimeRegisters,
    images: dict[str, torch.Tensor],
    directions: torch.Tensor | None = None,
    mask_thr: float = 4.0,
    kernel: int = 3,
) -> HeldOut:
    """A repair run's ``held_out`` section for test-time registers: ``{name: [3, R, R]}`` normalised images
    through the unedited ``model`` and through it with ``registers`` applied (removed again afterwards).

    Defects per image at the last block (eq. 5 with ``directions`` ``[depth, D]``, default
    ``defect_directions(model)``), their reduction, and the final features' cosines to the original's
    (normal patch tokens; class token or mean patch token). ``BackboneError`` if the model is already edited.
    """
    if registers_of(model) is not None:
        raise BackboneError(f"{registers.base_model}: pass the model without test-time registers")
    if not images:
        raise InputError("held-out comparison: no images")
    shapes = {tuple(image.shape[-3:]) for image in images.values()}
    (shape, *others) = shapes
    if others or len(shape) != 3 or shape[-1] != shape[-2]:
        raise InputError(f"held-out comparison: expected [3, R, R] images of one size, got shapes {sorted(shapes)}")
    if directions is None:
        directions = defect_directions(model)
    parameter = next(model.parameters())
    batched = {name: image.reshape(1, *image.shape[-3:]).to(parameter) for name, image in images.items()}
    with torch.inference_mode():
        before = held_out_outputs(model, batched, directions, mask_thr, kernel)
        apply_test_time_registers(model, registers)
        try:
            after = held_out_outputs(model, batched, directions, mask_thr, kernel)
        finally:
            remove_test_time_registers(model)
    return compare_held_out(model, before, after, resolution=shape[-1])

"""Fine-tuning only singular values (paper §4.2): ``W = U diag(S + ε) Vᵀ`` with U, S, V frozen.

The linear layers that ``sinder_hub.families`` lists as movable (the value projection, the
attention output projection and the MLP's linear layers) become ``SingularValueLinear``
layers whose only trainable tensor is ``ε`` (initialised to zero). In a fused ``qkv`` layer
only the value rows get an ``ε``; queries and keys stay frozen, as in the authors' code.
Eva's fused qkv with separate ``q_bias`` / ``v_bias`` reads ``qkv.weight`` itself
(``F.linear``) instead of calling the layer; there the attention is switched to
``qkv_bias_separate`` (call the layer, then add the biases) while parametrised, and back
on merge.

As in the authors' code, a layer's weight is ``U diag(S + ε) Vᵀ`` rebuilt from its factors
(at the caller's matmul precision: TF32 under ``--precision tf32``, as theirs), a function
of ``ε`` alone, so a run resumed from a checkpoint of ``ε``, or split over processes,
computes with exactly the weights of an uninterrupted one-process run. Unlike theirs, a
layer keeps its original ``W₀`` (no SVD round-off) until a non-zero ``ε`` first reaches it:
blocks that are never trained stay bit-identical to the original.

Speed and memory:
- the SVD of a layer is computed the first time a gradient reaches its ``ε`` (lazily, so
  blocks that never receive an update never pay for it), or the first time a non-zero ``ε``
  has to be applied;
- the layer keeps one weight on its device: the ``weight`` buffer holds the weight for the
  ``ε`` last applied, replaced by ``U diag(S + ε) Vᵀ`` (one ``[rows, r] x [r, in]``
  product) after ``ε`` changes; ``W₀`` is not kept once it has been replaced. So a
  parametrised model's ``state_dict()`` holds the weights it computes with (same keys as
  before);
- the eager forward applies pending ``ε`` changes itself (it checks ``ε._version``: the
  optimiser and ``copy_`` update ``ε`` in place). Compiled code does not: call
  ``sync_singular_values(model)`` before running compiled blocks after ``ε`` changed;
- its backward computes ``∂L/∂ε_k = Σ_t (g_t · u_k)(x_t · v_k)`` from two projections
  instead of forming the dense ``∂L/∂W`` and back-propagating through the rebuild.
- ``reference_mode()`` switches to the authors' pattern instead: rebuild the weight with
  autograd on every forward (the naive baseline and test oracle), with the same values as
  the fast path.

The merge (``merge_singular_values``) writes ``U diag(S + ε) Vᵀ`` computed in float64.
Loading a parametrised model's state dict into a parametrised model is not supported:
restore ``ε`` into a freshly parametrised model with ``copy_`` instead, as the trainer does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .anatomy import describe_block, describe_model, get_path

_REFERENCE_MODE = False
# set on an EvaAttention whose qkv_bias_separate was switched on by parametrize_singular_values: its old value
_BIAS_SEPARATE_WAS = "_sinder_qkv_bias_separate_was"


@contextmanager
def reference_mode():
    """Within this context, layers rebuild ``W(ε)`` with autograd on every forward (the authors' way)."""
    global _REFERENCE_MODE
    previous, _REFERENCE_MODE = _REFERENCE_MODE, True
    try:
        yield
    finally:
        _REFERENCE_MODE = previous


class _SingularValueLinearFunction(torch.autograd.Function):
    """``F.linear(x, W(ε), b)`` with ``W(ε)`` given; backward straight to ``x`` and ``ε``.

    The layer's SVD is taken in the backward, the first time a gradient reaches its ``ε``,
    so blocks that are only ever run forward (with autograd on or off) never pay for it.
    """

    @staticmethod
    def forward(ctx, x, eps, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_eps = None
        if ctx.needs_input_grad[1]:
            layer = ctx.layer
            layer.factorize()
            start, stop = layer.rows
            g = grad_out[..., start:stop].flatten(0, -2)
            inputs = x.flatten(0, -2).to(g.dtype)
            # dL/dε_k = Σ_t (g_t · u_k)(x_t · v_k): two projections instead of the dense dL/dW
            grad_eps = ((g @ layer.U.to(g.dtype)).float() * (inputs @ layer.Vh.T.to(g.dtype)).float()).sum(0)
        return grad_x, grad_eps, None, None, None


class SingularValueLinear(nn.Module):
    """``y = x W(ε)ᵀ + b``, ``W(ε) = U diag(S + ε) Vᵀ`` on the output rows ``rows`` (``W₀`` elsewhere).

    ``weight`` ``[out, in]`` holds the weight for ``eps_applied``, the ``ε`` last applied (``W₀``
    while that is zero), and ``bias`` ``[out]`` the frozen original bias (same names as in
    ``nn.Linear``, so state-dict keys do not change); ``eps`` ``[r]`` with ``r = min(len(rows), in)``
    is the trainable part; ``U [len(rows), r]``, ``S [r]``, ``Vh [r, in]`` are the frozen SVD
    factors of ``W₀[rows]``, filled on first use. Invariant: ``eps_applied`` (a non-persistent
    buffer) is zero and ``weight`` equals ``W₀`` until the layer is factorised.
    """

    def __init__(self, linear: nn.Linear, rows: tuple[int, int] | None = None):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.rows = rows or (0, out_features)
        self.register_buffer("weight", linear.weight.detach())  # replaced, never written in place
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        rank = min(self.rows[1] - self.rows[0], in_features)
        self.eps = nn.Parameter(torch.zeros(rank, dtype=linear.weight.dtype, device=linear.weight.device))
        self.register_buffer("U", None)
        self.register_buffer("S", None)
        self.register_buffer("Vh", None)
        self.register_buffer("eps_applied", torch.zeros_like(self.eps.detach()), persistent=False)
        self._applied_version = self.eps._version
        self.register_state_dict_pre_hook(_sync_before_saving)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, trainable rows={self.rows}, rank={self.eps.numel()}"

    def factorize(self) -> None:
        """SVD of the trainable rows of ``W₀``, once: float64 arithmetic, stored in the weight's dtype.

        Taken through the Gram matrix of the shorter side: ``AᵀA = V S² Vᵀ`` (eigh), then
        a QR of ``A V = U S`` gives ``U`` with orthonormal columns, also where ``S`` is tiny.
        Exact arithmetic gives the SVD; in float64 the factors reproduce the weight to
        ~1e-15 of its norm (tested), and a dense eigh + QR is far cheaper on a GPU than
        a general SVD.
        """
        if self.U is not None:
            return
        assert not bool(self.eps_applied.any()), "weight must still be W₀ when the layer is factorised"
        start, stop = self.rows
        weight = self.weight[start:stop].double()
        tall = weight.shape[0] >= weight.shape[1]
        A = weight if tall else weight.T  # [m, n], m >= n
        _, V = torch.linalg.eigh(A.T @ A)
        V = V.flip(-1)  # descending singular values
        Q, R = torch.linalg.qr(A @ V)
        diagonal = torch.diagonal(R)
        signs = torch.where(diagonal < 0, -1.0, 1.0).to(diagonal)
        U, S = Q * signs, diagonal * signs  # A = U diag(S) Vᵀ
        if not tall:  # W = Aᵀ = V diag(S) Uᵀ
            U, V = V, U
        self.U, self.S, self.Vh = (t.to(self.weight.dtype).contiguous() for t in (U, S, V.T))

    def sync_weight(self) -> None:
        """Bring ``weight`` to the current ``ε`` after it changed: its trainable rows become
        ``U diag(S + ε) Vᵀ`` (no autograd, no autocast, at the caller's matmul precision)."""
        if self._applied_version == self.eps._version:
            return
        with torch.no_grad():
            if bool((self.eps != self.eps_applied).any()):
                self.factorize()
                with torch.autocast(device_type=self.weight.device.type, enabled=False):
                    rows = (self.U * (self.S + self.eps)) @ self.Vh
                self.weight = self._with_rows(rows)
                self.eps_applied.copy_(self.eps)
        self._applied_version = self.eps._version

    def current_weight(self) -> torch.Tensor:
        """``W(ε)`` ``[out, in]`` without autograd: ``weight`` after applying pending ``ε`` changes."""
        self.sync_weight()
        return self.weight

    def merged_weight(self) -> torch.Tensor:
        """``W(ε)`` ``[out, in]`` for the merge, without autograd: ``U diag(S + ε) Vᵀ`` computed in float64 and
        cast to the weight's dtype (the original weight itself while unfactorised with ``ε = 0``)."""
        if self.U is None:
            if not bool(self.eps.detach().any()):
                return self.weight
            self.factorize()
        with torch.no_grad():
            rows = (self.U.double() * (self.S.double() + self.eps.double())) @ self.Vh.double()
        return self._with_rows(rows.to(self.weight.dtype))

    def _rebuilt_weight(self) -> torch.Tensor:
        """``W(ε)`` ``[out, in]`` rebuilt with autograd (reference mode): ``weight + U diag(ε − ε_applied) Vᵀ``
        on the trainable rows, exactly ``weight`` once synced, with the gradient of ``U diag(S + ε) Vᵀ``."""
        self.factorize()
        start, stop = self.rows
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            rows = self.weight[start:stop] + (self.U * (self.eps - self.eps_applied)) @ self.Vh
        return self._with_rows(rows)

    def _with_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """``weight`` ``[out, in]`` with its trainable rows replaced by ``rows`` ``[len(rows), in]`` (a new tensor)."""
        start, stop = self.rows
        if (start, stop) == (0, self.weight.shape[0]):
            return rows
        return torch.cat([self.weight[:start], rows, self.weight[stop:]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # compiled code: the caller runs sync_singular_values first
            self.sync_weight()
        if not (torch.is_grad_enabled() and self.eps.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if _REFERENCE_MODE:
            return F.linear(x, self._rebuilt_weight(), self.bias)
        return _SingularValueLinearFunction.apply(x, self.eps, self.weight, self.bias, self)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W(ε)`` computed in float64 (the merge of §4.2)."""
        weight = self.merged_weight()
        linear = nn.Linear(
            weight.shape[1], weight.shape[0], bias=self.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _sync_before_saving(layer: SingularValueLinear, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: the saved ``weight`` is ``W(ε)`` for the saved ``ε``."""
    layer.sync_weight()


def sync_singular_values(model: nn.Module) -> None:
    """Apply pending ``ε`` changes to the weights of every ``SingularValueLinear`` in ``model``.

    The eager forward does this itself; code that compiles a block must call it before running
    the compiled block after ``ε`` changed (the compiled forward does not check ``ε``).
    """
    for module in model.modules():
        if isinstance(module, SingularValueLinear):
            module.sync_weight()


def _block_linears(block: nn.Module, where: str = "block"):
    """``(parent, attribute, rows)`` of every movable linear layer of a block (``families``); a fused qkv
    keeps only its value rows."""
    for path, rows in describe_block(block, where).movable:
        parent_path, _, attribute = path.rpartition(".")
        yield (get_path(block, parent_path) if parent_path else block), attribute, rows


def parametrize_singular_values(model: nn.Module) -> dict[str, nn.Parameter]:
    """Put every movable linear layer of ``model.blocks`` in singular-value form; freeze everything else.

    Returns ``{name: ε}`` for all of them, in block order (the optimiser's parameter order).
    Idempotent. Until a non-zero ``ε`` is applied the model computes exactly what it did before
    (Eva's fused qkv with separate biases: up to float rounding, the bias being added after the
    product instead of in it).
    Raises ``BackboneError`` for a block ``families.describe_block`` does not support.
    """
    described = describe_model(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for index, (block, layout) in enumerate(zip(model.blocks, described.blocks)):
        for parent, attribute, rows in _block_linears(block, f"blocks.{index}"):
            layer = getattr(parent, attribute)
            if isinstance(layer, nn.Linear):
                setattr(parent, attribute, SingularValueLinear(layer, rows))
        if layout.qkv_bias_read_by_attention:  # else the attention would bypass the parametrised qkv
            setattr(block.attn, _BIAS_SEPARATE_WAS, block.attn.qkv_bias_separate)
            block.attn.qkv_bias_separate = True
    parameters = singular_value_parameters(model)
    for eps in parameters.values():
        eps.requires_grad_(True)
    return parameters


def singular_value_parameters(model: nn.Module, blocks: range | None = None) -> dict[str, nn.Parameter]:
    """``{name: ε}`` of the parametrised layers, optionally only of the blocks in ``blocks``."""
    found = {}
    for index, block in enumerate(model.blocks):
        if blocks is not None and index not in blocks:
            continue
        for name, module in block.named_modules():
            if isinstance(module, SingularValueLinear):
                found[f"blocks.{index}.{name}.eps"] = module.eps
    return found


def factorize_blocks(model: nn.Module, blocks: range) -> list[SingularValueLinear]:
    """Factorise now every parametrised layer of ``model.blocks[blocks]`` (else done on first use); returns them."""
    layers = [
        m
        for block in model.blocks[blocks.start : blocks.stop]
        for m in block.modules()
        if isinstance(m, SingularValueLinear)
    ]
    for layer in layers:
        layer.factorize()
    return layers


def merge_singular_values(model: nn.Module) -> nn.Module:
    """Replace every ``SingularValueLinear`` by a plain ``nn.Linear`` with ``W(ε)``, in place.

    The merged model has exactly the original architecture, parameter names and shapes.
    """
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, SingularValueLinear):
                parent_name, _, attribute = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                setattr(parent, attribute, module.to_linear())
        attn = getattr(block, "attn", None)
        if hasattr(attn, _BIAS_SEPARATE_WAS):
            attn.qkv_bias_separate = getattr(attn, _BIAS_SEPARATE_WAS)
            delattr(attn, _BIAS_SEPARATE_WAS)
    return model

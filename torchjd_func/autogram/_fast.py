"""Per-layer Gramians of per-sample gradients without re-running the layer (``batch_dim`` set).

For a unit that is exactly an ``nn.Linear``, an ``nn.Conv1d``/``nn.Conv2d`` (``groups=1``) or an
``nn.Embedding`` (no ``max_norm``, ``scale_grad_by_freq`` or ``sparse``), the per-sample gradient
of row ``r`` and sample ``b`` is known in closed form from the recorded input and the cotangent of
the output, so the Gramian over the ``(sample, row)`` pairs needs no ``vmap`` re-run:

* weight (Linear; Conv after unfolding its input into patches, positions as ``t``):
  ``g_rb = Σ_t d_rbt a_btᵀ``, with ``a_bt`` the input at position ``t`` and ``d_rbt`` the cotangent
  of the output there;
* weight (Embedding): the same with ``a_bt`` the one-hot vector of token ``id_bt`` (the cotangents
  of ``padding_idx`` tokens zeroed: that row gets no gradient);
* bias: ``Σ_t d_rbt``.

Two exact ways give the weight Gramian, and the cheaper one (in multiply-adds, as in ghost
clipping, Li et al. 2022, Bu et al. 2023) is used for each layer and call:

* **ghost**: ``G[(b,r), (c,s)] = Σ_{t,u} (d_rbt·d_scu)(a_bt·a_cu)``, from the inner products of
  the inputs and of the cotangents over all ``(b, t)`` pairs (``(A Aᵀ) ⊙ (D Dᵀ)`` when there is
  one position); cost ``~ (BT)² (in + R² out)``, memory ``(RBT)²`` (computed in blocks of samples);
* **materialise**: the per-sample gradients ``[B, R, in·out]`` (for an embedding, restricted to
  the tokens present in the batch) and their Gram matrix; cost ``~ R·B·T·in·out + (RB)²·in·out``,
  memory ``R·B·in·out``.

Every other unit (or a group of units sharing a parameter) takes the generic path of
:mod:`torchjd_func.autogram._engine`. The same closed forms give the per-sample Gramians of
:mod:`torchjd_func._probes` (``gramian_step``), pure and compiled, which have no generic path.
"""

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchjd_func.autogram._recording import Call

__all__ = ["DISPATCH", "fast_square_gramian", "layer_gramian", "layer_operands"]

DISPATCH: Counter[str] = Counter()
"""How often each way was taken, for tests and benchmarks: ``"linear.ghost"``,
``"conv.materialise"``, ``"embedding.bias_only"`` (no trainable weight), ... per layer and
``compute_gramian``, and ``"generic"`` per re-run call of the generic path."""

_BLOCK_ELEMENTS = 1 << 24
"""Largest ``[R, c, T, R, B, T]`` block of cotangent inner products built at once by the ghost
way (64 MiB in float32)."""


@dataclass(frozen=True)
class _Operands:
    """One layer's calls as a linear map per position: ``out_bt = W a_bt (+ bias)``.

    ``inputs`` is ``[B, T, in]`` (Linear, Conv patches) or the token ids ``[B, T]`` (Embedding);
    ``cotangents`` is ``[R, B, T, out]``."""

    kind: str
    inputs: Tensor
    cotangents: Tensor
    in_features: int


def _joined(parts: Sequence[_Operands]) -> tuple[Tensor, Tensor]:
    """The calls' inputs and cotangents joined along the positions (no copy for one call), in
    float32 at least: inner products of float16/bfloat16 gradients overflow (float16 above
    65504) or lose most digits long before the gradients themselves do."""
    if len(parts) == 1:
        inputs, cots = parts[0].inputs, parts[0].cotangents
    else:
        inputs = torch.cat([p.inputs for p in parts], dim=1)
        cots = torch.cat([p.cotangents for p in parts], dim=2)
    dtype = torch.promote_types(cots.dtype, torch.float32)
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    return inputs, cots.to(dtype)


def fast_square_gramian(
    calls: Sequence[Call],
    cotangents: dict[Call, list[Tensor | None]],
    trainable: dict[str, Tensor],
    batched: bool,
) -> Tensor | None:
    """The Gramian ``[B, R, B, R]`` of the per-sample gradients of the ``R`` rows w.r.t.
    ``trainable`` (the module's trainable parameters by name), summed over ``calls`` (all of one
    module), or ``None`` when the module or a call is not supported (then nothing was computed).

    ``batched=False``: the output was reduced over the batch, so each row's gradient is the sum of
    the per-sample ones: the batch is folded into the positions and ``B`` is 1.
    """
    module = calls[0].module
    if any(call.module is not module for call in calls):
        return None
    kind = _kind(module)
    if kind is None or not trainable or not set(trainable) <= {"weight", "bias"}:
        return None
    parts = []
    for call in calls:
        part = _operands(kind, module, call, cotangents[call])
        if part is None:
            return None
        parts.append(part)
    total, way = layer_gramian(parts, "weight" in trainable, "bias" in trainable, batched=batched)
    DISPATCH[f"{kind}.{way}"] += 1
    return total


def layer_gramian(
    parts: Sequence[_Operands], weight: bool, bias: bool, *, batched: bool = True
) -> tuple[Tensor, str]:
    """The Gramian ``[B, R, B, R]`` of one layer's per-sample gradients w.r.t. its weight and/or
    its bias (at least one), summed over its calls ``parts``, and the way taken for the weight:
    ``"ghost"``, ``"materialise"`` or ``"bias_only"``. ``batched``: as in
    :func:`fast_square_gramian`."""
    inputs, cots = _joined(parts)
    if not batched:
        folded = inputs.shape[0] * inputs.shape[1]
        inputs = inputs.reshape(1, folded, *inputs.shape[2:])
        cots = cots.reshape(cots.shape[0], 1, folded, cots.shape[-1])
    operands = _Operands(parts[0].kind, inputs, cots, parts[0].in_features)

    total: Tensor | None = None
    way = "bias_only"
    if weight:
        ghost = use_ghost(operands)
        way = "ghost" if ghost else "materialise"
        total = _ghost(operands) if ghost else _materialise(operands)
    if bias:
        square = _square(cots.sum(dim=2))
        total = square if total is None else total + square
    assert total is not None  # `weight` or `bias`
    return total, way


def task_gramian(parts: Sequence[_Operands], weight: bool, bias: bool) -> Tensor:
    """The Gramian ``[R, R]`` of the ``R`` rows' gradients w.r.t. one layer's weight and/or bias
    (at least one), for rows reduced over the batch (MTL task losses): summed over its calls.

    With the samples and positions folded into ``N`` positions, row ``r``'s weight gradient is
    ``D_rᵀ A`` (``D_r`` ``[N, out]``, ``A`` ``[N, in]``), so ``G_rs = ⟨D_r, K D_s⟩`` with
    ``K = A Aᵀ`` (token equality for an embedding): ``N²·in + R·N²·out + R²·N·out``
    multiply-adds, against ``R·N·in·out + R²·in·out`` for the materialised gradients; the cheaper
    way is taken. The bias adds ``⟨Σ_t d_rt, Σ_t d_st⟩``.
    """
    inputs, cots = _joined(parts)
    n_rows, out = cots.shape[0], cots.shape[-1]
    d = cots.reshape(n_rows, -1, out)  # [R, N, out]
    n = d.shape[1]
    total: Tensor | None = None
    if weight:
        kind, in_features = parts[0].kind, parts[0].in_features
        embedding = kind == "embedding"
        ghost = n * n * (0 if embedding else in_features) + n_rows * n * n * out
        ghost += n_rows * n_rows * n * out
        present = min(in_features, n) if embedding else in_features
        materialise = n_rows * n * present * out + n_rows * n_rows * present * out
        if ghost <= materialise:
            if embedding:
                ids = inputs.reshape(n)
                inner = (ids[:, None] == ids[None, :]).to(d.dtype)
            else:
                flat = inputs.reshape(n, inputs.shape[-1])
                inner = flat @ flat.T
            # K D_s for every row as one broadcast matmul, then the flat inner products: no
            # permuted copies of D (einsum's plan for the same contraction made three, and took
            # twice as long at R = 32, N = 64, out = 256).
            k_d = torch.matmul(inner, d)  # [R, N, out]
            total = d.reshape(n_rows, -1) @ k_d.reshape(n_rows, -1).T
        else:
            folded = _Operands(
                kind, inputs.reshape(1, n, *inputs.shape[2:]), d[:, None], in_features
            )
            total = _materialise(folded).reshape(n_rows, n_rows)
    if bias:
        summed = d.sum(dim=1)
        square = summed @ summed.T
        total = square if total is None else total + square
    assert total is not None  # `weight` or `bias`
    return total


def _kind(module: nn.Module) -> str | None:
    """Which closed form applies to ``module``, if it is exactly a supported layer."""
    if next(module.children(), None) is not None:
        return None
    if not {name for name, _ in module.named_parameters()} <= {"weight", "bias"}:
        return None
    # Exact types: a subclass may override `forward`.
    if type(module) is nn.Linear:
        return "linear"
    if isinstance(module, nn.Conv1d | nn.Conv2d) and type(module) in (nn.Conv1d, nn.Conv2d):
        return "conv" if module.groups == 1 else None
    # max_norm renormalises the weight in place; scale_grad_by_freq depends on the batch; sparse
    # gradients: all left to the generic path, as they are.
    if (
        isinstance(module, nn.Embedding)
        and type(module) is nn.Embedding
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    ):
        return "embedding"
    return None


def _single_input(call: Call) -> Tensor | None:
    if len(call.args) == 1 and not call.kwargs:
        value = call.args[0]
    elif not call.args and set(call.kwargs) == {"input"}:
        value = call.kwargs["input"]
    else:
        return None
    return value.detach() if isinstance(value, Tensor) else None


def _operands(
    kind: str, module: nn.Module, call: Call, cotangents: list[Tensor | None]
) -> _Operands | None:
    """``call``'s input and output cotangent as ``[B, T, ...]`` operands, or ``None``."""
    x = _single_input(call)
    if x is None or len(call.slots) != 1:
        return None
    d = cotangents[0]
    if call.slots[0].position != 0 or d is None or d.shape[1:] != call.slots[0].shape:
        return None
    return layer_operands(kind, module, x, d)


def layer_operands(kind: str, module: nn.Module, x: Tensor, d: Tensor) -> _Operands | None:
    """One call of a layer of ``kind`` (see :func:`_kind`) as ``[B, T, ...]`` operands, from its
    input ``x`` ``[B, ...]`` and the cotangents ``d`` ``[R, *output.shape]`` of its output, or
    ``None`` when the call has no closed form (unbatched input, mixed dtypes or devices)."""
    weight = getattr(module, "weight", None)
    if (
        not isinstance(weight, Tensor)
        or d.dtype != weight.dtype  # e.g. autocast: left to the generic path
        or d.device != x.device
        or x.ndim < 1
        or d.ndim < 3
    ):
        return None
    n_rows, batch, n_out = d.shape[0], x.shape[0], d.shape[-1]
    if isinstance(module, nn.Embedding):
        if x.dtype not in (torch.int32, torch.int64):
            return None
        ids = x.reshape(batch, math.prod(x.shape[1:]))
        d = d.reshape(n_rows, batch, ids.shape[1], n_out)
        if module.padding_idx is not None:
            d = d * (ids != module.padding_idx).unsqueeze(-1).to(d.dtype)
        return _Operands(kind, ids, d, module.num_embeddings)
    if x.dtype != d.dtype:
        return None
    if kind == "linear":
        if x.ndim < 2:
            return None
        positions = math.prod(x.shape[1:-1])
        a = x.reshape(batch, positions, x.shape[-1])
        return _Operands(kind, a, d.reshape(n_rows, batch, positions, n_out), a.shape[2])
    if not isinstance(module, nn.Conv1d | nn.Conv2d):
        return None
    patches = _patches(module, x)
    if patches is None:
        return None
    positions, n_channels = patches.shape[1], d.shape[2]
    if math.prod(d.shape[3:]) != positions:
        return None
    d = d.reshape(n_rows, batch, n_channels, positions).transpose(2, 3)
    return _Operands(kind, patches, d, patches.shape[2])


def _patches(conv: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor | None:
    """The input patches ``[B, positions, in_channels · prod(kernel_size)]`` of a convolution,
    ordered as its weight ``[out, in, *kernel_size]`` flattens."""
    n_spatial = len(conv.kernel_size)
    if x.ndim != n_spatial + 2:
        return None  # unbatched input
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    pads: list[int] = []  # F.pad order: last dim first, (left, right)
    for i in reversed(range(n_spatial)):
        if conv.padding == "valid":
            left = right = 0
        elif conv.padding == "same":
            total = dilation[i] * (kernel[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = int(conv.padding[i])
        pads += [left, right]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    if n_spatial == 1:
        x = x.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
    unfolded = F.unfold(x, kernel_size=kernel, dilation=dilation, stride=stride)
    return unfolded.transpose(1, 2)


def _rows_first(flat: Tensor) -> Tensor:
    """``[R, B, ...]`` -> ``[B·R, prod(...)]``: one row per (sample, output row) pair."""
    return flat.transpose(0, 1).reshape(flat.shape[0] * flat.shape[1], math.prod(flat.shape[2:]))


def _square(per_sample: Tensor) -> Tensor:
    """The Gram matrix ``[B, R, B, R]`` of per-sample gradients ``[R, B, ...]``."""
    n_rows, batch = per_sample.shape[:2]
    rows = _rows_first(per_sample)
    return (rows @ rows.T).reshape(batch, n_rows, batch, n_rows)


def _unique_tokens(ids: Tensor, vocabulary: int) -> tuple[Tensor, int]:
    """The slot of each id among ``n`` token slots, and ``n``.

    Eager: one slot per distinct id. Under ``torch.compile``, where ``torch.unique`` breaks the
    graph (its size depends on the data), ``min(vocabulary, ids.numel())`` slots: the ids
    themselves, or their ranks among the distinct ids (extra slots stay zero)."""
    if not torch.compiler.is_compiling():
        unique, inverse = torch.unique(ids, return_inverse=True)
        return inverse, unique.numel()
    if vocabulary <= ids.numel():
        return ids, vocabulary
    flat = ids.reshape(-1)
    ordered, order = torch.sort(flat)
    starts = torch.cat([torch.ones_like(flat[:1]), (ordered[1:] != ordered[:-1]).to(flat.dtype)])
    ranks = torch.cumsum(starts, dim=0) - 1
    return torch.empty_like(flat).scatter_(0, order, ranks).reshape(ids.shape), flat.numel()


def use_ghost(op: _Operands) -> bool:
    """Whether the ghost way costs fewer multiply-adds than materialising the gradients."""
    n_rows, batch, positions, out = op.cotangents.shape
    pairs = (batch * positions) ** 2
    if op.kind == "embedding":
        # Token equality is free; materialised gradients cover the tokens present only.
        in_features = min(op.in_features, batch * positions)
        ghost = pairs * (n_rows * n_rows * (out + 1))
        materialise = n_rows * batch * positions * out
    else:
        in_features = op.in_features
        ghost = pairs * (in_features + n_rows * n_rows * (out + 1))
        materialise = n_rows * batch * positions * in_features * out
    materialise += (n_rows * batch) ** 2 * in_features * out
    return ghost <= materialise


def _ghost(op: _Operands) -> Tensor:
    """``G[b, r, c, s] = Σ_{t,u} (d_rbt·d_scu)(a_bt·a_cu)``, in blocks of samples ``b``."""
    d = op.cotangents
    n_rows, batch, positions, out = d.shape
    all_d = d.reshape(n_rows * batch * positions, out)
    inner: Callable[[int, int], Tensor]
    if op.kind == "embedding":
        all_ids = op.inputs.reshape(1, batch * positions)

        def inner(start: int, stop: int) -> Tensor:
            same = op.inputs[start:stop].reshape((stop - start) * positions, 1) == all_ids
            return same.to(d.dtype)

    else:
        all_a = op.inputs.reshape(batch * positions, op.inputs.shape[2])

        def inner(start: int, stop: int) -> Tensor:
            return (
                op.inputs[start:stop].reshape((stop - start) * positions, all_a.shape[1]) @ all_a.T
            )

    step = max(1, _BLOCK_ELEMENTS // max(1, n_rows * n_rows * positions * positions * batch))
    result = d.new_empty(batch, n_rows, batch, n_rows)
    for start in range(0, batch, step):
        stop = min(batch, start + step)
        size = stop - start
        # [c·T, B·T] -> [1, c, T, 1, B, T]
        a_block = inner(start, stop).reshape(1, size, positions, 1, batch, positions)
        d_block = d[:, start:stop].reshape(n_rows * size * positions, out) @ all_d.T
        d_block = d_block.reshape(n_rows, size, positions, n_rows, batch, positions)
        block = (d_block * a_block).sum(dim=(2, 5))  # [R, c, R, B]
        result[start:stop] = block.permute(1, 0, 3, 2)
    return result


def _materialise(op: _Operands) -> Tensor:
    """The Gram matrix of the per-sample weight gradients ``[R, B, out, in]``."""
    d = op.cotangents
    n_rows, batch, positions, out = d.shape
    if op.kind != "embedding":
        return _square(torch.einsum("rbto,bti->rboi", d, op.inputs))
    # Scatter the cotangents into the rows of the tokens present in the batch.
    inverse, n_tokens = _unique_tokens(op.inputs, op.in_features)
    offsets = torch.arange(batch, device=d.device).unsqueeze(1) * n_tokens
    grads = d.new_zeros(n_rows, batch * n_tokens, out)
    grads.index_add_(1, (offsets + inverse).reshape(-1), d.reshape(n_rows, batch * positions, out))
    return _square(grads.reshape(n_rows, batch, n_tokens * out))

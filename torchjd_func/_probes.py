"""Per-sample Gramians from probes on the layers: a pure function that compiles in one graph.

For per-sample losses ``[B]`` (IWRM, one row per sample, ``R = 1``) or ``[B, m]`` (IWMTL,
``R = m``) of a model whose trainable parameters all belong to layers with a closed-form
per-sample Gramian (exactly ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1`` or
``nn.Embedding``: :mod:`torchjd_func.autogram._fast`), the Gramian ``G = J Jᵀ`` over the ``B·R``
losses needs only each layer call's input ``A`` and the cotangents ``D`` of its output:

1. a forward pass under ``torch.no_grad()`` gives the shapes of the layers' outputs (under
   ``torch.compile`` its results are unused, so its ops are dead code);
2. the differentiated forward pass (``torch.func.vjp`` of ``call(model, params, *inputs)`` w.r.t.
   the probes only) records each layer call's input and adds a zero **probe** to its output. The
   probes are the inputs of the vjp, so its cotangent w.r.t. a probe is ``D``: one backward pass with ones for losses
   ``[B]``, ``m`` of them (``vmap`` over one-hot task cotangents) for ``[B, m]``. As the loss of
   sample ``b`` depends on sample ``b`` only, ``D[r, b]`` is the derivative of loss ``(b, r)``
   w.r.t. sample ``b``'s part of the output;
3. each layer's Gramian ``[B, R, B, R]`` comes in closed form (``(A Aᵀ) ⊙ (D Dᵀ)`` summed over
   positions, or materialised per-sample gradients, whichever costs less), summed over layers;
4. the update ``Jᵀw`` for weights ``w`` comes in closed form from the same ``A`` and ``D``
   (``Σ w_rb d_rbt a_btᵀ`` per weight, ``Σ w_rb d_rbt`` per bias): no other backward pass, and the
   one for ``D`` computes no parameter gradient.

The probes are put in by forward hooks, installed by giving each layer a new ``_forward_hooks``
dict (its hooks plus the probe) and restoring the original dict in ``finally``:
``register_forward_hook`` breaks the graph under ``torch.compile`` (its ``RemovableHandle``
increments a class attribute) and dynamo does not trace item assignment into a hooks dict, but it
does trace replacing the dict.
"""

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn
from torch.func import vjp, vmap

from torchjd_func._jacobian import (
    VjpFn,
    _check_output,
    check_head_params,
    check_task_mapping,
    task_rows,
)
from torchjd_func._torch_compat import forward_hooks, set_forward_hooks, tree_leaves
from torchjd_func._tree import call, check_params, dotted, from_leaves, leaves
from torchjd_func._types import LeafKey
from torchjd_func.autogram._engine import _batch_incompatibility
from torchjd_func.autogram._fast import (
    _kind,
    _Operands,
    layer_gramian,
    layer_operands,
    task_gramian,
)

__all__ = [
    "MTLGramian",
    "PerSampleGramian",
    "value_and_mtl_gramian",
    "value_and_per_sample_gramian",
]

_PROBE = "torchjd_func.probe"
"""The key of the probe hook in a layer's hooks dict (never an int, the keys of other hooks)."""

_SUPPORTED = (
    "nn.Linear, nn.Conv1d / nn.Conv2d (groups=1) and nn.Embedding (without max_norm, "
    "scale_grad_by_freq or sparse), exactly (not subclasses)"
)

Hook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


class PerSampleGramian(NamedTuple):
    """What :func:`value_and_per_sample_gramian` returns."""

    losses: Tensor
    """The per-sample losses, ``[B]`` or ``[B, m]``."""
    gramian: Tensor
    """``[M, M]`` with ``M = losses.numel()``, rows in ``losses.flatten()`` order."""
    combine: Callable[[Tensor], TensorDict]
    """``combine(weights)``: ``Jᵀw`` for weights shaped like the losses, params-shaped."""


class MTLGramian(NamedTuple):
    """What :func:`value_and_mtl_gramian` returns."""

    losses: Tensor
    """The task losses ``[m]``."""
    gramian: Tensor
    """``[m, m]``: the Gramian of the task gradients w.r.t. the shared (trunk) parameters."""
    combine: Callable[[Tensor], TensorDict]
    """``combine(weights [m])``: ``Jᵀw`` w.r.t. the shared parameters, params-shaped."""
    head_grads: TensorDict
    """The gradient of ``Σ losses`` w.r.t. the head parameters."""


@dataclass(frozen=True)
class _Layer:
    """A layer holding trainable parameters of ``params``, and which of them."""

    path: str
    module: nn.Module
    kind: str
    weight: bool
    bias: bool

    def __str__(self) -> str:
        return _module_name(self.path, self.module)


def _module_name(path: str, module: nn.Module) -> str:
    where = f"module {path!r}" if path else "the model itself"
    return f"{where} ({type(module).__name__})"


def _coupling(module: nn.Module) -> str:
    return "is a recurrent layer" if isinstance(module, nn.RNNBase) else "mixes the samples"


def _coupling_advice(module: nn.Module, fallback: str) -> str:
    """What to do about a module that :func:`_batch_incompatibility` rejects, by its kind."""
    if isinstance(module, nn.RNNBase):
        return (
            "Use `jd_step` on the losses of the whole batch ([B] or [B, m]: the same per-sample "
            f"rows), or `{fallback}` where torch.vmap has a rule for the layer (it has none for "
            "nn.GRU and nn.RNN on the CPU, nor for nn.LSTM in float64 there)."
        )
    return (
        "Put it in eval mode (BatchNorm with running statistics), replace it (e.g. by GroupNorm "
        "or LayerNorm), or use `jd_step` on the losses of the whole batch."
    )


def check_model(model: nn.Module, *, per_sample: bool, step: str, fallback: str) -> None:
    """What can be checked from the model alone, when a Gramian step is built: each trainable
    parameter (``requires_grad=True``) belongs to a supported layer and, with ``per_sample``, no
    module couples the samples. Outside the traced step, so that the errors arrive as they are
    under ``torch.compile``; the step checks again (the model may change in between).

    Raises:
        TypeError: a trainable parameter belongs to an unsupported module, or is shared by
            several.
        ValueError: with ``per_sample``, a module couples the samples.
    """
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    _layers(model, names, per_sample=per_sample, step=step, fallback=fallback)


def _layers(
    model: nn.Module,
    names: Sequence[str],
    *,
    per_sample: bool = True,
    step: str = "gramian_step",
    fallback: str = "per_sample_step",
) -> list[_Layer]:
    """The layers owning the parameters ``names``, each checked to have a closed form.
    ``per_sample``: also reject the modules that couple the samples. ``step`` and ``fallback``
    name, in the errors, the step that needs the closed forms and the one that does not."""
    for path, module in model.named_modules():
        reason = _batch_incompatibility(module) if per_sample else None
        if reason is not None:
            raise ValueError(
                f"Per-sample Gramians need the loss of each sample to depend on that sample only, "
                f"but {_module_name(path, module)} {_coupling(module)}: {reason}. "
                f"{_coupling_advice(module, fallback)}"
            )
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((path, module, attr))
    everything = dict(model.named_parameters(remove_duplicate=False))
    found: dict[str, _Layer] = {}
    for name in names:
        param = everything.get(name)
        if param is None:
            continue  # `call` reports the names that the model does not have
        places = owners[id(param)]
        if len(places) > 1:
            shared = ", ".join(_module_name(path, module) for path, module, _ in places)
            raise TypeError(
                f"The trainable parameter {name!r} is shared by {shared}: tied weights have no "
                f"per-layer closed-form Gramian. Use `{fallback}`."
            )
        path, module, attr = places[0]
        kind = _kind(module)
        if kind is None or attr not in ("weight", "bias"):
            raise TypeError(
                f"The trainable parameter {name!r} belongs to "
                f"{_module_name(path, module)}, which has no closed-form Gramian: "
                f"`{step}` supports {_SUPPORTED}. Use `{fallback}`, or freeze this "
                "parameter (`requires_grad_(False)`, and leave it out of `params`)."
            )
        layer = found.get(path, _Layer(path, module, kind, False, False))
        found[path] = _Layer(
            path,
            module,
            kind,
            layer.weight or attr == "weight",
            layer.bias or attr == "bias",
        )
    return list(found.values())


def _run(
    model: nn.Module,
    params: TensorDictBase,
    inputs: Sequence[Any],
    layers: Sequence[_Layer],
    hook_of: Callable[[int], Hook],
) -> Any:
    """``call(model, params, *inputs)`` with the hook ``hook_of(i)`` on layer ``i``, removed after
    (even on an error)."""
    originals = [forward_hooks(layer.module) for layer in layers]
    try:
        for i, (layer, original) in enumerate(zip(layers, originals, strict=True)):
            hooks: dict[Any, Callable[..., Any]] = OrderedDict([*original.items()])
            hooks[_PROBE] = hook_of(i)
            set_forward_hooks(layer.module, hooks)
        return call(model, params, *inputs)
    finally:
        for layer, original in zip(layers, originals, strict=True):
            set_forward_hooks(layer.module, original)


class _Plan(NamedTuple):
    """One layer call of the forward pass, in call order."""

    layer: int
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def _discover(
    model: nn.Module,
    params: TensorDictBase,
    inputs: Sequence[Any],
    layers: Sequence[_Layer],
    fallback: str,
) -> list[_Plan]:
    """The layer calls of a forward pass, checking that every parameter of ``params`` is used
    inside the forward of its layer only.

    The closed forms see a layer's parameters only through its calls: a parent reading
    ``self.fc.weight`` itself (``F.linear(h, self.fc.weight)``, weight tying by hand) would have
    that use silently dropped. So this forward pass is differentiated (``vjp``) w.r.t. the
    parameters, with each layer's output detached in its hook: the model's outputs then require
    grad exactly when a parameter reaches them otherwise, a static property (no backward pass,
    no host sync; under ``torch.compile`` the pass is dead code). The backward pass runs only to
    name the culprits in the error.
    """
    plan: list[_Plan] = []
    keys = list(check_params(params))

    def hook_of(i: int) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            plan.append(_Plan(i, output.shape, output.dtype, output.device))
            return output.detach()

        return hook

    outside: list[bool] = []

    def forward(*leaf_tensors: Tensor) -> Tensor:
        tensors = from_leaves(dict(zip(keys, leaf_tensors, strict=True)), [])
        outputs = _run(model, tensors, inputs, layers, hook_of)
        reached = [t for t in tree_leaves(outputs) if isinstance(t, Tensor) and t.requires_grad]
        outside.append(bool(reached))
        return sum((t.sum() for t in reached), torch.zeros((), device=leaf_tensors[0].device))

    total, vjp_fn = cast("tuple[Tensor, VjpFn]", vjp(forward, *leaves(params).values()))
    if outside[0]:
        used: list[str] = []
        if not torch.compiler.is_compiling():  # naming them reads the gradients on the host
            grads = vjp_fn(torch.ones_like(total))
            used = [dotted(key) for key, grad in zip(keys, grads, strict=True) if grad.any()]
        named = f"{used} are" if used else "a parameter of `params` is"
        raise ValueError(
            f"The parameters {named} used outside the forward of the layer that holds them (a "
            "parent module reading `self.fc.weight` instead of calling `self.fc`, or weights "
            "tied by hand as in `F.linear(h, self.embedding.weight)`): the closed-form Gramians "
            "see a parameter only through its layer's calls, so that use would be missing. Call "
            f"the layer itself, or use `{fallback}`, which handles any use of the parameters."
        )
    return plan


def _probe_hooks(
    plan: Sequence[_Plan],
    layers: Sequence[_Layer],
    probes: Sequence[Tensor],
    recorded: list[Tensor],
    fallback: str,
    versions: list[int] | None = None,
) -> Callable[[int], Hook]:
    """Hooks that record each layer call's input in ``recorded`` (and, eagerly, its version
    counter in ``versions``, for :func:`_check_inputs_unchanged`) and add its probe to the
    output, checking that the calls come in the order of ``plan``."""

    def hook_of(i: int) -> Hook:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
            n = len(recorded)
            if n >= len(plan) or plan[n].layer != i:
                raise RuntimeError(
                    "The model called its layers in a different order in two forward passes "
                    "over the same inputs (control flow depending on randomness?)."
                )
            if len(args) != 1 or not isinstance(args[0], Tensor):
                raise TypeError(
                    f"{layers[i]} must be called with exactly one positional tensor input "
                    f"to have a closed-form Gramian. Use `{fallback}`."
                )
            recorded.append(args[0])
            if versions is not None and not torch.compiler.is_compiling():
                versions.append(args[0]._version)  # dynamo does not trace `_version`
            return output + probes[n]

        return hook

    return hook_of


def _check_inputs_unchanged(
    layers: Sequence[_Layer],
    plan: Sequence[_Plan],
    recorded: Sequence[Tensor],
    versions: Sequence[int],
    fallback: str,
) -> None:
    """Raises if a layer's input was modified in place after the layer used it (e.g.
    ``h += layer(h)``): its closed-form Gramian would use the modified values. Eager only (the
    versions are not recorded under ``torch.compile``)."""
    for step, x, version in zip(plan, recorded, versions, strict=False):
        if x._version != version:
            raise ValueError(
                f"The input of {layers[step.layer]} was modified in place after the layer used "
                "it (e.g. `h += layer(h)`), so its closed-form Gramian would use the modified "
                f"values. Use an out-of-place operation (`h = h + layer(h)`), or `{fallback}`."
            )


def _layer_parts(
    layers: Sequence[_Layer],
    plan: Sequence[_Plan],
    recorded: Sequence[Tensor],
    cotangents: Sequence[Tensor],
    batch: int | None,
    fallback: str,
) -> list[list[_Operands]]:
    """Each layer's calls as closed-form operands (inputs and cotangents ``[R, ...]``)."""
    parts: list[list[_Operands]] = [[] for _ in layers]
    for step, x, d in zip(plan, recorded, cotangents, strict=True):
        layer = layers[step.layer]
        if x.ndim == 0 or (batch is not None and x.shape[0] != batch):
            raise ValueError(
                f"The input of {layer} has shape {list(x.shape)}: it is not batched on dim 0 "
                f"(batch size {batch}). Use `{fallback}`."
            )
        operands = layer_operands(layer.kind, layer.module, x, d)
        if operands is None:
            raise TypeError(
                f"A call of {layer} has no closed-form Gramian (an unbatched input, or input, "
                f"output and weight of different dtypes or devices). Use `{fallback}`."
            )
        parts[step.layer].append(operands)
    return parts


def _check_losses(losses: Tensor, batch: int) -> None:
    if losses.ndim not in (1, 2) or losses.shape[0] != batch:
        raise ValueError(
            "`losses_fn` must return per-sample losses of shape [B] (IWRM) or [B, m] (IWMTL), "
            f"with B = {batch} the size of dim 0 of the first input; got shape "
            f"{list(losses.shape)}. Reduce over anything but the samples (and tasks), e.g. "
            "`.mean(dim=1)`, never over the batch."
        )


def _weighted_gradients(
    layer: _Layer, parts: Sequence[_Operands], weights: Tensor
) -> dict[str, Tensor]:
    """``Σ_{r,b} w_rb ∇ loss_rb`` w.r.t. the layer's trainable parameters, by name, in closed
    form from its calls' operands (inputs ``[B, T, in]`` or ids ``[B, T]``, cotangents
    ``[R, B, T, out]``) and the weights ``[R, B]``, or ``[R]`` for losses reduced over the batch
    (MTL: ``Σ_r w_r ∇ loss_r``)."""
    module = layer.module
    prefix = f"{layer.path}." if layer.path else ""
    weight = cast(Tensor, module.weight)
    bias = getattr(module, "bias", None)
    grad_weight = torch.zeros_like(weight) if layer.weight else None
    grad_bias = torch.zeros_like(bias) if layer.bias and isinstance(bias, Tensor) else None
    for part in parts:
        # Σ_r w_rb d_rbt: the cotangent of the weighted sum of the losses, [B, T, out].
        per_row = (
            weights[:, None].expand(-1, part.cotangents.shape[1]) if weights.ndim == 1 else weights
        )
        weighted = torch.einsum("rbto,rb->bto", part.cotangents, per_row)
        if grad_weight is not None:
            if part.kind == "embedding":
                rows = weighted.reshape(-1, weighted.shape[-1])
                grad_weight = grad_weight.index_add(0, part.inputs.reshape(-1), rows)
            else:
                flat = torch.einsum("bto,bti->oi", weighted, part.inputs)
                grad_weight = grad_weight + flat.reshape(weight.shape)
        if grad_bias is not None:
            grad_bias = grad_bias + weighted.sum(dim=(0, 1))
    grads: dict[str, Tensor] = {}
    if grad_weight is not None:
        grads[f"{prefix}weight"] = grad_weight
    if grad_bias is not None:
        grads[f"{prefix}bias"] = grad_bias
    return grads


def _check_weights(weights: Tensor, losses: Tensor) -> None:
    if weights.shape != losses.shape:
        raise ValueError(
            f"Expected weights of the losses' shape {list(losses.shape)}, got "
            f"{list(weights.shape)}."
        )


def _closed_form_update(
    layers: Sequence[_Layer],
    parts: Sequence[Sequence[_Operands]],
    params_leaves: dict[LeafKey, Tensor],
    weights: Tensor,
) -> TensorDict:
    """``Jᵀw`` params-shaped, from every layer's operands (:func:`_weighted_gradients`); zero for
    the parameters of layers that no call reached."""
    grads: dict[str, Tensor] = {}
    for layer, layer_parts in zip(layers, parts, strict=True):
        grads.update(_weighted_gradients(layer, layer_parts, weights))
    leaves_ = {
        key: grads.get(dotted(key), torch.zeros_like(leaf)) for key, leaf in params_leaves.items()
    }
    return from_leaves(leaves_, [])


def value_and_per_sample_gramian(
    model: nn.Module,
    params: TensorDictBase,
    inputs: Sequence[Any],
    losses_fn: Callable[..., Tensor],
    targets: Sequence[Any] = (),
) -> PerSampleGramian:
    """Per-sample losses, their Gramian from the layers' closed forms, and ``w -> Jᵀw``.

    With ``outputs = call(model, params, *inputs)`` and ``losses = losses_fn(outputs, *targets)``
    of shape ``[B]`` or ``[B, m]`` (``B = inputs[0].shape[0]``), returns the flattened Gramian
    ``[M, M]`` (``M = losses.numel()``) of the Jacobian of the losses w.r.t. ``params``, without
    computing that Jacobian. Every trainable parameter in ``params`` must belong to a supported
    layer, each of whose calls takes one positional input batched on dim 0.

    The loss of sample ``b`` must depend on sample ``b`` only: a batch statistic (BatchNorm in
    training mode) or any other coupling of the samples gives a wrong Gramian; the modules known
    to couple them are rejected.

    Args:
        model: The model; its supported layers get temporary forward hooks.
        params: Its trainable parameters, keyed as :func:`~torchjd_func.params_of` gives them.
        inputs: The model's positional inputs; the first is a tensor batched on dim 0.
        losses_fn: ``losses_fn(outputs, *targets) -> losses [B] or [B, m]``.
        targets: Further arguments of ``losses_fn``.

    Returns:
        ``PerSampleGramian(losses, gramian, combine)``.

    Raises:
        TypeError: a trainable parameter belongs to an unsupported module (or is shared by
            several), or a layer call has no closed form (keyword input, mixed dtypes).
        ValueError: the losses are not ``[B]`` or ``[B, m]``, a module couples the samples, or
            a layer's input is not batched on dim 0.
    """
    if not inputs or not isinstance(inputs[0], Tensor) or inputs[0].ndim == 0:
        raise ValueError(
            "The inputs must start with a tensor batched on dim 0 (the samples), got "
            f"{[type(i).__name__ for i in inputs]}."
        )
    batch = inputs[0].shape[0]
    params_leaves = check_params(params)
    keys: list[LeafKey] = list(params_leaves)
    layers = _layers(model, [dotted(key) for key in keys])
    plan = _discover(model, params, inputs, layers, "per_sample_step")

    def forward(
        leaf_tensors: tuple[Tensor, ...], probes: tuple[Tensor, ...]
    ) -> tuple[Tensor, list[Tensor]]:
        recorded: list[Tensor] = []
        versions: list[int] = []
        hook_of = _probe_hooks(plan, layers, probes, recorded, "per_sample_step", versions)
        tensors = from_leaves(dict(zip(keys, leaf_tensors, strict=True)), [])
        outputs = _run(model, tensors, inputs, layers, hook_of)
        losses = _check_output(losses_fn(outputs, *targets), "`losses_fn`")
        _check_losses(losses, batch)
        _check_inputs_unchanged(layers, plan, recorded, versions, "per_sample_step")
        return losses, recorded

    probes = tuple(torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in plan)
    leaf_tensors = tuple(params_leaves.values())
    # Differentiated w.r.t. the probes only: the backward pass computes the cotangents of the
    # layer outputs, not the parameter gradients, which come in closed form (`combine`).
    losses, vjp_fn, recorded = cast(
        "tuple[Tensor, VjpFn, list[Tensor]]",
        vjp(lambda p: forward(leaf_tensors, p), probes, has_aux=True),
    )
    cotangents: Sequence[Tensor]
    if losses.ndim == 1:
        cotangents = [d.unsqueeze(0) for d in vjp_fn(torch.ones_like(losses))[0]]
    else:
        n_tasks = losses.shape[1]
        one_hot = torch.eye(n_tasks, dtype=losses.dtype, device=losses.device)
        rows = one_hot.unsqueeze(1).expand(n_tasks, batch, n_tasks)  # [R, B, m]
        per_task = vmap(lambda row: vjp_fn(row)[0])(rows)
        cotangents = cast("tuple[Tensor, ...]", per_task)  # each [R, *output.shape]

    parts = _layer_parts(layers, plan, recorded, cotangents, batch, "per_sample_step")
    n_rows = losses.numel()
    total = losses.new_zeros(n_rows, n_rows)
    for layer, layer_parts in zip(layers, parts, strict=True):
        if layer_parts:  # a layer that no call reached has zero gradients
            square, _ = layer_gramian(layer_parts, layer.weight, layer.bias)
            total = total + square.reshape(n_rows, n_rows)

    def combine(weights: Tensor) -> TensorDict:
        _check_weights(weights, losses)
        # [R, B]: one weight per (row, sample), as the cotangents are laid out.
        rows_first = weights.to(losses.dtype).reshape(batch, -1).T
        return _closed_form_update(layers, parts, params_leaves, rows_first)

    return PerSampleGramian(losses, total, combine)


def value_and_mtl_gramian(
    trunk: nn.Module,
    shared_params: TensorDictBase,
    trunk_inputs: Sequence[Any],
    heads_fn: Callable[..., Tensor] | Mapping[str, Callable[..., Tensor]],
    head_params: TensorDictBase,
    head_args: Sequence[Any] = (),
) -> MTLGramian:
    """Task losses, the Gramian of their trunk gradients from the layers' closed forms, and
    ``w -> Jᵀw``: MTL without the per-task Jacobian of the trunk.

    With ``features = call(trunk, shared_params, *trunk_inputs)`` and
    ``losses = heads_fn(head_params, features, *head_args)`` of shape ``[m]``, each trunk layer's
    part of task ``i``'s gradient is ``D_iᵀ A`` (``A`` the layer's inputs, ``D_i`` the cotangents
    of ``losses[i]`` w.r.t. its outputs, over all the samples and positions). So the Gramian is
    ``Σ_layers [⟨D_i, (A Aᵀ) D_j⟩]`` (plus the bias terms) or, where cheaper, the Gramian of the
    materialised ``D_iᵀ A``: the autogram engine's closed forms with the batch folded in
    (``layer_gramian(..., batched=False)``). The backward passes (``m`` of them, vmapped, through
    the heads and the trunk) are taken w.r.t. probes on the layers' outputs and the head
    parameters only: no per-task weight gradient of the trunk is formed unless the closed form
    chooses to.

    Every trainable parameter of ``shared_params`` must belong to a supported layer of the trunk
    (as for :func:`value_and_per_sample_gramian`); unlike there, the samples may be coupled
    (BatchNorm in training mode is fine): the task losses are already reduced over the batch.

    Args:
        trunk: The shared trunk; its supported layers get temporary forward hooks.
        shared_params: Its trainable parameters, keyed as :func:`~torchjd_func.params_of` gives
            them.
        trunk_inputs: The trunk's positional inputs.
        heads_fn: ``heads_fn(head_params, features, *head_args) -> losses [m]``; or a mapping
            ``{task: fn}`` with ``fn(head_params[task], features, *head_args) -> scalar loss``
            (one head per task, ``head_params`` keyed by task): then each task's backward pass
            goes through its own head only, and the trunk must return one Tensor.
        head_params: The heads' parameters (a TensorDict, possibly empty).
        head_args: Further arguments of ``heads_fn``.

    Returns:
        ``MTLGramian(losses, gramian, combine, head_grads)``.

    Raises:
        TypeError: a trainable parameter belongs to an unsupported module (or is shared by
            several), or a layer call has no closed form.
        ValueError: the losses are not a vector ``[m]``.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func import params_of
        >>> trunk = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
        >>> def losses_fn(head_params, features):  # two tasks, no head parameters
        ...     return torch.stack([features[:, 0].mean(), features.pow(2).mean()])
        >>> x = torch.randn(8, 3)
        >>> out = value_and_mtl_gramian(trunk, params_of(trunk), (x,), losses_fn, TensorDict())
        >>> out.gramian.shape, sorted(out.combine(torch.ones(2)).keys())
        (torch.Size([2, 2]), ['0'])
    """
    fallback = "mtl_step"
    shared_leaves = check_params(shared_params, "shared_params")
    if isinstance(heads_fn, Mapping):
        check_task_mapping(heads_fn, head_params)
    keys: list[LeafKey] = list(shared_leaves)
    head_leaves = check_head_params(head_params)
    head_keys = list(head_leaves)
    layers = _layers(
        trunk,
        [dotted(key) for key in keys],
        per_sample=False,
        step="mtl_gramian_step",
        fallback=fallback,
    )
    plan = _discover(trunk, shared_params, trunk_inputs, layers, fallback)

    probes = tuple(torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in plan)

    def trunk_forward(probes: tuple[Tensor, ...]) -> tuple[Any, list[Tensor]]:
        recorded: list[Tensor] = []
        versions: list[int] = []
        hook_of = _probe_hooks(plan, layers, probes, recorded, fallback, versions)
        features = _run(trunk, shared_params, trunk_inputs, layers, hook_of)
        _check_inputs_unchanged(layers, plan, recorded, versions, fallback)
        return features, recorded

    if isinstance(heads_fn, Mapping):
        losses, recorded, cotangents, head_grads = _per_task_cotangents(
            trunk_forward, probes, heads_fn, head_params, head_args
        )
    else:

        def forward(
            probes: tuple[Tensor, ...], *head_tensors: Tensor
        ) -> tuple[Tensor, list[Tensor]]:
            features, recorded = trunk_forward(probes)
            heads = from_leaves(dict(zip(head_keys, head_tensors, strict=True)), [])
            losses = _check_output(heads_fn(heads, features, *head_args), "`heads_fn`")
            if losses.ndim != 1:
                raise ValueError(
                    f"`heads_fn` must return the task losses as a vector [m], got shape "
                    f"{list(losses.shape)}."
                )
            return losses, recorded

        losses, vjp_fn, recorded = cast(
            "tuple[Tensor, VjpFn, list[Tensor]]",
            vjp(forward, probes, *head_leaves.values(), has_aux=True),
        )
        rows = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
        per_task = cast("tuple[Any, ...]", vmap(vjp_fn)(rows))  # ([m, *out] per probe, heads)
        cotangents = per_task[0]
        head_grads = from_leaves(
            {key: rows_.sum(0) for key, rows_ in zip(head_keys, per_task[1:], strict=True)}, []
        )
    n_tasks = losses.shape[0]
    parts = _layer_parts(layers, plan, recorded, cotangents, None, fallback)
    total = losses.new_zeros(n_tasks, n_tasks)
    for layer, layer_parts in zip(layers, parts, strict=True):
        if layer_parts:
            total = total + task_gramian(layer_parts, layer.weight, layer.bias)

    def combine(weights: Tensor) -> TensorDict:
        _check_weights(weights, losses)
        return _closed_form_update(layers, parts, shared_leaves, weights.to(losses.dtype))

    return MTLGramian(losses, total, combine, head_grads)


def _per_task_cotangents(
    trunk_forward: Callable[[tuple[Tensor, ...]], tuple[Any, list[Tensor]]],
    probes: tuple[Tensor, ...],
    task_fns: Mapping[str, Callable[..., Tensor]],
    head_params: TensorDictBase,
    head_args: Sequence[Any],
) -> tuple[Tensor, list[Tensor], tuple[Tensor, ...], TensorDict]:
    """Losses, the trunk layers' inputs and per-task cotangents ``[m, *out]``, and the head
    gradients: one backward pass per task through its own head only
    (:func:`~torchjd_func._jacobian.task_rows`), then the ``m`` feature cotangents vmapped
    through the trunk."""
    features, trunk_vjp, recorded = cast(
        "tuple[Any, VjpFn, list[Tensor]]", vjp(trunk_forward, probes, has_aux=True)
    )
    if not isinstance(features, Tensor):
        raise TypeError(
            "With `heads_fn` a mapping of per-task functions, the trunk must return one Tensor "
            f"of features, got {type(features).__name__}."
        )
    losses, head_grads, (rows,) = task_rows(
        task_fns, head_params, (features,), lambda feats: feats[0], head_args
    )
    cotangents = cast("tuple[Tensor, ...]", vmap(trunk_vjp)(rows)[0])
    return losses, recorded, cotangents, head_grads

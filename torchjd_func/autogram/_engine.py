"""The autogram ``Engine``: the Gramian of a tensor's Jacobian w.r.t. the parameters of modules.

Two ways, chosen by ``batch_dim``:

* ``batch_dim=None``: vector-Jacobian products of the rows of an identity through the existing
  autograd graph (``torch.autograd.grad`` with ``is_grads_batched=True``), reduced to a Gramian leaf
  by leaf with :func:`torchjd_func.gramian`. Exact for any code.
* ``batch_dim=k``: forward hooks record the calls of the modules holding parameters; one batched
  backward pass gives the cotangents of ``output`` w.r.t. each recorded module output (all-ones
  over the batch, an identity over the other dims of ``output``); then each module's forward is
  re-run on one sample at a time (a functional call + ``vjp`` under ``vmap`` over the
  batch), which gives its per-sample parameter gradients, squared into the Gramian module by
  module: ``G = Σ_modules J_mod J_modᵀ``. Units that are exactly an ``nn.Linear``,
  ``nn.Conv1d``/``nn.Conv2d`` or ``nn.Embedding`` skip the re-run: their Gramian comes in closed
  form from the recorded inputs and the cotangents (:mod:`torchjd_func.autogram._fast`).
"""

import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tensordict import TensorDict
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.func import vjp, vmap
from torch.utils.hooks import RemovableHandle

from torchjd_func._gramian import gramian
from torchjd_func._torch_compat import tree_flatten, tree_map, tree_map_only
from torchjd_func._tree import functional
from torchjd_func.autogram._fast import DISPATCH, fast_square_gramian
from torchjd_func.autogram._recording import (
    Call,
    Reached,
    Recorder,
    RecordingState,
    check_params_used_inside,
    forget,
    reached_calls,
)

__all__ = ["Engine"]

_FALLBACK = "Use `batch_dim=None`, which is exact for any module (and slower)."


class Engine:
    """Computes the Gramian of the Jacobian of a tensor w.r.t. the parameters of some modules.

    The Gramian ``G = J Jᵀ`` of the Jacobian ``J`` of ``output`` (shape ``s``) w.r.t. the
    trainable parameters of ``modules`` holds the inner products of the gradients of the elements
    of ``output``. It is all that Gramian-based weightings (``UPGradWeighting``, ...) need:
    extract weights from it, then ``output.backward(weights)`` (Algorithm 3 of `Jacobian Descent
    for Multi-Objective Optimization <https://arxiv.org/abs/2406.16232>`_). ``J`` itself is never
    materialised for all parameters at once.

    ``compute_gramian`` returns the generalized Gramian ``[*s, *reversed(s)]`` (``[m, m]`` for a
    vector, ``[B, m, m, B]`` for per-sample, per-task losses ``[B, m]``, a 0-d squared gradient norm
    for a scalar); :func:`torchjd_func.flatten_gramian` gives the square ``[M, M]`` one with rows in
    ``output.flatten()`` order, and ``Flattening(weighting)`` weights it directly.

    ``batch_dim`` (keyword-only, required):

    * ``None``: differentiates ``output`` through its autograd graph, one batched backward pass
      for all its ``M`` elements. Exact for any architecture (BatchNorm in training mode, RNNs,
      randomness, any code between the modules), at the cost of the per-parameter Jacobian
      ``[M, *param.shape]`` in memory.
    * ``k`` (``int ≥ 0``): the dimension of ``output`` that indexes the samples of the batch,
      exploiting that each sample's losses depend on that sample only. ``output`` of shape ``s``
      then gets one backward pass per element of ``s`` without dim ``k`` (one in all for per-sample
      losses ``[B]``), and each module's per-sample gradients are computed by re-running its
      forward with ``torch.func``, one module at a time. ``output[..., b, ...]`` (``b`` on dim
      ``k``) must depend on sample ``b`` only, which cannot be checked; an ``output`` without dim
      ``k`` (e.g. a scalar) is taken as already reduced over the batch. The modules must then:

      * treat the samples independently (no batch statistics: BatchNorm only in eval mode with
        running statistics; no ``track_running_stats`` in training mode; no RNNs);
      * take and return tensors batched on dim 0 (``batch_first=True`` in attention layers),
        every tensor input and output included;
      * have no side effects and no randomness in modules that directly hold parameters
        (their forward is re-run: ``Dropout`` layers are fine, attention layers need
        ``dropout=0.0``), and not modify their inputs in place;
      * use each parameter only inside the forward of the module that directly holds it (a
        parent must call its children rather than read their parameters);
      * not return several outputs sharing memory from one module holding parameters (e.g.
        ``h, h[:, :3]``; the chunks of one ``h.chunk(2)`` are fine).

      In-place operations on the modules' outputs (``nn.ReLU(inplace=True)``,
      ``out += identity``) are supported: an output that is a view created inside the module,
      and each output of a module returning several tensors, is returned through an identity
      autograd node (same values and storage, no longer a view), so that such an operation keeps
      the record of the call; other outputs are returned unchanged.

      The modules holding parameters directly are found at construction, as in TorchJD: a module
      with a direct trainable parameter is handled as one unit (with its children), otherwise
      its children are searched. A parameter shared by several units is supported (their
      Jacobians are summed before squaring). Violations that can be detected raise a
      ``ValueError``.

    Each forward pass of the modules (with grad enabled) is recorded in its autograd graph, until
    ``compute_gramian`` consumes it: call it once per forward pass. Records of a forward whose
    output is never given to ``compute_gramian`` are freed with its graph. The engine keeps the
    graph (``retain_graph=True``) so that ``output.backward(weights)`` can follow.

    Args:
        *modules: The modules whose trainable parameters the Jacobian is taken with respect to.
            None may contain another; each needs a trainable parameter.
        batch_dim: The batch dimension of ``output``, or ``None`` for no assumption.

    Raises:
        TypeError: a module is not an ``nn.Module``, or ``batch_dim`` is not ``None`` or an int.
        ValueError: no module, a module given twice or inside another, a module without a
            trainable parameter, a negative ``batch_dim``, or (with ``batch_dim`` set) a module
            that does not treat samples independently (BatchNorm in training mode, running
            statistics, RNNs, dropout inside a module holding parameters).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchjd_func.aggregation import Flattening, UPGradWeighting
        >>> from torchjd_func.autogram import Engine
        >>> trunk = nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU())
        >>> head1, head2 = nn.Linear(3, 1), nn.Linear(3, 1)
        >>> engine = Engine(trunk, batch_dim=0)
        >>> x, y1, y2 = torch.randn(16, 10), torch.randn(16), torch.randn(16)
        >>> features = trunk(x)
        >>> losses = torch.stack(
        ...     [(head1(features).squeeze(1) - y1) ** 2, (head2(features).squeeze(1) - y2) ** 2],
        ...     dim=1,
        ... )  # [16, 2]: one loss per sample and per task
        >>> gramian = engine.compute_gramian(losses)
        >>> gramian.shape
        torch.Size([16, 2, 2, 16])
        >>> weights = Flattening(UPGradWeighting())(gramian)  # [16, 2]
        >>> losses.backward(weights)

        In-place activations after the recorded modules are fine:

        >>> model = nn.Sequential(nn.Linear(10, 4), nn.LayerNorm(4), nn.ReLU(inplace=True))
        >>> engine = Engine(model, batch_dim=0)
        >>> engine.compute_gramian(model(x).sum(dim=1)).shape  # per-sample losses [16]
        torch.Size([16, 16])
    """

    def __init__(self, *modules: nn.Module, batch_dim: int | None) -> None:
        if not modules:
            raise ValueError(
                "Engine needs at least one module, e.g. `Engine(model, batch_dim=0)`: the Gramian "
                "is taken w.r.t. the modules' parameters."
            )
        for i, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"Engine takes torch.nn.Module arguments; argument {i} is a "
                    f"{type(module).__name__}. Pass the modules, e.g. `Engine(model, batch_dim=0)`."
                )
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int)
        ):
            raise TypeError(f"`batch_dim` must be None or an int, got {type(batch_dim).__name__}.")
        if batch_dim is not None and batch_dim < 0:
            raise ValueError(
                f"`batch_dim` must be a non-negative dimension of the output, got {batch_dim}."
            )
        _check_disjoint(modules)
        for i, module in enumerate(modules):
            if not any(p.requires_grad for p in module.parameters()):
                raise ValueError(
                    f"Module {i} ({type(module).__name__}) has no trainable parameter: there is "
                    "nothing to differentiate. Leave it out of the Engine."
                )
        self._modules = modules
        self._batch_dim = batch_dim
        self._state = RecordingState()
        self._fast_gramians = True
        """Closed-form Gramians of supported layers (``False``: the generic re-run for all,
        an escape hatch used by the tests to compare both)."""
        self._units: list[nn.Module] = []
        handles: list[RemovableHandle] = []
        if batch_dim is not None:
            _check_batchable(modules)
            self._units = _dedup(unit for module in modules for unit in _units_of(module))
            _check_units_disjoint(self._units)
            _check_no_randomness(self._units)
            recorder = Recorder(self._state)
            # First among the forward hooks, the recorder sees what `forward` itself returned:
            # what the re-run (`_ForwardOnly`) computes again.
            handles = [
                u.register_forward_hook(recorder, with_kwargs=True, prepend=True)
                for u in self._units
            ]
        # The hooks reference the recording state, not the engine, so the engine can be freed;
        # then its hooks go too.
        weakref.finalize(self, _remove, handles)

    def compute_gramian(self, output: Tensor, /) -> Tensor:
        """The generalized Gramian of the Jacobian of ``output`` w.r.t. the modules' parameters.

        Args:
            output: A floating-point tensor of shape ``s`` computed (with grad enabled) from the
                modules' latest forward pass, e.g. losses ``[B, m]``.

        Returns:
            ``G`` of shape ``[*s, *reversed(s)]``: ``G[i_1..i_k, j_k..j_1] = <∇output[i], ∇output[j]>``.
            ``flatten_gramian(G)`` is ``J Jᵀ`` with rows in ``output.flatten()`` order.

        Raises:
            TypeError: ``output`` is not a floating-point Tensor.
            ValueError: ``output`` is empty or does not depend on the modules' parameters (or its
                forward pass was already consumed by ``compute_gramian``); with ``batch_dim`` set,
                the size of ``output`` along ``batch_dim`` differs from the modules' batch, a
                module's input or output is not batched on dim 0, an input was modified in
                place, a module stopped treating samples independently (e.g. switched to training
                mode), or a parameter is used outside the forward of the module holding it.
        """
        if not isinstance(output, Tensor):
            raise TypeError(f"`output` must be a Tensor, got {type(output).__name__}.")
        if not output.is_floating_point():
            raise TypeError(f"`output` must be floating-point, got dtype {output.dtype}.")
        if output.numel() == 0:
            raise ValueError(f"`output` is empty (shape {list(output.shape)}).")
        if not output.requires_grad:
            raise ValueError(
                "`output` does not require grad, so it does not depend on the modules' parameters: "
                "compute it from the modules' outputs, with grad enabled and without `.detach()`."
            )
        if self._batch_dim is None:
            return self._autograd_gramian(output)
        return self._batched_gramian(output, self._batch_dim)

    def _trainable_params(self) -> dict[int, tuple[str, Tensor]]:
        found: dict[int, tuple[str, Tensor]] = {}
        for i, module in enumerate(self._modules):
            for name, param in module.named_parameters():
                if param.requires_grad and id(param) not in found:
                    found[id(param)] = (f"{name!r} of module {i} ({type(module).__name__})", param)
        return found

    def _autograd_gramian(self, output: Tensor) -> Tensor:
        params = [param for _, param in self._trainable_params().values()]
        if not params:
            raise ValueError("The Engine's modules have no trainable parameter any more.")
        n_rows = output.numel()
        rows = torch.eye(n_rows, dtype=output.dtype, device=output.device)
        grads = _grads_of_rows(output, params, rows.reshape(n_rows, *output.shape))
        # An unused parameter contributes zero: leave it out of the sum.
        leaves = {
            str(i): grad.reshape(*output.shape, *param.shape)
            for i, (param, grad) in enumerate(zip(params, grads, strict=True))
            if grad is not None
        }
        if not leaves:
            raise _not_depending(recorded=False)
        return gramian(TensorDict(leaves, batch_size=output.shape))

    def _batched_gramian(self, output: Tensor, batch_dim: int) -> Tensor:
        # The modules' training modes may have changed since construction.
        _check_batchable(self._modules)
        _check_no_randomness(self._units)
        root = get_gradient_edge(output).node
        reached, holders = reached_calls(root, self._state.key)
        try:
            if not reached:
                raise _not_depending(recorded=True)
            calls = _dedup(r.call for r in reached)
            for call in calls:
                _check_not_aliased(call)
            owners = {key: name for key, (name, _) in self._trainable_params().items()}
            check_params_used_inside(root, self._state.key, owners)
            for call in calls:
                _check_unchanged(call)
            batch_size = _batch_size(calls)
            batched = output.ndim > batch_dim
            if batched and output.shape[batch_dim] != batch_size:
                raise ValueError(
                    f"`output` has shape {list(output.shape)}: size {output.shape[batch_dim]} along "
                    f"batch_dim={batch_dim}, but the modules processed batches of {batch_size} "
                    "samples. Give the per-sample output (batch on `batch_dim`) or a scalar, or "
                    "use `batch_dim=None`."
                )
            cotangents = _cotangents(output, batch_dim if batched else None, reached)
            if not cotangents:
                raise _not_depending(recorded=True)
            self._state.paused = True
            try:
                total = _sum_gramians(
                    output.shape, batch_dim if batched else None, cotangents, self._fast_gramians
                )
            finally:
                self._state.paused = False
        finally:
            forget(holders, self._state.key)
        return total


def _remove(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def _not_depending(recorded: bool) -> ValueError:
    where = " through a recorded forward pass" if recorded else ""
    hint = (
        " after creating the Engine, and call `compute_gramian` once per forward pass: it "
        "releases what the forward pass recorded"
        if recorded
        else ""
    )
    return ValueError(
        f"`output` does not depend on the parameters of the Engine's modules{where}. Compute it "
        f"from the modules' outputs (not detached){hint}."
    )


def _dedup(items: Iterator[Any] | Sequence[Any]) -> list[Any]:
    return list({id(item): item for item in items}.values())


def _check_disjoint(modules: Sequence[nn.Module]) -> None:
    for i, outer in enumerate(modules):
        for j, inner in enumerate(modules):
            if i != j and inner is outer:
                raise ValueError(f"Module {j} ({type(inner).__name__}) is given twice.")
            if i != j and any(sub is inner for sub in outer.modules()):
                raise ValueError(
                    f"Module {j} ({type(inner).__name__}) is inside module {i} "
                    f"({type(outer).__name__}): its parameters would be counted twice. Give only "
                    "the outer module, or modules that do not contain each other."
                )


def _units_of(module: nn.Module) -> Iterator[nn.Module]:
    """The modules that directly hold a trainable parameter, as TorchJD hooks them: such a module
    is one unit with all its children, otherwise its children are searched."""
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        yield module
    else:
        for child in module.children():
            yield from _units_of(child)


def _check_units_disjoint(units: Sequence[nn.Module]) -> None:
    # Only possible when the given modules share a submodule.
    for outer in units:
        for inner in units:
            if inner is not outer and any(sub is inner for sub in outer.modules()):
                raise ValueError(
                    f"{type(inner).__name__} is inside {type(outer).__name__}, which holds "
                    "parameters directly, and is also reached through another of the given "
                    "modules: its parameters would be counted twice. Give modules that share no "
                    f"submodule. {_FALLBACK}"
                )


def _batch_incompatibility(module: nn.Module) -> str | None:
    if isinstance(module, nn.RNNBase):
        return "recurrent layers keep their state batched on dim 1 and are not supported"
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
        module.training or not module.track_running_stats
    ):
        return "it normalises with the statistics of the batch, which mixes the samples"
    if module.training and getattr(module, "track_running_stats", False) is True:
        return "it updates running statistics in place during the forward pass"
    return None


def _check_batchable(modules: Sequence[nn.Module]) -> None:
    for i, outer in enumerate(modules):
        for name, sub in outer.named_modules():
            reason = _batch_incompatibility(sub)
            if reason is not None:
                where = f"{type(sub).__name__} {name!r} of module {i}" if name else f"Module {i}"
                raise ValueError(
                    f"{where} ({type(sub).__name__}) cannot be differentiated per sample with "
                    f"`batch_dim` set: {reason}. {_FALLBACK} Alternatively put BatchNorm in eval "
                    "mode, or replace it (e.g. by GroupNorm or LayerNorm)."
                )


def _check_no_randomness(units: Sequence[nn.Module]) -> None:
    for unit in units:
        for sub in unit.modules():
            p = (
                sub.p
                if isinstance(sub, nn.modules.dropout._DropoutNd)
                else sub.dropout
                if isinstance(sub, nn.MultiheadAttention)
                else 0.0
            )
            if sub.training and p > 0:
                raise ValueError(
                    f"{type(unit).__name__} holds parameters and applies dropout ({type(sub).__name__}"
                    f", p={p}) in training mode: with `batch_dim` set its forward is re-run, which "
                    "would draw a different mask. Set its dropout to 0.0 (Dropout layers outside "
                    f"modules holding parameters are fine). {_FALLBACK}"
                )


def _check_not_aliased(call: Call) -> None:
    if call.aliased:
        raise ValueError(
            f"{type(call.module).__name__} returned several outputs that share memory (e.g. a "
            "tensor and a view of it): with `batch_dim` set, the derivatives w.r.t. each of them "
            "cannot be told apart. Return tensors that do not alias each other (e.g. `.clone()` "
            f"one of them), or return only one of them. {_FALLBACK}"
        )


def _check_unchanged(call: Call) -> None:
    for tensor, version in zip(call.input_tensors(), call.versions, strict=True):
        if tensor._version != version:
            raise ValueError(
                f"An input of {type(call.module).__name__} was modified in place after the module "
                "used it, so its forward can no longer be re-run. Avoid in-place operations on "
                f"module inputs (e.g. `x += f(x)`). {_FALLBACK}"
            )


def _batch_size(calls: Sequence[Call]) -> int:
    sizes: dict[int, str] = {}
    for call in calls:
        name = type(call.module).__name__
        described = [(f"an input of {name}", t.shape) for t in call.input_tensors()]
        described += [(f"an output of {name}", slot.shape) for slot in call.slots]
        for what, shape in described:
            if len(shape) == 0:
                raise ValueError(
                    f"With `batch_dim` set, every tensor input and output of the modules must be "
                    f"batched on dim 0, but {what} is 0-dimensional. {_FALLBACK}"
                )
            sizes.setdefault(shape[0], f"{what} (shape {list(shape)})")
    if len(sizes) > 1:
        raise ValueError(
            "With `batch_dim` set, every tensor input and output of the modules must be batched "
            "on dim 0 with the same batch size, but: "
            + "; ".join(f"{what} has {size}" for size, what in sizes.items())
            + f". Use `batch_first=True` where layers offer it. {_FALLBACK}"
        )
    (size,) = sizes
    return size


def _cotangents(
    output: Tensor, batch_dim: int | None, reached: Sequence[Reached]
) -> dict[Call, list[Tensor | None]]:
    """The cotangents ``[R, *slot.shape]`` of ``output``'s rows w.r.t. each recorded output.

    Batched: ``R`` rows, one per element of ``output`` without ``batch_dim``, each all-ones over
    the batch. As output[b, r] depends on sample b only, the sample-b part of the cotangent of row
    r is exactly ∂output[b, r]/∂(sample b of the module output): the whole batch in one pass.
    Reduced (``batch_dim=None`` here): the rows of an identity over all of ``output``.
    """
    if batch_dim is None:
        n_rows = output.numel()
        rows = torch.eye(n_rows, dtype=output.dtype, device=output.device)
        rows = rows.reshape(n_rows, *output.shape)
    else:
        rest = [size for dim, size in enumerate(output.shape) if dim != batch_dim]
        n_rows = torch.Size(rest).numel()
        rows = torch.eye(n_rows, dtype=output.dtype, device=output.device).reshape(n_rows, *rest)
        rows = rows.unsqueeze(batch_dim + 1).expand(n_rows, *output.shape)
    # A tensor returned twice (one edge) gets its cotangent once: it already sums both uses.
    unique = _dedup_edges(reached)
    grads = _grads_of_rows(output, [r.edge for r in unique], rows)
    found: dict[Call, list[Tensor | None]] = {}
    for r, grad in zip(unique, grads, strict=True):
        if grad is not None:
            found.setdefault(r.call, [None] * len(r.call.slots))[r.slot] = grad
    return found


def _grads_of_rows(
    output: Tensor, inputs: Sequence[Any], rows: Tensor
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` of ``output`` for each cotangent row of ``rows`` ``[R, *shape]``.

    The rows are batched (``is_grads_batched``); if an operation of the graph has no batching
    rule (e.g. cuDNN's RNN backward on CUDA), one backward pass per row instead, same values.
    """
    try:
        return torch.autograd.grad(
            output,
            inputs,
            grad_outputs=rows,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
    except RuntimeError as error:
        if "Batching rule not implemented" not in str(error):
            raise
    per_row = [
        torch.autograd.grad(output, inputs, grad_outputs=row, retain_graph=True, allow_unused=True)
        for row in rows
    ]
    stacked: list[Tensor | None] = []
    for column in zip(*per_row, strict=True):
        known = next((g for g in column if g is not None), None)
        if known is None:
            stacked.append(None)
        else:
            stacked.append(
                torch.stack([torch.zeros_like(known) if g is None else g for g in column])
            )
    return tuple(stacked)


def _dedup_edges(reached: Sequence[Reached]) -> list[Reached]:
    unique: dict[tuple[int, int], Reached] = {}
    for r in reached:
        unique.setdefault((id(r.edge.node), r.edge.output_nr), r)
    return list(unique.values())


def _sum_gramians(
    shape: torch.Size,
    batch_dim: int | None,
    cotangents: dict[Call, list[Tensor | None]],
    fast: bool = True,
) -> Tensor:
    """``Σ_groups J_group J_groupᵀ`` as a generalized Gramian, one group of modules at a time.

    Modules sharing a parameter form one group (their Jacobians w.r.t. it are summed before
    squaring); the calls of one module are summed likewise. A group made of one supported layer
    (``fast``) gets its Gramian in closed form, without its per-sample Jacobian.
    """
    total: Tensor | None = None
    for calls in _groups(list(cotangents)):
        if fast:
            params = _params_of(calls[0].module)
            square = fast_square_gramian(calls, cotangents, params, batch_dim is not None)
            if square is not None:
                group_gramian = _generalize(square, shape, batch_dim)
                total = group_gramian if total is None else total + group_gramian
                continue
        jacobian: dict[int, Tensor] = {}  # id(param) -> [B, R, *param.shape]
        for call in calls:
            params = _params_of(call.module)
            grads = _per_sample_grads(call, params, cotangents[call])
            for name, grad in grads.items():
                key = id(params[name])
                jacobian[key] = grad if key not in jacobian else jacobian[key] + grad
        group_gramian = _gramian_of_rows(jacobian, shape, batch_dim)
        total = group_gramian if total is None else total + group_gramian
    assert total is not None  # `cotangents` is not empty
    return total


def _params_of(module: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def _groups(calls: list[Call]) -> list[list[Call]]:
    groups: list[tuple[set[int], list[Call]]] = []
    for call in calls:
        ids = {id(p) for p in _params_of(call.module).values()}
        if not ids:
            continue  # frozen since the Engine was created: no column of the Jacobian
        merged = [g for g in groups if g[0] & ids]
        groups = [g for g in groups if not g[0] & ids]
        groups.append(
            (
                ids.union(*(g[0] for g in merged)),
                [c for g in merged for c in g[1]] + [call],
            )
        )
    return [members for _, members in groups]


class _ForwardOnly(nn.Module):
    """Runs ``module.forward`` without the module's own hooks.

    The recorded inputs already went through its forward pre-hooks, and the recorded outputs are
    those of ``forward`` (the recorder runs first among the forward hooks); other hooks (e.g.
    another engine's) must not see the re-run either.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.forward(*args, **kwargs)


def _per_sample_grads(
    call: Call, params: dict[str, Tensor], cotangents: list[Tensor | None]
) -> dict[str, Tensor]:
    """Per-sample gradients ``[B, R, *param.shape]``: for sample ``b`` and row ``r``, the
    vector-Jacobian product of the module's outputs on sample ``b`` alone with the sample-``b`` part
    of the row-``r`` cotangents, by ``vjp`` of a functional call under ``vmap`` over the batch."""
    module = call.module
    DISPATCH["generic"] += 1
    n_rows = next(c for c in cotangents if c is not None).shape[0]
    filled = tuple(
        c if c is not None else torch.zeros(n_rows, *s.shape, dtype=s.dtype, device=s.device)
        for c, s in zip(cotangents, call.slots, strict=True)
    )
    inputs = tree_map_only(Tensor, Tensor.detach, (call.args, call.kwargs))
    in_dims = tree_map(lambda v: 0 if isinstance(v, Tensor) else None, inputs)
    primals = {f"module.{name}": p.detach() for name, p in params.items()}
    forward_only = _ForwardOnly(module)
    indices = [slot.position for slot in call.slots]

    def one_sample(sample: Any, sample_cotangents: tuple[Tensor, ...]) -> dict[str, Tensor]:
        # Modules see a batch of one sample: some (e.g. nn.Flatten) treat a batch and a sample
        # differently.
        args, kwargs = tree_map_only(Tensor, lambda t: t.unsqueeze(0), sample)

        def outputs_of(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            leaves = tree_flatten(functional(forward_only, p, args, kwargs))[0]
            return tuple(leaves[i].squeeze(0) for i in indices)

        vjp_fn = vjp(outputs_of, primals)[1]
        grads: dict[str, Tensor] = vmap(vjp_fn)(sample_cotangents)[0]
        return {name.removeprefix("module."): grad for name, grad in grads.items()}

    try:
        result: dict[str, Tensor] = vmap(one_sample, in_dims=(in_dims, 1))(inputs, filled)
    except RuntimeError as error:
        raise RuntimeError(
            f"Re-running {type(module).__name__} on one sample at a time (torch.func.vmap of its "
            f"forward) failed: {error}. With `batch_dim` set, modules must treat samples "
            f"independently and have no data-dependent control flow. {_FALLBACK}"
        ) from error
    return result


def _gramian_of_rows(
    jacobian: dict[int, Tensor], shape: torch.Size, batch_dim: int | None
) -> Tensor:
    """The generalized Gramian ``[*shape, *reversed(shape)]`` of per-sample rows ``[B, R, *p]``."""
    if batch_dim is None:
        # Reduced over the batch: each row's gradient is the sum of the per-sample ones.
        leaves = {
            str(i): g.sum(0).reshape(*shape, *g.shape[2:]) for i, g in enumerate(jacobian.values())
        }
        return gramian(TensorDict(leaves, batch_size=shape))
    moved = torch.Size([shape[batch_dim], *shape[:batch_dim], *shape[batch_dim + 1 :]])
    leaves = {str(i): g.reshape(*moved, *g.shape[2:]) for i, g in enumerate(jacobian.values())}
    # [B, *rest, *reversed(rest), B] -> [*shape, *reversed(shape)]
    square = gramian(TensorDict(leaves, batch_size=moved))
    n_dims = len(shape)
    return square.movedim(0, batch_dim).movedim(2 * n_dims - 1, 2 * n_dims - 1 - batch_dim)


def _generalize(square: Tensor, shape: torch.Size, batch_dim: int | None) -> Tensor:
    """A square Gramian ``[B, R, B, R]`` over (sample, row) pairs (``B = 1`` when ``output`` has
    no batch dim; rows in the order of ``output`` without ``batch_dim``) as the generalized
    Gramian ``[*shape, *reversed(shape)]``."""
    if batch_dim is None:
        moved = shape
    else:
        moved = torch.Size([shape[batch_dim], *shape[:batch_dim], *shape[batch_dim + 1 :]])
    n_dims = len(moved)
    # [*moved, *moved] -> [*moved, *reversed(moved)]
    result = square.reshape((*moved, *moved)).permute(
        (*range(n_dims), *reversed(range(n_dims, 2 * n_dims)))
    )
    if batch_dim is None:
        return result
    return result.movedim(0, batch_dim).movedim(2 * n_dims - 1, 2 * n_dims - 1 - batch_dim)

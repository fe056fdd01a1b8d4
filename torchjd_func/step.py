"""Whole Jacobian-descent training steps as pure functions, ready for ``torch.compile``.

Each builder returns ``step(params, opt_state, agg_state, batch) -> StepOutput`` that runs the
forward pass once, computes the Jacobian, aggregates it with a :class:`PureWeighting` and applies
a functional :class:`~torchjd_func.optim.Optimizer`. Nothing is mutated, so
``torch.compile(step, fullgraph=True)`` traces it into one graph, compiled once and reused for
every batch of the same shapes.

* :func:`jd_step`: losses of any shape from ``losses_fn(params, *batch)``;
* :func:`per_sample_step`: instance-wise risk minimisation (one loss per sample, IWRM) or
  per-sample, per-task losses (IWMTL), from a function written for one sample;
* :func:`mtl_step`: a shared trunk and task heads, through the features (``mtl_jacobian``);
* :func:`gramian_step`: IWRM or IWMTL without the Jacobian: the per-sample Gramian in closed form
  from the layers' inputs and output cotangents (models made of ``nn.Linear``, ``nn.Conv1d``,
  ``nn.Conv2d`` and ``nn.Embedding`` layers).

Example:
    >>> import torch
    >>> from torchjd_func import call, params_of
    >>> from torchjd_func.aggregation import upgrad
    >>> from torchjd_func.optim import sgd
    >>> from torchjd_func.step import per_sample_step
    >>> model = torch.nn.Linear(3, 1)
    >>> def sample_loss(params, x, y):
    ...     return (call(model, params, x).squeeze() - y) ** 2
    >>> weighting, optimizer = upgrad(), sgd(lr=0.1)
    >>> step = per_sample_step(sample_loss, weighting, optimizer)  # wrap in torch.compile to compile
    >>> params = params_of(model)
    >>> opt_state, agg_state = optimizer.init(params), weighting.init(8)
    >>> out = step(params, opt_state, agg_state, (torch.randn(8, 3), torch.randn(8)))
    >>> out.metrics["losses"].shape
    torch.Size([8])
"""

import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, NamedTuple, TypeAlias

import torch
import torch.utils._pytree as pytree
from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn

from torchjd_func._gramian import combine, flatten_gramian, gramian, inner_products, reshape_weights
from torchjd_func._jacobian import (
    _check_chunk_size,
    mtl_jacobian,
    value_and_jacobian,
    value_and_per_sample_jacobian,
)
from torchjd_func._probes import check_model, value_and_mtl_gramian, value_and_per_sample_gramian
from torchjd_func._tree import leaves
from torchjd_func._types import FeaturesFn, LossFn
from torchjd_func.aggregation import CrossWeighting, JacobianAggregator, PureWeighting
from torchjd_func.aggregation._base import S
from torchjd_func.aggregation._kinds import describe_kind
from torchjd_func.optim import Optimizer, OptState

__all__ = [
    "StepFn",
    "StepOutput",
    "gramian_step",
    "jd_step",
    "mtl_gramian_step",
    "mtl_step",
    "per_sample_step",
]


class StepOutput(NamedTuple, Generic[OptState, S]):
    """What a step function returns, generic in the optimizer's and the weighting's state types
    (``StepOutput[SGDState, EmptyState]`` for ``sgd`` and ``upgrad``)."""

    params: TensorDict
    """The updated parameters (the given ones if the step was skipped)."""
    opt_state: OptState
    """The optimizer's new state (the given one if the step was skipped)."""
    agg_state: S
    """The weighting's new state (the given one if the step was skipped)."""
    metrics: dict[str, Tensor]
    """``"losses"`` (before the update), ``"weights"`` (the aggregation weights; absent for a
    :class:`~torchjd_func.aggregation.JacobianAggregator` that gives none, e.g. GradDrop) and
    ``"decrease"``: ``J d``, the first-order decrease of each loss per unit learning rate along
    the aggregated direction ``d`` (for UPGrad non-negative up to its regularisation,
    ``≥ −reg_eps·tr(G)·w``; for MTL, through the shared parameters only), all in the losses'
    shape; ``"skipped"``, a ``[]`` bool tensor: ``True`` when the step found a non-finite value
    and returned its inputs unchanged (always ``False`` with ``skip_nonfinite=False``)."""


StepFn: TypeAlias = Callable[
    [TensorDictBase, OptState, S, Sequence[object]], StepOutput[OptState, S]
]
"""``step(params, opt_state, agg_state, batch) -> StepOutput``: ``StepFn[SGDState, EmptyState]``
for ``sgd`` and ``upgrad``."""


class _Parts(NamedTuple):
    """What the builder-specific part of a step computes, before the optimizer."""

    losses: Tensor
    gramian: Any
    """The weighting's input: the Gramian ``[M, M]``, or the Jacobian's leaves."""
    weights: Tensor | None
    agg_state: Any
    grads: TensorDictBase
    """What the optimizer gets, params-shaped."""
    decrease: Tensor


_Core = Callable[[TensorDictBase, Any, Sequence[Any]], _Parts]
"""``core(params, agg_state, batch) -> _Parts``."""


def _check(
    weighting: object,
    optimizer: Optimizer[Any],
    skip_nonfinite: bool,
    *,
    functions: Mapping[str, object],
    modules: Mapping[str, object],
    step: str,
    jacobian_fallback: str | None = None,
) -> None:
    """Checks, when the step is built, what does not depend on the step's inputs: an error
    raised inside a compiled step reaches the caller as ``torch._dynamo.exc.Unsupported``.

    ``jacobian_fallback``: for a step that never builds the Jacobian, the step to use instead
    with a :class:`JacobianAggregator` (``None``: the step takes one)."""
    if isinstance(weighting, JacobianAggregator) and jacobian_fallback is not None:
        raise TypeError(
            f"`{step}` computes the Gramian without ever building the Jacobian, but `weighting` "
            f"is {describe_kind(weighting)}: use `{jacobian_fallback}` for it."
        )
    if isinstance(weighting, CrossWeighting):
        raise TypeError(
            f"`weighting` is {describe_kind(weighting)}, which `{step}` cannot build from one "
            "batch: compute the Jacobians of two batches, weight `cross_gramian(jac_1, jac_2)` "
            "with `weighting.update`, and apply the weights with `combine(jac, weights)`."
        )
    if not isinstance(weighting, PureWeighting | JacobianAggregator):
        kinds = "a PureWeighting (e.g. `upgrad()`)"
        if jacobian_fallback is None:
            kinds += " or a JacobianAggregator (e.g. `trimmed_mean(1)`)"
        raise TypeError(f"`weighting` must be {kinds}, got {type(weighting).__name__}.")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"`optimizer` must be a functional Optimizer (e.g. `sgd(0.1)`), got "
            f"{type(optimizer).__name__}."
        )
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"`skip_nonfinite` must be a bool, got {skip_nonfinite!r}.")
    for name, function in functions.items():
        if not callable(function):
            raise TypeError(f"`{name}` must be a function, got {type(function).__name__}.")
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(module).__name__}.")


def _check_in_dims(in_dims: object) -> None:
    dims = (in_dims,) if isinstance(in_dims, int) else in_dims
    if (
        not isinstance(dims, Sequence)
        or isinstance(in_dims, bool)
        or not all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in dims)
    ):
        raise TypeError(
            "`in_dims` must be an int (the batch dim of every input) or a sequence of ints and "
            f"Nones (one per input; None: not batched), got {in_dims!r}."
        )


def _check_heads_fn(heads_fn: object) -> None:
    if isinstance(heads_fn, Mapping):
        functions = list(heads_fn.values())
    elif isinstance(heads_fn, Sequence):
        functions = list(heads_fn)
    else:
        functions = [heads_fn]
    if not functions or not all(callable(f) for f in functions):
        raise TypeError(
            "`heads_fn` must be a function, a non-empty sequence of functions or a non-empty "
            f"mapping `task -> function`, got {heads_fn!r}."
        )


def _weigh(
    jacobian: TensorDictBase, weighting: PureWeighting[S] | JacobianAggregator[S], agg_state: S
) -> tuple[Any, Tensor | None, S, TensorDict, Tensor]:
    """``(G, weights, state, Jᵀw, J Jᵀw)`` for a Jacobian of losses of any shape (the steps check
    ``G``, the weighting's input, as well as its output). A :class:`JacobianAggregator` gets the
    Jacobian with its losses flattened, and its input (first) is the Jacobian's leaves."""
    if isinstance(weighting, JacobianAggregator):
        update, flat, new_state = weighting.update(jacobian.reshape(-1), agg_state)
        weights = None if flat is None else reshape_weights(flat, jacobian.batch_size)
        inputs = list(leaves(jacobian).values())
        return inputs, weights, new_state, update, inner_products(jacobian, update)
    square = flatten_gramian(gramian(jacobian))
    flat_weights, new_state = weighting.update(square, agg_state)
    weights = reshape_weights(flat_weights, jacobian.batch_size)
    update = combine(jacobian, weights)
    return square, weights, new_state, update, inner_products(jacobian, update)


def _all_finite(*trees: Any) -> Tensor:
    """``[]`` bool: whether every floating-point tensor in ``trees`` is finite (no host sync)."""
    flags = [
        torch.isfinite(leaf).all()
        for leaf in pytree.tree_leaves(trees)
        if isinstance(leaf, Tensor) and leaf.is_floating_point()
    ]
    return torch.stack(flags).all()


def _select(keep_new: Tensor, new: Any, old: Any) -> Any:
    """``new`` where ``keep_new``, else ``old``, tensor by tensor (the same pytree structure)."""
    return pytree.tree_map(
        lambda n, o: torch.where(keep_new, n, o) if isinstance(n, Tensor) else n, new, old
    )


def _step_fn(
    core: _Core, optimizer: Optimizer[OptState], skip_nonfinite: bool
) -> StepFn[OptState, Any]:
    """The step: ``core``, the optimizer, and the selection of the old or the new values."""

    def step(
        params: TensorDictBase, opt_state: OptState, agg_state: Any, batch: Sequence[object]
    ) -> StepOutput[OptState, Any]:
        parts = core(params, agg_state, batch)
        new_params, new_opt_state = optimizer.update(parts.grads, opt_state, params)
        metrics = {"losses": parts.losses, "decrease": parts.decrease}
        if parts.weights is not None:
            metrics["weights"] = parts.weights
        if not skip_nonfinite:
            skipped = torch.zeros((), dtype=torch.bool, device=parts.losses.device)
            metrics["skipped"] = skipped
            return StepOutput(new_params, new_opt_state, parts.agg_state, metrics)
        # The weighting's input, its output and the update are all checked: a weighting with a
        # state may give finite weights for a non-finite Gramian, and an update may overflow.
        finite = _all_finite(
            parts.losses,
            parts.gramian,
            parts.weights,
            parts.decrease,
            parts.grads,
            new_params,
            new_opt_state,
        )
        metrics["skipped"] = ~finite
        return StepOutput(
            _select(finite, new_params, params),
            _select(finite, new_opt_state, opt_state),
            _select(finite, parts.agg_state, agg_state),
            metrics,
        )

    # Dynamo caches the compiled graphs of a function, and counts its recompilations against
    # `torch._dynamo.config.recompile_limit` (8), per code object; every step would otherwise
    # share the code object of `step` above, each new step failing the guards of the previous
    # ones, so that a sweep of more than 8 compiled steps would stop with
    # `FailOnRecompileLimitHit`. A copy of the code object is a code object of its own.
    own = types.FunctionType(
        step.__code__.replace(), step.__globals__, step.__name__, None, step.__closure__
    )
    own.__qualname__, own.__doc__ = step.__qualname__, step.__doc__
    return own


def jd_step(
    losses_fn: LossFn,
    weighting: PureWeighting[S] | JacobianAggregator[S],
    optimizer: Optimizer[OptState],
    *,
    chunk_size: int | None = None,
    skip_nonfinite: bool = True,
) -> StepFn[OptState, S]:
    """A Jacobian-descent step for ``losses_fn(params, *batch)`` (losses of any shape ``s``).

    The Jacobian comes from :func:`~torchjd_func.value_and_jacobian` (one backward pass per loss,
    vmapped), the weights from ``weighting`` on the (flattened) Gramian, and the update
    ``Jᵀw`` goes to ``optimizer``.

    Args:
        losses_fn: ``losses_fn(params, *batch) -> losses``.
        weighting: E.g. ``upgrad()``, or a
            :class:`~torchjd_func.aggregation.JacobianAggregator` (e.g. ``trimmed_mean(1)``,
            initialised with ``init(params, m)``); its state is threaded through ``agg_state``.
        optimizer: E.g. ``sgd(0.1, momentum=0.9)`` or ``adam(1e-3)``.
        chunk_size: Rows of the Jacobian computed at once (see ``value_and_jacobian``).
        skip_nonfinite: If ``True`` (default), a step that meets a non-finite loss, Gramian,
            weight, decrease, update, new parameter or new optimizer state returns ``params``,
            ``opt_state`` and ``agg_state`` unchanged, with ``metrics["skipped"]`` ``True``
            (selected with ``torch.where``, no host sync). ``False``: non-finite values propagate.

    Returns:
        ``step(params, opt_state, agg_state, batch) -> StepOutput``.

    Example:
        >>> import torch
        >>> from torchjd_func import call, params_of
        >>> from torchjd_func.aggregation import upgrad
        >>> from torchjd_func.optim import adam
        >>> from torchjd_func.step import jd_step
        >>> model = torch.nn.Linear(4, 2)
        >>> losses_fn = lambda p, x, y: (call(model, p, x) - y).pow(2).mean(0)  # two losses
        >>> step = jd_step(losses_fn, upgrad(), adam(1e-2))
        >>> params = params_of(model)
        >>> out = step(params, adam(1e-2).init(params), upgrad().init(2), (torch.randn(8, 4), torch.randn(8, 2)))
        >>> out.metrics["weights"].shape
        torch.Size([2])
    """
    _check(
        weighting,
        optimizer,
        skip_nonfinite,
        functions={"losses_fn": losses_fn},
        modules={},
        step="jd_step",
    )
    _check_chunk_size(chunk_size)

    def core(params: TensorDictBase, agg_state: Any, batch: Sequence[Any]) -> _Parts:
        losses, jacobian, _ = value_and_jacobian(losses_fn, params, *batch, chunk_size=chunk_size)
        square, weights, new_state, update, decrease = _weigh(jacobian, weighting, agg_state)
        return _Parts(losses, square, weights, new_state, update, decrease)

    return _step_fn(core, optimizer, skip_nonfinite)


def per_sample_step(
    sample_losses_fn: LossFn,
    weighting: PureWeighting[S] | JacobianAggregator[S],
    optimizer: Optimizer[OptState],
    *,
    in_dims: int | Sequence[int | None] = 0,
    chunk_size: int | None = None,
    skip_nonfinite: bool = True,
) -> StepFn[OptState, S]:
    """An IWRM (losses ``[B]``) or IWMTL (losses ``[B, m]``) step from a per-sample function.

    ``sample_losses_fn(params, *sample)`` computes the loss (``[]``) or losses (``[m]``) of one
    sample; :func:`~torchjd_func.value_and_per_sample_jacobian` maps it over the batch. The
    weighting sees the ``[B·m, B·m]`` flattened Gramian and its weights come back as ``[B, m]``.
    Its state must be initialised for ``B·m`` losses.

    Args:
        sample_losses_fn: ``sample_losses_fn(params, *sample) -> losses of one sample``.
        weighting: E.g. ``upgrad()``.
        optimizer: E.g. ``sgd(0.1)``.
        in_dims: Batch dim of each input of ``batch`` (``None``: not batched).
        chunk_size: Samples processed at once (``None``: all).
        skip_nonfinite: If ``True`` (default), a step that meets a non-finite loss, Gramian,
            weight, decrease, update, new parameter or new optimizer state returns ``params``,
            ``opt_state`` and ``agg_state`` unchanged, with ``metrics["skipped"]`` ``True``
            (selected with ``torch.where``, no host sync). ``False``: non-finite values propagate.

    Returns:
        ``step(params, opt_state, agg_state, batch) -> StepOutput``.
    """
    _check(
        weighting,
        optimizer,
        skip_nonfinite,
        functions={"sample_losses_fn": sample_losses_fn},
        modules={},
        step="per_sample_step",
    )
    _check_in_dims(in_dims)
    _check_chunk_size(chunk_size)

    def core(params: TensorDictBase, agg_state: Any, batch: Sequence[Any]) -> _Parts:
        losses, jacobian, _ = value_and_per_sample_jacobian(
            sample_losses_fn, params, *batch, in_dims=in_dims, chunk_size=chunk_size
        )
        square, weights, new_state, update, decrease = _weigh(jacobian, weighting, agg_state)
        return _Parts(losses, square, weights, new_state, update, decrease)

    return _step_fn(core, optimizer, skip_nonfinite)


def mtl_step(
    trunk_fn: FeaturesFn,
    heads_fn: LossFn | Sequence[LossFn] | Mapping[str, LossFn],
    weighting: PureWeighting[S] | JacobianAggregator[S],
    optimizer: Optimizer[OptState],
    *,
    chunk_size: int | None = None,
    skip_nonfinite: bool = True,
) -> StepFn[OptState, S]:
    """A multi-task step: shared trunk aggregated by ``weighting``, heads by their own gradient.

    ``params`` is ``TensorDict({"shared": trunk params, "heads": head params})`` and ``batch`` is
    ``(trunk_args, head_args)``, two tuples passed to :func:`~torchjd_func.mtl_jacobian`.

    Args:
        trunk_fn: ``trunk_fn(shared_params, *trunk_args) -> features``.
        heads_fn: ``heads_fn(head_params, features, *head_args) -> losses [m]``, a sequence
            of per-task functions returning scalar losses, or a mapping ``{task: fn}`` whose
            functions take only their own head's parameters ``params["heads"][task]`` (see
            :func:`~torchjd_func.mtl_jacobian`).
        weighting: E.g. ``upgrad()``, initialised for ``m`` losses.
        optimizer: E.g. ``sgd(0.1)``, initialised with the whole ``params``.
        chunk_size: Losses differentiated at once.
        skip_nonfinite: If ``True`` (default), a step that meets a non-finite loss, Gramian,
            weight, decrease, update, new parameter or new optimizer state returns ``params``,
            ``opt_state`` and ``agg_state`` unchanged, with ``metrics["skipped"]`` ``True``
            (selected with ``torch.where``, no host sync). ``False``: non-finite values propagate.

    Returns:
        ``step(params, opt_state, agg_state, (trunk_args, head_args)) -> StepOutput``.
    """
    _check(
        weighting,
        optimizer,
        skip_nonfinite,
        functions={"trunk_fn": trunk_fn},
        modules={},
        step="mtl_step",
    )
    _check_heads_fn(heads_fn)
    _check_chunk_size(chunk_size)

    def core(params: TensorDictBase, agg_state: Any, batch: Sequence[Any]) -> _Parts:
        _check_mtl_params(params)
        trunk_args, head_args = _check_pair(batch, "(trunk_args, head_args)")
        out = mtl_jacobian(
            trunk_fn,
            heads_fn,
            params["shared"],
            params["heads"],
            trunk_args,
            head_args,
            chunk_size=chunk_size,
        )
        square, weights, new_state, update, decrease = _weigh(out.jacobian, weighting, agg_state)
        grads = TensorDict({"shared": update, "heads": out.head_grads}, batch_size=[])
        return _Parts(out.losses, square, weights, new_state, grads, decrease)

    return _step_fn(core, optimizer, skip_nonfinite)


def _check_mtl_params(params: TensorDictBase) -> None:
    if not isinstance(params, TensorDictBase) or set(params.keys()) != {"shared", "heads"}:
        keys = sorted(params.keys()) if isinstance(params, TensorDictBase) else type(params)
        raise ValueError(
            f'An MTL step takes `params = TensorDict({{"shared": ..., "heads": ...}})`, got {keys}.'
        )


def _describe(batch: object) -> str:
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return f"a {type(batch).__name__} of {[type(part).__name__ for part in batch]}"
    return f"a {type(batch).__name__}"


def _check_pair(batch: object, names: str) -> tuple[Sequence[Any], Sequence[Any]]:
    if not (
        isinstance(batch, Sequence)
        and len(batch) == 2
        and all(isinstance(part, Sequence) and not isinstance(part, str) for part in batch)
    ):
        raise ValueError(
            f"This step takes `batch = {names}`, two tuples (wrap a single tensor `x` as "
            f"`(x,)`), got {_describe(batch)}."
        )
    return batch[0], batch[1]


def mtl_gramian_step(
    trunk: nn.Module,
    heads_fn: LossFn | Mapping[str, LossFn],
    weighting: PureWeighting[S],
    optimizer: Optimizer[OptState],
    *,
    skip_nonfinite: bool = True,
) -> StepFn[OptState, S]:
    """:func:`mtl_step` for a trunk module of closed-form layers, without the task Jacobian.

    ``params`` is ``TensorDict({"shared": trunk params, "heads": head params})`` and ``batch`` is
    ``(trunk_inputs, head_args)``: the features are ``call(trunk, params["shared"],
    *trunk_inputs)`` and the losses ``heads_fn(params["heads"], features, *head_args)`` ``[m]``.
    The Gramian of the task gradients w.r.t. the trunk comes from each trunk layer's inputs ``A``
    and the cotangents ``D_i`` of each task at its outputs, ``⟨D_i, (A Aᵀ) D_j⟩`` (or the
    materialised ``D_iᵀ A``, whichever is cheaper), and the trunk's update ``Jᵀw`` from
    ``(Σ_i w_i D_i)ᵀ A``: the ``m`` vmapped backward passes compute the cotangents, not the
    per-task weight gradients ``[m, *param.shape]`` that :func:`mtl_step` builds and multiplies.
    The heads get the gradient of the sum of the losses, as in :func:`mtl_step`; the values are
    the same (tested).

    Every trainable parameter of the trunk must belong to a layer that is exactly an
    ``nn.Linear``, an ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1`` or an ``nn.Embedding``
    (without ``max_norm``, ``scale_grad_by_freq`` or ``sparse``), not shared with another module
    and called with one positional input; parameter-free modules and frozen layers may be
    anything, including batch statistics (the losses are reduced over the batch). Anything else:
    :func:`mtl_step`. The metrics are those of :func:`mtl_step`, ``"decrease"`` being ``G w``.

    Args:
        trunk: The shared trunk, called as ``call(trunk, params["shared"], *trunk_inputs)``.
        heads_fn: ``heads_fn(head_params, features, *head_args) -> losses [m]``, or, with one
            head per task and ``params["heads"]`` keyed by task, a mapping ``{task: fn}`` with
            ``fn(params["heads"][task], features, *head_args) -> scalar loss``: each task's
            backward pass then goes through its own head only (one function for all the tasks
            makes every task's backward pass compute the zero cotangents of the other heads).
        weighting: E.g. ``upgrad()``, initialised for ``m`` losses.
        optimizer: E.g. ``sgd(0.1)``, initialised with the whole ``params``.
        skip_nonfinite: If ``True`` (default), a step that meets a non-finite loss, Gramian,
            weight, decrease, update, new parameter or new optimizer state returns ``params``,
            ``opt_state`` and ``agg_state`` unchanged, with ``metrics["skipped"]`` ``True``
            (selected with ``torch.where``, no host sync). ``False``: non-finite values propagate.

    Returns:
        ``step(params, opt_state, agg_state, (trunk_inputs, head_args)) -> StepOutput``.

    Raises:
        TypeError: (when the step is built, and at the step) a trainable parameter of the trunk
            belongs to an unsupported module; (when built) a bad ``weighting``, ``optimizer``,
            ``heads_fn`` or ``skip_nonfinite``.
        ValueError: (at the step) bad ``params`` keys or ``batch``, or losses that are not a
            vector ``[m]``.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func import call, params_of
        >>> from torchjd_func.aggregation import upgrad
        >>> from torchjd_func.optim import sgd
        >>> from torchjd_func.step import mtl_gramian_step
        >>> trunk = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU())
        >>> heads = torch.nn.ModuleList([torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)])
        >>> def heads_fn(params, features, y):  # two tasks
        ...     outputs = [call(h, params[str(i)], features)[:, 0] for i, h in enumerate(heads)]
        ...     return torch.stack([(o - y[:, i]).pow(2).mean() for i, o in enumerate(outputs)])
        >>> weighting, optimizer = upgrad(), sgd(lr=0.1)
        >>> step = mtl_gramian_step(trunk, heads_fn, weighting, optimizer)
        >>> params = TensorDict({"shared": params_of(trunk), "heads": params_of(heads)})
        >>> opt_state, agg_state = optimizer.init(params), weighting.init(2)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 2)
        >>> out = step(params, opt_state, agg_state, ((x,), (y,)))
        >>> out.metrics["weights"].shape
        torch.Size([2])
    """
    _check(
        weighting,
        optimizer,
        skip_nonfinite,
        functions={},
        modules={"trunk": trunk},
        step="mtl_gramian_step",
        jacobian_fallback="mtl_step",
    )
    _check_heads_fn(heads_fn)
    check_model(trunk, per_sample=False, step="mtl_gramian_step", fallback="mtl_step")

    def core(params: TensorDictBase, agg_state: Any, batch: Sequence[Any]) -> _Parts:
        _check_mtl_params(params)
        trunk_inputs, head_args = _check_pair(batch, "(trunk_inputs, head_args)")
        losses, square, combine_update, head_grads = value_and_mtl_gramian(
            trunk,
            params["shared"],
            tuple(trunk_inputs),
            heads_fn,
            params["heads"],
            tuple(head_args),
        )
        weights, new_state = weighting.update(square, agg_state)
        grads = TensorDict({"shared": combine_update(weights), "heads": head_grads}, batch_size=[])
        decrease = square @ weights.to(square.dtype)
        return _Parts(losses, square, weights, new_state, grads, decrease)

    return _step_fn(core, optimizer, skip_nonfinite)


def gramian_step(
    model: nn.Module,
    # ``losses_fn(outputs, *targets)``: the outputs are whatever the model returns.
    losses_fn: Callable[..., Tensor],
    weighting: PureWeighting[S],
    optimizer: Optimizer[OptState],
    *,
    skip_nonfinite: bool = True,
) -> StepFn[OptState, S]:
    """An IWRM (losses ``[B]``) or IWMTL (losses ``[B, m]``) step without the Jacobian.

    ``batch = (inputs, targets)``, two tuples: the losses are
    ``losses_fn(call(model, params, *inputs), *targets)``, of shape ``[B]`` (one row per sample,
    ``R = 1``) or ``[B, m]`` (``R = m``). Their Gramian ``G = J Jᵀ`` ``[B·R, B·R]`` comes from each
    layer's input ``A`` and output cotangents ``D`` in closed form, as in the autogram engine's
    fast path (``(A Aᵀ) ⊙ (D Dᵀ)`` summed over positions, or materialised per-sample gradients,
    whichever is cheaper), with no per-sample gradient of the whole model in memory: one forward
    pass, one backward pass for ``D`` (``m`` of them, vmapped, for IWMTL; no parameter
    gradients), the per-layer Gramians, the weighting on ``G``, and the update ``Jᵀw`` in closed
    form from the layers' inputs and ``D``.

    Every trainable parameter of ``params`` must belong to a layer that is exactly an
    ``nn.Linear``, an ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1`` or an ``nn.Embedding``
    (without ``max_norm``, ``scale_grad_by_freq`` or ``sparse``), not shared with another module
    and called with one positional input batched on dim 0; parameter-free modules (activations,
    pooling, dropout, ...) and frozen layers may be anything. The loss of sample ``b`` must depend
    on sample ``b`` only: BatchNorm in training mode, or any other coupling of the samples, would
    give a wrong Gramian (the modules known to couple them are rejected). Anything else:
    :func:`per_sample_step`.

    The weighting sees the flattened Gramian ``[B·R, B·R]`` (rows in ``losses.flatten()`` order);
    its state must be initialised for ``B·R`` losses. The metrics are those of the other steps,
    ``"decrease"`` being ``G w`` in the losses' shape.

    Args:
        model: The model, called as ``call(model, params, *inputs)``.
        losses_fn: ``losses_fn(outputs, *targets) -> losses [B] or [B, m]``.
        weighting: E.g. ``upgrad()``.
        optimizer: E.g. ``sgd(0.1)``.
        skip_nonfinite: If ``True`` (default), a step that meets a non-finite loss, Gramian,
            weight, decrease, update, new parameter or new optimizer state returns ``params``,
            ``opt_state`` and ``agg_state`` unchanged, with ``metrics["skipped"]`` ``True``
            (selected with ``torch.where``, no host sync). ``False``: non-finite values propagate.

    Returns:
        ``step(params, opt_state, agg_state, (inputs, targets)) -> StepOutput``.

    Raises:
        TypeError: (when the step is built, and at the step) a trainable parameter belongs to an
            unsupported module; (when built) a bad ``weighting``, ``optimizer`` or
            ``skip_nonfinite``.
        ValueError: (when the step is built, and at the step) a module couples the samples; (at
            the step) a bad ``batch``, or losses that are not ``[B]`` or ``[B, m]``.

    Example:
        >>> import torch
        >>> from torchjd_func import params_of
        >>> from torchjd_func.aggregation import upgrad
        >>> from torchjd_func.optim import sgd
        >>> from torchjd_func.step import gramian_step
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> def losses_fn(outputs, y):  # [B, 2]: per sample, per task (IWMTL)
        ...     return (outputs - y) ** 2
        >>> weighting, optimizer = upgrad(), sgd(lr=0.1)
        >>> step = gramian_step(model, losses_fn, weighting, optimizer)  # torch.compile it, or not
        >>> params = params_of(model)
        >>> opt_state, agg_state = optimizer.init(params), weighting.init(8 * 2)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
        >>> out = step(params, opt_state, agg_state, ((x,), (y,)))
        >>> out.metrics["weights"].shape
        torch.Size([8, 2])
    """
    _check(
        weighting,
        optimizer,
        skip_nonfinite,
        functions={"losses_fn": losses_fn},
        modules={"model": model},
        step="gramian_step",
        jacobian_fallback="per_sample_step",
    )
    check_model(model, per_sample=True, step="gramian_step", fallback="per_sample_step")

    def core(params: TensorDictBase, agg_state: Any, batch: Sequence[Any]) -> _Parts:
        inputs, targets = _check_pair(batch, "(inputs, targets)")
        losses, square, combine_update = value_and_per_sample_gramian(
            model, params, tuple(inputs), losses_fn, tuple(targets)
        )
        flat_weights, new_state = weighting.update(square, agg_state)
        weights = reshape_weights(flat_weights, losses.shape)
        decrease = (square @ flat_weights.to(square.dtype)).reshape(losses.shape)
        return _Parts(losses, square, weights, new_state, combine_update(weights), decrease)

    return _step_fn(core, optimizer, skip_nonfinite)

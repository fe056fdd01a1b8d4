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

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from tensordict import TensorDict, TensorDictBase
from torch import Tensor, nn

from torchjd_func._gramian import inner_products, reshape_weights
from torchjd_func._jacobian import mtl_jacobian, value_and_jacobian, value_and_per_sample_jacobian
from torchjd_func._probes import check_model, value_and_mtl_gramian, value_and_per_sample_gramian
from torchjd_func.aggregation import Aggregation, PureWeighting, aggregate
from torchjd_func.optim import Optimizer

__all__ = [
    "StepFn",
    "StepOutput",
    "gramian_step",
    "jd_step",
    "mtl_gramian_step",
    "mtl_step",
    "per_sample_step",
]


class StepOutput(NamedTuple):
    """What a step function returns."""

    params: TensorDict
    """The updated parameters."""
    opt_state: Any
    """The optimizer's new state."""
    agg_state: Any
    """The weighting's new state."""
    metrics: dict[str, Tensor]
    """``"losses"`` (before the update), ``"weights"`` (the aggregation weights) and
    ``"decrease"``: ``J d``, the first-order decrease of each loss per unit learning rate along
    the aggregated direction ``d`` (for UPGrad non-negative up to its regularisation,
    ``≥ −reg_eps·tr(G)·w``; for MTL, through the shared parameters only), all in the losses'
    shape."""


StepFn = Callable[[TensorDictBase, Any, Any, Sequence[Any]], StepOutput]
"""``step(params, opt_state, agg_state, batch) -> StepOutput``."""


def _check(weighting: PureWeighting, optimizer: Optimizer, **modules: object) -> None:
    """Checks the weighting, the optimizer and the modules given by name."""
    if not isinstance(weighting, PureWeighting):
        raise TypeError(
            f"`weighting` must be a PureWeighting (e.g. `upgrad()`), got {type(weighting).__name__}."
        )
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"`optimizer` must be a functional Optimizer (e.g. `sgd(0.1)`), got "
            f"{type(optimizer).__name__}."
        )
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            raise TypeError(f"`{name}` must be a torch.nn.Module, got {type(module).__name__}.")


def _finish(
    params: TensorDictBase,
    grads: TensorDictBase,
    opt_state: Any,
    optimizer: Optimizer,
    agg_state: Any,
    metrics: dict[str, Tensor],
) -> StepOutput:
    new_params, new_opt_state = optimizer.update(grads, opt_state, params)
    return StepOutput(new_params, new_opt_state, agg_state, metrics)


def _metrics(
    losses: Tensor, aggregation: Aggregation, jacobian: TensorDictBase
) -> dict[str, Tensor]:
    decrease = inner_products(jacobian, aggregation.update)
    return {"losses": losses, "weights": aggregation.weights, "decrease": decrease}


def jd_step(
    losses_fn: Callable[..., Tensor],
    weighting: PureWeighting,
    optimizer: Optimizer,
    *,
    chunk_size: int | None = None,
) -> StepFn:
    """A Jacobian-descent step for ``losses_fn(params, *batch)`` (losses of any shape ``s``).

    The Jacobian comes from :func:`~torchjd_func.value_and_jacobian` (one backward pass per loss,
    vmapped), the weights from ``weighting`` on the (flattened) Gramian, and the update
    ``Jᵀw`` goes to ``optimizer``.

    Args:
        losses_fn: ``losses_fn(params, *batch) -> losses``.
        weighting: E.g. ``upgrad()``; its state is threaded through ``agg_state``.
        optimizer: E.g. ``sgd(0.1, momentum=0.9)`` or ``adam(1e-3)``.
        chunk_size: Rows of the Jacobian computed at once (see ``value_and_jacobian``).

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
    _check(weighting, optimizer)

    def step(
        params: TensorDictBase, opt_state: Any, agg_state: Any, batch: Sequence[Any]
    ) -> StepOutput:
        losses, jacobian, _ = value_and_jacobian(losses_fn, params, *batch, chunk_size=chunk_size)
        aggregation = aggregate(jacobian, weighting, agg_state)
        metrics = _metrics(losses, aggregation, jacobian)
        return _finish(params, aggregation.update, opt_state, optimizer, aggregation.state, metrics)

    return step


def per_sample_step(
    sample_losses_fn: Callable[..., Tensor],
    weighting: PureWeighting,
    optimizer: Optimizer,
    *,
    in_dims: int | Sequence[int | None] = 0,
    chunk_size: int | None = None,
) -> StepFn:
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

    Returns:
        ``step(params, opt_state, agg_state, batch) -> StepOutput``.
    """
    _check(weighting, optimizer)

    def step(
        params: TensorDictBase, opt_state: Any, agg_state: Any, batch: Sequence[Any]
    ) -> StepOutput:
        losses, jacobian, _ = value_and_per_sample_jacobian(
            sample_losses_fn, params, *batch, in_dims=in_dims, chunk_size=chunk_size
        )
        aggregation = aggregate(jacobian, weighting, agg_state)
        metrics = _metrics(losses, aggregation, jacobian)
        return _finish(params, aggregation.update, opt_state, optimizer, aggregation.state, metrics)

    return step


def mtl_step(
    trunk_fn: Callable[..., Tensor | Sequence[Tensor]],
    heads_fn: Callable[..., Tensor]
    | Sequence[Callable[..., Tensor]]
    | Mapping[str, Callable[..., Tensor]],
    weighting: PureWeighting,
    optimizer: Optimizer,
    *,
    chunk_size: int | None = None,
) -> StepFn:
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

    Returns:
        ``step(params, opt_state, agg_state, (trunk_args, head_args)) -> StepOutput``.
    """
    _check(weighting, optimizer)

    def step(
        params: TensorDictBase, opt_state: Any, agg_state: Any, batch: Sequence[Any]
    ) -> StepOutput:
        _check_mtl_params(params)
        trunk_args, head_args = batch
        out = mtl_jacobian(
            trunk_fn,
            heads_fn,
            params["shared"],
            params["heads"],
            trunk_args,
            head_args,
            chunk_size=chunk_size,
        )
        aggregation = aggregate(out.jacobian, weighting, agg_state)
        grads = TensorDict({"shared": aggregation.update, "heads": out.head_grads}, batch_size=[])
        metrics = _metrics(out.losses, aggregation, out.jacobian)
        return _finish(params, grads, opt_state, optimizer, aggregation.state, metrics)

    return step


def _check_mtl_params(params: TensorDictBase) -> None:
    if set(params.keys()) != {"shared", "heads"}:
        raise ValueError(
            'An MTL step takes `params = TensorDict({"shared": ..., "heads": ...})`, got keys '
            f"{sorted(params.keys())}."
        )


def mtl_gramian_step(
    trunk: nn.Module,
    heads_fn: Callable[..., Tensor] | Mapping[str, Callable[..., Tensor]],
    weighting: PureWeighting,
    optimizer: Optimizer,
) -> StepFn:
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

    Returns:
        ``step(params, opt_state, agg_state, (trunk_inputs, head_args)) -> StepOutput``.

    Raises:
        TypeError: (at the step) a trainable parameter of the trunk belongs to an unsupported
            module.
        ValueError: (at the step) bad ``params`` keys, or losses that are not a vector ``[m]``.

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
    _check(weighting, optimizer, trunk=trunk)
    check_model(trunk, per_sample=False, step="mtl_gramian_step", fallback="mtl_step")

    def step(
        params: TensorDictBase, opt_state: Any, agg_state: Any, batch: Sequence[Any]
    ) -> StepOutput:
        _check_mtl_params(params)
        trunk_inputs, head_args = batch
        losses, square, combine, head_grads = value_and_mtl_gramian(
            trunk,
            params["shared"],
            tuple(trunk_inputs),
            heads_fn,
            params["heads"],
            tuple(head_args),
        )
        weights, new_state = weighting.update(square, agg_state)
        grads = TensorDict({"shared": combine(weights), "heads": head_grads}, batch_size=[])
        metrics = {
            "losses": losses,
            "weights": weights,
            "decrease": square @ weights.to(square.dtype),
        }
        return _finish(params, grads, opt_state, optimizer, new_state, metrics)

    return step


def gramian_step(
    model: nn.Module,
    losses_fn: Callable[..., Tensor],
    weighting: PureWeighting,
    optimizer: Optimizer,
) -> StepFn:
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

    Returns:
        ``step(params, opt_state, agg_state, (inputs, targets)) -> StepOutput``.

    Raises:
        TypeError: (at the step) a trainable parameter belongs to an unsupported module.
        ValueError: (at the step) the losses are not ``[B]`` or ``[B, m]``, or a module couples
            the samples.

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
    _check(weighting, optimizer, model=model)
    check_model(model, per_sample=True, step="gramian_step", fallback="per_sample_step")

    def step(
        params: TensorDictBase, opt_state: Any, agg_state: Any, batch: Sequence[Any]
    ) -> StepOutput:
        if not (isinstance(batch, Sequence) and len(batch) == 2):
            raise ValueError(
                "A Gramian step takes `batch = (inputs, targets)`, two tuples: the model's "
                "inputs and the further arguments of `losses_fn`."
            )
        inputs, targets = batch
        losses, square, combine = value_and_per_sample_gramian(
            model, params, tuple(inputs), losses_fn, tuple(targets)
        )
        flat_weights, new_state = weighting.update(square, agg_state)
        weights = reshape_weights(flat_weights, losses.shape)
        metrics = {
            "losses": losses,
            "weights": weights,
            "decrease": (square @ flat_weights.to(square.dtype)).reshape(losses.shape),
        }
        return _finish(params, combine(weights), opt_state, optimizer, new_state, metrics)

    return step

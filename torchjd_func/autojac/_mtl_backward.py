"""``mtl_backward``: head gradients and the shared Jacobian, through the features."""

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from torchjd_func.aggregation import Aggregator
from torchjd_func.autojac._jac_to_grad import aggregate_into_grads
from torchjd_func.autojac._utils import (
    accumulate_grads,
    accumulate_jacs,
    as_tensors,
    check_chunk_size,
    check_expects_grad,
    distinct_tensors,
    jacobian_rows,
    leaf_tensors,
    reached,
)

__all__ = ["mtl_backward"]


def _task_params(
    losses: list[Tensor],
    features: list[Tensor],
    tasks_params: Sequence[Iterable[Tensor]] | None,
) -> list[list[Tensor]]:
    if tasks_params is None:
        return [leaf_tensors([loss], excluded=features) for loss in losses]
    given = [
        distinct_tensors(params, f"tasks_params[{i}]") for i, params in enumerate(tasks_params)
    ]
    if len(given) != len(losses):
        raise ValueError(
            f"`tasks_params` has {len(given)} parameter sets for {len(losses)} losses: give one "
            "set per task."
        )
    return given


def _grad_tensors(
    losses: list[Tensor], grad_tensors: Sequence[Tensor] | None
) -> list[Tensor | None]:
    """The checked ``grad_tensors`` (one per loss, its shape), or ``None``s for scalar losses."""
    if grad_tensors is None:
        for i, loss in enumerate(losses):
            if loss.ndim != 0:
                raise ValueError(
                    f"`losses[{i}]` has shape {list(loss.shape)}: without `grad_tensors`, "
                    "mtl_backward takes one scalar loss per task. Reduce it (e.g. `.mean()`), give "
                    "`grad_tensors` (one tensor of the loss's shape per task), or use `backward` "
                    "for a tensor of losses."
                )
        return [None] * len(losses)
    given = list(grad_tensors)
    if len(given) != len(losses):
        raise ValueError(
            f"`grad_tensors` has {len(given)} tensors for {len(losses)} losses: give one per loss."
        )
    for i, (grad, loss) in enumerate(zip(given, losses, strict=True)):
        if not isinstance(grad, Tensor):
            raise TypeError(f"`grad_tensors[{i}]` is a {type(grad).__name__}, not a Tensor.")
        if grad.shape != loss.shape:
            raise ValueError(
                f"`grad_tensors[{i}]` has shape {list(grad.shape)} but `losses[{i}]` has shape "
                f"{list(loss.shape)}: they must match."
            )
    return list(given)


def mtl_backward(
    losses: Sequence[Tensor],
    features: Sequence[Tensor] | Tensor,
    aggregator: Aggregator | None = None,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
    *,
    grad_tensors: Sequence[Tensor] | None = None,
) -> None:
    """Multi-task backward pass: each head gets its task's gradient, the trunk its Jacobian.

    For each task loss, its gradient w.r.t. its own parameters is added to their ``.grad``, and
    its gradient w.r.t. the ``features`` is kept; these ``m`` feature gradients are then pushed
    through the shared feature extractor together (one batched vector-Jacobian product, not ``m``
    backward passes), giving the Jacobian ``[m, *param.shape]`` of the losses w.r.t. each shared
    parameter. With an ``aggregator`` it is aggregated into the shared parameters' ``.grad``;
    without one it is added to their ``.jac``, for :func:`jac_to_grad` (e.g. once per group).
    This is the autograd twin of :func:`torchjd_func.mtl_jacobian`.

    Args:
        losses: The ``m`` task losses: scalars, or of any shape with ``grad_tensors``.
        features: The shared representation(s) all tasks are computed from.
        aggregator: Optional aggregator of the shared Jacobian.
        tasks_params: One iterable of parameters per task; default: the leaves requiring grad in
            the graph of each loss that were not used to compute the features. A parameter
            repeated within a task is counted once; one given to several tasks gets the sum of
            their gradients (as autograd and TorchJD do).
        shared_params: The shared parameters (a parameter repeated is counted once); default:
            the leaves requiring grad in the graph of the features. Empty: only the task
            gradients are computed, as in TorchJD.
        retain_graph: Keep the graph.
        parallel_chunk_size: Rows differentiated at once through the trunk (``None``: all; any
            positive integer, see :func:`backward`).
        grad_tensors: Optional, keyword-only (as in TorchJD): one tensor per loss, of the loss's
            shape, the ``grad_outputs`` of each task's backward pass (default: ones, for scalar
            losses). Row ``i`` of the shared Jacobian is then ``grad_tensors[i]ᵀ ∂losses[i]/∂θ``.

    Raises:
        ValueError: non-scalar losses without ``grad_tensors``, ``grad_tensors`` of the wrong
            number or shapes, empty or repeated losses or features, losses or features that do
            not require grad, a loss not computed from the features, shared and task parameters
            that overlap, parameters whose ``.grad``/``.jac`` cannot be populated (not requiring
            grad, or not leaves), features with no parameter behind them, or a bad chunk size.
            Every check runs before any ``.grad`` or ``.jac`` is touched.
        TypeError: an element that is not a Tensor.

    Example:
        >>> import torch
        >>> from torchjd_func.autojac import jac_to_grad, mtl_backward
        >>> from torchjd_func.aggregation import UPGrad
        >>> trunk, head1, head2 = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
        >>> features = trunk(torch.randn(8, 4))
        >>> losses = [head1(features).pow(2).mean(), head2(features).abs().mean()]
        >>> mtl_backward(losses, features)
        >>> trunk.weight.jac.shape, head1.weight.grad.shape
        (torch.Size([2, 3, 4]), torch.Size([1, 3]))
        >>> jac_to_grad(trunk.parameters(), UPGrad()).shape
        torch.Size([2])

        Per-sample losses of each task, weighted by ``grad_tensors``:

        >>> features = trunk(torch.randn(8, 4))
        >>> losses = [head1(features).pow(2).squeeze(1), head2(features).abs().squeeze(1)]
        >>> mtl_backward(losses, features, grad_tensors=[torch.full((8,), 1 / 8)] * 2)
        >>> trunk.weight.jac.shape
        torch.Size([2, 3, 4])
    """
    chunk_size = check_chunk_size(parallel_chunk_size)
    task_losses = as_tensors(losses, "losses")
    task_grads = _grad_tensors(task_losses, grad_tensors)
    for i, loss in enumerate(task_losses):
        if not loss.requires_grad:
            raise ValueError(f"`losses[{i}]` does not require grad.")
    shared_features = as_tensors(features, "features")
    for i, feature in enumerate(shared_features):
        if not feature.requires_grad:
            raise ValueError(f"`features[{i}]` does not require grad.")
    for i, loss in enumerate(task_losses):
        if not any(reached(loss, shared_features)):
            raise ValueError(
                f"`losses[{i}]` is not computed from the `features`: give as features the "
                "tensors the task heads take as input (e.g. the trunk's output, from the same "
                "forward pass as the losses)."
            )
    if shared_params is None:
        shared = leaf_tensors(shared_features)
        if not shared:
            raise ValueError("The features depend on no parameter that requires grad.")
    else:
        shared = distinct_tensors(shared_params, "shared_params")
    tasks = _task_params(task_losses, shared_features, tasks_params)
    shared_ids = {id(p) for p in shared}
    for i, params in enumerate(tasks):
        if any(id(p) in shared_ids for p in params):
            raise ValueError(
                f"The parameters of task {i} overlap with `shared_params`: a parameter is either "
                "shared (it gets the aggregated Jacobian) or task-specific (it gets its task's "
                "gradient), not both."
            )
        check_expects_grad(params, f"tasks_params[{i}]", ".grad")
    check_expects_grad(shared, "shared_params", ".jac" if aggregator is None else ".grad")

    feature_rows: list[list[Tensor]] = [[] for _ in shared_features]
    for loss, grad_loss, params in zip(task_losses, task_grads, tasks, strict=True):
        grads = torch.autograd.grad(
            loss,
            [*params, *shared_features],
            grad_outputs=grad_loss,
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        accumulate_grads(params, grads[: len(params)])
        for rows, grad in zip(feature_rows, grads[len(params) :], strict=True):
            rows.append(grad)
    if not shared:
        return  # as TorchJD: the task gradients only, no shared Jacobian
    cotangents = [torch.stack(rows) for rows in feature_rows]
    jacs = jacobian_rows(shared_features, shared, cotangents, retain_graph, chunk_size)
    if aggregator is None:
        accumulate_jacs(shared, jacs)
    else:
        aggregate_into_grads(shared, jacs, aggregator)

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
    given = [list(params) for params in tasks_params]
    if len(given) != len(losses):
        raise ValueError(
            f"`tasks_params` has {len(given)} parameter sets for {len(losses)} losses: give one "
            "set per task."
        )
    return given


def mtl_backward(
    losses: Sequence[Tensor],
    features: Sequence[Tensor] | Tensor,
    aggregator: Aggregator | None = None,
    tasks_params: Sequence[Iterable[Tensor]] | None = None,
    shared_params: Iterable[Tensor] | None = None,
    retain_graph: bool = False,
    parallel_chunk_size: int | None = None,
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
        losses: The ``m`` scalar task losses.
        features: The shared representation(s) all tasks are computed from.
        aggregator: Optional aggregator of the shared Jacobian.
        tasks_params: One iterable of parameters per task; default: the leaves requiring grad in
            the graph of each loss that were not used to compute the features.
        shared_params: The shared parameters; default: the leaves requiring grad in the graph of
            the features.
        retain_graph: Keep the graph.
        parallel_chunk_size: Rows differentiated at once through the trunk (``None``: all).

    Raises:
        ValueError: non-scalar or repeated losses, losses or features that do not require grad,
            a loss not computed from the features, shared and task parameters that overlap, no shared parameter, or a bad chunk size.

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
    """
    check_chunk_size(parallel_chunk_size)
    task_losses = as_tensors(losses, "losses")
    for i, loss in enumerate(task_losses):
        if loss.ndim != 0:
            raise ValueError(
                f"`losses[{i}]` has shape {list(loss.shape)}: mtl_backward takes one scalar loss "
                "per task. Reduce it (e.g. `.mean()`), or use `backward` for a tensor of losses."
            )
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
    shared = (
        leaf_tensors(shared_features)
        if shared_params is None
        else as_tensors(shared_params, "shared_params")
    )
    if not shared:
        raise ValueError("The features depend on no parameter that requires grad.")
    tasks = _task_params(task_losses, shared_features, tasks_params)
    shared_ids = {id(p) for p in shared}
    for i, params in enumerate(tasks):
        if any(id(p) in shared_ids for p in params):
            raise ValueError(
                f"The parameters of task {i} overlap with `shared_params`: a parameter is either "
                "shared (it gets the aggregated Jacobian) or task-specific (it gets its task's "
                "gradient), not both."
            )

    feature_rows: list[list[Tensor]] = [[] for _ in shared_features]
    for loss, params in zip(task_losses, tasks, strict=True):
        grads = torch.autograd.grad(
            loss,
            [*params, *shared_features],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        accumulate_grads(params, grads[: len(params)])
        for rows, grad in zip(feature_rows, grads[len(params) :], strict=True):
            rows.append(grad)
    cotangents = [torch.stack(rows) for rows in feature_rows]
    jacs = jacobian_rows(shared_features, shared, cotangents, retain_graph, parallel_chunk_size)
    if aggregator is None:
        accumulate_jacs(shared, jacs)
    else:
        aggregate_into_grads(shared, jacs, aggregator)

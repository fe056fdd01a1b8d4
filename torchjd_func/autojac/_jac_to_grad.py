"""``jac_to_grad``: aggregate the Jacobians stored in ``.jac`` into ``.grad``."""

from collections.abc import Iterable, Sequence

import torch
from tensordict import TensorDict
from torch import Tensor

from torchjd_func._gramian import combine, gramian
from torchjd_func.aggregation import Aggregator, GramianWeightedAggregator
from torchjd_func.autojac._utils import accumulate_grads, as_tensors, check_expects_grad

__all__ = ["jac_to_grad"]


def _check(jacs: Sequence[Tensor], aggregator: Aggregator) -> int:
    """The common number of rows of the Jacobians, after checking the aggregator."""
    if not isinstance(aggregator, Aggregator):
        raise TypeError(
            f"`aggregator` must be an Aggregator (e.g. `UPGrad()`), got {type(aggregator).__name__}."
        )
    rows = {jac.shape[0] for jac in jacs}
    if len(rows) != 1:
        raise ValueError(
            "The Jacobians have different numbers of rows "
            f"({[jac.shape[0] for jac in jacs]}): they must come from the same losses."
        )
    (m,) = rows
    return m


def aggregate_into_grads(
    params: Sequence[Tensor], jacs: Sequence[Tensor], aggregator: Aggregator
) -> Tensor | None:
    """Aggregates the Jacobians ``[m, *param.shape]`` and adds the result to ``.grad``.

    A Gramian-weighted aggregator (all of ``torchjd_func.aggregation``) gets the Gramian summed
    param by param (the Jacobian is never concatenated) and the update is ``combine``-d from the
    weights, which are returned. Any other aggregator gets the concatenated ``[m, n]`` matrix.

    A non-finite Gramian gives NaN weights whatever the weighting returns (selected on the
    device, no host sync), so a non-finite Jacobian always gives a non-finite ``.grad``, which
    ``torch.amp.GradScaler`` detects to skip the step.
    """
    m = _check(jacs, aggregator)
    if isinstance(aggregator, GramianWeightedAggregator):
        jacobian = TensorDict({str(i): jac for i, jac in enumerate(jacs)}, batch_size=[m])
        square = gramian(jacobian)
        weights = aggregator.gramian_weighting(square)
        weights = torch.where(square.isfinite().all(), weights, torch.nan)
        update = combine(jacobian, weights)
        accumulate_grads(params, [update[str(i)] for i in range(len(jacs))])
        return weights
    matrix = torch.cat([jac.reshape(m, -1) for jac in jacs], dim=1)
    flat = aggregator(matrix)
    pieces = torch.split(flat, [jac[0].numel() for jac in jacs])
    accumulate_grads(
        params, [p.reshape(param.shape) for p, param in zip(pieces, params, strict=True)]
    )
    return None


def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    """Aggregates the Jacobians in the ``.jac`` fields of ``tensors`` into their ``.grad``.

    Called after :func:`backward` or :func:`mtl_backward`; call it once per group of parameters,
    each with its own aggregator instance, to aggregate per group (Gradient Vaccine's grouping
    strategies). ``.grad`` is added to where it exists. By default the ``.jac`` fields are deleted.

    Args:
        tensors: The tensors whose ``.jac`` to aggregate (e.g. ``model.parameters()``).
        aggregator: The aggregator, e.g. ``UPGrad()``; a stateful one (``GradVac()``) updates its
            state.
        retain_jac: Keep the ``.jac`` fields.
        optimize_gramian_computation: Accepted for compatibility with TorchJD (same default,
            ``False``); must be a bool. It changes nothing here: a Gramian-weighted aggregator
            (all of :mod:`torchjd_func.aggregation`) always gets the Gramian summed tensor by
            tensor, without concatenating the Jacobians (TorchJD's optimized path), and any other
            aggregator gets the concatenated matrix. As in TorchJD, ``True`` with an aggregator
            that is not Gramian-weighted is refused.

    Returns:
        The weights ``[m]`` for Gramian-weighted aggregators, else ``None``. The Gramian is
        summed in at least float32 (float16 and bfloat16 Jacobians included); if it is not
        finite, the weights are NaN whatever the aggregator, so that ``.grad`` is non-finite and
        ``torch.amp.GradScaler`` skips the step.

    Raises:
        ValueError: a tensor has no ``.jac``, the Jacobians have different numbers of rows,
            ``tensors`` is empty or repeats a tensor, a tensor's ``.grad`` cannot be populated
            (it does not require grad, or is neither a leaf nor retains grad; as in TorchJD), or
            ``optimize_gramian_computation=True`` with an aggregator that is not Gramian-weighted.
            Nothing is freed or written when a call is refused.
        TypeError: ``aggregator`` is not an Aggregator, or ``optimize_gramian_computation`` is
            not a bool.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import UPGrad
        >>> from torchjd_func.autojac import backward, jac_to_grad
        >>> param = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> backward(torch.stack([param @ torch.tensor([-4.0, 1.0]), param @ torch.tensor([6.0, 1.0])]))
        >>> jac_to_grad([param], UPGrad())
        tensor([1.1763, 0.8108])
        >>> param.grad
        tensor([0.1596, 1.9870])

        TorchJD's ``optimize_gramian_computation`` is accepted (the path is the same either way):

        >>> backward(torch.stack([param @ torch.tensor([-4.0, 1.0]), param @ torch.tensor([6.0, 1.0])]))
        >>> jac_to_grad([param], UPGrad(), optimize_gramian_computation=True)
        tensor([1.1763, 0.8108])
    """
    if not isinstance(optimize_gramian_computation, bool):
        raise TypeError(
            "`optimize_gramian_computation` must be a bool, got "
            f"{type(optimize_gramian_computation).__name__}."
        )
    params = as_tensors(tensors, "tensors")
    missing = [i for i, p in enumerate(params) if getattr(p, "jac", None) is None]
    if missing:
        raise ValueError(
            f"Tensors {missing} have no `.jac`: call `backward` or `mtl_backward` first (and "
            "aggregate each tensor only once)."
        )
    check_expects_grad(params, "tensors", ".grad")
    jacs: list[Tensor] = [p.jac for p in params]  # type: ignore[attr-defined]
    _check(jacs, aggregator)  # before the Jacobians are freed
    if optimize_gramian_computation and not isinstance(aggregator, GramianWeightedAggregator):
        raise ValueError(
            "`optimize_gramian_computation=True` needs an aggregator whose weights are computed "
            f"from the Gramian (a GramianWeightedAggregator, e.g. `UPGrad()`), got {aggregator!r}."
        )
    if not retain_jac:
        for param in params:
            del param.jac  # type: ignore[attr-defined]
    return aggregate_into_grads(params, jacs, aggregator)

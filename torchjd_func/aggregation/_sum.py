"""Sum: the sum of the rows, ``A(J) = Σ_i g_i``."""

from typing import Any

import torch
from torch import Tensor

from torchjd_func.aggregation._base import (
    EmptyState,
    GramianWeightedAggregator,
    GramianWeighting,
    PureWeighting,
    check_gramian,
    nan_if_nonfinite,
    stateless,
)

__all__ = ["Sum", "SumWeighting", "sum_", "sum_weights"]


def sum_weights(gramian: Tensor) -> Tensor:
    """``w = 1`` for each of the ``m`` losses (only the Gramian's size and finiteness are used).

    Args:
        gramian: Gramians ``[..., m, m]``.

    Returns:
        Weights ``[..., m]``, dtype and device of ``gramian``; NaN for a non-finite Gramian.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import sum_weights
        >>> sum_weights(torch.eye(3))
        tensor([1., 1., 1.])
    """
    check_gramian(gramian)
    ones = torch.ones(gramian.shape[:-1], dtype=gramian.dtype, device=gramian.device)
    return nan_if_nonfinite(gramian, ones)


def sum_() -> PureWeighting[EmptyState]:
    """The sum weighting as a stateless :class:`PureWeighting` (``sum_``: ``sum`` is a builtin).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import sum_
        >>> sum_().update(torch.eye(2), sum_().init(2))[0]
        tensor([1., 1.])
    """
    return stateless(sum_weights)


class SumWeighting(GramianWeighting):
    """Weighting of :func:`sum_weights`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import SumWeighting
        >>> SumWeighting()(torch.eye(2))
        tensor([1., 1.])
    """

    def __init__(self) -> None:
        super().__init__()

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return sum_()

    def _weights_for_no_loss(self, gramian: Tensor) -> Tensor:
        return gramian.new_zeros(0)  # as TorchJD: no loss, no weight (the sum is zero)


class Sum(GramianWeightedAggregator):
    """Aggregator summing the rows of the matrix.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import Sum
        >>> Sum()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([2., 2., 2.])
    """

    def __init__(self) -> None:
        super().__init__(SumWeighting())

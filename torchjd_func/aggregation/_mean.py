"""Mean: the average of the rows, ``A(J) = (1/m) Σ_i g_i``."""

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

__all__ = ["Mean", "MeanWeighting", "mean", "mean_weights"]


def mean_weights(gramian: Tensor) -> Tensor:
    """``w = 1/m`` for each of the ``m`` losses (only the Gramian's size and finiteness are used).

    Args:
        gramian: Gramians ``[..., m, m]``.

    Returns:
        Weights ``[..., m]``, dtype and device of ``gramian``; NaN for a non-finite Gramian.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import mean_weights
        >>> mean_weights(torch.eye(4))
        tensor([0.2500, 0.2500, 0.2500, 0.2500])
    """
    check_gramian(gramian)
    m = gramian.shape[-1]
    weights = torch.full(gramian.shape[:-1], 1.0 / m, dtype=gramian.dtype, device=gramian.device)
    return nan_if_nonfinite(gramian, weights)


def mean() -> PureWeighting[EmptyState]:
    """The mean weighting as a stateless :class:`PureWeighting`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import mean
        >>> weights, _ = mean().update(torch.eye(2), mean().init(2))
        >>> weights
        tensor([0.5000, 0.5000])
    """
    return stateless(mean_weights)


class MeanWeighting(GramianWeighting):
    """Weighting of :func:`mean_weights`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import MeanWeighting
        >>> MeanWeighting()(torch.eye(2))
        tensor([0.5000, 0.5000])
    """

    def __init__(self) -> None:
        super().__init__()

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return mean()


class Mean(GramianWeightedAggregator):
    """Aggregator averaging the rows of the matrix.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import Mean
        >>> Mean()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([1., 1., 1.])
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())

"""Constant: a fixed linear combination of the rows, ``A(J) = Σ_i c_i g_i``."""

import torch
from torch import Tensor

from torchjd_func.aggregation._base import (
    GramianWeightedAggregator,
    PureWeighting,
    Weighting,
    check_gramian,
    nan_if_nonfinite,
    stateless,
)

__all__ = ["Constant", "ConstantWeighting", "constant", "constant_weights"]


def _check_vector_type(weights: object, name: str) -> Tensor:
    """Checks that ``weights`` is a non-empty 1-D floating-point tensor (no host sync)."""
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"`{name}` must be a Tensor [m], got {type(weights).__name__}: pass "
            f"`torch.tensor(...)` with one float per loss."
        )
    if weights.ndim != 1 or weights.shape[0] == 0:
        raise ValueError(
            f"`{name}` must be a non-empty vector [m], one entry per loss, got shape "
            f"{list(weights.shape)}."
        )
    if not weights.is_floating_point():
        raise TypeError(f"`{name}` must be floating-point, got dtype {weights.dtype}.")
    return weights


def check_vector(weights: object, name: str) -> Tensor:
    """Checks, once at construction, that ``weights`` is a finite non-empty float vector."""
    vector = _check_vector_type(weights, name)
    if not bool(torch.isfinite(vector).all()):
        raise ValueError(f"`{name}` must be finite, got {vector.tolist()}.")
    return vector


def constant_weights(gramian: Tensor, weights: Tensor) -> Tensor:
    """The given ``weights`` (length ``m``), broadcast over the leading dims of ``gramian``.

    Args:
        gramian: Gramians ``[..., m, m]``.
        weights: Weights ``[m]``.

    Returns:
        ``weights`` ``[..., m]`` in the dtype and on the device of ``gramian``; NaN for a
        non-finite Gramian.

    Raises:
        ValueError: ``weights`` does not have one entry per loss.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import constant_weights
        >>> constant_weights(torch.eye(2), torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    check_gramian(gramian)
    _check_vector_type(weights, "weights")
    if weights.shape[0] != gramian.shape[-1]:
        raise ValueError(
            f"{weights.shape[0]} constant weights for a Gramian of {gramian.shape[-1]} losses: "
            "give one weight per loss."
        )
    out = weights.to(dtype=gramian.dtype, device=gramian.device)
    return nan_if_nonfinite(gramian, out.expand(*gramian.shape[:-1]))


def constant(weights: Tensor) -> PureWeighting:
    """The constant weighting as a stateless :class:`PureWeighting`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import constant
        >>> weighting = constant(torch.tensor([1.0, 2.0]))
        >>> weighting.update(torch.eye(2), weighting.init(2))[0]
        tensor([1., 2.])
    """
    check_vector(weights, "weights")
    return stateless(lambda gramian: constant_weights(gramian, weights))


class ConstantWeighting(Weighting):
    """Weighting of :func:`constant_weights`.

    Args:
        weights: The weights ``[m]``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import ConstantWeighting
        >>> ConstantWeighting(torch.tensor([1.0, 2.0]))(torch.eye(2))
        tensor([1., 2.])
    """

    def __init__(self, weights: Tensor) -> None:
        super().__init__(constant(weights), weights=weights)
        self.weights = weights


class Constant(GramianWeightedAggregator):
    """Aggregator making a fixed linear combination of the rows.

    Args:
        weights: The weights ``[m]``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import Constant
        >>> Constant(torch.tensor([1.0, 2.0]))(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([8., 3., 3.])
    """

    def __init__(self, weights: Tensor) -> None:
        super().__init__(ConstantWeighting(weights))

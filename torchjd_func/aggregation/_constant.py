"""Constant: a fixed linear combination of the rows, ``A(J) = Σ_i c_i g_i``."""

from functools import partial
from typing import Any

import torch
from torch import Tensor

from torchjd_func.aggregation._base import (
    Delegated,
    EmptyState,
    GramianWeightedAggregator,
    GramianWeighting,
    Hyperparameter,
    PureWeighting,
    check_gramian,
    nan_if_nonfinite,
    stateless,
    vector_to_str,
)

__all__ = ["Constant", "ConstantWeighting", "constant", "constant_weights"]


def _check_vector_type(weights: object, name: str, *, empty: bool = False) -> Tensor:
    """Checks that ``weights`` is a 1-D floating-point tensor, non-empty unless ``empty`` (no
    host sync)."""
    if not isinstance(weights, Tensor):
        raise TypeError(
            f"`{name}` must be a Tensor [m], got {type(weights).__name__}: pass "
            f"`torch.tensor(...)` with one float per loss."
        )
    if weights.ndim != 1 or (weights.shape[0] == 0 and not empty):
        raise ValueError(
            f"`{name}` must be a non-empty vector [m], one entry per loss, got shape "
            f"{list(weights.shape)}."
        )
    if not weights.is_floating_point():
        raise TypeError(f"`{name}` must be floating-point, got dtype {weights.dtype}.")
    return weights


def check_vector(weights: object, name: str, *, empty: bool = False) -> Tensor:
    """Checks, once at construction, that ``weights`` is a finite float vector, non-empty unless
    ``empty``."""
    vector = _check_vector_type(weights, name, empty=empty)
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


def constant(weights: Tensor) -> PureWeighting[EmptyState]:
    """The constant weighting as a stateless :class:`PureWeighting`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import constant
        >>> weighting = constant(torch.tensor([1.0, 2.0]))
        >>> weighting.update(torch.eye(2), weighting.init(2))[0]
        tensor([1., 2.])
    """
    check_vector(weights, "weights")
    return stateless(partial(constant_weights, weights=weights))


def _mismatch(weights: Tensor, m: int) -> ValueError:
    return ValueError(
        f"{weights.shape[0]} constant weights for a Gramian of {m} losses: give one weight per "
        "loss."
    )


class ConstantWeighting(GramianWeighting):
    """Weighting of :func:`constant_weights`; differentiable (also with respect to ``weights``).

    Args:
        weights: The weights ``[m]``; may be empty (then only a Gramian for no loss, ``[0, 0]``,
            is accepted, and its weights are empty), as in TorchJD.

    ``weights`` is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import ConstantWeighting
        >>> ConstantWeighting(torch.tensor([1.0, 2.0]))(torch.eye(2))
        tensor([1., 2.])
    """

    weights = Hyperparameter[Tensor]()

    def __init__(self, weights: Tensor) -> None:
        super().__init__(weights=weights)

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        weights = check_vector(hyperparameters["weights"], "weights", empty=True)
        if weights.shape[0] == 0:

            def refuse(gramian: Tensor) -> Tensor:
                raise _mismatch(weights, gramian.shape[-1])

            return stateless(refuse)
        return constant(weights)

    def _weights_for_no_loss(self, gramian: Tensor) -> Tensor:
        weights = self.weights
        if weights.shape[0] != 0:
            raise _mismatch(weights, 0)
        return weights.to(dtype=gramian.dtype, device=gramian.device)


class Constant(GramianWeightedAggregator):
    """Aggregator making a fixed linear combination of the rows; differentiable.

    Args:
        weights: The weights ``[m]`` (may be empty, for a matrix with no row).

    ``weights`` is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import Constant
        >>> aggregator = Constant(torch.tensor([1.0, 2.0]))
        >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([8., 3., 3.])
        >>> aggregator, str(aggregator)
        (Constant(weights=tensor([1., 2.])), 'Constant([1., 2.])')
    """

    gramian_weighting: ConstantWeighting
    weights = Delegated[Tensor]()

    def __init__(self, weights: Tensor) -> None:
        super().__init__(ConstantWeighting(weights))

    def __str__(self) -> str:
        return f"Constant([{vector_to_str(self.weights)}])"

"""Krum and Multi-Krum: keep the gradients closest to their neighbours (Byzantine-robust).

Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS 2017,
https://proceedings.neurips.cc/paper/2017/file/f4b9ec30ad9f68f89b29639786cb62ef-Paper.pdf.
With ``f`` Byzantine rows among ``m``, each row's score is the sum of its distances to its
``m − f − 2`` nearest other rows, computed from the Gramian alone:

.. math::

    d_{ij} = \\sqrt{\\max(G_{ii} + G_{jj} - 2 G_{ij}, 0)}, \\qquad
    s_i = \\sum_{j \\in N_i} d_{ij}, \\qquad
    w = \\frac{1}{k} \\sum_{i \\in \\text{the } k \\text{ lowest scores}} e_i,

``k = n_selected`` (1 for Krum, more for Multi-Krum). As in TorchJD, the ``m − f − 1`` smallest
distances of each row are taken and the smallest one dropped, as if it were the row's distance
to itself (0); ties are broken by ``torch.topk``.
"""

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
)

__all__ = ["Krum", "KrumWeighting", "krum", "krum_weights"]


def _check_counts(n_byzantine: object, n_selected: object) -> tuple[int, int]:
    for name, value, low in [("n_byzantine", n_byzantine, 0), ("n_selected", n_selected, 1)]:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
        if value < low:
            kind = "non-negative" if low == 0 else "positive"
            raise ValueError(f"`{name}` must be a {kind} int, got {value}.")
    return n_byzantine, n_selected  # type: ignore[return-value]


def krum_weights(gramian: Tensor, n_byzantine: int, n_selected: int = 1) -> Tensor:
    """(Multi-)Krum's weights: ``1/n_selected`` on the rows with the lowest scores, batched.

    Args:
        gramian: PSD Gramians ``[..., m, m]``.
        n_byzantine: The number ``f`` of rows that may be adversarial; ``m ≥ f + 3``.
        n_selected: The number of rows kept (``1``: Krum; more: Multi-Krum); ``m ≥ n_selected``.

    Returns:
        Weights ``[..., m]`` in the dtype and on the device of ``gramian`` (constant in the
        Gramian: no gradient flows through them); NaN for a Gramian with a NaN or ±Inf entry.

    Raises:
        TypeError: ``gramian`` is not a floating-point Tensor, or a count is not an int.
        ValueError: ``gramian`` is not square or empty, a count is out of range, or the Gramian
            has too few rows (``m < n_byzantine + 3`` or ``m < n_selected``).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import krum_weights
        >>> J = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.9, 0.0], [-5.0, 8.0]])
        >>> krum_weights(J @ J.T, n_byzantine=1)
        tensor([1., 0., 0., 0.])
        >>> krum_weights(J @ J.T, n_byzantine=1, n_selected=2)
        tensor([0.5000, 0.0000, 0.5000, 0.0000])
    """
    check_gramian(gramian)
    f, k = _check_counts(n_byzantine, n_selected)
    m = gramian.shape[-1]
    if m < f + 3:
        raise ValueError(
            f"Krum with n_byzantine={f} needs at least {f + 3} rows (n_byzantine + 3), got a "
            f"Gramian for {m}: lower `n_byzantine` or aggregate more rows."
        )
    if m < k:
        raise ValueError(
            f"Krum with n_selected={k} needs at least {k} rows, got a Gramian for {m}: lower "
            "`n_selected`."
        )
    squared_norms = gramian.diagonal(dim1=-2, dim2=-1)
    squared = squared_norms.unsqueeze(-2) + squared_norms.unsqueeze(-1) - 2 * gramian
    distances = squared.clamp(min=0.0).sqrt()
    nearest = torch.topk(distances, k=m - f - 1, dim=-1, largest=False).values[..., 1:]
    scores = nearest.sum(dim=-1)
    selected = torch.topk(scores, k=k, dim=-1, largest=False).indices
    counts = torch.nn.functional.one_hot(selected, num_classes=m).sum(dim=-2)
    return nan_if_nonfinite(gramian, counts.to(gramian.dtype) / k)


def krum(n_byzantine: int, n_selected: int = 1) -> PureWeighting[EmptyState]:
    """(Multi-)Krum as a stateless :class:`PureWeighting`; see :func:`krum_weights`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import krum
        >>> J = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.9, 0.0], [-5.0, 8.0]])
        >>> krum(1).update(J @ J.T, krum(1).init(4))[0]
        tensor([1., 0., 0., 0.])
    """
    f, k = _check_counts(n_byzantine, n_selected)
    return stateless(_KrumKernel(f, k))


class _KrumKernel:
    """The kernel of :func:`krum` (an object, not a closure, so that it pickles)."""

    def __init__(self, n_byzantine: int, n_selected: int) -> None:
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    def __call__(self, gramian: Tensor) -> Tensor:
        return krum_weights(gramian, self.n_byzantine, self.n_selected)


class KrumWeighting(GramianWeighting):
    """Weighting of :func:`krum_weights`.

    Args:
        n_byzantine: The number of rows that may be adversarial (``m ≥ n_byzantine + 3``).
        n_selected: The number of rows kept (Multi-Krum when above 1).

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import KrumWeighting
        >>> J = torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.9, 0.0], [-5.0, 8.0]])
        >>> KrumWeighting(n_byzantine=1)(J @ J.T)
        tensor([1., 0., 0., 0.])
    """

    n_byzantine = Hyperparameter[int]()
    n_selected = Hyperparameter[int]()

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(n_byzantine=n_byzantine, n_selected=n_selected)

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return krum(**hyperparameters)


class Krum(GramianWeightedAggregator):
    """Aggregator of (Multi-)Krum: the mean of the ``n_selected`` rows with the lowest scores.

    Args:
        n_byzantine: The number of rows that may be adversarial (``m ≥ n_byzantine + 3``).
        n_selected: The number of rows kept (Multi-Krum when above 1).

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import Krum
        >>> aggregator = Krum(n_byzantine=1, n_selected=2)
        >>> aggregator(torch.tensor([[1.0, 0.0], [1.1, 0.1], [0.9, 0.0], [-5.0, 8.0]]))
        tensor([0.9500, 0.0000])
        >>> aggregator, str(aggregator)
        (Krum(n_byzantine=1, n_selected=2), 'Krum1-2')
    """

    gramian_weighting: KrumWeighting
    n_byzantine = Delegated[int]()
    n_selected = Delegated[int]()

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine, n_selected))

    def __str__(self) -> str:
        return f"Krum{self.n_byzantine}-{self.n_selected}"

"""IMTL-G: the update whose projections onto every unit gradient are equal.

Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021,
https://openreview.net/forum?id=IMPnRXEWpvr (the gradient part, IMTL-G), generalised with a
pseudo-inverse to linearly dependent gradients in Quinton & Rey, "Jacobian Descent for
Multi-Objective Optimization", 2024, https://arxiv.org/abs/2406.16232.

.. math::

    v = G^{+} d, \\quad d_i = \\sqrt{G_{ii}} = \\|g_i\\|, \\qquad
    w = v / \\textstyle\\sum_i v_i \\quad (w = 0 \\text{ if } |\\sum_i v_i| < 10^{-12}).

For independent gradients ``J Jᵀw = d / Σv``: the update has the same inner product with every
unit gradient ``g_i/‖g_i‖``. As in TorchJD, the threshold on ``|Σv|`` is absolute, so it is not
scale-invariant: ``v`` scales as ``1/s`` for a Jacobian scaled by ``s``, and Jacobians scaled
beyond about ``1e12`` get zero weights.
"""

from functools import partial
from typing import Any

import torch
from torch import Tensor

from torchjd_func.aggregation._base import (
    EmptyState,
    GramianWeightedAggregator,
    GramianWeighting,
    PureWeighting,
    check_gramian,
    stateless,
)

__all__ = ["IMTLG", "IMTLGWeighting", "finite_mask", "imtlg", "imtlg_weights", "work_dtype"]

_SUM_EPS = 1e-12
"""TorchJD's absolute threshold on ``|Σv|`` below which the weights are zero."""


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a decomposition (``pinv``, ``eigh``) for a Gramian of ``dtype``: float32 for
    float16 and bfloat16, which torch's linear algebra does not take, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def finite_mask(gramian: Tensor) -> Tensor:
    """``[...]`` bool: whether each Gramian ``[..., m, m]`` of the batch is all finite. A
    decomposition of a NaN matrix may raise, so the kernels decompose zeros in its place and
    give it NaN weights."""
    return gramian.isfinite().all(dim=(-2, -1))


def imtlg_weights(gramian: Tensor, *, differentiable: bool = False) -> Tensor:
    """IMTL-G's weights ``w = v / Σv``, ``v = G⁺ diag(G)^{1/2}``, batched.

    Args:
        gramian: PSD Gramians ``[..., m, m]``.
        differentiable: Keep the autograd graph of ``gramian``; by default the weights are
            detached, as in TorchJD (the gradient of ``G⁺`` jumps where the rank changes).

    Returns:
        Weights ``[..., m]`` (summing to 1, possibly negative) in the dtype and on the device of
        ``gramian``; zeros where ``|Σv| < 1e-12`` (a zero Gramian, or one scaled beyond about
        ``1e24``); NaN for a Gramian with a NaN or ±Inf entry (or a negative diagonal entry).
        ``m = 1``: ``[1]`` (``[0]`` for a zero gradient).

    Raises:
        TypeError: ``gramian`` is not a floating-point Tensor.
        ValueError: ``gramian`` is not square, or empty.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import imtlg_weights
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> imtlg_weights(J @ J.T)
        tensor([0.5923, 0.4077])
    """
    check_gramian(gramian)
    if not isinstance(differentiable, bool):
        raise TypeError(f"`differentiable` must be a bool, got {type(differentiable).__name__}.")
    g = gramian if differentiable else gramian.detach()
    finite = finite_mask(g)
    g = torch.where(finite[..., None, None], g, 0.0).to(work_dtype(g.dtype))
    norms = g.diagonal(dim1=-2, dim2=-1).sqrt()
    v = (torch.linalg.pinv(g) @ norms.unsqueeze(-1)).squeeze(-1)
    total = v.sum(dim=-1, keepdim=True)
    kept = total.abs() >= _SUM_EPS
    weights = torch.where(kept, v / torch.where(kept, total, 1.0), 0.0).to(gramian.dtype)
    return torch.where(finite[..., None], weights, float("nan"))


def imtlg(*, differentiable: bool = False) -> PureWeighting[EmptyState]:
    """IMTL-G as a stateless :class:`PureWeighting`; see :func:`imtlg_weights`.

    ``differentiable=True`` keeps the autograd graph of the Gramian (detached by default, as
    TorchJD's IMTL-G is not differentiable).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import imtlg
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> imtlg().update(J @ J.T, imtlg().init(2))[0]
        tensor([0.5923, 0.4077])
    """
    if not isinstance(differentiable, bool):
        raise TypeError(f"`differentiable` must be a bool, got {type(differentiable).__name__}.")
    return stateless(partial(imtlg_weights, differentiable=differentiable))


class IMTLGWeighting(GramianWeighting):
    """Weighting of :func:`imtlg_weights`; not differentiable (runs under ``torch.no_grad()``),
    as in TorchJD: for gradients through the weights, wrap ``imtlg(differentiable=True)`` in a
    :class:`GramianWeighting`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import IMTLGWeighting
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> IMTLGWeighting()(J @ J.T)
        tensor([0.5923, 0.4077])
    """

    _differentiable = False

    def __init__(self) -> None:
        super().__init__()

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return imtlg()

    def _weights_for_no_loss(self, gramian: Tensor) -> Tensor:
        return gramian.new_zeros(0)  # as TorchJD: Σv = 0 gives zero weights


class IMTLG(GramianWeightedAggregator):
    """Aggregator ``A(J) = Jᵀw`` of IMTL-G, generalised to dependent rows with ``G⁺``; not
    differentiable (runs under ``torch.no_grad()``), as in TorchJD.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import IMTLG
        >>> IMTLG()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.0767, 1.0000, 1.0000])
    """

    _differentiable = False
    gramian_weighting: IMTLGWeighting

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())

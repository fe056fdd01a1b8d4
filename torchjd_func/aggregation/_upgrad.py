"""UPGrad: the mean of the projections of each gradient onto the dual cone of all of them.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
https://arxiv.org/abs/2406.16232.

.. math::

    A(J) = \\sum_i \\pi_J(u_i g_i), \\qquad
    \\pi_J(x) = \\arg\\min_{y:\\, Jy \\ge 0} \\|y - x\\|^2,

where the projection onto the dual cone ``{y: Jy ≥ 0}`` of ``u_i g_i = Jᵀ(u_i e_i)`` is ``Jᵀv``
with ``v = argmin vᵀGv s.t. v ≥ u_i e_i`` (Prop. 1), so the weights are ``Σ_i v_i``. ``u`` is the
preference vector (``1/m`` by default). As in TorchJD, the Gramian is normalised by its trace
(zeroed below ``norm_eps``) and regularised with ``reg_eps·I`` before the ``m`` quadratic programs,
which are solved together, batched and on the Gramian's device (``torchjd_func._qp``).
"""

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor

from torchjd_func._qp import check_eps
from torchjd_func._qp import check_pref as _check_pref
from torchjd_func._qp import upgrad_weights as _upgrad_weights
from torchjd_func.aggregation._base import (
    Delegated,
    EmptyState,
    GramianWeightedAggregator,
    GramianWeighting,
    Hyperparameter,
    PureWeighting,
    check_gramian,
    stateless,
    vector_to_str,
)
from torchjd_func.aggregation._constant import check_vector

__all__ = [
    "UPGrad",
    "UPGradWeighting",
    "check_eps",
    "check_pref",
    "check_pref_values",
    "pref_suffix",
    "projection_weighting",
    "upgrad",
    "upgrad_weights",
]


def check_pref(gramian: Tensor, pref_vector: object) -> Tensor | None:
    """Checks that the preference vector is ``None`` or a floating-point Tensor with one entry per
    loss of ``gramian``; see :func:`torchjd_func._qp.check_pref`."""
    return _check_pref(pref_vector, gramian.shape[-1])


def check_pref_values(pref_vector: object) -> Tensor | None:
    """Checks a preference vector given at construction: a non-empty 1-D floating-point Tensor
    with finite, non-negative entries (read once, eagerly)."""
    if pref_vector is None:
        return None
    pref = check_vector(pref_vector, "pref_vector")
    if not bool((pref.isfinite() & (pref >= 0)).all()):
        raise ValueError(
            f"`pref_vector` must have finite, non-negative entries, got {pref.tolist()}."
        )
    return pref


def upgrad_weights(
    gramian: Tensor,
    pref_vector: Tensor | None = None,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    differentiable: bool = False,
) -> Tensor:
    """UPGrad's weights ``Σ_i v_i``, ``v_i = argmin vᵀGv s.t. v ≥ u_i e_i``, batched.

    Args:
        gramian: PSD Gramians ``[..., m, m]``, any floating dtype (solved in float64).
        pref_vector: Preferences ``u`` ``[m]`` (not normalised, ``≥ 0``); ``None`` means ``1/m``.
        norm_eps: Gramians with a trace below this are treated as zero; finite, ``≥ 0``.
        reg_eps: Added to the diagonal of the trace-normalised Gramian; finite, ``≥ 0``.
        differentiable: Keep the autograd graph of ``gramian`` (costs an extra
            ``[..., m, m, m]`` solve); by default the weights are detached, as in TorchJD.

    Returns:
        Weights ``[..., m]`` in the dtype and on the device of ``gramian``. All NaN for a
        Gramian with a NaN or ±Inf entry, indefinite or non-symmetric beyond rounding
        (``√eps`` of its dtype, relative to its trace; ``docs/qp.md``), or for a
        ``pref_vector`` with a negative or non-finite entry; the other Gramians of a batch are
        unaffected.

    Raises:
        TypeError: ``gramian`` or ``pref_vector`` is not a floating-point Tensor, or an eps is not
            a float.
        ValueError: wrong shapes (``pref_vector`` 0-d or not of length ``m``), or an eps is
            negative, NaN or infinite.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import upgrad_weights
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> upgrad_weights(J @ J.T)
        tensor([1.1109, 0.7894])
    """
    check_gramian(gramian)
    pref = check_pref(gramian, pref_vector)
    return _upgrad_weights(
        gramian, pref, norm_eps=norm_eps, reg_eps=reg_eps, differentiable=differentiable
    )


def upgrad(
    pref_vector: Tensor | None = None,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    differentiable: bool = False,
) -> PureWeighting[EmptyState]:
    """UPGrad as a stateless :class:`PureWeighting`; see :func:`upgrad_weights`.

    ``differentiable=True`` keeps the autograd graph of the Gramian (the weights are detached by
    default, as in TorchJD, whose UPGrad is not differentiable).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import upgrad
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> upgrad().update(J @ J.T, upgrad().init(2))[0]
        tensor([1.1109, 0.7894])
    """
    return projection_weighting(upgrad_weights, pref_vector, norm_eps, reg_eps, differentiable)


def projection_weighting(
    kernel: Callable[..., Tensor],
    pref_vector: Tensor | None,
    norm_eps: float,
    reg_eps: float,
    differentiable: bool,
) -> PureWeighting[EmptyState]:
    """A stateless :class:`PureWeighting` of a dual-cone projection kernel (UPGrad, DualProj),
    with its hyperparameters validated once, at construction."""
    check_pref_values(pref_vector)
    norm = check_eps(norm_eps, "norm_eps")
    reg = check_eps(reg_eps, "reg_eps")
    if not isinstance(differentiable, bool):
        raise TypeError(f"`differentiable` must be a bool, got {type(differentiable).__name__}.")
    return stateless(
        partial(
            kernel,
            pref_vector=pref_vector,
            norm_eps=norm,
            reg_eps=reg,
            differentiable=differentiable,
        )
    )


def pref_suffix(pref_vector: Tensor | None) -> str:
    """TorchJD's ``str`` suffix of a preference vector: ``""`` or ``([1., 2.])``."""
    return "" if pref_vector is None else f"([{vector_to_str(pref_vector)}])"


class UPGradWeighting(GramianWeighting):
    """Weighting of :func:`upgrad_weights`; not differentiable (runs under ``torch.no_grad()``), as
    in TorchJD: for gradients through the weights, wrap ``upgrad(differentiable=True)`` in a
    :class:`GramianWeighting`.

    Args:
        pref_vector: Preferences ``[m]`` (not normalised); ``None`` means the mean, ``1/m``.
        norm_eps: Gramians with a trace below this are treated as zero.
        reg_eps: Added to the diagonal of the trace-normalised Gramian.

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import UPGradWeighting
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> UPGradWeighting()(J @ J.T)
        tensor([1.1109, 0.7894])
    """

    _differentiable = False
    pref_vector = Hyperparameter[Tensor | None]()
    norm_eps = Hyperparameter[float]()
    reg_eps = Hyperparameter[float]()

    def __init__(
        self, pref_vector: Tensor | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
    ) -> None:
        super().__init__(pref_vector=pref_vector, norm_eps=norm_eps, reg_eps=reg_eps)

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return upgrad(**hyperparameters)


class UPGrad(GramianWeightedAggregator):
    """Aggregator ``A(J) = Σ_i π_J(u_i g_i)``: no conflict with any row (``J A(J) ≥ 0``).

    Not differentiable (runs under ``torch.no_grad()``), as in TorchJD.

    Args:
        pref_vector: Preferences ``[m]`` (not normalised); ``None`` means the mean, ``1/m``.
        norm_eps: Gramians with a trace below this are treated as zero.
        reg_eps: Added to the diagonal of the trace-normalised Gramian.

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import UPGrad
        >>> aggregator = UPGrad()
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> aggregator(J)
        tensor([0.2929, 1.9004, 1.9004])
        >>> aggregator.pref_vector = torch.tensor([1.0, 2.0])
        >>> aggregator(J)
        tensor([1.6984, 6.0225, 6.0225])
        >>> aggregator, str(aggregator)
        (UPGrad(pref_vector=tensor([1., 2.]), norm_eps=0.0001, reg_eps=0.0001), 'UPGrad([1., 2.])')
    """

    _differentiable = False
    gramian_weighting: UPGradWeighting
    pref_vector = Delegated[Tensor | None]()
    norm_eps = Delegated[float]()
    reg_eps = Delegated[float]()

    def __init__(
        self, pref_vector: Tensor | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, norm_eps, reg_eps))

    def __str__(self) -> str:
        return f"UPGrad{pref_suffix(self.pref_vector)}"

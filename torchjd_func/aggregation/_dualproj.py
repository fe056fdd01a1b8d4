"""DualProj: the projection of the preferred combination onto the dual cone of the gradients.

Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017,
https://arxiv.org/abs/1706.08840, eq. 11:

.. math::

    A(J) = \\pi_J(J^\\top u), \\qquad w = \\arg\\min_{v \\ge u} v^\\top G v,

with ``u`` the preference vector (``1/m`` by default), and the same trace normalisation and
``reg_eps`` regularisation as UPGrad.
"""

from typing import Any

from torch import Tensor

from torchjd_func._qp import dualproj_weights as _dualproj_weights
from torchjd_func.aggregation._base import (
    Delegated,
    EmptyState,
    GramianWeightedAggregator,
    GramianWeighting,
    Hyperparameter,
    PureWeighting,
    check_gramian,
)
from torchjd_func.aggregation._upgrad import check_pref, pref_suffix, projection_weighting

__all__ = ["DualProj", "DualProjWeighting", "dualproj", "dualproj_weights"]


def dualproj_weights(
    gramian: Tensor,
    pref_vector: Tensor | None = None,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    differentiable: bool = False,
) -> Tensor:
    """DualProj's weights ``argmin vᵀGv s.t. v ≥ u``, batched.

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
        >>> from torchjd_func.aggregation import dualproj_weights
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> dualproj_weights(J @ J.T)
        tensor([0.6109, 0.5000])
    """
    check_gramian(gramian)
    pref = check_pref(gramian, pref_vector)
    return _dualproj_weights(
        gramian, pref, norm_eps=norm_eps, reg_eps=reg_eps, differentiable=differentiable
    )


def dualproj(
    pref_vector: Tensor | None = None,
    *,
    norm_eps: float = 1e-4,
    reg_eps: float = 1e-4,
    differentiable: bool = False,
) -> PureWeighting[EmptyState]:
    """DualProj as a stateless :class:`PureWeighting`; see :func:`dualproj_weights`.

    ``differentiable=True`` keeps the autograd graph of the Gramian (the weights are detached by
    default, as in TorchJD, whose DualProj is not differentiable).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import dualproj
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> dualproj().update(J @ J.T, dualproj().init(2))[0]
        tensor([0.6109, 0.5000])
    """
    return projection_weighting(dualproj_weights, pref_vector, norm_eps, reg_eps, differentiable)


class DualProjWeighting(GramianWeighting):
    """Weighting of :func:`dualproj_weights`; not differentiable (runs under ``torch.no_grad()``),
    as in TorchJD: for gradients through the weights, wrap ``dualproj(differentiable=True)`` in a
    :class:`GramianWeighting`.

    Args:
        pref_vector: Preferences ``[m]`` (not normalised); ``None`` means the mean, ``1/m``.
        norm_eps: Gramians with a trace below this are treated as zero.
        reg_eps: Added to the diagonal of the trace-normalised Gramian.

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import DualProjWeighting
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> DualProjWeighting()(J @ J.T)
        tensor([0.6109, 0.5000])
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
        return dualproj(**hyperparameters)


class DualProj(GramianWeightedAggregator):
    """Aggregator ``A(J) = π_J(Jᵀu)``: the preferred combination, projected to conflict with no row.

    Not differentiable (runs under ``torch.no_grad()``), as in TorchJD.

    Args:
        pref_vector: Preferences ``[m]`` (not normalised); ``None`` means the mean, ``1/m``.
        norm_eps: Gramians with a trace below this are treated as zero.
        reg_eps: Added to the diagonal of the trace-normalised Gramian.

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import DualProj
        >>> DualProj()(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.5563, 1.1109, 1.1109])
    """

    _differentiable = False
    gramian_weighting: DualProjWeighting
    pref_vector = Delegated[Tensor | None]()
    norm_eps = Delegated[float]()
    reg_eps = Delegated[float]()

    def __init__(
        self, pref_vector: Tensor | None = None, norm_eps: float = 1e-4, reg_eps: float = 1e-4
    ) -> None:
        super().__init__(DualProjWeighting(pref_vector, norm_eps, reg_eps))

    def __str__(self) -> str:
        return f"DualProj{pref_suffix(self.pref_vector)}"

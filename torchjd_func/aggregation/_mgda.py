"""MGDA: the minimum-norm point of the convex hull of the gradients.

Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective optimization", 2012;
Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
https://arxiv.org/abs/1810.04650.

.. math::

    w = \\arg\\min_{\\alpha \\ge 0,\\ \\sum_i \\alpha_i = 1} \\alpha^\\top G \\alpha,
    \\qquad A(J) = J^\\top w.

TorchJD solves it with Frank-Wolfe to a step tolerance (``epsilon=1e-3``, about 2e-3 KKT error
measured); here it is solved exactly, as a linear complementarity problem, by the batched
active-set solver of ``torchjd_func._qp`` (KKT residual within ``reg_eps·tr(G)``).
"""

from functools import partial
from typing import Any

import torch
from torch import Tensor

from torchjd_func._qp import mgda_weights as _mgda_weights
from torchjd_func.aggregation._base import (
    Delegated,
    EmptyState,
    GramianWeightedAggregator,
    GramianWeighting,
    Hyperparameter,
    PureWeighting,
    check_gramian,
    stateless,
)
from torchjd_func.aggregation._upgrad import check_eps

__all__ = ["MGDA", "MGDAWeighting", "mgda", "mgda_weights"]


def mgda_weights(gramian: Tensor, *, reg_eps: float = 1e-8, differentiable: bool = False) -> Tensor:
    """MGDA's weights: the min-norm convex combination of the gradients, batched.

    Args:
        gramian: PSD Gramians ``[..., m, m]``, any floating dtype (solved in float64).
        reg_eps: Positive regularisation added to the trace-normalised Gramian, which makes the
            problem strictly convex; the KKT conditions hold up to ``reg_eps·tr(G)``.
        differentiable: Keep the autograd graph of ``gramian``; by default the weights are
            detached, as in TorchJD.

    Returns:
        Weights ``[..., m]`` on the simplex, dtype and device of ``gramian``. A zero Gramian
        gives uniform weights. All NaN for a Gramian with a NaN or ±Inf entry, or indefinite or
        non-symmetric beyond rounding (``√eps`` of its dtype, relative to its trace;
        ``docs/qp.md``); the other Gramians of a batch are unaffected.

    Raises:
        TypeError: ``gramian`` is not a floating-point Tensor, or ``reg_eps`` is not a float.
        ValueError: ``gramian`` is not square, or ``reg_eps`` is not finite and positive.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import mgda_weights
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> mgda_weights(J @ J.T)
        tensor([0.6000, 0.4000])
    """
    check_gramian(gramian)
    reg = check_eps(reg_eps, "reg_eps", positive=True)
    return _mgda_weights(gramian, reg_eps=reg, differentiable=differentiable)


def mgda(*, reg_eps: float = 1e-8, differentiable: bool = False) -> PureWeighting[EmptyState]:
    """MGDA as a stateless :class:`PureWeighting`; see :func:`mgda_weights`.

    ``differentiable=True`` keeps the autograd graph of the Gramian (detached by default).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import mgda
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> mgda().update(J @ J.T, mgda().init(2))[0]
        tensor([0.6000, 0.4000])
    """
    reg = check_eps(reg_eps, "reg_eps", positive=True)
    if not isinstance(differentiable, bool):
        raise TypeError(f"`differentiable` must be a bool, got {type(differentiable).__name__}.")
    return stateless(partial(mgda_weights, reg_eps=reg, differentiable=differentiable))


def _check_max_iters(max_iters: object) -> int:
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"`max_iters` must be a positive int, got {max_iters!r}.")
    return max_iters


class MGDAWeighting(GramianWeighting):
    """Weighting of :func:`mgda_weights`; differentiable, as TorchJD's (the weights keep the
    Gramian's graph when it requires grad and grad mode is on; the extra solve is skipped
    otherwise).

    Args:
        epsilon: Accepted for compatibility with TorchJD's Frank-Wolfe solver; the exact solver
            used here has no step tolerance, so it has no effect.
        max_iters: Accepted for compatibility with TorchJD; no effect (fixed iteration budget).
        reg_eps: See :func:`mgda_weights`.

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import MGDAWeighting
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> MGDAWeighting()(J @ J.T)
        tensor([0.6000, 0.4000])
    """

    epsilon = Hyperparameter[float]()
    max_iters = Hyperparameter[int]()
    reg_eps = Hyperparameter[float]()

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100, reg_eps: float = 1e-8) -> None:
        super().__init__(epsilon=epsilon, max_iters=max_iters, reg_eps=reg_eps)

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        check_eps(hyperparameters["epsilon"], "epsilon")
        _check_max_iters(hyperparameters["max_iters"])
        reg = check_eps(hyperparameters["reg_eps"], "reg_eps", positive=True)

        def kernel(gramian: Tensor) -> Tensor:
            differentiable = gramian.requires_grad and torch.is_grad_enabled()
            return mgda_weights(gramian, reg_eps=reg, differentiable=differentiable)

        return stateless(kernel)


class MGDA(GramianWeightedAggregator):
    """Aggregator ``A(J) = Jᵀw`` with ``w`` the min-norm convex combination of the rows;
    differentiable, as TorchJD's.

    Args:
        epsilon: Accepted for compatibility with TorchJD; no effect (exact solver).
        max_iters: Accepted for compatibility with TorchJD; no effect.
        reg_eps: See :func:`mgda_weights`.

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import MGDA
        >>> MGDA()(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        tensor([0.8000, 0.4000])
    """

    gramian_weighting: MGDAWeighting
    epsilon = Delegated[float]()
    max_iters = Delegated[int]()
    reg_eps = Delegated[float]()

    def __init__(self, epsilon: float = 0.001, max_iters: int = 100, reg_eps: float = 1e-8) -> None:
        super().__init__(MGDAWeighting(epsilon, max_iters, reg_eps))

"""MoDo: a projected gradient step on the task weights, from a cross-Gramian of two batches.

Chen et al., "Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", JMLR 2024, https://www.jmlr.org/papers/volume25/23-1287/23-1287.pdf
(Algorithm 1).

.. math::

    \\lambda \\leftarrow \\Pi_{\\Delta}\\big(\\lambda - \\gamma (A \\lambda + \\rho \\lambda)\\big),
    \\qquad \\lambda_0 = 1/m,

with ``A = J₁ J₂ᵀ`` the cross-Gramian of two independent batches (``A λ`` is then an unbiased
estimate of ``∇_λ ½‖Jᵀλ‖²``; a single-batch ``J Jᵀ`` biases it), ``Π_Δ`` the Euclidean projection
onto the simplex (sort-based, no loop on values), ``γ`` the step size and ``ρ`` an ℓ2
regularisation. The weights are the new ``λ``. Like TorchJD's, they are not differentiable (``A``
is detached).
"""

from typing import Any, NamedTuple

import torch
from torch import Tensor

from torchjd_func.aggregation._base import (
    Hyperparameter,
    check_gramian,
    guard_nonfinite,
    nan_if_nonfinite,
)
from torchjd_func.aggregation._cross import CrossGramianWeighting
from torchjd_func.aggregation._flat import check_m
from torchjd_func.aggregation._kinds import CrossWeighting
from torchjd_func.aggregation._simplex import project_onto_simplex

__all__ = ["MoDoState", "MoDoWeighting", "check_positive", "modo", "modo_weights"]


class MoDoState(NamedTuple):
    """State of MoDo."""

    weights: Tensor
    """``[m]``: the task weights ``λ`` on the simplex, ``1/m`` at the start."""


def check_positive(value: object, name: str, *, zero: bool = False) -> float:
    """Checks a finite float hyperparameter, positive (or non-negative with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__}.")
    low_ok = value >= 0 if zero else value > 0
    if not (low_ok and value < float("inf")):
        kind = "non-negative" if zero else "positive"
        raise ValueError(f"`{name}` must be {kind} and finite, got {value!r}.")
    return float(value)


def modo_weights(
    cross_gramian: Tensor, weights: Tensor, *, gamma: float = 0.1, rho: float = 0.1
) -> Tensor:
    """One MoDo step: ``Π_Δ(λ − γ(Aλ + ρλ))``, batched over the leading dims of ``A``.

    Args:
        cross_gramian: ``A = J₁ J₂ᵀ`` ``[..., m, m]`` (not symmetric in general).
        weights: The current ``λ`` ``[..., m]`` (broadcast against ``A``).
        gamma: The step size, positive.
        rho: The ℓ2 regularisation, non-negative.

    Returns:
        The new ``λ`` ``[..., m]`` on the simplex, dtype and device of ``A`` (NaN for a
        non-finite ``A``).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import modo_weights
        >>> A = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
        >>> modo_weights(A, torch.tensor([0.5, 0.5]))
        tensor([1., 0.])
    """
    check_gramian(cross_gramian)
    m = cross_gramian.shape[-1]
    if weights.shape[-1:] != (m,):
        raise ValueError(
            f"MoDo's weights have shape {list(weights.shape)} but A is for {m} losses: "
            "re-initialise the state with `init(m)`."
        )
    a = cross_gramian.detach()
    lam = weights.to(a.dtype)
    gradient = (a @ lam.unsqueeze(-1)).squeeze(-1) + rho * lam
    return nan_if_nonfinite(cross_gramian, project_onto_simplex(lam - gamma * gradient))


def modo(gamma: float = 0.1, rho: float = 0.1) -> CrossWeighting[MoDoState]:
    """MoDo as a :class:`~torchjd_func.aggregation.CrossWeighting` whose state is a
    :class:`MoDoState`; see :func:`modo_weights`.

    Args:
        gamma: The step size, positive.
        rho: The ℓ2 regularisation, non-negative.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import modo
        >>> A = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
        >>> weighting = modo()
        >>> first, state = weighting.update(A, weighting.init(2))
        >>> second, state = weighting.update(A, state)
        >>> first, second
        (tensor([1., 0.]), tensor([0., 1.]))
    """
    return CrossWeighting(
        _MoDoInit(),
        guard_nonfinite(
            _MoDoUpdate(check_positive(gamma, "gamma"), check_positive(rho, "rho", zero=True))
        ),
    )


class _MoDoInit:
    """The ``init`` of :func:`modo`."""

    def __call__(
        self,
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> MoDoState:
        return MoDoState(torch.full((check_m(m),), 1.0 / m, dtype=dtype, device=device))


class _MoDoUpdate:
    """The (unguarded) ``update`` of :func:`modo`."""

    def __init__(self, gamma: float, rho: float) -> None:
        self.gamma = gamma
        self.rho = rho

    def __call__(self, cross_gramian: Tensor, state: MoDoState, /) -> tuple[Tensor, MoDoState]:
        if not isinstance(state, MoDoState):
            raise TypeError(f"Expected a MoDoState (from `modo().init(m)`), got {state!r}.")
        weights = modo_weights(cross_gramian, state.weights, gamma=self.gamma, rho=self.rho)
        return weights, MoDoState(weights)


class MoDoWeighting(CrossGramianWeighting):
    """Weighting of :func:`modo_weights`, holding ``λ`` in ``state``; it takes the cross-Gramian
    ``A = J₁ J₂ᵀ`` of two independent batches (not a Gramian: ``GramianWeightedAggregator``
    refuses it). Not differentiable (runs under ``torch.no_grad()``), as in TorchJD.

    Args:
        gamma: The step size, positive.
        rho: The ℓ2 regularisation, non-negative.

    Each argument is a property that can be set later (checked as here; ``λ`` is kept).

    Example:
        >>> import torch
        >>> from torchjd_func import combine
        >>> from torchjd_func.aggregation import MoDoWeighting, cross_gramian
        >>> from tensordict import TensorDict
        >>> J1 = TensorDict({"w": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, [2])
        >>> J2 = TensorDict({"w": torch.tensor([[-3.0, 1.0, 2.0], [5.0, 0.0, 1.0]])}, [2])
        >>> weighting = MoDoWeighting()
        >>> weights = weighting(cross_gramian(J1, J2))
        >>> weights, combine(J1, weights)["w"]
        (tensor([1., 0.]), tensor([-4.,  1.,  1.]))
    """

    _differentiable = False
    gamma = Hyperparameter[float]()
    rho = Hyperparameter[float]()

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__(gamma=gamma, rho=rho)

    def _build(self, **hyperparameters: Any) -> CrossWeighting[Any]:
        return modo(**hyperparameters)

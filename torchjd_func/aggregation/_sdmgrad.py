"""SDMGrad: stochastic direction-oriented multi-objective gradient, from a cross-Gramian.

Xiao et al., "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
Algorithms", NeurIPS 2023, https://arxiv.org/abs/2305.18409 (Algorithm 1).

With ``A = J₁ J₂ᵀ`` the cross-Gramian of two independent batches, normalised as
``a = A / (mean_i √max(A_ii, 0))² + 1e-8)`` (official implementation, §6.1), ``w̃`` the
preference (``1/m`` by default, not normalised) and ``λ`` its pull, ``n_iter`` steps of momentum
SGD on the simplex:

.. math::

    g = a (w + \\lambda \\tilde w), \\quad v \\leftarrow \\mu v + g \\ (v = g \\text{ at first}),
    \\quad w \\leftarrow \\Pi_{\\Delta}(w - \\text{lr}\\, v),

then the weights are ``(w + λw̃) / (1 + λ)``; ``w`` is kept in the state (the next call starts from
it), ``w₀ = 1/m``. The ``n_iter`` iterations are unrolled (a fixed budget); the projection is
sort-based. Like TorchJD's, the weights are not differentiable (``A`` is detached).
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
from torchjd_func.aggregation._constant import check_vector
from torchjd_func.aggregation._cross import CrossGramianWeighting
from torchjd_func.aggregation._flat import check_m
from torchjd_func.aggregation._kinds import CrossWeighting
from torchjd_func.aggregation._modo import check_positive
from torchjd_func.aggregation._simplex import project_onto_simplex

__all__ = ["SDMGradState", "SDMGradWeighting", "sdmgrad", "sdmgrad_weights"]


class SDMGradState(NamedTuple):
    """State of SDMGrad."""

    weights: Tensor
    """``[m]``: the inner iterate ``w`` on the simplex, ``1/m`` at the start."""


def check_momentum(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`momentum` must be a float, got {type(value).__name__}.")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`momentum` must be in [0, 1), got {value!r}.")
    return float(value)


def check_n_iter(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`n_iter` must be an int, got {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`n_iter` must be a positive integer, got {value}.")
    return value


def sdmgrad_weights(
    cross_gramian: Tensor,
    weights: Tensor,
    *,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """SDMGrad's weights and new inner iterate ``w``, batched over the leading dims of ``A``.

    Args:
        cross_gramian: ``A = J₁ J₂ᵀ`` ``[..., m, m]`` (not symmetric in general).
        weights: The current inner iterate ``w`` ``[..., m]`` (broadcast against ``A``).
        lr: The inner step size, positive.
        momentum: The inner momentum, in ``[0, 1)``.
        n_iter: The number of inner steps, positive.
        lambda_: The pull ``λ`` toward the preference direction, non-negative.
        pref_vector: The preference ``w̃`` ``[m]``; ``None`` means ``1/m``.

    Returns:
        ``(weights [..., m], new w [..., m])``, dtype and device of ``A`` (NaN for a non-finite
        ``A``).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import sdmgrad_weights
        >>> A = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
        >>> weights, w = sdmgrad_weights(A, torch.tensor([0.5, 0.5]))
        >>> weights
        tensor([0.1154, 0.8846])
    """
    check_gramian(cross_gramian)
    m = cross_gramian.shape[-1]
    if weights.shape[-1:] != (m,):
        raise ValueError(
            f"SDMGrad's weights have shape {list(weights.shape)} but A is for {m} losses: "
            "re-initialise the state with `init(m)`."
        )
    a = cross_gramian.detach()
    if pref_vector is None:
        target = torch.full((m,), 1.0 / m, dtype=a.dtype, device=a.device)
    else:
        if pref_vector.shape != (m,):
            raise ValueError(
                f"`pref_vector` has shape {list(pref_vector.shape)} but A is for {m} losses: "
                "give one preference per loss."
            )
        target = pref_vector.detach().to(dtype=a.dtype, device=a.device)
    scale = a.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt().mean(-1)
    a = a / (scale**2 + 1e-8)[..., None, None]
    pull = lambda_ * target
    w = weights.to(a.dtype)
    velocity: Tensor | None = None
    for _ in range(n_iter):
        gradient = (a @ (w + pull).unsqueeze(-1)).squeeze(-1)
        velocity = gradient if velocity is None else momentum * velocity + gradient
        w = project_onto_simplex(w - lr * velocity)
    out = (w + pull) / (1.0 + lambda_)
    return nan_if_nonfinite(cross_gramian, out), nan_if_nonfinite(cross_gramian, w)


def sdmgrad(
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: Tensor | None = None,
) -> CrossWeighting[SDMGradState]:
    """SDMGrad as a :class:`~torchjd_func.aggregation.CrossWeighting` whose state is an
    :class:`SDMGradState`; see :func:`sdmgrad_weights`.

    Args:
        lr: The inner step size, positive.
        momentum: The inner momentum, in ``[0, 1)``.
        n_iter: The number of inner steps, positive.
        lambda_: The pull toward the preference direction, non-negative.
        pref_vector: The preference ``[m]`` (finite); ``None`` means ``1/m``.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import sdmgrad
        >>> A = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
        >>> weighting = sdmgrad()
        >>> weights, state = weighting.update(A, weighting.init(2))
        >>> weights
        tensor([0.1154, 0.8846])
    """
    if pref_vector is not None:
        check_vector(pref_vector, "pref_vector")
    update = _SDMGradUpdate(
        check_positive(lr, "lr"),
        check_momentum(momentum),
        check_n_iter(n_iter),
        check_positive(lambda_, "lambda_", zero=True),
        pref_vector,
    )
    return CrossWeighting(_SDMGradInit(), guard_nonfinite(update))


class _SDMGradInit:
    """The ``init`` of :func:`sdmgrad`."""

    def __call__(
        self,
        m: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> SDMGradState:
        return SDMGradState(torch.full((check_m(m),), 1.0 / m, dtype=dtype, device=device))


class _SDMGradUpdate:
    """The (unguarded) ``update`` of :func:`sdmgrad`."""

    def __init__(
        self, lr: float, momentum: float, n_iter: int, lambda_: float, pref: Tensor | None
    ) -> None:
        self.lr = lr
        self.momentum = momentum
        self.n_iter = n_iter
        self.lambda_ = lambda_
        self.pref_vector = pref

    def __call__(
        self, cross_gramian: Tensor, state: SDMGradState, /
    ) -> tuple[Tensor, SDMGradState]:
        if not isinstance(state, SDMGradState):
            raise TypeError(f"Expected an SDMGradState (from `sdmgrad().init(m)`), got {state!r}.")
        weights, w = sdmgrad_weights(
            cross_gramian,
            state.weights,
            lr=self.lr,
            momentum=self.momentum,
            n_iter=self.n_iter,
            lambda_=self.lambda_,
            pref_vector=self.pref_vector,
        )
        return weights, SDMGradState(w)


class SDMGradWeighting(CrossGramianWeighting):
    """Weighting of :func:`sdmgrad_weights`, holding the inner iterate ``w`` in ``state``; it
    takes the cross-Gramian ``A = J₁ J₂ᵀ`` of two independent batches (not a Gramian:
    ``GramianWeightedAggregator`` refuses it). Not differentiable (runs under
    ``torch.no_grad()``), as in TorchJD.

    Args:
        lr: The inner step size, positive.
        momentum: The inner momentum, in ``[0, 1)``.
        n_iter: The number of inner steps, positive.
        lambda_: The pull toward the preference direction, non-negative.
        pref_vector: The preference ``[m]``; ``None`` means ``1/m``.

    Each argument is a property that can be set later (checked as here; ``w`` is kept).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import SDMGradWeighting
        >>> A = torch.tensor([[18.0, -22.0], [-22.0, 38.0]])
        >>> weighting = SDMGradWeighting()
        >>> weighting(A)
        tensor([0.1154, 0.8846])
        >>> weighting
        SDMGradWeighting(lr=10.0, momentum=0.5, n_iter=20, lambda_=0.3, pref_vector=None)
    """

    _differentiable = False
    lr = Hyperparameter[float]()
    momentum = Hyperparameter[float]()
    n_iter = Hyperparameter[int]()
    lambda_ = Hyperparameter[float]()
    pref_vector = Hyperparameter[Tensor | None]()

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
    ) -> None:
        super().__init__(
            lr=lr, momentum=momentum, n_iter=n_iter, lambda_=lambda_, pref_vector=pref_vector
        )

    def _build(self, **hyperparameters: Any) -> CrossWeighting[Any]:
        return sdmgrad(**hyperparameters)

"""ConFIG: the conflict-free direction of the unit gradients, rescaled.

Liu et al., "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks", ICLR
2025, https://arxiv.org/abs/2408.11104 (Equation 2).

With ``U`` the rows of ``J`` normalised to unit length (zero rows stay zero) and ``w`` the
preference vector (ones by default, not normalised):

.. math::

    b = U^{+} w, \\qquad \\hat u = \\frac{b}{\\max(\\|b\\|, 10^{-12})}, \\qquad
    A(J) = \\Big(\\sum_i g_i^\\top \\hat u\\Big)\\, \\hat u.

**From the Gramian.** ``U⁺ = Uᵀ (U Uᵀ)⁺``, and ``U = D J`` with ``D = diag(1/‖g_i‖)`` (0 for a
zero row), so ``b = Jᵀ c`` with ``c = D K⁺ w`` and ``K = D G D`` (the cosines of the rows). Then
``‖b‖² = wᵀ K⁺ w``, ``Σ_i g_iᵀ b = 1ᵀ G c``, and ConFIG is exactly the weighting

.. math::

    \\text{weights} = c \\cdot \\frac{1^\\top G c}{\\max(w^\\top K^{+} w,\\ 10^{-24})},
    \\qquad A(J) = J^\\top \\text{weights}.

So only the ``[m, m]`` Gramian is needed: :func:`config_weights` is a Gramian kernel, and
:func:`config` computes the Gramian leaf by leaf in float64 (no flattened ``[m, n]`` copy, no SVD
of an ``[m, n]`` matrix), ``K⁺`` with ``torch.linalg.eigh``, and the update with
:func:`~torchjd_func.combine`. The float64 Gramian keeps a float32 Jacobian's accuracy: in float32,
nearly colinear rows would lose their small eigenvalue to rounding.

**Cut-off.** TorchJD's ``torch.linalg.pinv(U)`` drops the singular values ``σ ≤ rtol·σ_max`` with
``rtol = max(m, n)·eps`` of the Jacobian's dtype; here the eigenvalues ``λ = σ²`` of ``K`` with
``λ ≤ λ_max·max(rtol², m·eps)``, ``eps`` of the Gramian's dtype: the second term is the rounding
floor of the eigen-decomposition, below which an eigenvalue is noise. The two agree unless ``U``
has singular values between ``rtol·σ_max`` and ``√(m·eps)·σ_max`` (``≈ 1.5e-8·√m`` in float64):
such nearly dependent unit rows (all but colinear, or a tiny component in a new direction) are
treated as dependent here, where TorchJD amplifies that component by up to ``1/σ``.

Like TorchJD's, ConFIG is not differentiable (the Gramian is detached).
"""

from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from torchjd_func._gramian import combine
from torchjd_func.aggregation._base import (
    EmptyState,
    Hyperparameter,
    check_gramian,
    nan_if_nonfinite,
)
from torchjd_func.aggregation._constant import check_vector
from torchjd_func.aggregation._flat import ordered_leaves, params_layout, work_dtype
from torchjd_func.aggregation._kinds import (
    JacobianAggregating,
    JacobianAggregator,
    check_jacobian,
    guard_nonfinite_jacobian,
)
from torchjd_func.aggregation._upgrad import pref_suffix

__all__ = ["ConFIG", "config", "config_weights"]


def config_weights(
    gramian: Tensor, pref_vector: Tensor | None = None, *, rtol: float | None = None
) -> Tensor:
    """ConFIG's effective weights, from the Gramian alone (see the module's derivation), batched.

    Args:
        gramian: PSD Gramians ``[..., m, m]``, any floating dtype (solved in float64).
        pref_vector: Preferences ``w`` ``[m]`` (not normalised); ``None`` means ones.
        rtol: Singular values of the unit rows below ``rtol·σ_max`` count as zero; ``None``
            means ``m·eps`` of ``gramian``'s dtype (TorchJD's pinv uses ``max(m, n)·eps`` of the
            Jacobian's dtype: pass that when ``n`` is known, as :func:`config` does).

    Returns:
        Weights ``[..., m]``, dtype and device of ``gramian`` (``A(J) = Jᵀ weights``); zero for a
        zero Gramian; NaN for a non-finite one.

    Raises:
        TypeError: ``gramian`` or ``pref_vector`` is not a floating-point Tensor.
        ValueError: wrong shapes, or ``rtol`` negative or not finite.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import config_weights
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weights = config_weights(J @ J.T)
        >>> weights, weights @ J
        (tensor([1.2265, 0.8441]), tensor([0.1588, 2.0706, 2.0706]))
    """
    check_gramian(gramian)
    m = gramian.shape[-1]
    if rtol is None:
        rtol = m * torch.finfo(gramian.dtype).eps
    elif (
        isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < float("inf")
    ):
        raise ValueError(f"`rtol` must be a finite, non-negative float, got {rtol!r}.")
    g = gramian.detach().to(torch.float64)
    # eigh raises on a NaN (a host synchronisation): solve a zero Gramian instead, then poison.
    finite = g.isfinite().all(dim=-1, keepdim=True).all(dim=-2, keepdim=True)
    g = torch.where(finite, g, torch.zeros_like(g))
    if pref_vector is None:
        w = torch.ones(m, dtype=torch.float64, device=g.device)
    else:
        if not isinstance(pref_vector, Tensor) or not pref_vector.is_floating_point():
            raise TypeError("`pref_vector` must be a floating-point Tensor [m] or None.")
        if pref_vector.shape != (m,):
            raise ValueError(
                f"`pref_vector` has shape {list(pref_vector.shape)} but the Gramian is for {m} "
                "losses: give one preference per loss."
            )
        w = pref_vector.detach().to(dtype=torch.float64, device=g.device)
    norms = g.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt()
    inverse = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
    cosines = g * inverse.unsqueeze(-1) * inverse.unsqueeze(-2)
    cosines = 0.5 * (cosines + cosines.mT)
    eigenvalues, eigenvectors = torch.linalg.eigh(cosines)
    floor = max(float(rtol) ** 2, m * torch.finfo(gramian.dtype).eps)
    top = eigenvalues[..., -1:].clamp(min=0.0)
    kept = eigenvalues > top * floor
    inverted = torch.where(kept, 1.0 / torch.where(kept, eigenvalues, 1.0), 0.0)
    projected = (eigenvectors.mT @ w.unsqueeze(-1)).squeeze(-1)  # Vᵀ w
    v = (eigenvectors @ (inverted * projected).unsqueeze(-1)).squeeze(-1)  # K⁺ w
    squared_norm = (inverted * projected**2).sum(-1, keepdim=True)  # wᵀ K⁺ w = ‖b‖²
    c = inverse * v
    length = (g @ c.unsqueeze(-1)).squeeze(-1).sum(-1, keepdim=True)  # 1ᵀ G c = Σ_i g_iᵀ b
    weights = c * length / squared_norm.clamp(min=1e-24)
    return nan_if_nonfinite(gramian, weights.to(gramian.dtype))


def _gramian64(jacobian: TensorDictBase) -> Tensor:
    """``J Jᵀ`` ``[m, m]`` in float64, leaf by leaf."""
    m = jacobian.batch_size[0]
    total: Tensor | None = None
    for _, value in ordered_leaves(jacobian):
        rows = value.detach().reshape(m, -1).to(torch.float64)
        term = rows @ rows.T
        total = term if total is None else total + term
    assert total is not None
    return total


def config(pref_vector: Tensor | None = None) -> JacobianAggregator[EmptyState]:
    """ConFIG as a stateless :class:`~torchjd_func.aggregation.JacobianAggregator` whose weights
    are its exact effective weights (:func:`config_weights`, the Gramian computed leaf by leaf in
    float64 and ``rtol = max(m, n)·eps`` of the Jacobian's dtype, as TorchJD's pinv).

    ``stateless(functools.partial(config_weights, pref_vector=...))`` is the same method as a
    :class:`~torchjd_func.aggregation.PureWeighting`, for the steps that only build the Gramian.

    Args:
        pref_vector: Preferences ``[m]`` (not normalised, finite); ``None`` means ones.

    Example:
        >>> import torch
        >>> from tensordict import TensorDict
        >>> from torchjd_func.aggregation import config
        >>> J = TensorDict({"w": torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])}, [2])
        >>> aggregator = config()
        >>> update, weights, state = aggregator.update(J, aggregator.init(J, 2))
        >>> update["w"]
        tensor([0.1588, 2.0706, 2.0706])
    """
    if pref_vector is not None:
        check_vector(pref_vector, "pref_vector")
    return JacobianAggregator(_ConFIGInit(), guard_nonfinite_jacobian(_ConFIGUpdate(pref_vector)))


class _ConFIGInit:
    """The ``init`` of :func:`config`."""

    def __call__(self, params: TensorDictBase, m: int, /) -> EmptyState:
        del m
        params_layout(params)
        return EmptyState()


class _ConFIGUpdate:
    """The (unguarded) ``update`` of :func:`config`."""

    def __init__(self, pref_vector: Tensor | None) -> None:
        self.pref_vector = pref_vector

    def __call__(
        self, jacobian: TensorDictBase, state: EmptyState, /
    ) -> tuple[TensorDict, Tensor | None, EmptyState]:
        if not isinstance(state, EmptyState):
            raise TypeError(f"Expected the EmptyState of ConFIG, got {state!r}.")
        check_jacobian(jacobian)
        m = jacobian.batch_size[0]
        found = [value for _, value in ordered_leaves(jacobian)]
        dtype = work_dtype(found)
        n = sum(value.shape[1:].numel() for value in found)
        # The least precise leaf sets the pinv's tolerance.
        eps = 0.0
        for value in found:
            eps = max(eps, torch.finfo(value.dtype).eps)
        rtol = max(m, n) * eps
        weights = config_weights(_gramian64(jacobian), self.pref_vector, rtol=rtol).to(dtype)
        return combine(jacobian, weights), weights, state


class ConFIG(JacobianAggregating):
    """Aggregator ``[m, n] -> [n]`` of ConFIG's conflict-free direction (:func:`config`); not
    differentiable (runs under ``torch.no_grad()``), as in TorchJD.

    Args:
        pref_vector: Preferences ``[m]`` (not normalised); ``None`` means ones.

    ``pref_vector`` is a property that can be set later (checked as here). A matrix with no row
    gives zeros ``[n]``, as in TorchJD.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import ConFIG
        >>> aggregator = ConFIG()
        >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.1588, 2.0706, 2.0706])
        >>> aggregator.pref_vector = torch.tensor([1.0, 2.0])
        >>> aggregator, str(aggregator)
        (ConFIG(pref_vector=tensor([1., 2.])), 'ConFIG([1., 2.])')
    """

    _differentiable = False
    pref_vector = Hyperparameter[Tensor | None]()

    def __init__(self, pref_vector: Tensor | None = None) -> None:
        super().__init__(pref_vector=pref_vector)

    def _build(self, **hyperparameters: Any) -> JacobianAggregator[Any]:
        return config(**hyperparameters)

    def forward(self, matrix: Tensor, /) -> Tensor:
        if matrix.shape[0] == 0:
            return matrix.new_zeros(matrix.shape[1])
        return super().forward(matrix)

    def __str__(self) -> str:
        return f"ConFIG{pref_suffix(self.pref_vector)}"

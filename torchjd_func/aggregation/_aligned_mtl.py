"""Aligned-MTL: align the principal components of the gradients, then weight them.

Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
https://openaccess.thecvf.com/content/CVPR2023/papers/Senushkin_Independent_Component_Alignment_for_Multi-Task_Learning_CVPR_2023_paper.pdf
(Alg. 1). With ``G = V Λ Vᵀ`` and ``k`` the eigenvalues above ``tol = λ_max · m · eps``:

.. math::

    B = \\sqrt{\\sigma}\\, V_k \\Lambda_k^{-1/2} V_k^\\top, \\qquad w = B u,

so that ``Jᵀ B`` has orthogonal rows of equal norm ``√σ`` (the condition number of the aligned
gradients is 1). ``u`` is the preference vector (``1/m`` by default); the scale ``σ`` is the
smallest kept eigenvalue (``"min"``), their lower median (``"median"``) or their mean (``"rmse"``,
as in the original implementation). No eigenvalue above ``tol`` (a zero Gramian): ``B = I``.

The rank ``k`` depends on the data: it is a mask over the eigenvalues (``eigh`` sorts them in
ascending order, so the kept ones are the last ``k``), not Python control flow, so the kernel is
batched, compiles with ``fullgraph=True`` and does not synchronise with the host.
"""

from typing import Any, Literal, TypeAlias

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
    stateless,
)
from torchjd_func.aggregation._constant import check_vector
from torchjd_func.aggregation._imtlg import finite_mask, work_dtype
from torchjd_func.aggregation._upgrad import check_pref, pref_suffix

__all__ = [
    "AlignedMTL",
    "AlignedMTLWeighting",
    "ScaleMode",
    "aligned_mtl",
    "aligned_mtl_weights",
]

ScaleMode: TypeAlias = Literal["min", "median", "rmse"]
"""How Aligned-MTL scales its balance transformation."""
_SCALE_MODES = ("min", "median", "rmse")


def _check_scale_mode(scale_mode: object) -> ScaleMode:
    if not isinstance(scale_mode, str) or scale_mode not in _SCALE_MODES:
        raise ValueError(f"Invalid scale_mode={scale_mode!r}. Expected 'min', 'median', or 'rmse'.")
    return scale_mode  # type: ignore[return-value]


def _balance_transformation(gramian: Tensor, scale_mode: ScaleMode) -> Tensor:
    """``B = √σ V_k Λ_k^{-1/2} V_kᵀ`` ``[..., m, m]`` (``I`` where no eigenvalue is kept)."""
    m = gramian.shape[-1]
    eigenvalues, vectors = torch.linalg.eigh(gramian, UPLO="U")
    tol = eigenvalues.amax(dim=-1, keepdim=True) * m * torch.finfo(gramian.dtype).eps
    kept = eigenvalues > tol  # the last `rank` (ascending order)
    rank = kept.sum(dim=-1, keepdim=True)
    inverse_root = torch.where(kept, torch.where(kept, eigenvalues, 1.0).rsqrt(), 0.0)
    if scale_mode == "rmse":
        scale = (eigenvalues * kept).sum(dim=-1, keepdim=True) / rank.clamp(min=1)
    else:
        # The smallest kept eigenvalue is at m − rank; torch.median's lower median of the k
        # kept ones, (k − 1) // 2 above it.
        offset = (rank - 1).div(2, rounding_mode="floor") if scale_mode == "median" else 0
        index = (m - rank + offset).clamp(0, m - 1)
        scale = eigenvalues.gather(-1, index)
    scale = torch.where(rank > 0, scale, 1.0)
    transformation = (
        scale.unsqueeze(-1).sqrt() * (vectors * inverse_root.unsqueeze(-2)) @ vectors.mT
    )
    identity = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    return torch.where((rank > 0).unsqueeze(-1), transformation, identity)


def aligned_mtl_weights(
    gramian: Tensor, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min"
) -> Tensor:
    """Aligned-MTL's weights ``w = B u``, batched (differentiable, as TorchJD's).

    Args:
        gramian: PSD Gramians ``[..., m, m]``.
        pref_vector: Preferences ``u`` ``[m]`` (or ``[..., m]``), not normalised; ``None``
            means ``1/m``.
        scale_mode: ``"min"``, ``"median"`` or ``"rmse"``; see the module docstring.

    Returns:
        Weights ``[..., m]`` in the dtype and on the device of ``gramian``; ``u`` itself for a
        zero Gramian (``B = I``); ``u`` for ``m = 1``; NaN for a Gramian with a NaN or ±Inf
        entry. The gradient through ``eigh`` is not finite where kept eigenvalues coincide (as
        in TorchJD).

    Raises:
        TypeError: ``gramian`` or ``pref_vector`` is not a floating-point Tensor.
        ValueError: ``gramian`` is not square or empty, ``pref_vector`` does not have ``m``
            entries, or ``scale_mode`` is not one of the three.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import aligned_mtl_weights
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> aligned_mtl_weights(J @ J.T)
        tensor([0.5591, 0.4083])
        >>> aligned_mtl_weights(J @ J.T, scale_mode="rmse")
        tensor([1.5109, 1.1033])
    """
    check_gramian(gramian)
    mode = _check_scale_mode(scale_mode)
    pref = check_pref(gramian, pref_vector)
    m = gramian.shape[-1]
    work = work_dtype(gramian.dtype)
    if pref is None:
        u = torch.full(gramian.shape[:-1], 1.0 / m, dtype=work, device=gramian.device)
    else:
        u = pref.to(dtype=work, device=gramian.device).expand(*gramian.shape[:-1])
    finite = finite_mask(gramian)
    sanitized = torch.where(finite[..., None, None], gramian, 0.0).to(work)
    weights = (_balance_transformation(sanitized, mode) @ u.unsqueeze(-1)).squeeze(-1)
    return torch.where(finite[..., None], weights.to(gramian.dtype), float("nan"))


def aligned_mtl(
    pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min"
) -> PureWeighting[EmptyState]:
    """Aligned-MTL as a stateless :class:`PureWeighting`; see :func:`aligned_mtl_weights`.

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import aligned_mtl
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> weighting = aligned_mtl(scale_mode="median")
        >>> weighting.update(J @ J.T, weighting.init(2))[0]
        tensor([0.5591, 0.4083])
    """
    if pref_vector is not None:
        check_vector(pref_vector, "pref_vector")
    return stateless(_AlignedMTLKernel(pref_vector, _check_scale_mode(scale_mode)))


class _AlignedMTLKernel:
    """The kernel of :func:`aligned_mtl` (an object, not a closure, so that it pickles)."""

    def __init__(self, pref_vector: Tensor | None, scale_mode: ScaleMode) -> None:
        self.pref_vector = pref_vector
        self.scale_mode = scale_mode

    def __call__(self, gramian: Tensor) -> Tensor:
        return aligned_mtl_weights(gramian, self.pref_vector, self.scale_mode)


class AlignedMTLWeighting(GramianWeighting):
    """Weighting of :func:`aligned_mtl_weights`; differentiable, as TorchJD's.

    Args:
        pref_vector: Preferences ``[m]`` (not normalised); ``None`` means the mean, ``1/m``.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``; anything else raises a
            ``ValueError`` here (TorchJD raises at the first call).

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import AlignedMTLWeighting
        >>> J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
        >>> AlignedMTLWeighting()(J @ J.T)
        tensor([0.5591, 0.4083])
    """

    pref_vector = Hyperparameter[Tensor | None]()
    scale_mode = Hyperparameter[ScaleMode]()

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min") -> None:
        super().__init__(pref_vector=pref_vector, scale_mode=scale_mode)

    def _build(self, **hyperparameters: Any) -> PureWeighting[Any]:
        return aligned_mtl(**hyperparameters)


class AlignedMTL(GramianWeightedAggregator):
    """Aggregator ``A(J) = Jᵀ B u`` of Aligned-MTL (Alg. 1); differentiable, as TorchJD's.

    Args:
        pref_vector: Preferences ``[m]`` (not normalised); ``None`` means the mean, ``1/m``.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.

    Each argument is a property that can be set later (checked as here).

    Example:
        >>> import torch
        >>> from torchjd_func.aggregation import AlignedMTL
        >>> aggregator = AlignedMTL()
        >>> aggregator(torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]]))
        tensor([0.2133, 0.9673, 0.9673])
        >>> aggregator.scale_mode = "rmse"
        >>> aggregator, str(aggregator)
        (AlignedMTL(pref_vector=None, scale_mode='rmse'), 'AlignedMTL')
    """

    gramian_weighting: AlignedMTLWeighting
    pref_vector = Delegated[Tensor | None]()
    scale_mode = Delegated[ScaleMode]()

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: ScaleMode = "min") -> None:
        super().__init__(AlignedMTLWeighting(pref_vector, scale_mode))

    def __str__(self) -> str:
        return f"AlignedMTL{pref_suffix(self.pref_vector)}"

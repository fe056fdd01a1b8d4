"""One registry of every weighting, with the properties it claims, and the matrices to test on.

The shared suite in ``test_weightings.py`` checks each entry for the properties it declares
(optax's ``_OPTIMIZERS_UNDER_TEST``, TorchJD's per-aggregator property lists).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tests.settings import DEVICE, DTYPE
from torchjd_func.aggregation import (
    PureWeighting,
    aligned_mtl,
    config_weights,
    constant,
    crmogm,
    dualproj,
    gradvac,
    imtlg,
    krum,
    mean,
    mgda,
    pcd,
    pcgrad,
    random_,
    stateless,
    sum_,
    upgrad,
)

NON_CONFLICTING = "non_conflicting"
"""``J A(J) ≥ 0``: the update conflicts with no row."""
PERMUTATION_INVARIANT = "permutation_invariant"
"""Permuting the rows of ``J`` does not change ``A(J)``."""
LINEAR_UNDER_SCALING = "linear_under_scaling"
"""``A(diag(αc₁ + βc₂) J) = α A(diag(c₁) J) + β A(diag(c₂) J)`` for positive ``c``, α, β."""
SIMPLEX = "simplex"
"""Weights are non-negative and sum to 1."""
STATEFUL = "stateful"
"""The state changes across calls."""


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[[int], PureWeighting[Any]]
    """Builds the weighting for ``m`` losses (Constant needs ``m``)."""
    properties: frozenset[str]
    linearity_tol: float = 1e-4
    """Relative tolerance of the linearity check (UPGrad is linear only up to ``reg_eps``)."""
    min_m: int = 1
    """The fewest losses it takes (Krum needs ``n_byzantine + 3``); smaller inputs are skipped."""

    def __str__(self) -> str:
        return self.name


def _pref(m: int) -> Tensor:
    return torch.arange(1, m + 1, dtype=DTYPE, device=DEVICE)


REGISTRY = [
    Entry(
        "mean",
        lambda m: mean(),
        frozenset({PERMUTATION_INVARIANT, LINEAR_UNDER_SCALING}),
    ),
    Entry("sum", lambda m: sum_(), frozenset({PERMUTATION_INVARIANT, LINEAR_UNDER_SCALING})),
    Entry("constant", lambda m: constant(_pref(m)), frozenset({LINEAR_UNDER_SCALING})),
    Entry("random", lambda m: random_(seed=3), frozenset({STATEFUL, SIMPLEX})),
    Entry(
        "upgrad",
        lambda m: upgrad(),
        frozenset({NON_CONFLICTING, PERMUTATION_INVARIANT, LINEAR_UNDER_SCALING}),
        linearity_tol=6e-2,
    ),
    Entry("upgrad_pref", lambda m: upgrad(_pref(m)), frozenset({NON_CONFLICTING})),
    Entry("dualproj", lambda m: dualproj(), frozenset({NON_CONFLICTING, PERMUTATION_INVARIANT})),
    Entry("dualproj_pref", lambda m: dualproj(_pref(m)), frozenset({NON_CONFLICTING})),
    Entry(
        "mgda",
        lambda m: mgda(),
        frozenset({NON_CONFLICTING, PERMUTATION_INVARIANT, SIMPLEX}),
    ),
    Entry("pcgrad", lambda m: pcgrad(seed=1), frozenset({STATEFUL})),
    Entry("gradvac", lambda m: gradvac(seed=2), frozenset({STATEFUL})),
    # ConFIG's exact effective weights are a function of the Gramian (docs/methods/jacobian.md).
    Entry("config", lambda m: stateless(config_weights), frozenset({PERMUTATION_INVARIANT})),
    Entry("imtlg", lambda m: imtlg(), frozenset({PERMUTATION_INVARIANT})),
    Entry("aligned_mtl", lambda m: aligned_mtl(), frozenset({PERMUTATION_INVARIANT})),
    Entry(
        "aligned_mtl_median",
        lambda m: aligned_mtl(scale_mode="median"),
        frozenset({PERMUTATION_INVARIANT}),
    ),
    Entry("aligned_mtl_rmse_pref", lambda m: aligned_mtl(_pref(m), "rmse"), frozenset()),
    Entry("krum", lambda m: krum(1), frozenset({SIMPLEX}), min_m=4),
    Entry("multi_krum", lambda m: krum(0, 3), frozenset({SIMPLEX}), min_m=3),
    Entry(
        "crmogm_upgrad",
        lambda m: crmogm(upgrad()),
        frozenset({STATEFUL, NON_CONFLICTING, PERMUTATION_INVARIANT}),
    ),
    Entry("crmogm_gradvac", lambda m: crmogm(gradvac(seed=2), alpha=0.5), frozenset({STATEFUL})),
    Entry(
        "crmogm_mgda_initial",
        lambda m: crmogm(
            mgda(), initial_weights=torch.full((m,), 1 / m, dtype=DTYPE, device=DEVICE)
        ),
        frozenset({STATEFUL, SIMPLEX}),
    ),
    # Row 0 is the primary objective: not permutation invariant, and no row is protected from
    # conflict (the secondary ones only get a fraction τ of their own progress).
    Entry("pcd", lambda m: pcd(), frozenset({STATEFUL})),
    Entry("pcd_tau", lambda m: pcd(0.5, beta=0.9), frozenset({STATEFUL})),
]


def _low_rank(m: int, n: int, rank: int, generator: torch.Generator) -> Tensor:
    """``U[:, :r] diag(s) V[:r]`` with random orthonormal U, V (TorchJD's NormalSampler)."""
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    s = torch.randn(rank, generator=generator, dtype=torch.float64).abs() + 0.1
    return (u[:, :rank] * s) @ v[:, :rank].T


def _matrices() -> list[tuple[str, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    dims = [(1, 1, 1), (4, 3, 1), (4, 3, 2), (4, 3, 3), (9, 11, 5), (9, 11, 9)]
    normal = [(f"normal{d}", _low_rank(*d, generator)) for d in dims]
    zero = [(f"zero{(m, n)}", torch.zeros(m, n, dtype=torch.float64)) for m, n in [(1, 1), (4, 3)]]
    conflicting = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
    colinear = torch.randn(1, 7, generator=generator, dtype=torch.float64).repeat(5, 1)
    colinear = colinear * torch.tensor([[1.0], [2.0], [-1.0], [0.5], [1.0 + 1e-6]])
    return [*normal, *zero, ("J_base", conflicting), ("colinear", colinear)]


MATRICES = [(name, matrix.to(dtype=DTYPE, device=DEVICE)) for name, matrix in _matrices()]
"""Typical inputs: low-rank, zero, conflicting and (anti-)colinear matrices."""

SCALED = [
    (f"{name}x{scale:g}", matrix * scale)
    for name, matrix in MATRICES[:6]
    for scale in [0.0, 1e-10, 1e3, 1e5, 1e10, 1e15]
]
"""The typical inputs scaled from 0 to 1e15 (the Gramian then reaches 1e30)."""

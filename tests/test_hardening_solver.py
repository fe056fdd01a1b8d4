"""Input screening, validation and detaching of the UPGrad / DualProj / MGDA kernels (issue 11,
items 1, 5, 6, 15 and 17)."""

import math

import pytest
import torch
from torch import Tensor

from torchjd_func._qp import normalize_regularize
from torchjd_func.aggregation import (
    DualProjWeighting,
    UPGradWeighting,
    dualproj,
    dualproj_weights,
    mgda_weights,
    upgrad,
    upgrad_weights,
)

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

F64 = torch.float64
KERNELS = [upgrad_weights, dualproj_weights, mgda_weights]


def _pair(family: str, seed: int) -> Tensor:
    """Two float64 gradients ``[2, 256]`` of a hard family."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(256, dtype=F64, generator=gen)
    a = a / a.norm()
    noise = 1e-6 * torch.randn(256, dtype=F64, generator=gen)
    b = -(a + noise) if family == "opposite" else 10.0 * (a + noise)
    return torch.stack([a, b])


def _mgda_kkt(gramian: Tensor, alpha: Tensor) -> float:
    """Worst KKT violation of ``min αᵀGα on the simplex``, relative to ``tr(G)``."""
    g_alpha = gramian @ alpha
    lam = alpha @ g_alpha
    stationarity = (lam - g_alpha).clamp_min(0).max()
    complementarity = (alpha * (g_alpha - lam)).abs().max()
    return float(torch.maximum(stationarity, complementarity) / gramian.trace())


@pytest.mark.parametrize("family", ["opposite", "colinear"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_mgda_rounding_indefinite_matches_torchjd_and_kkt(family: str, dtype: torch.dtype) -> None:
    """Item 1: float32 rounding makes these Gramians indefinite by more than reg_eps."""
    for seed in range(20):
        j = _pair(family, seed).to(dtype)
        gramian = j @ j.T
        ours = mgda_weights(gramian).double()
        theirs = torchjd_aggregation.MGDAWeighting()(gramian).double()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)
        # KKT of the exact float64 Gramian of the same (rounded) gradients.
        j64 = j.double()
        assert _mgda_kkt(j64 @ j64.T, ours) < 1e-5


@pytest.mark.parametrize("family", ["opposite", "colinear"])
@pytest.mark.parametrize("scale", [1e-10, 1.0, 1e15])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (upgrad_weights, lambda: torchjd_aggregation.UPGradWeighting()),
        (dualproj_weights, lambda: torchjd_aggregation.DualProjWeighting()),
    ],
)
def test_projections_hard_families_match_torchjd(
    family: str, scale: float, dtype: torch.dtype, ours: object, theirs: object
) -> None:
    """Item 1's families for UPGrad and DualProj, in float32 and float64."""
    for seed in range(5):
        j = (math.sqrt(scale) * _pair(family, seed)).to(dtype)
        gramian = j @ j.T
        expected = theirs()(gramian.double())  # type: ignore[operator]
        got = ours(gramian)  # type: ignore[operator]
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_kernels_validate_hyperparameters() -> None:
    """Item 5: the kernels check their eps like the factories do."""
    g = torch.eye(2)
    for bad in (-0.5, math.nan, math.inf):
        for kernel in (upgrad_weights, dualproj_weights):
            with pytest.raises(ValueError, match="reg_eps"):
                kernel(g, reg_eps=bad)
            with pytest.raises(ValueError, match="norm_eps"):
                kernel(g, norm_eps=bad)
        with pytest.raises(ValueError, match="reg_eps"):
            mgda_weights(g, reg_eps=bad)
    with pytest.raises(TypeError, match="reg_eps"):
        upgrad_weights(g, reg_eps="1e-4")  # type: ignore[arg-type]


@pytest.mark.parametrize("kernel", [upgrad_weights, dualproj_weights])
def test_kernels_check_pref_vector(kernel: object) -> None:
    """Item 15: a 0-d, list or wrong-length preference vector gets a clear error."""
    g = torch.eye(3)
    with pytest.raises(ValueError, match="one preference per loss"):
        kernel(g, torch.tensor(1.0))  # type: ignore[operator]
    with pytest.raises(ValueError, match="one preference per loss"):
        kernel(g, torch.ones(2))  # type: ignore[operator]
    with pytest.raises(TypeError, match=r"torch\.tensor"):
        kernel(g, [1.0, 1.0, 1.0])  # type: ignore[operator]
    # Negative or non-finite preferences: NaN (detectable, no host synchronisation).
    for pref in ([1.0, -1.0, 1.0], [1.0, math.nan, 1.0], [1.0, math.inf, 1.0]):
        assert kernel(g, torch.tensor(pref)).isnan().all()  # type: ignore[operator]


@pytest.mark.parametrize(
    "factory", [upgrad, dualproj, UPGradWeighting, DualProjWeighting], ids=lambda f: f.__name__
)
def test_constructors_reject_bad_pref_values(factory: object) -> None:
    for pref in ([1.0, -1.0], [1.0, math.nan], [math.inf, 1.0]):
        with pytest.raises(ValueError, match=r"finite|non-negative"):
            factory(torch.tensor(pref))  # type: ignore[operator]
    with pytest.raises(TypeError, match="pref_vector"):
        factory([1.0, 1.0])  # type: ignore[operator]
    with pytest.raises(ValueError, match="pref_vector"):
        factory(torch.tensor(1.0))  # type: ignore[operator]


BAD_GRAMIANS = {
    "minus-inf-diagonal": [[-math.inf, 0.0], [0.0, 1.0]],
    "plus-inf": [[math.inf, 0.0], [0.0, 1.0]],
    "nan-off-diagonal": [[1.0, math.nan], [math.nan, 1.0]],
    "indefinite": [[1.0, 2.0], [2.0, 1.0]],
    "negative-trace": [[-1.0, 0.0], [0.0, -1.0]],
    "zero-trace-indefinite": [[0.0, 1.0], [1.0, 0.0]],
    "non-symmetric": [[1.0, 0.5], [-0.5, 1.0]],
}


@pytest.mark.parametrize("name", BAD_GRAMIANS)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_bad_gramian_gives_nan_others_unaffected(
    name: str, kernel: object, dtype: torch.dtype
) -> None:
    """Item 6: NaN for the bad Gramian only, in every dtype; also compiled and under vmap."""
    bad = torch.tensor(BAD_GRAMIANS[name], dtype=F64)
    j = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=F64)
    good = j @ j.T
    batch = torch.stack([good, bad, 2.0 * good]).to(dtype)
    out = kernel(batch)  # type: ignore[operator]
    assert out.dtype == dtype
    assert out[1].isnan().all()
    expected = kernel(good)  # type: ignore[operator]
    for i in (0, 2):
        torch.testing.assert_close(out[i].double(), expected, rtol=0, atol=1e-2)
    torch.testing.assert_close(torch.vmap(kernel)(batch), out, equal_nan=True)  # type: ignore[arg-type]


def test_bad_gramian_nan_compiled_and_m7() -> None:
    """The PDAS path (m ≥ 7) screens the same way, and compiles with fullgraph=True."""
    gen = torch.Generator().manual_seed(0)
    j = torch.randn(7, 9, generator=gen, dtype=F64)
    good = j @ j.T
    indefinite = good - 2.0 * good.trace() / 7 * torch.eye(7, dtype=F64)
    batch = torch.stack([good, indefinite])
    compiled = torch.compile(upgrad_weights, fullgraph=True, backend="eager")
    for fn in (upgrad_weights, compiled):
        out = fn(batch)
        assert out[1].isnan().all()
        torch.testing.assert_close(out[0], upgrad_weights(good))


def test_rounding_level_asymmetry_is_solved_as_symmetric_part() -> None:
    gen = torch.Generator().manual_seed(1)
    j = torch.randn(5, 8, generator=gen)
    g = j @ j.T
    perturbed = g + 1e-6 * g.trace() * torch.triu(torch.ones(5, 5), diagonal=1)
    sym = 0.5 * (perturbed + perturbed.T)
    for kernel in KERNELS:
        torch.testing.assert_close(kernel(perturbed), kernel(sym))


def test_normalize_regularize_non_finite_gives_nan() -> None:
    g = torch.tensor([[-math.inf, 0.0], [0.0, 1.0]])
    assert normalize_regularize(g).isnan().all()


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_weights_are_detached_by_default(kernel: object) -> None:
    """Item 17: a Gramian that requires grad no longer records the whole solve."""
    j = torch.randn(16, 20, dtype=F64, requires_grad=True)
    out = kernel(j @ j.T)  # type: ignore[operator]
    assert not out.requires_grad
    assert kernel(j @ j.T, differentiable=True).requires_grad  # type: ignore[operator]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_low_precision_gramians_are_solved_accurately(dtype: torch.dtype, kernel: object) -> None:
    """Low-precision Gramians are solved in float64: the result is that of the rounded Gramian,
    returned in its dtype."""
    gen = torch.Generator().manual_seed(2)
    for m in (1, 2, 5, 9):
        j = torch.randn(m, 2 * m, generator=gen, dtype=F64)
        g = (j @ j.T).to(dtype)
        out = kernel(g)  # type: ignore[operator]
        assert out.dtype == dtype
        expected = kernel(g.double())  # type: ignore[operator]
        tol = 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_m1_and_zero_gramian() -> None:
    for dtype in (torch.float16, torch.float32, F64):
        one = torch.tensor([[4.0]], dtype=dtype)
        zero = torch.zeros(3, 3, dtype=dtype)
        # TorchJD: a zero Gramian projects u onto itself, MGDA of one gradient is 1.
        assert upgrad_weights(one).tolist() == [1.0]
        assert mgda_weights(one).tolist() == [1.0]
        torch.testing.assert_close(
            upgrad_weights(zero).double(), torch.full((3,), 1 / 3, dtype=F64), atol=1e-3, rtol=0
        )
        torch.testing.assert_close(
            mgda_weights(zero).double(), torch.full((3,), 1 / 3, dtype=F64), atol=1e-3, rtol=0
        )

"""IMTL-G, Aligned-MTL, Krum and CR-MOGM against TorchJD 0.18 and their defining properties.

Each method is run side by side with TorchJD's own class on the same Gramian (float64): random,
low-rank, conflicting and zero inputs, ``m`` from 1 to 16, CR-MOGM over sequences of steps from
fresh objects. Then: the published values on ``J_base``, the optimality conditions that define
each method, errors, setters, state (nested in CR-MOGM's) saved, restored, moved and pickled.
"""

import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from torchjd_func.aggregation import (
    IMTLG,
    AlignedMTL,
    AlignedMTLWeighting,
    CRMOGMState,
    CRMOGMWeighting,
    EmptyState,
    GradVacState,
    GradVacWeighting,
    GramianWeightedAggregator,
    GramianWeighting,
    IMTLGWeighting,
    Krum,
    KrumWeighting,
    MeanWeighting,
    MGDAWeighting,
    PCGradWeighting,
    PureWeighting,
    UPGradWeighting,
    Weighting,
    aligned_mtl,
    aligned_mtl_weights,
    crmogm,
    gradvac,
    imtlg,
    imtlg_weights,
    krum,
    krum_weights,
    mean,
    upgrad,
)
from torchjd_func.aggregation._aligned_mtl import ScaleMode
from torchjd_func.aggregation._base import _Guarded

theirs = pytest.importorskip("torchjd.aggregation")

J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
MODES: list[ScaleMode] = ["min", "median", "rmse"]


def _matrix(m: int, n: int, rank: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(m, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, n, generator=generator, dtype=torch.float64)
    return left @ right


def _cases() -> list[Any]:
    cases = []
    for m, n, rank in [(1, 3, 1), (2, 3, 2), (2, 5, 1), (3, 5, 3), (4, 3, 2), (5, 8, 5)]:
        cases.append(pytest.param(_matrix(m, n, rank, m * 7 + rank), id=f"{m}x{n}r{rank}"))
    for m, n, rank in [(8, 20, 8), (8, 20, 3), (16, 10, 10), (16, 30, 16)]:
        cases.append(pytest.param(_matrix(m, n, rank, m * 7 + rank), id=f"{m}x{n}r{rank}"))
    cases.append(pytest.param(J_BASE.double(), id="J_base"))
    scaled = _matrix(6, 9, 6, 3) * 10.0 ** torch.arange(-3, 3, dtype=torch.float64)[:, None]
    cases.append(pytest.param(scaled, id="badly_scaled"))
    cases.append(pytest.param(torch.zeros(4, 3, dtype=torch.float64), id="zero"))
    cases.append(pytest.param(torch.zeros(1, 3, dtype=torch.float64), id="zero1"))
    return cases


def _close(actual: Tensor, expected: Tensor, rtol: float = 1e-4) -> None:
    scale = float(expected.abs().max().clamp(min=1.0))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


# --- 1. Against TorchJD's classes ----------------------------------------------------------------


@pytest.mark.parametrize("matrix", _cases())
def test_imtlg_matches_torchjd(matrix: Tensor) -> None:
    gramian = matrix @ matrix.T
    expected = theirs.IMTLGWeighting()(gramian)
    _close(IMTLGWeighting()(gramian), expected)
    _close(imtlg_weights(gramian), expected)
    _close(IMTLG()(matrix), theirs.IMTLG()(matrix))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("matrix", _cases())
def test_aligned_mtl_matches_torchjd(matrix: Tensor, mode: ScaleMode) -> None:
    gramian = matrix @ matrix.T
    m = matrix.shape[0]
    expected = theirs.AlignedMTLWeighting(scale_mode=mode)(gramian)
    _close(AlignedMTLWeighting(scale_mode=mode)(gramian), expected)
    pref = torch.linspace(2.0, -1.0, m, dtype=torch.float64)  # TorchJD takes any sign
    expected = theirs.AlignedMTLWeighting(pref, scale_mode=mode)(gramian)
    _close(aligned_mtl_weights(gramian, pref, mode), expected)
    _close(AlignedMTL(pref, mode)(matrix), theirs.AlignedMTL(pref, mode)(matrix))


@pytest.mark.parametrize("matrix", [c for c in _cases() if c.values[0].shape[0] >= 3])
def test_krum_matches_torchjd_exactly(matrix: Tensor) -> None:
    gramian = matrix @ matrix.T
    m = matrix.shape[0]
    for n_byzantine in range(m - 2):
        for n_selected in sorted({1, 2, m // 2, m} - {0}):
            expected = theirs.KrumWeighting(n_byzantine, n_selected)(gramian)
            assert torch.equal(KrumWeighting(n_byzantine, n_selected)(gramian), expected)
            assert torch.equal(krum_weights(gramian, n_byzantine, n_selected), expected)
    assert torch.equal(Krum(0, 2)(matrix), theirs.Krum(0, 2)(matrix))


def test_krum_with_byzantine_rows_keeps_the_honest_ones() -> None:
    generator = torch.Generator().manual_seed(0)
    honest = torch.ones(7, 4, dtype=torch.float64) + 0.01 * torch.randn(7, 4, generator=generator)
    byzantine = torch.tensor([[-50.0, 3.0, 8.0, 1.0], [40.0, -9.0, 0.0, 2.0]], dtype=torch.float64)
    matrix = torch.cat([honest, byzantine])
    weights = KrumWeighting(2, n_selected=3)(matrix @ matrix.T)
    assert weights[7:].abs().sum() == 0
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.equal(weights, theirs.KrumWeighting(2, 3)(matrix @ matrix.T))


def _steps(m: int, count: int, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(m, 2 * m + 1, generator=generator, dtype=torch.float64) for _ in range(count)
    ]


CRMOGM_PAIRS: list[tuple[str, int, Callable[[], Weighting], Callable[[], Any], float]] = [
    ("upgrad", 4, UPGradWeighting, lambda: theirs.UPGradWeighting(), 1e-6),
    ("imtlg", 5, IMTLGWeighting, lambda: theirs.IMTLGWeighting(), 1e-9),
    ("aligned_mtl", 5, AlignedMTLWeighting, lambda: theirs.AlignedMTLWeighting(), 1e-9),
    (
        "aligned_mtl_rmse",
        16,
        lambda: AlignedMTLWeighting(scale_mode="rmse"),
        lambda: theirs.AlignedMTLWeighting(scale_mode="rmse"),
        1e-9,
    ),
    ("krum", 6, lambda: KrumWeighting(1, 2), lambda: theirs.KrumWeighting(1, 2), 1e-12),
    # Two tasks: GradVac's and PCGrad's random orders play no role, the runs agree step by step.
    (
        "gradvac",
        2,
        lambda: GradVacWeighting(beta=0.3, seed=0),
        lambda: theirs.GradVacWeighting(beta=0.3),
        1e-9,
    ),
    ("pcgrad", 2, lambda: PCGradWeighting(seed=0), lambda: theirs.PCGradWeighting(), 1e-9),
]


@pytest.mark.parametrize("initial", [False, True], ids=["first_weights", "initial_weights"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize(
    ("m", "ours_inner", "theirs_inner", "tol"),
    [p[1:] for p in CRMOGM_PAIRS],
    ids=[p[0] for p in CRMOGM_PAIRS],
)
def test_crmogm_matches_torchjd_over_several_steps(
    m: int,
    ours_inner: Callable[[], GramianWeighting],
    theirs_inner: Callable[[], Any],
    tol: float,
    alpha: float,
    initial: bool,
) -> None:
    initial_weights = torch.linspace(0.5, 2.0, m, dtype=torch.float64) if initial else None
    mine = CRMOGMWeighting(ours_inner(), alpha, initial_weights)
    reference = theirs.CRMOGMWeighting(theirs_inner(), alpha, initial_weights)
    for matrix in _steps(m, 6, seed=m):
        gramian = matrix @ matrix.T
        _close(mine(gramian), reference(gramian), rtol=tol)
    _close(mine.state.weights, reference._lambda, rtol=tol)
    # reset() restarts the smoothing and the wrapped weighting, in both.
    mine.reset()
    reference.reset()
    gramian = _steps(m, 1, seed=99)[0]
    _close(mine(gramian @ gramian.T), reference(gramian @ gramian.T), rtol=tol)


def test_crmogm_aggregator_matches_torchjd() -> None:
    mine = GramianWeightedAggregator(CRMOGMWeighting(AlignedMTLWeighting(), alpha=0.6))
    reference = theirs.GramianWeightedAggregator(
        theirs.CRMOGMWeighting(theirs.AlignedMTLWeighting(), alpha=0.6)
    )
    for matrix in _steps(3, 5, seed=1):
        _close(mine(matrix), reference(matrix), rtol=1e-9)


def test_crmogm_follows_its_recurrence() -> None:
    alpha = 0.7
    weighting = crmogm(gradvac(beta=0.4, seed=5), alpha)
    inner = gradvac(beta=0.4, seed=5)
    state, inner_state = weighting.init(4, dtype=torch.float64), inner.init(4, dtype=torch.float64)
    previous = None
    for matrix in _steps(4, 5, seed=2):
        estimate, inner_state = inner.update(matrix @ matrix.T, inner_state)
        expected = estimate if previous is None else alpha * previous + (1 - alpha) * estimate
        weights, state = weighting.update(matrix @ matrix.T, state)
        torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12)
        assert torch.equal(state.inner.targets, inner_state.targets)
        assert torch.equal(state.inner.key, inner_state.key)
        previous = weights


# --- 2. Published values (contract §5, float32) ---------------------------------------------------

PUBLISHED: list[tuple[str, Callable[[], Any], list[float]]] = [
    ("IMTLG", IMTLG, [0.076697, 1.0, 1.0]),
    ("AlignedMTL", AlignedMTL, [0.213279, 0.967333, 0.967333]),
    ("AlignedMTL_median", lambda: AlignedMTL(scale_mode="median"), [0.213279, 0.967333, 0.967333]),
    ("AlignedMTL_rmse", lambda: AlignedMTL(scale_mode="rmse"), [0.576375, 2.614172, 2.614172]),
    ("IMTLGWeighting", IMTLGWeighting, [0.592330, 0.407670]),
    ("AlignedMTLWeighting", AlignedMTLWeighting, [0.559072, 0.408261]),
]


@pytest.mark.parametrize(
    ("make", "expected"), [p[1:] for p in PUBLISHED], ids=[p[0] for p in PUBLISHED]
)
def test_published_values(make: Callable[[], Any], expected: list[float]) -> None:
    obj = make()
    stat = J_BASE if len(expected) == 3 else J_BASE @ J_BASE.T
    torch.testing.assert_close(obj(stat), torch.tensor(expected), rtol=0, atol=1e-4)


def test_published_crmogm_values_on_two_calls() -> None:
    aggregator = GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting()))
    weighting = CRMOGMWeighting(UPGradWeighting())
    for _ in range(2):
        torch.testing.assert_close(
            aggregator(J_BASE), torch.tensor([0.292901, 1.900352, 1.900352]), rtol=0, atol=1e-4
        )
        torch.testing.assert_close(
            weighting(J_BASE @ J_BASE.T), torch.tensor([1.110921, 0.789431]), rtol=0, atol=1e-4
        )


# --- 3. Optimality conditions ----------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3, 5, 8, 16])
def test_imtlg_projects_equally_onto_every_unit_gradient(m: int) -> None:
    matrix = _matrix(m, 2 * m, m, seed=m)
    gramian = matrix @ matrix.T
    weights = imtlg_weights(gramian)
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    projections = (gramian @ weights) / gramian.diagonal().sqrt()  # g_iᵀ(Jᵀw) / ‖g_i‖
    torch.testing.assert_close(projections, projections[:1].expand(m), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("m", "rank"), [(2, 2), (4, 4), (6, 3), (9, 9), (12, 5)])
def test_aligned_mtl_aligns_the_principal_components(m: int, rank: int, mode: ScaleMode) -> None:
    # w = B u, so the preferences e_i give the columns of B; the aligned gradients Jᵀ B are
    # orthogonal with the same norm √σ on the range of G: B G B = σ V_k V_kᵀ.
    matrix = _matrix(m, 2 * m, rank, seed=m + rank)
    gramian = matrix @ matrix.T
    identity = torch.eye(m, dtype=torch.float64)
    columns = [aligned_mtl_weights(gramian, identity[i], mode) for i in range(m)]
    balance = torch.stack(columns, dim=-1)
    eigenvalues, vectors = torch.linalg.eigh(gramian)
    kept = eigenvalues > eigenvalues.max() * m * torch.finfo(torch.float64).eps
    assert int(kept.sum()) == rank
    top = eigenvalues[kept]
    scale = {"min": top.min(), "median": top.median(), "rmse": top.mean()}[mode]
    projector = vectors[:, kept] @ vectors[:, kept].T
    torch.testing.assert_close(balance @ gramian @ balance, scale * projector, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(aligned_mtl_weights(gramian, None, mode), balance @ identity.mean(0))


def test_aligned_mtl_median_is_the_lower_median_of_the_kept_eigenvalues() -> None:
    # Four kept eigenvalues 1, 4, 9, 16 (and one zero): σ = 4, torch.median's lower median.
    vectors, _ = torch.linalg.qr(
        torch.randn(5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    gramian = (
        vectors
        @ torch.diag(torch.tensor([0.0, 1.0, 4.0, 9.0, 16.0], dtype=torch.float64))
        @ vectors.T
    )
    u = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    kept = vectors[:, 1:]
    inverse_root = (
        kept @ torch.diag(torch.tensor([1.0, 1 / 2, 1 / 3, 1 / 4], dtype=torch.float64)) @ kept.T
    )
    scales: list[tuple[ScaleMode, float]] = [("min", 1.0), ("median", 4.0), ("rmse", 7.5)]
    for mode, scale in scales:
        expected = scale**0.5 * inverse_root @ u
        torch.testing.assert_close(aligned_mtl_weights(gramian, u, mode), expected)


@pytest.mark.parametrize("seed", range(5))
def test_krum_selects_the_lowest_brute_force_scores(seed: int) -> None:
    matrix = _matrix(9, 4, 4, seed=seed)
    f, k = 2, 3
    distances = torch.cdist(matrix, matrix)
    scores = torch.stack(
        [distances[i][torch.arange(9) != i].sort().values[: 9 - f - 2].sum() for i in range(9)]
    )
    expected = torch.zeros(9, dtype=torch.float64)
    expected[scores.argsort()[:k]] = 1 / k
    torch.testing.assert_close(krum_weights(matrix @ matrix.T, f, k), expected)


# --- 4. m = 1, zero Gramians, zero tasks, non-finite input, dtypes ----------------------------------


def test_one_loss_and_zero_gramians_as_in_torchjd() -> None:
    for gramian in [torch.full((1, 1), 4.0), torch.zeros(1, 1), torch.zeros(3, 3)]:
        for mine, reference in [
            (IMTLGWeighting(), theirs.IMTLGWeighting()),
            (AlignedMTLWeighting(), theirs.AlignedMTLWeighting()),
            (AlignedMTLWeighting(scale_mode="rmse"), theirs.AlignedMTLWeighting(scale_mode="rmse")),
        ]:
            assert torch.equal(mine(gramian), reference(gramian))
    assert torch.equal(imtlg_weights(torch.full((1, 1), 4.0)), torch.ones(1))
    assert torch.equal(imtlg_weights(torch.zeros(3, 3)), torch.zeros(3))  # TorchJD: zeros
    assert torch.equal(aligned_mtl_weights(torch.zeros(3, 3)), torch.full((3,), 1 / 3))  # B = I
    assert torch.equal(
        krum_weights(torch.zeros(3, 3), 0), theirs.KrumWeighting(0)(torch.zeros(3, 3))
    )


def test_imtlg_zero_weights_beyond_the_absolute_threshold_as_in_torchjd() -> None:
    matrix = _matrix(3, 4, 3, seed=0)
    for scale in [1e-10, 1.0, 1e10, 1e13, 1e15]:
        gramian = (scale * matrix) @ (scale * matrix).T
        assert torch.equal(imtlg_weights(gramian) == 0, theirs.IMTLGWeighting()(gramian) == 0)
    assert bool((imtlg_weights((1e15 * matrix) @ (1e15 * matrix).T) == 0).all())


def test_zero_tasks_as_in_torchjd() -> None:
    empty = torch.zeros(0, 0)
    assert torch.equal(IMTLGWeighting()(empty), theirs.IMTLGWeighting()(empty))
    assert torch.equal(IMTLG()(torch.zeros(0, 3)), theirs.IMTLG()(torch.zeros(0, 3)))
    for mine, reference in [
        (AlignedMTLWeighting(), theirs.AlignedMTLWeighting()),
        (KrumWeighting(0), theirs.KrumWeighting(0)),
        (CRMOGMWeighting(UPGradWeighting()), theirs.CRMOGMWeighting(theirs.UPGradWeighting())),
    ]:
        with pytest.raises((ValueError, ZeroDivisionError, IndexError)):
            reference(empty)
        with pytest.raises(ValueError, match="0 losses"):
            mine(empty)
    wrapped = CRMOGMWeighting(IMTLGWeighting())
    assert torch.equal(wrapped(empty), torch.zeros(0))
    assert wrapped.state is None  # nothing to smooth; a later call is a first one


FACTORIES: dict[str, Callable[[], PureWeighting[Any]]] = {
    "imtlg": imtlg,
    "aligned_mtl": aligned_mtl,
    "aligned_mtl_median": lambda: aligned_mtl(scale_mode="median"),
    "krum": lambda: krum(0, 2),
    "crmogm_gradvac": lambda: crmogm(gradvac(seed=1), alpha=0.5),
    "crmogm_imtlg": lambda: crmogm(imtlg(), initial_weights=torch.ones(3)),
}


def _leaves(state: Any) -> list[Tensor]:
    return [leaf for leaf in tree_flatten(state)[0] if isinstance(leaf, Tensor)]


def _gramians(count: int, m: int = 3, seed: int = 0) -> list[Tensor]:
    return [j @ j.T for j in _steps(m, count, seed)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_nonfinite_gramian_gives_nan_and_keeps_the_state(name: str, bad: float) -> None:
    weighting = FACTORIES[name]()
    gramians = _gramians(4)
    _, state = weighting.update(gramians[0], weighting.init(3, dtype=torch.float64))
    poisoned = gramians[1].clone()
    poisoned[0, 2] = poisoned[2, 0] = bad
    weights, kept = weighting.update(poisoned, state)  # the decompositions do not raise
    assert bool(weights.isnan().all())
    for after, before in zip(_leaves(kept), _leaves(state), strict=True):
        assert torch.equal(after, before)
    batch = torch.stack([gramians[2], poisoned, gramians[3]])
    weights, _ = weighting.update(batch, state)
    assert bool(weights[1].isnan().all())
    for i, gramian in [(0, gramians[2]), (2, gramians[3])]:
        torch.testing.assert_close(weights[i], weighting.update(gramian, state)[0])


class _Unguarded:
    """A stateful inner update that is not guarded (a user's own), counting its calls."""

    def __call__(self, gramian: Tensor, state: GradVacState, /) -> tuple[Tensor, GradVacState]:
        return gramian.diagonal(), GradVacState(state.targets + 1, state.key + 1)


def test_the_guard_restores_a_nested_unguarded_state() -> None:
    inner = PureWeighting(gradvac().init, _Unguarded())
    weighting = crmogm(inner)
    state = weighting.init(2)
    _, state = weighting.update(torch.eye(2), state)
    weights, kept = weighting.update(torch.full((2, 2), float("nan")), state)
    assert bool(weights.isnan().all())
    assert torch.equal(kept.inner.targets, state.inner.targets)
    assert torch.equal(kept.inner.key, state.inner.key)
    assert isinstance(weighting.update, _Guarded)


class _NaNWeights:
    def __call__(self, gramian: Tensor, state: EmptyState, /) -> tuple[Tensor, EmptyState]:
        return torch.full(gramian.shape[:-1], float("nan")), state


def test_crmogm_does_not_average_nonfinite_inner_weights_into_its_state() -> None:
    weighting = crmogm(PureWeighting(mean().init, _NaNWeights()), initial_weights=torch.ones(2))
    state = weighting.init(2)
    weights, new_state = weighting.update(torch.eye(2), state)
    assert bool(weights.isnan().all())  # never a finite wrong answer
    assert torch.equal(new_state.weights, state.weights)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_every_dtype_gives_finite_weights(name: str, dtype: torch.dtype) -> None:
    weighting = FACTORIES[name]()
    state = weighting.init(3, dtype=dtype)
    for gramian in _gramians(3):
        weights, state = weighting.update(gramian.to(dtype), state)
        assert weights.dtype == dtype
        assert bool(weights.isfinite().all()), (name, dtype, weights)
        if name in ("imtlg", "aligned_mtl", "aligned_mtl_median"):
            exact = weighting.update(gramian, EmptyState())[0]
            torch.testing.assert_close(weights.double(), exact, rtol=5e-2, atol=5e-2)


# --- 5. Differentiability ---------------------------------------------------------------------------

DIFF: list[tuple[str, Callable[[], Weighting], Callable[[], Any]]] = [
    ("imtlg", IMTLGWeighting, lambda: theirs.IMTLGWeighting()),
    ("aligned_mtl", AlignedMTLWeighting, lambda: theirs.AlignedMTLWeighting()),
    ("krum", lambda: KrumWeighting(0), lambda: theirs.KrumWeighting(0)),
    (
        "crmogm_upgrad",
        lambda: CRMOGMWeighting(UPGradWeighting()),
        lambda: theirs.CRMOGMWeighting(theirs.UPGradWeighting()),
    ),
    (
        "crmogm_imtlg",
        lambda: CRMOGMWeighting(IMTLGWeighting()),
        lambda: theirs.CRMOGMWeighting(theirs.IMTLGWeighting()),
    ),
    (
        "crmogm_mgda",
        lambda: CRMOGMWeighting(MGDAWeighting()),
        lambda: theirs.CRMOGMWeighting(theirs.MGDAWeighting()),
    ),
    (
        "crmogm_aligned",
        lambda: CRMOGMWeighting(AlignedMTLWeighting()),
        lambda: theirs.CRMOGMWeighting(theirs.AlignedMTLWeighting()),
    ),
]


@pytest.mark.parametrize(("make", "theirs_make"), [d[1:] for d in DIFF], ids=[d[0] for d in DIFF])
def test_requires_grad_as_in_torchjd(
    make: Callable[[], Weighting], theirs_make: Callable[[], Any]
) -> None:
    # MGDA's solution is interior here: TorchJD's Frank-Wolfe weights depend on the Gramian.
    matrix = torch.tensor(
        [[1.0, 0.0, 0.0, 0.2, 0.0], [0.0, 1.0, 0.0, 0.0, 0.3], [-0.5, -0.5, 1.0, 0.0, 0.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    gramian = matrix @ matrix.T
    mine, reference = make(), theirs_make()
    first = mine(gramian)
    assert first.requires_grad == reference(gramian).requires_grad
    if first.requires_grad:
        torch.autograd.grad(first.sum(), matrix, retain_graph=True)
    # A second step: the stored weights are detached, so it does not reach the first graph.
    second = mine(gramian)
    assert second.requires_grad == reference(gramian).requires_grad
    if second.requires_grad:
        torch.autograd.grad(second.sum(), matrix)
    if isinstance(mine, CRMOGMWeighting):
        assert not mine.state.weights.requires_grad


def test_aligned_mtl_gradient_matches_torchjd_autograd() -> None:
    matrix = _matrix(3, 5, 3, seed=4)
    cotangent = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    for mode in MODES:
        ours_input, theirs_input = matrix.clone().requires_grad_(), matrix.clone().requires_grad_()
        (grad,) = torch.autograd.grad(
            AlignedMTL(scale_mode=mode)(ours_input) @ cotangent, ours_input
        )
        (expected,) = torch.autograd.grad(
            theirs.AlignedMTL(scale_mode=mode)(theirs_input) @ cotangent, theirs_input
        )
        torch.testing.assert_close(grad, expected)
    assert torch.autograd.gradcheck(
        lambda x: aligned_mtl_weights(x @ x.T, scale_mode="median"),
        (matrix.clone().requires_grad_(),),
    )


def test_imtlg_differentiable_on_request() -> None:
    matrix = _matrix(3, 5, 3, seed=1).requires_grad_()
    assert not imtlg_weights(matrix @ matrix.T).requires_grad
    assert torch.autograd.gradcheck(
        lambda x: imtlg_weights(x @ x.T, differentiable=True), (matrix,)
    )
    aggregator = GramianWeightedAggregator(GramianWeighting(imtlg(differentiable=True)))
    assert aggregator.gramian_weighting(matrix @ matrix.T).requires_grad


# --- 6. Errors, setters, repr ------------------------------------------------------------------------

ERRORS: list[tuple[Callable[[], object], type[Exception], str]] = [
    (lambda: AlignedMTL(scale_mode="max"), ValueError, "Invalid scale_mode='max'"),  # type: ignore[arg-type]
    (lambda: AlignedMTLWeighting(scale_mode="mean"), ValueError, "'min', 'median', or 'rmse'"),  # type: ignore[arg-type]
    (lambda: aligned_mtl(scale_mode=None), ValueError, "scale_mode"),  # type: ignore[arg-type]
    (lambda: aligned_mtl_weights(torch.eye(2), scale_mode="MIN"), ValueError, "scale_mode"),  # type: ignore[arg-type]
    (lambda: aligned_mtl_weights(torch.eye(2), torch.ones(3)), ValueError, "2 losses"),
    (lambda: AlignedMTL(torch.ones(2, 2)), ValueError, "pref_vector"),
    (lambda: AlignedMTL(torch.tensor([1.0, float("nan")])), ValueError, "finite"),
    (lambda: aligned_mtl_weights(torch.eye(2, dtype=torch.int64)), TypeError, "floating-point"),
    (lambda: imtlg_weights(torch.ones(2, 3)), ValueError, "square"),
    (lambda: imtlg(differentiable=1), TypeError, "differentiable"),  # type: ignore[arg-type]
    (lambda: krum_weights(torch.eye(3), 1), ValueError, "at least 4 rows"),
    (lambda: krum_weights(torch.eye(4), 0, 5), ValueError, "n_selected=5 needs at least 5"),
    (lambda: KrumWeighting(1)(torch.eye(3)), ValueError, "n_byzantine \\+ 3"),
    (lambda: Krum(-1), ValueError, "n_byzantine"),
    (lambda: Krum(1, 0), ValueError, "n_selected"),
    (lambda: krum(1.5), TypeError, "n_byzantine"),  # type: ignore[arg-type]
    (lambda: krum(True), TypeError, "n_byzantine"),
    (lambda: crmogm(upgrad(), alpha=1.5), ValueError, "alpha"),
    (lambda: crmogm(upgrad(), alpha=-0.1), ValueError, "alpha"),
    (lambda: CRMOGMWeighting(UPGradWeighting(), alpha=2.0), ValueError, "alpha"),
    (lambda: crmogm(UPGradWeighting()), TypeError, "wraps a PureWeighting"),  # type: ignore[arg-type]
    (lambda: CRMOGMWeighting(upgrad()), TypeError, "wraps a GramianWeighting"),  # type: ignore[arg-type]
    (lambda: crmogm(upgrad(), initial_weights=torch.ones(2, 2)), ValueError, "initial_weights"),
    (
        lambda: crmogm(upgrad(), initial_weights=torch.ones(2)).init(3),
        ValueError,
        r"\(2,\), expected \(3,\)",
    ),
    (
        lambda: CRMOGMWeighting(MeanWeighting(), initial_weights=torch.ones(2))(torch.eye(3)),
        ValueError,
        "expected \\(3,\\)",
    ),
    (
        lambda: crmogm(upgrad()).update(torch.eye(2), EmptyState()),  # type: ignore[arg-type]
        TypeError,
        "Expected a CRMOGMState",
    ),
    (
        lambda: crmogm(upgrad()).update(torch.eye(3), crmogm(upgrad()).init(2)),
        ValueError,
        "changed from 2 to 3",
    ),
]


@pytest.mark.parametrize(("make", "error", "match"), ERRORS)
def test_bad_arguments_get_clear_errors(
    make: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


def test_krum_validation_matches_torchjd() -> None:
    for n_byzantine, n_selected, m in [(1, 1, 3), (0, 4, 3), (2, 1, 4)]:
        gramian = torch.eye(m)
        with pytest.raises(ValueError, match="rows"):
            theirs.KrumWeighting(n_byzantine, n_selected)(gramian)
        with pytest.raises(ValueError, match="rows"):
            KrumWeighting(n_byzantine, n_selected)(gramian)


def test_crmogm_raises_when_m_changes_as_torchjd() -> None:
    mine, reference = (
        CRMOGMWeighting(GradVacWeighting(seed=0)),
        theirs.CRMOGMWeighting(theirs.GradVacWeighting()),
    )
    mine(torch.eye(2))
    reference(torch.eye(2))
    with pytest.raises(ValueError, match="number of objectives changed from 2 to 3"):
        reference(torch.eye(3))
    with pytest.raises(ValueError, match=r"number of objectives changed from 2 to 3.*reset"):
        mine(torch.eye(3))
    mine.reset()
    assert mine(torch.eye(3)).shape == (3,)


SETTERS: list[tuple[str, Callable[[], Any], Callable[[], Any], str, Any]] = [
    ("aligned_scale_mode", AlignedMTL, lambda: theirs.AlignedMTL(), "scale_mode", "rmse"),
    (
        "aligned_pref",
        AlignedMTL,
        lambda: theirs.AlignedMTL(),
        "pref_vector",
        torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64),
    ),
    ("krum_n_byzantine", lambda: Krum(0), lambda: theirs.Krum(0), "n_byzantine", 1),
    ("krum_n_selected", lambda: Krum(1), lambda: theirs.Krum(1), "n_selected", 3),
    (
        "crmogm_alpha",
        lambda: CRMOGMWeighting(IMTLGWeighting()),
        lambda: theirs.CRMOGMWeighting(theirs.IMTLGWeighting()),
        "alpha",
        0.2,
    ),
]


@pytest.mark.parametrize(
    ("make", "theirs_make", "name", "value"), [s[1:] for s in SETTERS], ids=[s[0] for s in SETTERS]
)
def test_setters_take_effect_as_in_torchjd(
    make: Callable[[], Any], theirs_make: Callable[[], Any], name: str, value: Any
) -> None:
    mine, reference = make(), theirs_make()
    matrices = _steps(3 if name == "pref_vector" else 5, 4, seed=3)
    # Aggregators take the matrix, the CR-MOGM weighting the Gramian.
    inputs = [m @ m.T if isinstance(mine, Weighting) else m for m in matrices]
    _close(mine(inputs[0]), reference(inputs[0]), rtol=1e-9)
    setattr(mine, name, value)
    setattr(reference, name, value)
    assert getattr(mine, name) is value
    for x in inputs[1:]:
        _close(mine(x), reference(x), rtol=1e-9)


@pytest.mark.parametrize(
    ("make", "name", "value", "match"),
    [
        (AlignedMTL, "scale_mode", "avg", "scale_mode"),
        (AlignedMTLWeighting, "pref_vector", torch.ones(2, 2), "pref_vector"),
        (lambda: Krum(1), "n_byzantine", -2, "n_byzantine"),
        (lambda: KrumWeighting(1), "n_selected", 0, "n_selected"),
        (lambda: CRMOGMWeighting(UPGradWeighting()), "alpha", 1.01, "alpha"),
        (
            lambda: CRMOGMWeighting(UPGradWeighting()),
            "initial_weights",
            torch.ones(()),
            "initial_weights",
        ),
    ],
)
def test_a_bad_value_is_refused_on_set_and_changes_nothing(
    make: Callable[[], Any], name: str, value: Any, match: str
) -> None:
    obj = make()
    before = getattr(obj, name)
    with pytest.raises(ValueError, match=match):
        setattr(obj, name, value)
    assert getattr(obj, name) is before


def test_setting_the_wrapped_weighting_takes_effect() -> None:
    matrices = _steps(3, 4, seed=8)
    aligned = AlignedMTLWeighting()
    mine = CRMOGMWeighting(aligned, alpha=0.5)
    reference = theirs.CRMOGMWeighting(theirs.AlignedMTLWeighting(), alpha=0.5)
    for matrix in matrices[:2]:
        _close(mine(matrix @ matrix.T), reference(matrix @ matrix.T), rtol=1e-9)
    aligned.scale_mode = "rmse"
    reference.weighting.scale_mode = "rmse"
    _close(mine(matrices[2] @ matrices[2].T), reference(matrices[2] @ matrices[2].T), rtol=1e-9)
    # Another wrapped weighting: the previous weights are kept (as in TorchJD), its state is fresh.
    mine.weighting = IMTLGWeighting()
    reference.weighting = theirs.IMTLGWeighting()
    _close(mine(matrices[3] @ matrices[3].T), reference(matrices[3] @ matrices[3].T), rtol=1e-9)
    stateful = CRMOGMWeighting(MeanWeighting())
    stateful(matrices[0] @ matrices[0].T)
    stateful.weighting = GradVacWeighting(seed=0)
    stateful(matrices[1] @ matrices[1].T)
    assert isinstance(stateful.state.inner, GradVacState)


def test_repr_and_str_as_in_torchjd() -> None:
    pref = torch.tensor([1.0, 2.0])
    for mine, reference in [
        (IMTLG(), theirs.IMTLG()),
        (AlignedMTL(), theirs.AlignedMTL()),
        (AlignedMTL(pref, "median"), theirs.AlignedMTL(pref, "median")),
        (Krum(1, 4), theirs.Krum(1, 4)),
    ]:
        assert str(mine) == str(reference)
        assert repr(mine) == repr(reference)
    assert str(Krum(1, 4)) == "Krum1-4"
    assert "alpha=0.9, initial_weights=None" in repr(CRMOGMWeighting(UPGradWeighting()))
    assert "(weighting): UPGradWeighting(" in repr(CRMOGMWeighting(UPGradWeighting()))


# --- 7. State: assignment, state_dict, .to, pickling ------------------------------------------------


def _save(obj: object) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _crmogm_gradvac() -> CRMOGMWeighting:
    return CRMOGMWeighting(GradVacWeighting(beta=0.3, seed=4), alpha=0.6)


def test_assigned_nested_state_continues_identically() -> None:
    gramians = _gramians(8, m=4)
    uninterrupted = _crmogm_gradvac()
    expected = [uninterrupted(g) for g in gramians]
    first = _crmogm_gradvac()
    results = [first(g) for g in gramians[:4]]
    resumed = _crmogm_gradvac()
    resumed.state = torch.load(_save(first.state), weights_only=False)
    results += [resumed(g) for g in gramians[4:]]
    for actual, reference in zip(results, expected, strict=True):
        assert torch.equal(actual, reference)


def test_state_dict_round_trip_of_a_nested_state() -> None:
    gramians = _gramians(6, m=4)
    first = GramianWeightedAggregator(_crmogm_gradvac())
    for g in gramians[:3]:
        first.gramian_weighting(g)
    saved = first.state_dict()
    extra = saved["gramian_weighting._extra_state"]["state"]
    assert sorted(extra) == ["inner", "started", "weights"]
    assert sorted(extra["inner"]) == ["key", "targets"]
    resumed = GramianWeightedAggregator(_crmogm_gradvac())
    resumed.load_state_dict(torch.load(_save(saved), weights_only=True))
    assert isinstance(resumed.state, CRMOGMState)
    assert isinstance(resumed.state.inner, GradVacState)
    for g in gramians[3:]:
        assert torch.equal(resumed.gramian_weighting(g), first.gramian_weighting(g))
    with pytest.raises(ValueError, match="same class"):
        CRMOGMWeighting(UPGradWeighting()).load_state_dict(
            {
                "_extra_state": {
                    "state": {
                        "inner": {"x": torch.ones(1)},
                        "weights": torch.ones(1),
                        "started": torch.ones(()),
                    }
                }
            },
            strict=False,
        )
    # A state_dict saved before the first call, and one with initial weights of another length.
    fresh = CRMOGMWeighting(UPGradWeighting(), initial_weights=torch.ones(3))
    fresh.load_state_dict(CRMOGMWeighting(UPGradWeighting()).state_dict())
    assert fresh.state is None


def test_a_mismatched_nested_state_is_refused_with_its_path() -> None:
    weighting = _crmogm_gradvac()
    weighting(_gramians(1, m=3)[0])
    fresh = _crmogm_gradvac()
    fresh.state = weighting.state
    with pytest.raises(ValueError, match=r"`inner.targets` is \[3, 3\].*expected \[4, 4\]"):
        fresh(_gramians(1, m=4)[0])
    fresh.state = weighting.state._replace(inner=EmptyState())
    with pytest.raises(ValueError, match="`inner` is a EmptyState, expected a GradVacState"):
        fresh(_gramians(1, m=3)[0])


def test_double_moves_the_nested_state() -> None:
    weighting = _crmogm_gradvac()
    gramians = _gramians(4)
    reference = _crmogm_gradvac()
    for g in gramians[:2]:
        weighting(g.float())
        reference(g.float())
    weighting.double()
    assert weighting.state.inner.targets.dtype == torch.float64
    assert weighting.state.inner.key.dtype == torch.int64  # integer tensors are not converted
    assert weighting.state.weights.dtype == torch.float64
    assert weighting.state.started.dtype == torch.bool
    # Continues from the converted state (the run in float32 continued in float64).
    converted = reference.state
    reference.state = CRMOGMState(
        GradVacState(converted.inner.targets.double(), converted.inner.key),
        converted.weights.double(),
        converted.started,
    )
    for g in gramians[2:]:
        assert torch.equal(weighting(g), reference(g))


PICKLED: list[Callable[[], Any]] = [
    IMTLG,
    AlignedMTL,
    lambda: AlignedMTL(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), "rmse"),
    lambda: Krum(0, 2),
    lambda: GramianWeightedAggregator(_crmogm_gradvac()),
    lambda: GramianWeightedAggregator(
        CRMOGMWeighting(MGDAWeighting(), initial_weights=torch.ones(3, dtype=torch.float64))
    ),
    lambda: GramianWeightedAggregator(GramianWeighting(crmogm(gradvac(seed=1), alpha=0.2))),
]


@pytest.mark.parametrize("make", PICKLED)
def test_torch_save_round_trip_continues_identically(make: Callable[[], Any]) -> None:
    matrices = _steps(3, 6, seed=5)
    original = make()
    before = [original(x) for x in matrices[:3]]
    loaded = torch.load(_save(original), weights_only=False)
    assert repr(loaded) == repr(original)
    copy = torch.load(_save(original), weights_only=False)
    for x in matrices[3:]:
        assert torch.equal(original(x), loaded(x))
    copy.reset()
    assert torch.equal(copy(matrices[0]), before[0])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_pure_weightings_pickle_and_continue_identically(name: str) -> None:
    original = FACTORIES[name]()
    state = original.init(3, dtype=torch.float64)
    loaded, loaded_state = pickle.loads(pickle.dumps(original)), pickle.loads(pickle.dumps(state))
    for gramian in _gramians(4):
        expected, state = original.update(gramian, state)
        weights, loaded_state = loaded.update(gramian, loaded_state)
        assert torch.equal(weights, expected)


def test_crmogm_pure_state_compiles_once_across_the_first_and_later_steps() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    weighting = crmogm(gradvac(seed=0), alpha=0.5)
    counter = CompileCounter()
    compiled = torch.compile(weighting.update, fullgraph=True, backend=counter)
    state = eager_state = weighting.init(3, dtype=torch.float64)
    for gramian in _gramians(4):
        weights, state = compiled(gramian, state)
        expected, eager_state = weighting.update(gramian, eager_state)
        torch.testing.assert_close(weights, expected)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_to_moves_the_wrapped_hyperparameters_and_the_state() -> None:
    pref = torch.tensor([1.0, 2.0])
    aligned = AlignedMTLWeighting(pref)
    weighting = CRMOGMWeighting(aligned, initial_weights=torch.tensor([0.5, 0.5]))
    gramian = J_BASE @ J_BASE.T
    weighting(gramian)
    weighting.to(torch.float64)
    assert aligned.pref_vector is not None
    assert aligned.pref_vector.dtype == torch.float64
    assert weighting.initial_weights.dtype == torch.float64  # type: ignore[union-attr]
    assert weighting.state.weights.dtype == torch.float64
    reference = theirs.CRMOGMWeighting(
        theirs.AlignedMTLWeighting(pref.double()), initial_weights=torch.tensor([0.5, 0.5])
    )
    reference(gramian.double())
    _close(weighting(gramian.double()), reference(gramian.double()), rtol=1e-6)

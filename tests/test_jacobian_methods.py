"""GradDrop, ConFIG, ExcessMTL (Jacobian aggregators), MoDo and SDMGrad (cross-Gramian
weightings): against TorchJD 0.18, published values, and the library's properties (purity,
compile, vmap, non-finite input, pickling, state save and restore)."""

import io
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any
from unittest import mock

import pytest
import torch
import torch._dynamo
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torch._dynamo.testing import CompileCounter
from torch.utils._pytree import tree_flatten

from torchjd_func import call, combine, group_params, jacobian, params_of
from torchjd_func._prng import key_from_seed, split, uniform
from torchjd_func.aggregation import (
    ConFIG,
    CrossGramianWeighting,
    CrossWeighting,
    ExcessMTL,
    ExcessMTLState,
    ExcessMTLWeighting,
    GradDrop,
    GramianWeightedAggregator,
    JacobianAggregator,
    MoDoState,
    MoDoWeighting,
    RandomState,
    SDMGradState,
    SDMGradWeighting,
    aggregate_groups,
    config,
    config_weights,
    cross_gramian,
    excess_mtl,
    excess_mtl_weights,
    graddrop,
    graddrop_update,
    init_group_states,
    mean,
    modo,
    modo_weights,
    sdmgrad,
    sdmgrad_weights,
    stateless,
)
from torchjd_func.aggregation._simplex import project_onto_simplex
from torchjd_func.optim import sgd
from torchjd_func.step import jd_step

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

F64 = torch.float64
J_BASE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


# --- Inputs ------------------------------------------------------------------------------------


def _matrices() -> list[tuple[str, Tensor]]:
    """Random, low-rank, row-scaled and conflicting matrices in float64, m from 1 to 16."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for m, n, rank in [(1, 4, 1), (2, 3, 2), (3, 5, 3), (5, 4, 4), (8, 20, 8), (8, 20, 3)]:
        left = torch.randn(m, rank, generator=generator, dtype=F64)
        right = torch.randn(rank, n, generator=generator, dtype=F64)
        out.append((f"normal{m}x{n}r{rank}", left @ right))
    for m, n, rank in [(16, 10, 10), (16, 30, 5)]:
        left = torch.randn(m, rank, generator=generator, dtype=F64)
        right = torch.randn(rank, n, generator=generator, dtype=F64)
        scale = 10.0 ** torch.randint(-3, 4, (m, 1), generator=generator)
        out.append((f"scaled{m}x{n}r{rank}", scale * (left @ right)))
    out.append(("J_base", J_BASE.to(F64)))
    # Conflicting: one direction, and rows pulling against it by various amounts.
    base = torch.randn(1, 6, generator=generator, dtype=F64)
    noise = 0.3 * torch.randn(6, 6, generator=generator, dtype=F64)
    out.append(
        (
            "conflicting6x6",
            torch.tensor([[1.0], [-1.0], [2.0], [-0.5], [1.0], [-3.0]]) * base + noise,
        )
    )
    return out


MATRICES = _matrices()


def _ids(cases: list[tuple[str, Tensor]]) -> list[Any]:
    return [pytest.param(matrix, id=name) for name, matrix in cases]


def _as_jacobian(matrix: Tensor) -> TensorDict:
    """``matrix`` ``[m, n]`` split into a nested Jacobian whose sorted leaves concatenate back to
    it (``"a"``: the first column, ``"b", "c"``: the rest, as ``[m, n - 1, 1]``)."""
    m = matrix.shape[0]
    return TensorDict(
        {"b": {"c": matrix[:, 1:].reshape(m, -1, 1)}, "a": matrix[:, 0]}, batch_size=[m]
    )


def _flat(update: TensorDictBase) -> Tensor:
    """The update of :func:`_as_jacobian`'s layout, back as a vector ``[n]``."""
    return torch.cat([update["a"].reshape(1), update["b", "c"].reshape(-1)])


def _close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    scale = float(expected.abs().max().clamp(min=1e-12))
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


def _cross_pairs(m: int, steps: int, seed: int) -> list[Tensor]:
    """Non-symmetric cross-Gramians ``J₁ J₂ᵀ`` of two correlated batches."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        j1 = torch.randn(m, 7, generator=generator, dtype=F64)
        j2 = j1 + 0.7 * torch.randn(m, 7, generator=generator, dtype=F64)
        out.append(j1 @ j2.T)
    return out


# --- GradDrop ----------------------------------------------------------------------------------


def _square(p: Tensor) -> Tensor:
    return p**2


@pytest.mark.parametrize("f", [None, _square], ids=["identity", "square"])
@pytest.mark.parametrize("with_leak", [False, True], ids=["no_leak", "leak"])
@pytest.mark.parametrize("matrix", _ids(MATRICES))
def test_graddrop_matches_torchjd_given_the_same_uniforms(
    matrix: Tensor, with_leak: bool, f: Callable[[Tensor], Tensor] | None
) -> None:
    m, n = matrix.shape
    key = torch.tensor(12345)
    noise = uniform(key, (n,), torch.float32).to(F64)
    leak = torch.linspace(0.0, 0.9, m, dtype=F64) if with_leak else None
    kwargs: dict[str, Any] = {} if f is None else {"f": f}
    with mock.patch("torch.rand", return_value=noise):
        expected = torchjd_aggregation.GradDrop(leak=leak, **kwargs)(matrix)
    actual = graddrop_update(_as_jacobian(matrix), key, leak=leak, **kwargs)
    _close(_flat(actual), expected, 1e-12)


def test_graddrop_factory_uses_the_split_key() -> None:
    matrix = MATRICES[4][1]
    aggregator = graddrop(seed=3)
    state = aggregator.init(_as_jacobian(matrix)[0], matrix.shape[0])
    update, weights, new_state = aggregator.update(_as_jacobian(matrix), state)
    kept, used = split(state.key)
    assert weights is None
    assert torch.equal(new_state.key, kept)
    expected = graddrop_update(_as_jacobian(matrix), used)
    assert torch.equal(_flat(update), _flat(expected))


def test_graddrop_has_the_papers_distribution() -> None:
    # E[d_k] = f(P_k) Σ_{J_ik > 0} J_ik + (1 − f(P_k)) Σ_{J_ik < 0} J_ik, with f(P) in [0, 1].
    generator = torch.Generator().manual_seed(5)
    matrix = torch.randn(4, 6, generator=generator, dtype=F64)
    jacobian = TensorDict({"w": matrix}, batch_size=[4])
    aggregator = graddrop(f=_square, seed=11)
    state = aggregator.init(jacobian[0], 4)
    draws = 4000
    total = torch.zeros(6, dtype=F64)
    for _ in range(draws):
        update, _, state = aggregator.update(jacobian, state)
        total += update["w"]
    purity = 0.5 * (1 + matrix.sum(0) / matrix.abs().sum(0))
    positive, negative = matrix.clamp(min=0).sum(0), matrix.clamp(max=0).sum(0)
    expected = purity**2 * positive + (1 - purity**2) * negative
    # Standard error of the mean: at most (positive - negative) / (2 √draws).
    bound = 4 * (positive - negative) / (2 * draws**0.5)
    assert ((total / draws - expected).abs() <= bound).all()


def test_graddrop_on_j_base() -> None:
    # The published value [6, 2, 2] (TorchJD, torch.manual_seed(0)) depends on the draw for the
    # first column (P = 0.6); the other columns have P = 1 and always pass.
    jacobian = _as_jacobian(J_BASE)
    aggregator = graddrop(seed=0)
    update, _, _ = aggregator.update(jacobian, aggregator.init(jacobian[0], 2))
    torch.testing.assert_close(_flat(update), torch.tensor([6.0, 2.0, 2.0]))
    drawn = torch.stack(
        [_flat(graddrop_update(jacobian, torch.tensor(seed)))[0] for seed in range(200)]
    )
    assert set(drawn.tolist()) == {-4.0, 6.0}
    assert 0.45 < float((drawn == 6.0).double().mean()) < 0.75


def test_graddrop_zero_columns_give_zero_and_leaves_keep_their_dtype() -> None:
    jacobian = TensorDict(
        {"a": torch.zeros(3, 2, dtype=torch.float16), "b": torch.randn(3, 4, dtype=F64)}, [3]
    )
    update = graddrop_update(jacobian, torch.tensor(0))
    assert update["a"].dtype == torch.float16
    assert update["b"].dtype == F64
    assert torch.equal(update["a"], torch.zeros(2, dtype=torch.float16))


def test_graddrop_bad_arguments() -> None:
    jacobian = _as_jacobian(J_BASE)
    with pytest.raises(ValueError, match="one leak per row"):
        graddrop_update(jacobian, torch.tensor(0), leak=torch.zeros(3))
    with pytest.raises(ValueError, match="keep the shape of P"):
        graddrop_update(jacobian, torch.tensor(0), f=lambda p: p.sum())
    with pytest.raises(TypeError, match="callable"):
        graddrop(f=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="leak"):
        graddrop(leak=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="seed"):
        graddrop(seed=-1)
    with pytest.raises(TypeError, match="RandomState"):
        graddrop().update(jacobian, MoDoState(torch.zeros(2)))  # type: ignore[arg-type]


# --- ConFIG ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pref", [False, True], ids=["ones", "pref"])
@pytest.mark.parametrize("matrix", _ids(MATRICES))
def test_config_matches_torchjd(matrix: Tensor, pref: bool) -> None:
    m = matrix.shape[0]
    pref_vector = torch.linspace(0.5, 2.0, m, dtype=F64) if pref else None
    expected = torchjd_aggregation.ConFIG(pref_vector)(matrix)
    aggregator = config(pref_vector)
    jacobian = _as_jacobian(matrix)
    update, weights, _ = aggregator.update(jacobian, aggregator.init(jacobian[0], m))
    _close(_flat(update), expected, 1e-10)
    assert weights is not None
    _close(weights @ matrix, expected, 1e-10)


INDEPENDENT = [c for c in MATRICES if int(torch.linalg.matrix_rank(c[1])) == c[1].shape[0]]


@pytest.mark.parametrize("matrix", _ids(INDEPENDENT))
def test_config_optimality_on_independent_rows(matrix: Tensor) -> None:
    # U b = w for unit rows U of full row rank: cos(g_i, A(J)) ∝ w_i, the conflict-free
    # condition of the paper (equal angles with the default w = 1).
    m = matrix.shape[0]
    pref = torch.linspace(0.5, 2.0, m, dtype=F64)
    aggregator = config(pref)
    jacobian = _as_jacobian(matrix)
    update, _, _ = aggregator.update(jacobian, aggregator.init(jacobian[0], m))
    cosines = matrix @ _flat(update) / (matrix.norm(dim=1) * _flat(update).norm())
    torch.testing.assert_close(cosines / cosines.sum(), pref / pref.sum(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("matrix", _ids(MATRICES))
def test_config_matches_torchjd_in_float32(matrix: Tensor) -> None:
    matrix = matrix.float()
    expected = torchjd_aggregation.ConFIG()(matrix)
    aggregator = config()
    jacobian = TensorDict({"w": matrix}, [matrix.shape[0]])
    update, _, _ = aggregator.update(jacobian, aggregator.init(jacobian[0], matrix.shape[0]))
    assert update["w"].dtype == torch.float32
    _close(update["w"], expected, 1e-4)


def test_config_nearly_colinear_float32_rows_keep_their_accuracy() -> None:
    # cos ≈ 1 − 5e-8 between the rows: a float32 Gramian loses the small eigenvalue to rounding
    # (relative error ~3e3 measured); the float64 one keeps it, and beats TorchJD's own float32
    # pinv (~1e-3 measured) against the float64 reference on the same float32 rows.
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(2, 50, generator=generator, dtype=F64)
    tilt = 3e-4 * base[1] / base[1].norm() * base[0].norm()
    matrix = torch.stack([base[0], base[0] + tilt]).float()
    pref = torch.tensor([1.0, 3.0])
    reference = torchjd_aggregation.ConFIG(pref.double())(matrix.double())
    aggregator = config(pref)
    jacobian = TensorDict({"w": matrix}, [2])
    update, _, _ = aggregator.update(jacobian, aggregator.init(jacobian[0], 2))
    theirs = torchjd_aggregation.ConFIG(pref)(matrix).double()

    def error(x: Tensor) -> float:
        return float((x - reference).norm() / reference.norm())

    # What is left is the float32 rounding of the update Jᵀw (weights ~1/σ cancel).
    assert error(update["w"].double()) < min(1e-3, error(theirs))


def test_config_published_value_and_degenerate_inputs() -> None:
    update, _, _ = config().update(_as_jacobian(J_BASE), config().init(_as_jacobian(J_BASE)[0], 2))
    torch.testing.assert_close(_flat(update), torch.tensor([0.158809, 2.070607, 2.070607]))
    # m = 1: the row itself, whatever the preference.
    row = torch.tensor([[3.0, -4.0]], dtype=F64)
    for pref in [None, torch.tensor([-2.0], dtype=F64)]:
        torch.testing.assert_close(config_weights(row @ row.T, pref), torch.ones(1, dtype=F64))
    # Zero rows are ignored (TorchJD's nan_to_num), a zero matrix gives zero.
    with_zero = torch.tensor([[0.0, 0.0, 0.0], [-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=F64)
    _close(
        config_weights(with_zero @ with_zero.T) @ with_zero,
        torchjd_aggregation.ConFIG()(with_zero),
        1e-12,
    )
    zeros = torch.zeros(3, 3, dtype=F64)
    assert torch.equal(config_weights(zeros), torch.zeros(3, dtype=F64))


def test_config_is_a_gramian_weighting() -> None:
    # The weights are a function of the Gramian: a stateless PureWeighting for the Gramian steps.
    weighting = stateless(partial(config_weights, pref_vector=None))
    matrix = MATRICES[4][1]
    weights, _ = weighting.update(matrix @ matrix.T, weighting.init(matrix.shape[0]))
    _close(weights @ matrix, torchjd_aggregation.ConFIG()(matrix), 1e-10)


def test_config_bad_arguments() -> None:
    gramian = J_BASE @ J_BASE.T
    with pytest.raises(ValueError, match="one preference per loss"):
        config_weights(gramian, torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        config_weights(gramian, torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="rtol"):
        config_weights(gramian, rtol=-1.0)
    with pytest.raises(ValueError, match="finite"):
        config(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="one preference per loss"):
        config(torch.ones(3)).update(
            _as_jacobian(J_BASE), config().init(_as_jacobian(J_BASE)[0], 2)
        )


# --- ExcessMTL ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("robust_step_size", "n_warmup_steps"), [(1.0, 0), (0.5, 3), (2.0, 1)], ids=str
)
@pytest.mark.parametrize("m", [1, 2, 5, 16])
def test_excess_mtl_matches_torchjd_over_several_steps(
    m: int, robust_step_size: float, n_warmup_steps: int
) -> None:
    generator = torch.Generator().manual_seed(m)
    reference = torchjd_aggregation.ExcessMTL(robust_step_size, n_warmup_steps)
    aggregator = excess_mtl(robust_step_size, n_warmup_steps)
    state = aggregator.init(_as_jacobian(torch.zeros(m, 9, dtype=F64))[0], m)
    for step in range(8):
        rank = 1 + step % min(m, 3)
        left = torch.randn(m, rank, generator=generator, dtype=F64)
        matrix = left @ torch.randn(rank, 9, generator=generator, dtype=F64)
        matrix = matrix * torch.rand(m, 1, generator=generator, dtype=F64) * 3
        expected = reference(matrix)
        update, weights, state = aggregator.update(_as_jacobian(matrix), state)
        _close(_flat(update), expected, 1e-12)
        assert weights is not None
        torch.testing.assert_close(weights, reference.weighting._weights, rtol=1e-12, atol=0)
    assert int(state.step) == 8


def test_excess_mtl_weights_match_torchjd_weighting_and_published_values() -> None:
    reference = torchjd_aggregation.ExcessMTLWeighting()
    jacobian = _as_jacobian(J_BASE)
    state = excess_mtl().init(jacobian[0], 2)
    for _ in range(2):  # The published values: the same at the second call.
        weights, state = excess_mtl_weights(jacobian, state)
        torch.testing.assert_close(weights, reference(J_BASE))
        torch.testing.assert_close(weights, torch.tensor([0.119203, 0.880797]))
    update, _, _ = excess_mtl().update(jacobian, excess_mtl().init(jacobian[0], 2))
    torch.testing.assert_close(_flat(update), torch.tensor([4.807971, 1.0, 1.0]))


def test_excess_mtl_state_layout() -> None:
    jacobian = _as_jacobian(MATRICES[3][1])
    aggregator = excess_mtl(n_warmup_steps=2)
    state = aggregator.init(jacobian[0], 5)
    assert state.sq_grad_sum.shape == (5, 4)
    _, weights, state = aggregator.update(jacobian, state)
    torch.testing.assert_close(weights, torch.full((5,), 0.2, dtype=F64))
    torch.testing.assert_close(state.sq_grad_sum, MATRICES[3][1] ** 2)
    assert not bool(state.has_baseline)


def test_excess_mtl_bad_arguments() -> None:
    jacobian = _as_jacobian(J_BASE)
    with pytest.raises(ValueError, match="robust_step_size"):
        excess_mtl(0.0)
    with pytest.raises(TypeError, match="robust_step_size"):
        excess_mtl("1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_warmup_steps"):
        excess_mtl(n_warmup_steps=-1)
    with pytest.raises(TypeError, match="n_warmup_steps"):
        excess_mtl(n_warmup_steps=1.5)  # type: ignore[arg-type]
    wrong = excess_mtl().init(TensorDict({"w": torch.zeros(4)}, []), 2)
    with pytest.raises(ValueError, match="re-initialise"):
        excess_mtl().update(jacobian, wrong)
    with pytest.raises(TypeError, match="ExcessMTLState"):
        excess_mtl().update(jacobian, RandomState(torch.tensor(0)))  # type: ignore[arg-type]


# --- MoDo and SDMGrad --------------------------------------------------------------------------


CROSS: list[tuple[str, Callable[[int], CrossWeighting[Any]], Callable[[int], Any]]] = [
    ("modo", lambda m: modo(), lambda m: torchjd_aggregation.MoDoWeighting()),
    ("modo_0.5_0", lambda m: modo(0.5, 0.0), lambda m: torchjd_aggregation.MoDoWeighting(0.5, 0.0)),
    ("sdmgrad", lambda m: sdmgrad(), lambda m: torchjd_aggregation.SDMGradWeighting()),
    (
        "sdmgrad_pref",
        lambda m: sdmgrad(3.0, 0.2, 7, 0.6, torch.arange(1.0, m + 1, dtype=F64)),
        lambda m: torchjd_aggregation.SDMGradWeighting(
            3.0, 0.2, 7, 0.6, torch.arange(1.0, m + 1, dtype=F64)
        ),
    ),
]


@pytest.mark.parametrize("m", [1, 2, 3, 8, 16])
@pytest.mark.parametrize(("name", "ours", "theirs"), CROSS, ids=[c[0] for c in CROSS])
def test_cross_weightings_match_torchjd_over_several_steps(
    name: str, ours: Callable[[int], CrossWeighting[Any]], theirs: Callable[[int], Any], m: int
) -> None:
    weighting, reference = ours(m), theirs(m)
    state = weighting.init(m, dtype=F64)
    for a in _cross_pairs(m, 6, seed=m):
        weights, state = weighting.update(a, state)
        torch.testing.assert_close(weights, reference(a), rtol=1e-10, atol=1e-12)


def test_cross_weightings_published_values_fed_the_gramian() -> None:
    gramian = J_BASE @ J_BASE.T
    weighting = modo()
    first, state = weighting.update(gramian, weighting.init(2))
    second, _ = weighting.update(gramian, state)
    torch.testing.assert_close(first, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(second, torch.tensor([0.0, 1.0]))
    weighting_ = sdmgrad()
    state_ = weighting_.init(2)
    for _ in range(2):
        weights, state_ = weighting_.update(gramian, state_)
        torch.testing.assert_close(weights, torch.tensor([0.115385, 0.884615]))


def test_cross_weightings_with_cross_gramian_of_jacobians() -> None:
    generator = torch.Generator().manual_seed(0)
    j1, j2 = (_as_jacobian(torch.randn(3, 5, generator=generator, dtype=F64)) for _ in range(2))
    a = cross_gramian(j1, j2)
    weighting = modo()
    weights, _ = weighting.update(a, weighting.init(3, dtype=F64))
    torch.testing.assert_close(weights, torchjd_aggregation.MoDoWeighting()(a))
    assert combine(j1, weights)["a"].shape == ()


def test_simplex_projection_matches_torchjd_and_is_optimal() -> None:
    from torchjd.aggregation._utils.simplex import project_onto_simplex as theirs

    generator = torch.Generator().manual_seed(0)
    for m in [1, 2, 3, 7, 16]:
        for _ in range(50):
            y = 3 * torch.randn(m, generator=generator, dtype=F64)
            x = project_onto_simplex(y)
            torch.testing.assert_close(x, theirs(y), rtol=0, atol=1e-14)
            assert (x >= 0).all()
            torch.testing.assert_close(x.sum(), torch.tensor(1.0, dtype=F64))
            # KKT: y − x = θ on the support, ≤ θ off it.
            theta = (y - x)[x > 0]
            assert float(theta.max() - theta.min()) < 1e-12
            assert ((y - x)[x == 0] <= theta.max() + 1e-12).all()


def test_cross_weightings_bad_arguments() -> None:
    a = J_BASE @ J_BASE.T
    makers: list[tuple[Callable[[], object], str]] = [
        (lambda: modo(0.0), "gamma"),
        (lambda: modo(rho=-1.0), "rho"),
        (lambda: sdmgrad(lr=0.0), "lr"),
        (lambda: sdmgrad(momentum=1.0), "momentum"),
        (lambda: sdmgrad(n_iter=0), "n_iter"),
        (lambda: sdmgrad(lambda_=-0.1), "lambda_"),
        (lambda: sdmgrad(pref_vector=torch.ones(2, 2)), "pref_vector"),
    ]
    for make, pattern in makers:
        with pytest.raises(ValueError, match=pattern):
            make()
    with pytest.raises(TypeError, match="n_iter"):
        sdmgrad(n_iter=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one preference per loss"):
        sdmgrad(pref_vector=torch.ones(3)).update(a, sdmgrad().init(2))
    with pytest.raises(ValueError, match="re-initialise"):
        modo_weights(a, torch.ones(3))
    with pytest.raises(ValueError, match="re-initialise"):
        sdmgrad_weights(a, torch.ones(3))
    with pytest.raises(TypeError, match="MoDoState"):
        modo().update(a, SDMGradState(torch.ones(2)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="SDMGradState"):
        sdmgrad().update(a, MoDoState(torch.ones(2)))  # type: ignore[arg-type]


# --- Shared properties: one registry of this file's methods ------------------------------------


@dataclass(frozen=True)
class JacobianEntry:
    name: str
    make: Callable[[], JacobianAggregator[Any]]
    stateful: bool
    weighted: bool

    def __str__(self) -> str:
        return self.name


JACOBIAN_REGISTRY = [
    JacobianEntry("graddrop", lambda: graddrop(seed=4), stateful=True, weighted=False),
    JacobianEntry(
        "graddrop_leak",
        lambda: graddrop(_square, torch.linspace(0, 0.5, 5), seed=1),
        stateful=True,
        weighted=False,
    ),
    JacobianEntry("config", lambda: config(), stateful=False, weighted=True),
    JacobianEntry(
        "config_pref", lambda: config(torch.arange(1.0, 6.0)), stateful=False, weighted=True
    ),
    JacobianEntry("excess_mtl", lambda: excess_mtl(), stateful=True, weighted=True),
    JacobianEntry("excess_mtl_warmup", lambda: excess_mtl(0.5, 1), stateful=True, weighted=True),
]


@dataclass(frozen=True)
class CrossEntry:
    name: str
    make: Callable[[], Any]
    """A CrossWeighting, or a PureWeighting of a Gramian kernel with the same signatures."""
    stateful: bool

    def __str__(self) -> str:
        return self.name


CROSS_REGISTRY = [
    CrossEntry("modo", lambda: modo(), stateful=True),
    CrossEntry("sdmgrad", lambda: sdmgrad(), stateful=True),
    CrossEntry("sdmgrad_pref", lambda: sdmgrad(pref_vector=torch.ones(4)), stateful=True),
    CrossEntry("config_weights", lambda: stateless(config_weights), stateful=False),
]


def _jacobian(seed: int, m: int = 5) -> TensorDict:
    generator = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "layer": {
                "weight": torch.randn(m, 3, 2, generator=generator),
                "bias": torch.randn(m, 3, generator=generator),
            },
            "head": torch.randn(m, 4, generator=generator),
        },
        batch_size=[m],
    )


def _leaves(tree: Any) -> list[Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, Tensor)]


def _td_leaves(td: TensorDictBase) -> list[Tensor]:
    return [td.get(key) for key in sorted(td.keys(True, True), key=str)]


def _equal_outputs(first: Any, second: Any) -> None:
    (u1, w1, s1), (u2, w2, s2) = first, second
    for a, b in zip(_td_leaves(u1), _td_leaves(u2), strict=True):
        torch.testing.assert_close(a, b)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        torch.testing.assert_close(w1, w2)
    for a, b in zip(_leaves(s1), _leaves(s2), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("entry", JACOBIAN_REGISTRY, ids=str)
def test_jacobian_aggregators_are_pure_and_state_stable(entry: JacobianEntry) -> None:
    aggregator = entry.make()
    jacobian = _jacobian(0)
    state = aggregator.init(jacobian[0], 5)
    jacobian_copy, state_copy = jacobian.clone(), [t.clone() for t in _leaves(state)]
    first = aggregator.update(jacobian, state)
    again = aggregator.update(jacobian, state)
    _equal_outputs(first, again)
    for a, b in zip(_td_leaves(jacobian), _td_leaves(jacobian_copy), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(_leaves(state), state_copy, strict=True):
        assert torch.equal(a, b)
    update, weights, new_state = first
    assert set(update.keys(True, True)) == set(jacobian.keys(True, True))
    for key in jacobian.keys(True, True):
        assert update.get(key).shape == jacobian.get(key).shape[1:]
    assert (weights is not None) == entry.weighted
    if weights is not None:
        assert weights.shape == (5,)
        torch.testing.assert_close(combine(jacobian, weights).get("head"), update.get("head"))
    assert type(new_state) is type(state)
    for a, b in zip(_leaves(new_state), _leaves(state), strict=True):
        assert (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
    changed = any(
        not torch.equal(a, b) for a, b in zip(_leaves(new_state), _leaves(state), strict=True)
    )
    assert changed == entry.stateful


@pytest.fixture
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("entry", JACOBIAN_REGISTRY, ids=str)
def test_jacobian_aggregators_compile_fullgraph_without_recompiling(entry: JacobianEntry) -> None:
    aggregator = entry.make()
    state = aggregator.init(_jacobian(0)[0], 5)
    counter = CompileCounter()
    compiled = torch.compile(aggregator.update, fullgraph=True, backend=counter)
    for seed in range(3):
        jacobian = _jacobian(seed)
        expected = aggregator.update(jacobian, state)
        _equal_outputs(compiled(jacobian, state), expected)
        state = expected[2]
    assert counter.frame_count == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("entry", JACOBIAN_REGISTRY, ids=str)
def test_jacobian_aggregators_on_nonfinite_input(entry: JacobianEntry, bad: float) -> None:
    aggregator = entry.make()
    state = aggregator.init(_jacobian(0)[0], 5)
    _, _, state = aggregator.update(_jacobian(1), state)
    jacobian = _jacobian(2)
    jacobian["head"][1, 2] = bad
    update, weights, new_state = aggregator.update(jacobian, state)
    for leaf in _td_leaves(update):
        assert leaf.isnan().all()
    if weights is not None:
        assert weights.isnan().all()
    for a, b in zip(_leaves(new_state), _leaves(state), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("entry", JACOBIAN_REGISTRY, ids=str)
def test_jacobian_aggregators_pickle_and_resume_identically(entry: JacobianEntry) -> None:
    aggregator = entry.make()
    state = aggregator.init(_jacobian(0)[0], 5)
    _, _, state = aggregator.update(_jacobian(1), state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored_state = torch.load(buffer, weights_only=False)
    restored = pickle.loads(pickle.dumps(aggregator))
    for seed in range(2, 4):
        expected = aggregator.update(_jacobian(seed), state)
        actual = restored.update(_jacobian(seed), restored_state)
        _equal_outputs(actual, expected)
        for a, b in zip(_leaves(actual[2]), _leaves(expected[2]), strict=True):
            assert torch.equal(a, b)
        state, restored_state = expected[2], actual[2]


def test_jacobian_aggregators_refuse_bad_jacobians() -> None:
    for entry in JACOBIAN_REGISTRY:
        aggregator = entry.make()
        state = aggregator.init(_jacobian(0)[0], 5)
        with pytest.raises(TypeError, match="TensorDict"):
            aggregator.update(torch.zeros(5, 3), state)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="floating-point"):
            aggregator.update(TensorDict({"w": torch.zeros(5, 3, dtype=torch.int64)}, [5]), state)
        with pytest.raises(TypeError, match="TensorDict"):
            aggregator.init(torch.zeros(3), 5)  # type: ignore[arg-type]


def _cross(seed: int, m: int = 4) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    j1 = torch.randn(m, 6, generator=generator)
    return j1 @ (j1 + 0.5 * torch.randn(m, 6, generator=generator)).T


@pytest.mark.parametrize("entry", CROSS_REGISTRY, ids=str)
def test_cross_weightings_are_pure_and_state_stable(entry: CrossEntry) -> None:
    weighting = entry.make()
    state = weighting.init(4)
    a = _cross(0)
    first, new_state = weighting.update(a, state)
    again, again_state = weighting.update(a, state)
    assert torch.equal(first, again)
    for x, y in zip(_leaves(new_state), _leaves(again_state), strict=True):
        assert torch.equal(x, y)
    assert first.shape == (4,)
    assert first.isfinite().all()
    assert type(new_state) is type(state)
    for x, y in zip(_leaves(new_state), _leaves(state), strict=True):
        assert (x.shape, x.dtype, x.device) == (y.shape, y.dtype, y.device)
    changed = any(
        not torch.equal(x, y) for x, y in zip(_leaves(new_state), _leaves(state), strict=True)
    )
    assert changed == entry.stateful


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("entry", CROSS_REGISTRY, ids=str)
def test_cross_weightings_compile_fullgraph_without_recompiling(entry: CrossEntry) -> None:
    weighting = entry.make()
    state = weighting.init(4)
    counter = CompileCounter()
    compiled: Callable[..., Any] = torch.compile(weighting.update, fullgraph=True, backend=counter)
    for seed in range(3):
        a = _cross(seed)
        expected, expected_state = weighting.update(a, state)
        actual, actual_state = compiled(a, state)
        torch.testing.assert_close(actual, expected)
        for x, y in zip(_leaves(actual_state), _leaves(expected_state), strict=True):
            torch.testing.assert_close(x, y)
        state = expected_state
    assert counter.frame_count == 1


@pytest.mark.parametrize("entry", CROSS_REGISTRY, ids=str)
def test_cross_weightings_vmap_equals_a_loop(entry: CrossEntry) -> None:
    weighting = entry.make()
    state = weighting.init(4)
    stack = torch.stack([_cross(seed) for seed in range(3)])
    batched, batched_states = torch.vmap(weighting.update, in_dims=(0, None))(stack, state)
    for i, a in enumerate(stack):
        expected, expected_state = weighting.update(a, state)
        torch.testing.assert_close(batched[i], expected)
        for x, y in zip(_leaves(batched_states), _leaves(expected_state), strict=True):
            torch.testing.assert_close(x[i] if x.ndim > y.ndim else x, y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("entry", CROSS_REGISTRY, ids=str)
def test_cross_weightings_on_nonfinite_input(entry: CrossEntry, bad: float) -> None:
    weighting = entry.make()
    _, state = weighting.update(_cross(1), weighting.init(4))
    a = _cross(2)
    a[0, 3] = bad
    weights, new_state = weighting.update(a, state)
    assert weights.isnan().all()
    for x, y in zip(_leaves(new_state), _leaves(state), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("entry", CROSS_REGISTRY, ids=str)
def test_cross_weightings_pickle_and_resume_identically(entry: CrossEntry) -> None:
    weighting = entry.make()
    _, state = weighting.update(_cross(1), weighting.init(4))
    restored = pickle.loads(pickle.dumps(weighting))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored_state = torch.load(buffer, weights_only=False)
    for seed in range(2, 4):
        expected, state = weighting.update(_cross(seed), state)
        actual, restored_state = restored.update(_cross(seed), restored_state)
        assert torch.equal(actual, expected)


def test_cross_weightings_state_types() -> None:
    assert isinstance(modo().init(3), MoDoState)
    assert isinstance(sdmgrad().init(3), SDMGradState)
    assert isinstance(excess_mtl().init(TensorDict({"w": torch.zeros(2)}, []), 3), ExcessMTLState)
    assert isinstance(modo(), CrossWeighting)
    assert isinstance(graddrop(), JacobianAggregator)


# --- The class front door ----------------------------------------------------------------------


def _torchjd_graddrop_run(matrices: list[Tensor], seed: int, **kwargs: Any) -> list[Tensor]:
    """TorchJD's GradDrop on each matrix, fed the uniforms our ``GradDrop(seed=seed)`` draws."""
    key = key_from_seed(seed)
    reference = torchjd_aggregation.GradDrop(**kwargs)
    out = []
    for matrix in matrices:
        key, used = split(key)
        noise = uniform(used, (matrix.shape[1],), torch.float32).to(matrix.dtype)
        with mock.patch("torch.rand", return_value=noise):
            out.append(reference(matrix))
    return out


def _steps(m: int, n: int, count: int, seed: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=generator, dtype=F64) for _ in range(count)]


@pytest.mark.parametrize("m", [1, 3, 16])
def test_graddrop_class_matches_torchjd_over_several_steps(m: int) -> None:
    matrices = _steps(m, 6, 5, seed=m)
    leak = torch.linspace(0.1, 0.6, m, dtype=F64)
    cases: list[dict[str, Any]] = [{}, {"leak": leak}, {"f": _square, "leak": leak}]
    for kwargs in cases:
        ours = GradDrop(seed=7, **kwargs)
        for actual, expected in zip(
            [ours(matrix) for matrix in matrices],
            _torchjd_graddrop_run(matrices, 7, **kwargs),
            strict=True,
        ):
            _close(actual, expected, 1e-12)


def test_classes_match_torchjd_over_several_steps() -> None:
    matrices = _steps(5, 8, 6, seed=0)
    pairs: list[tuple[Any, Any]] = [
        (ConFIG(), torchjd_aggregation.ConFIG()),
        (
            ConFIG(torch.arange(1.0, 6.0)),
            torchjd_aggregation.ConFIG(torch.arange(1.0, 6.0, dtype=F64)),
        ),
        (ExcessMTL(0.7, 2), torchjd_aggregation.ExcessMTL(0.7, 2)),
        (ExcessMTLWeighting(), torchjd_aggregation.ExcessMTLWeighting()),
    ]
    for ours, theirs in pairs:
        for matrix in matrices:
            _close(ours(matrix), theirs(matrix), 1e-10)
    cross: list[tuple[Any, Any]] = [
        (MoDoWeighting(0.3, 0.05), torchjd_aggregation.MoDoWeighting(0.3, 0.05)),
        (SDMGradWeighting(lambda_=0.5), torchjd_aggregation.SDMGradWeighting(lambda_=0.5)),
    ]
    for ours, theirs in cross:
        for a in _cross_pairs(5, 6, seed=3):
            torch.testing.assert_close(ours(a), theirs(a), rtol=1e-10, atol=1e-12)


def test_excess_mtl_class_restarts_when_the_shape_changes_as_torchjd() -> None:
    ours, theirs = ExcessMTL(), torchjd_aggregation.ExcessMTL()
    for matrix in [*_steps(3, 4, 2, 0), *_steps(3, 5, 2, 1), *_steps(2, 5, 2, 2)]:
        _close(ours(matrix), theirs(matrix), 1e-12)


def test_classes_published_values() -> None:
    gramian = J_BASE @ J_BASE.T
    torch.testing.assert_close(ConFIG()(J_BASE), torch.tensor([0.158809, 2.070607, 2.070607]))
    torch.testing.assert_close(GradDrop(seed=0)(J_BASE), torch.tensor([6.0, 2.0, 2.0]))
    aggregator, weighting = ExcessMTL(), ExcessMTLWeighting()
    modo_, sdmgrad_ = MoDoWeighting(), SDMGradWeighting()
    for index in range(2):
        torch.testing.assert_close(aggregator(J_BASE), torch.tensor([4.807971, 1.0, 1.0]))
        torch.testing.assert_close(weighting(J_BASE), torch.tensor([0.119203, 0.880797]))
        torch.testing.assert_close(modo_(gramian), torch.tensor([[1.0, 0.0], [0.0, 1.0]])[index])
        torch.testing.assert_close(sdmgrad_(gramian), torch.tensor([0.115385, 0.884615]))


def test_empty_matrices_as_torchjd() -> None:
    for shape in [(0, 3), (2, 0)]:
        matrix = torch.zeros(shape, dtype=F64)
        for ours, theirs in [
            (GradDrop(), torchjd_aggregation.GradDrop()),
            (ConFIG(), torchjd_aggregation.ConFIG()),
        ]:
            actual = ours(matrix)
            assert actual.shape == theirs(matrix).shape == (shape[1],)
            assert torch.equal(actual, torch.zeros(shape[1], dtype=F64))
    with pytest.raises(ValueError, match="one leak per row"):
        GradDrop(leak=torch.ones(2))(torch.zeros(0, 3))
    for weighting in [ExcessMTLWeighting(), MoDoWeighting(), SDMGradWeighting()]:
        with pytest.raises(ValueError, match=r"0 losses|m = 0"):
            weighting(torch.zeros(0, 0))


def test_reprs_and_strs_as_torchjd() -> None:
    pref = torch.tensor([1.0, 2.0])
    for ours, theirs in [
        (ConFIG(), torchjd_aggregation.ConFIG()),
        (ConFIG(pref), torchjd_aggregation.ConFIG(pref)),
        (ExcessMTL(0.5, 3), torchjd_aggregation.ExcessMTL(0.5, 3)),
        (ExcessMTLWeighting(0.5, 3), torchjd_aggregation.ExcessMTLWeighting(0.5, 3)),
        (MoDoWeighting(0.2), torchjd_aggregation.MoDoWeighting(0.2)),
        (
            SDMGradWeighting(pref_vector=pref),
            torchjd_aggregation.SDMGradWeighting(pref_vector=pref),
        ),
    ]:
        assert repr(ours) == repr(theirs)
        assert str(ours) == str(theirs)
    leak = torch.tensor([0.5, 0.25])
    assert str(GradDrop(leak=leak)) == str(torchjd_aggregation.GradDrop(leak=leak))
    assert str(GradDrop()) == "GradDrop"
    assert repr(GradDrop(seed=3)).startswith("GradDrop(f=<function _identity")
    assert repr(GradDrop(seed=3)).endswith("leak=None, seed=3)")


def test_setters_take_effect_and_validate() -> None:
    a = _cross_pairs(3, 1, seed=9)[0]
    weighting = MoDoWeighting()
    weighting(a)
    state = weighting.state
    weighting.gamma = 0.5
    expected, _ = modo(0.5).update(a, state)
    torch.testing.assert_close(weighting(a), expected)
    with pytest.raises(ValueError, match="gamma"):
        weighting.gamma = -1.0
    assert weighting.gamma == 0.5
    sdm = SDMGradWeighting()
    for name, bad in [("lr", 0.0), ("momentum", 1.0), ("n_iter", 0), ("lambda_", -1.0)]:
        with pytest.raises(ValueError, match=name):
            setattr(sdm, name, bad)
    sdm.n_iter = 3
    expected, _ = sdmgrad(n_iter=3).update(a, sdmgrad().init(3, dtype=F64))
    torch.testing.assert_close(sdm(a), expected)
    aggregator = ExcessMTL()
    aggregator(J_BASE)
    aggregator.robust_step_size = 3.0
    assert aggregator.weighting.robust_step_size == 3.0
    with pytest.raises(ValueError, match="robust_step_size"):
        aggregator.robust_step_size = 0.0
    with pytest.raises(ValueError, match="n_warmup_steps"):
        aggregator.n_warmup_steps = -2
    assert int(aggregator.state.step) == 1  # the state is kept
    config_ = ConFIG()
    config_.pref_vector = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(
        config_(J_BASE), torchjd_aggregation.ConFIG(torch.tensor([1.0, 3.0]))(J_BASE)
    )
    drop = GradDrop(seed=0)
    drop.leak = torch.ones(2)  # everything leaks through: the sum
    torch.testing.assert_close(drop(J_BASE), J_BASE.sum(0))
    with pytest.raises(ValueError, match="leak"):
        drop.leak = torch.ones(2, 2)
    with pytest.raises(AttributeError, match="fixed at construction"):
        drop.seed = 4


def test_cross_weightings_refuse_a_gramian_weighted_aggregator() -> None:
    for weighting in [MoDoWeighting(), SDMGradWeighting()]:
        with pytest.raises(TypeError, match="cross-Gramian"):
            GramianWeightedAggregator(weighting)
    with pytest.raises(TypeError, match="CrossWeighting"):
        CrossGramianWeighting(mean())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cross-Gramian"):
        MoDoWeighting()(torch.zeros(2, 2, 2))


def test_classes_are_not_differentiable() -> None:
    matrix = J_BASE.clone().requires_grad_()
    gramian = (J_BASE @ J_BASE.T).requires_grad_()
    for output in [
        GradDrop()(matrix),
        ConFIG()(matrix),
        ExcessMTL()(matrix),
        ExcessMTLWeighting()(matrix),
        MoDoWeighting()(gramian),
        SDMGradWeighting()(gramian),
    ]:
        assert not output.requires_grad


CLASSES: list[tuple[str, Callable[[], Any], bool]] = [
    ("GradDrop", lambda: GradDrop(seed=5), False),
    ("ConFIG", lambda: ConFIG(), False),
    ("ExcessMTL", lambda: ExcessMTL(0.5, 1), False),
    ("ExcessMTLWeighting", lambda: ExcessMTLWeighting(), False),
    ("MoDoWeighting", lambda: MoDoWeighting(), True),
    ("SDMGradWeighting", lambda: SDMGradWeighting(), True),
]


def _inputs(cross: bool, count: int) -> list[Tensor]:
    return _cross_pairs(4, count, seed=1) if cross else _steps(4, 6, count, seed=1)


@pytest.mark.parametrize(("name", "make", "cross"), CLASSES, ids=[c[0] for c in CLASSES])
def test_class_state_restored_by_assignment_pickling_and_state_dict(
    name: str, make: Callable[[], Any], cross: bool
) -> None:
    first, *rest = _inputs(cross, 4)
    original = make()
    original(first)
    buffer = io.BytesIO()
    torch.save(original.state, buffer)
    buffer.seek(0)
    assigned = make()
    assigned.state = torch.load(buffer, weights_only=False)
    pickled = pickle.loads(pickle.dumps(original))
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    saved.seek(0)
    loaded = make()
    loaded.load_state_dict(torch.load(saved, weights_only=True))
    for stat in rest:
        expected = original(stat)
        for other in [assigned, pickled, loaded]:
            assert torch.equal(other(stat), expected)


def test_class_refuses_an_assigned_state_of_another_shape() -> None:
    weighting = ExcessMTLWeighting()
    weighting(_steps(3, 4, 1, 0)[0])
    saved = weighting.state
    fresh = ExcessMTLWeighting()
    fresh.state = saved
    with pytest.raises(ValueError, match="does not fit"):
        fresh(_steps(3, 5, 1, 0)[0])
    modo_ = MoDoWeighting()
    modo_.state = MoDoState(torch.ones(3))
    with pytest.raises(ValueError, match="does not fit"):
        modo_(torch.eye(2))


# --- With the steps and aggregate --------------------------------------------------------------


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("entry", JACOBIAN_REGISTRY[::2], ids=str)
def test_jd_step_takes_the_jacobian_aggregators(entry: JacobianEntry) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 5))

    def losses_fn(p: TensorDictBase, x: Tensor, y: Tensor) -> Tensor:
        return (call(model, p, x) - y).pow(2).mean(0)  # five losses

    aggregator = entry.make()
    step = jd_step(losses_fn, aggregator, sgd(0.1))
    params = params_of(model)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, generator=generator), torch.randn(8, 5, generator=generator))]
    batches.append((torch.randn(8, 3, generator=generator), torch.randn(8, 5, generator=generator)))
    counter = CompileCounter()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    eager_state = compiled_state = aggregator.init(params, 5)
    eager_params = compiled_params = params
    opt = sgd(0.1).init(params)
    for batch in batches:
        eager = step(eager_params, opt, eager_state, batch)
        out = compiled(compiled_params, opt, compiled_state, batch)
        assert not bool(eager.metrics["skipped"])
        for a, b in zip(_td_leaves(out.params), _td_leaves(eager.params), strict=True):
            torch.testing.assert_close(a, b)
        eager_params, eager_state = eager.params, eager.agg_state
        compiled_params, compiled_state = out.params, out.agg_state
    assert counter.frame_count == 1
    # The update applied is the aggregator's on the step's Jacobian.
    jac = jacobian(losses_fn, params, *batches[0])
    update, _, _ = aggregator.update(jac, aggregator.init(params, 5))
    first = step(params, opt, aggregator.init(params, 5), batches[0])
    for key in params.keys(True, True):
        torch.testing.assert_close(first.params.get(key), params.get(key) - 0.1 * update.get(key))


def test_aggregate_groups_with_one_excess_mtl_state_per_layer() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    params = params_of(model)
    groups = group_params(params, "per_layer")
    states = init_group_states(groups, excess_mtl(), m=2, params=params)
    assert states["0"].sq_grad_sum.shape == (2, 16)
    assert states["2"].sq_grad_sum.shape == (2, 10)
    jac = jacobian(lambda p, x: call(model, p, x).pow(2).mean(0), params, torch.randn(8, 3))
    result = aggregate_groups(jac, groups, excess_mtl(), states)
    for name in ["0", "2"]:
        sub = jac.select(*groups[name])
        expected, _, _ = excess_mtl().update(sub, states[name])
        for key in sub.keys(True, True):
            torch.testing.assert_close(result.update.get(key), expected.get(key))

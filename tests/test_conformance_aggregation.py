"""The class front door of ``torchjd_func.aggregation`` against TorchJD 0.18, side by side.

Settable hyperparameters, ``weighting`` vs ``gramian_weighting``, zero tasks, differentiability,
and the ``nn.Module`` behaviour (hooks, ``state_dict``, ``.to``), each checked against TorchJD's
own objects run on the same input, or against float64 autograd.
"""

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.settings import DEVICE
from torchjd_func import aggregation as ours
from torchjd_func.aggregation import (
    MGDA,
    Aggregator,
    Constant,
    ConstantWeighting,
    DualProj,
    EmptyState,
    GradVac,
    GradVacWeighting,
    GramianWeightedAggregator,
    GramianWeighting,
    Mean,
    MeanWeighting,
    PCGrad,
    Random,
    RandomWeighting,
    Sum,
    UPGrad,
    UPGradWeighting,
    WeightedAggregator,
    Weighting,
    dualproj,
    mgda,
    upgrad,
)

theirs = pytest.importorskip("torchjd.aggregation")
linalg = pytest.importorskip("torchjd.linalg")

J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=torch.float64)
SQUARE = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0], [1.0, -2.0, 3.0]], dtype=torch.float64)


def _matrices(count: int, m: int = 2, n: int = 5, seed: int = 0) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(m, n, generator=generator, dtype=torch.float64) for _ in range(count)]


# --- 1. Hyperparameters: settable, validated, effective at the next call ----------------------


SETTERS: list[tuple[str, Callable[[], Aggregator], Callable[[], Any], str, Any, Callable[[], Any]]]
SETTERS = [
    # (id, ours, theirs, attribute, new value, TorchJD built with the new value)
    (
        "upgrad_pref",
        UPGrad,
        lambda: theirs.UPGrad(),
        "pref_vector",
        torch.tensor([1.0, 2.0], dtype=torch.float64),
        lambda: theirs.UPGrad(torch.tensor([1.0, 2.0], dtype=torch.float64)),
    ),
    (
        "dualproj_pref",
        DualProj,
        lambda: theirs.DualProj(),
        "pref_vector",
        torch.tensor([3.0, 1.0], dtype=torch.float64),
        lambda: theirs.DualProj(torch.tensor([3.0, 1.0], dtype=torch.float64)),
    ),
    (
        "upgrad_pref_back_to_none",
        lambda: UPGrad(torch.tensor([1.0, 2.0], dtype=torch.float64)),
        lambda: theirs.UPGrad(torch.tensor([1.0, 2.0], dtype=torch.float64)),
        "pref_vector",
        None,
        lambda: theirs.UPGrad(),
    ),
]


@pytest.mark.parametrize(
    ("ours_make", "theirs_make", "name", "value", "theirs_fresh"),
    [s[1:] for s in SETTERS],
    ids=[s[0] for s in SETTERS],
)
def test_setting_a_hyperparameter_takes_effect_as_in_torchjd(
    ours_make: Callable[[], Aggregator],
    theirs_make: Callable[[], Any],
    name: str,
    value: Any,
    theirs_fresh: Callable[[], Any],
) -> None:
    mine, reference = ours_make(), theirs_make()
    torch.testing.assert_close(mine(J), reference(J))
    setattr(mine, name, value)
    setattr(reference, name, value)
    expected = theirs_fresh()(J)
    torch.testing.assert_close(reference(J), expected)  # TorchJD's setter takes effect
    torch.testing.assert_close(mine(J), expected, rtol=1e-6, atol=1e-6)
    assert getattr(mine, name) is value
    assert getattr(mine.gramian_weighting, name) is value


@pytest.mark.parametrize(("name", "value"), [("norm_eps", 1e3), ("reg_eps", 0.5)])
def test_setting_an_eps_matches_torchjd_projector(name: str, value: float) -> None:
    mine = UPGrad()
    setattr(mine, name, value)
    projector = linalg.QuadprogProjector(**{"norm_eps": 1e-4, "reg_eps": 1e-4, name: value})
    expected = theirs.UPGrad(projector=projector)(J)
    assert not torch.allclose(expected, theirs.UPGrad()(J))  # the value matters
    torch.testing.assert_close(mine(J), expected, rtol=1e-6, atol=1e-6)
    assert f"{name}={value!r}" in repr(mine)


def test_setting_constant_weights_matches_torchjd() -> None:
    mine = Constant(torch.tensor([1.0, 2.0], dtype=torch.float64))
    mine.weights = torch.tensor([3.0, -1.0], dtype=torch.float64)
    expected = theirs.Constant(torch.tensor([3.0, -1.0], dtype=torch.float64))(J)
    torch.testing.assert_close(mine(J), expected)
    assert str(mine) == "Constant([3., -1.])"
    assert "tensor([ 3., -1.]" in repr(mine)


def test_setting_gradvac_beta_keeps_the_state_as_torchjd() -> None:
    # Two tasks: the random order plays no role, so the runs agree step by step.
    matrices = _matrices(6)
    mine, reference = GradVac(beta=0.5, seed=0), theirs.GradVac(beta=0.5)
    for matrix in matrices[:3]:
        torch.testing.assert_close(mine(matrix), reference(matrix))
    mine.beta, reference.beta = 0.1, 0.1
    mine.eps, reference.eps = 1e-3, 1e-3
    for matrix in matrices[3:]:
        torch.testing.assert_close(mine(matrix), reference(matrix))
    torch.testing.assert_close(mine.state.targets, reference.gramian_weighting._phi_t)
    assert mine.gramian_weighting.beta == 0.1
    assert repr(mine).startswith("GradVac(beta=0.1, eps=0.001, seed=0")


BAD_VALUES: list[tuple[Callable[[], Any], Callable[[], Any], str, Any]] = [
    (GradVac, lambda: theirs.GradVac(), "beta", -0.1),
    (GradVac, lambda: theirs.GradVac(), "beta", 1.5),
    (GradVac, lambda: theirs.GradVac(), "eps", -1.0),
    (GradVacWeighting, lambda: theirs.GradVacWeighting(), "beta", 2.0),
    (UPGrad, lambda: theirs.UPGrad(), "pref_vector", torch.ones(2, 2)),
    (DualProj, lambda: theirs.DualProj(), "pref_vector", torch.ones(2, 2)),
    (MGDA, lambda: theirs.MGDA(), "max_iters", 0),
    (MGDA, lambda: theirs.MGDA(), "epsilon", -1.0),
    (
        lambda: Constant(torch.ones(2)),
        lambda: theirs.ConstantWeighting(torch.ones(2)),  # TorchJD checks at construction only
        "weights",
        torch.ones(2, 2),
    ),
]


@pytest.mark.parametrize(("ours_make", "theirs_make", "name", "value"), BAD_VALUES)
def test_a_bad_value_is_refused_on_set_and_changes_nothing(
    ours_make: Callable[[], Any], theirs_make: Callable[[], Any], name: str, value: Any
) -> None:
    if name == "weights":
        with pytest.raises(ValueError, match="weights"):
            theirs.ConstantWeighting(value)
    else:
        with pytest.raises(ValueError, match=name):
            setattr(theirs_make(), name, value)
    mine = ours_make()
    before = getattr(mine, name)
    matrix = J.float()
    result = mine(matrix) if isinstance(mine, Aggregator) else mine(matrix @ matrix.T)
    with pytest.raises(ValueError, match=name):
        setattr(mine, name, value)
    assert getattr(mine, name) is before
    again = mine(matrix) if isinstance(mine, Aggregator) else mine(matrix @ matrix.T)
    if not isinstance(mine, GradVac | GradVacWeighting):  # stateful: a second call differs
        torch.testing.assert_close(again, result)
    with pytest.raises(ValueError, match=name):  # the constructor gives the same error
        type(mine)(**{name: value}) if name != "weights" else Constant(value)


@pytest.mark.parametrize(
    "make", [Random, PCGrad, GradVac, RandomWeighting, GradVacWeighting], ids=lambda c: c.__name__
)
def test_seed_is_read_only_with_a_clear_error(make: Callable[..., Any]) -> None:
    obj = make(seed=3)
    assert obj.seed == 3
    with pytest.raises(AttributeError, match="create a new object"):
        obj.seed = 4
    assert obj.seed == 3
    assert "seed=3" in repr(obj)


# --- 2. weighting takes the matrix, gramian_weighting the Gramian ------------------------------


PAIRS: list[tuple[str, Callable[[], GramianWeightedAggregator], Callable[[], Any]]] = [
    ("upgrad", UPGrad, lambda: theirs.UPGrad()),
    ("dualproj", DualProj, lambda: theirs.DualProj()),
    ("mean", Mean, lambda: theirs.Mean()),
    ("sum", Sum, lambda: theirs.Sum()),
    (
        "constant",
        lambda: Constant(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)),
        lambda: theirs.Constant(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)),
    ),
]


@pytest.mark.parametrize(("make", "theirs_make"), [p[1:] for p in PAIRS], ids=[p[0] for p in PAIRS])
def test_weighting_takes_the_matrix_as_in_torchjd(
    make: Callable[[], GramianWeightedAggregator], theirs_make: Callable[[], Any]
) -> None:
    # A square J must not be read as a Gramian.
    mine, reference = make(), theirs_make()
    torch.testing.assert_close(mine.weighting(SQUARE), reference.weighting(SQUARE))
    assert isinstance(mine.weighting, Weighting)
    torch.testing.assert_close(mine(SQUARE), mine.weighting(SQUARE) @ SQUARE)


@pytest.mark.parametrize("name", ["UPGrad", "DualProj"])
def test_gramian_weighting_takes_the_gramian_as_in_torchjd(name: str) -> None:
    gramian = SQUARE @ SQUARE.T
    expected = getattr(theirs, name)().gramian_weighting(gramian)
    torch.testing.assert_close(getattr(ours, name)().gramian_weighting(gramian), expected)


def test_weighted_aggregator_and_composition_match_torchjd() -> None:
    mine = WeightedAggregator(UPGradWeighting() << (lambda matrix: matrix @ matrix.T))
    reference = theirs.WeightedAggregator(
        theirs.UPGradWeighting() << (lambda matrix: matrix @ matrix.T)
    )
    torch.testing.assert_close(mine(SQUARE), reference(SQUARE))
    # A weighting of the matrix itself (TorchJD's Constant is one).
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    constant = WeightedAggregator(ConstantWeighting(weights) << (lambda matrix: matrix @ matrix.T))
    torch.testing.assert_close(constant(SQUARE), theirs.Constant(weights)(SQUARE))
    with pytest.raises(TypeError, match="callable"):
        UPGradWeighting() << 3  # type: ignore[operator]


def test_stateful_aggregator_shares_its_state_between_weighting_and_gramian_weighting() -> None:
    aggregator = GradVac(seed=0)
    aggregator.weighting(J)
    assert aggregator.gramian_weighting.state is aggregator.state
    composed_state: Any = aggregator.weighting.state
    assert composed_state is aggregator.state
    reference = theirs.GradVac()
    reference.weighting(J)
    torch.testing.assert_close(aggregator.state.targets, reference.gramian_weighting._phi_t)


# --- 3. Zero tasks ------------------------------------------------------------------------------

ZERO: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
    ("UPGrad", UPGrad, lambda: theirs.UPGrad()),
    ("DualProj", DualProj, lambda: theirs.DualProj()),
    ("MGDA", MGDA, lambda: theirs.MGDA()),
    ("Mean", Mean, lambda: theirs.Mean()),
    ("Sum", Sum, lambda: theirs.Sum()),
    ("Random", lambda: Random(seed=0), lambda: theirs.Random()),
    ("PCGrad", lambda: PCGrad(seed=0), lambda: theirs.PCGrad()),
    ("GradVac", lambda: GradVac(seed=0), lambda: theirs.GradVac()),
    ("Constant", lambda: Constant(torch.ones(0)), lambda: theirs.Constant(torch.ones(0))),
    ("Constant2", lambda: Constant(torch.ones(2)), lambda: theirs.Constant(torch.ones(2))),
]


@pytest.mark.parametrize(("make", "theirs_make"), [z[1:] for z in ZERO], ids=[z[0] for z in ZERO])
def test_zero_tasks_as_in_torchjd(make: Callable[[], Any], theirs_make: Callable[[], Any]) -> None:
    # TorchJD's Mean, Sum, Random and Constant weight the matrix (they only read its rows), so
    # their `weighting` takes the Gramian as well.
    parts: list[tuple[Callable[[Any], Any], Callable[[Any], Any], Tensor]] = [
        (lambda obj: obj, lambda obj: obj, torch.zeros(0, 3)),
        (
            lambda obj: obj.gramian_weighting,
            lambda obj: getattr(obj, "gramian_weighting", obj.weighting),
            torch.zeros(0, 0),
        ),
    ]
    for mine_part, theirs_part, stat in parts:
        try:
            expected = theirs_part(theirs_make())(stat)
        except (ValueError, ZeroDivisionError, IndexError):
            with pytest.raises(ValueError, match="0 losses"):
                mine_part(make())(stat)
        else:
            torch.testing.assert_close(mine_part(make())(stat), expected)


def test_zero_tasks_keep_the_state() -> None:
    aggregator = GradVac(seed=0)
    aggregator(J)
    targets = aggregator.state.targets.clone()
    assert torch.equal(aggregator(torch.zeros(0, 3, dtype=J.dtype)), torch.zeros(3, dtype=J.dtype))
    assert torch.equal(aggregator.state.targets, targets)


# --- 4. Differentiability -----------------------------------------------------------------------

DIFF: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
    *[(z[0], z[1], z[2]) for z in ZERO[:8]],
    (
        "Constant",
        lambda: Constant(torch.ones(2, dtype=torch.float64)),
        lambda: theirs.Constant(torch.ones(2, dtype=torch.float64)),
    ),
]


@pytest.mark.parametrize(("make", "theirs_make"), [d[1:] for d in DIFF], ids=[d[0] for d in DIFF])
def test_requires_grad_as_in_torchjd(
    make: Callable[[], Any], theirs_make: Callable[[], Any]
) -> None:
    matrix = J.clone().requires_grad_()
    mine, reference = make(), theirs_make()
    assert mine(matrix).requires_grad == reference(matrix).requires_grad
    gramian = matrix @ matrix.T
    assert (
        mine.gramian_weighting(gramian).requires_grad == reference.weighting(matrix).requires_grad
    )


@pytest.mark.parametrize(
    "make",
    [Mean, Sum, lambda: Constant(torch.tensor([1.0, -2.0], dtype=torch.float64))],
    ids=["mean", "sum", "constant"],
)
def test_linear_aggregators_have_autograd_gradients(make: Callable[[], Aggregator]) -> None:
    matrix = J.clone().requires_grad_()
    cotangent = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad(make()(matrix) @ cotangent, matrix)
    aggregator = make()
    assert isinstance(aggregator, GramianWeightedAggregator)
    weights = aggregator.gramian_weighting(J @ J.T)
    # d(wᵀJ c)/dJ = w cᵀ, the weights being constants of J.
    (expected,) = torch.autograd.grad((weights @ matrix) @ cotangent, matrix)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(grad, torch.outer(weights, cotangent))


def test_constant_is_differentiable_in_its_weights() -> None:
    weights = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(Constant(weights)(J).sum(), weights)
    torch.testing.assert_close(grad, J.sum(dim=1))


def test_mgda_gradient_matches_finite_differences() -> None:
    # Strictly convex, interior solution: the weights are a smooth function of J.
    matrix = torch.tensor([[1.0, 0.2, 0.0], [0.1, 2.0, 0.3]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: MGDA()(x), (matrix.requires_grad_(),))


@pytest.mark.parametrize("factory", [upgrad, dualproj], ids=["upgrad", "dualproj"])
def test_differentiable_on_request(factory: Callable[..., Any]) -> None:
    matrix = torch.tensor([[1.0, 0.2, 0.0], [-0.5, 2.0, 0.3]], dtype=torch.float64)
    aggregator = GramianWeightedAggregator(GramianWeighting(factory(differentiable=True)))
    assert torch.autograd.gradcheck(lambda x: aggregator(x), (matrix.requires_grad_(),))
    gramian = matrix @ matrix.T
    assert not factory().update(gramian, EmptyState())[0].requires_grad  # detached by default
    assert mgda(differentiable=True).update(gramian, EmptyState())[0].requires_grad


# --- 5. nn.Modules --------------------------------------------------------------------------------


def test_forward_hooks_run_as_in_torchjd() -> None:
    seen: list[Tensor] = []
    mine, reference = UPGrad(), theirs.UPGrad()
    for module in (mine, reference, mine.gramian_weighting, reference.gramian_weighting):
        assert isinstance(module, nn.Module)
        module.register_forward_hook(lambda _, args, output: seen.append(output))
    mine(J)
    reference(J)
    assert len(seen) == 4  # for each: the weights, then the aggregation
    torch.testing.assert_close(seen[0], seen[2])
    torch.testing.assert_close(seen[1], seen[3])


@pytest.mark.parametrize(
    "make",
    [lambda: GradVac(beta=0.3, seed=4), lambda: Random(seed=4), lambda: PCGrad(seed=4)],
    ids=["gradvac", "random", "pcgrad"],
)
def test_state_dict_resumes_a_run_in_a_new_object(make: Callable[[], Aggregator]) -> None:
    matrices = _matrices(8, m=4)
    uninterrupted = make()
    expected = [uninterrupted(matrix) for matrix in matrices]
    first = make()
    results = [first(matrix) for matrix in matrices[:4]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = make()
    resumed(matrices[0])  # a state of its own, replaced by the loaded one
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    results += [resumed(matrix) for matrix in matrices[4:]]
    for actual, reference in zip(results, expected, strict=True):
        assert torch.equal(actual, reference)


def test_a_loaded_state_is_checked() -> None:
    saved = GradVac(seed=0)
    saved(J)
    fresh = GradVac(seed=0)
    fresh.load_state_dict(saved.state_dict())
    with pytest.raises(ValueError, match=r"\[2, 2\].*expected \[3, 3\]"):
        fresh(SQUARE)
    with pytest.raises(ValueError, match="same class"):
        Random(seed=0).load_state_dict(saved.state_dict())


def test_double_moves_the_state_and_the_run_continues() -> None:
    matrices = _matrices(5)
    mine, reference = GradVac(seed=0), theirs.GradVac()
    for matrix in matrices[:2]:
        torch.testing.assert_close(mine(matrix.float()), reference(matrix.float()))
    mine.double()
    assert mine.state.targets.dtype == torch.float64
    # TorchJD's `.double()` converts its buffer, but a float64 input then resets it (its key is
    # (m, dtype)); the reference is TorchJD's algorithm continued from the converted targets.
    reference.double()
    reference.gramian_weighting._state_key = (2, torch.float64)
    for matrix in matrices[2:]:
        torch.testing.assert_close(mine(matrix), reference(matrix))


def test_to_moves_pref_vector_and_state() -> None:
    pref = torch.tensor([1.0, 2.0])
    aggregator = UPGrad(pref).to(DEVICE, torch.float64)
    assert aggregator.pref_vector.dtype == torch.float64  # type: ignore[union-attr]
    assert aggregator.pref_vector.device == DEVICE  # type: ignore[union-attr]
    expected = theirs.UPGrad(pref.double())(J)
    torch.testing.assert_close(aggregator(J.to(DEVICE)).cpu(), expected, rtol=1e-6, atol=1e-6)
    stateful = GradVac(seed=0)
    stateful(J.float())
    stateful.to(DEVICE)
    assert stateful.state.targets.device == DEVICE
    assert stateful.state.key.device == DEVICE


def test_repr_and_str_as_in_torchjd() -> None:
    pref = torch.tensor([1.0, 2.0])
    for ours_obj, theirs_obj in [
        (UPGrad(), theirs.UPGrad()),
        (UPGrad(pref), theirs.UPGrad(pref)),
        (DualProj(pref), theirs.DualProj(pref)),
        (MGDA(), theirs.MGDA()),
        (Mean(), theirs.Mean()),
        (Sum(), theirs.Sum()),
        (Random(), theirs.Random()),
        (PCGrad(), theirs.PCGrad()),
        (GradVac(), theirs.GradVac()),
        (Constant(torch.tensor([1.0, 0.5])), theirs.Constant(torch.tensor([1.0, 0.5]))),
    ]:
        assert str(ours_obj) == str(theirs_obj)
    same_repr: list[tuple[nn.Module, Any]] = [
        (Mean(), theirs.Mean()),
        (Sum(), theirs.Sum()),
        (Constant(torch.tensor([1.0, 0.5])), theirs.Constant(torch.tensor([1.0, 0.5]))),
        (MeanWeighting(), theirs.MeanWeighting()),
    ]
    for module, theirs_module in same_repr:
        assert repr(module) == repr(theirs_module)
    assert repr(GradVac(seed=1)) == "GradVac(beta=0.5, eps=1e-08, seed=1)"
    assert repr(UPGrad()) == "UPGrad(pref_vector=None, norm_eps=0.0001, reg_eps=0.0001)"
    assert repr(MGDA()) == "MGDA(epsilon=0.001, max_iters=100, reg_eps=1e-08)"
